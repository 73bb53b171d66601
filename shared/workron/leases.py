"""Leader leases in the ledger: one holder per role, judged by the database clock.

A service that must run as a singleton (the reaper; cron) acquires the
lease of its role, renews it well within its TTL, and does its duties only
while it holds it. A standby acquires it once it expires: after its holder
died, at most ``ttl_s`` plus one renewal period later; after a graceful
``release()``, at its next attempt.

Each holding has an epoch, one more than the last. The epoch fences the
leader's own writes: every leader transaction begins with ``hold()``, which
checks the holder and epoch are still current and locks the lease row FOR
SHARE, so no takeover can commit while that transaction runs. A deposed
leader's transaction is refused with ``LeadershipLostError``.

Locally the leader counts its lease from the moment it *sent* the last
successful renewal, minus a margin, on its monotonic clock: when that runs
out it stops its non-ledger duties too, before a standby can take over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from workron.errors import WorkronError
from workron.ledger import Connection, Pool, ledger_errors, queries

__all__ = ["LeaderLease", "LeadershipLostError", "holder_id"]

log = logging.getLogger(__name__)


class LeadershipLostError(WorkronError):
    """This process no longer holds the lease it acted under."""

    code = "not_leader"


def holder_id() -> str:
    """Unique per process run: a restarted leader never passes for its old self."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class LeaderLease:
    """The lease ``name`` as held (or not) by ``holder``."""

    def __init__(
        self,
        pool: Pool,
        name: str,
        *,
        holder: str | None = None,
        ttl_s: float = 5.0,
        margin_s: float | None = None,
    ) -> None:
        self._pool = pool
        self.name = name
        self.holder = holder or holder_id()
        self.ttl_s = ttl_s
        # Clock rates differ a little; a tenth of the TTL covers that and a
        # slow reply.
        self._margin_s = ttl_s / 10 if margin_s is None else margin_s
        #: The current holding's epoch; None when not leading.
        self.epoch: int | None = None
        self._valid_until = 0.0

    @property
    def leading(self) -> bool:
        """True while the lease is surely ours (by the local clock)."""
        return self.epoch is not None and asyncio.get_running_loop().time() < self._valid_until

    async def acquire(self) -> bool:
        """Take the lease if it is free or expired; True when this holder now leads."""
        sent = asyncio.get_running_loop().time()
        async with ledger_errors():
            epoch: int | None = await self._pool.fetchval(
                queries()["lease_acquire"], self.name, self.holder, self.ttl_s
            )
        if epoch is None:
            return False
        self.epoch = epoch
        self._valid_until = sent + self.ttl_s - self._margin_s
        log.info(
            "leadership acquired",
            extra={"action": "lease.acquire", "lease": self.name, "epoch": epoch},
        )
        return True

    async def renew(self) -> bool:
        """Extend the holding; False (and no longer leading) when it was lost.

        Raises LedgerUnavailableError when the ledger cannot say: the local
        deadline then decides how long this process goes on leading.
        """
        if self.epoch is None:
            return False
        sent = asyncio.get_running_loop().time()
        async with ledger_errors():
            renewed = await self._pool.fetchval(
                queries()["lease_renew"], self.name, self.holder, self.epoch, self.ttl_s
            )
        if renewed is None:
            self.lose("renewal refused")
            return False
        self._valid_until = sent + self.ttl_s - self._margin_s
        return True

    async def release(self) -> None:
        """Give the lease up now (graceful stop), so a standby need not wait out the TTL."""
        epoch, self.epoch = self.epoch, None
        if epoch is None:
            return
        async with ledger_errors():
            await self._pool.execute(queries()["lease_release"], self.name, self.holder, epoch)
        log.info("leadership released", extra={"action": "lease.release", "lease": self.name})

    def lose(self, why: str) -> None:
        if self.epoch is not None:
            log.warning(
                "leadership lost",
                extra={"action": "lease.lost", "lease": self.name, "epoch": self.epoch, "why": why},
            )
        self.epoch = None

    async def hold(self, conn: Connection, epoch: int | None = None) -> None:
        """In the caller's transaction: prove the holding (``epoch``, default the
        current one) is current, and keep it so until commit."""
        epoch = self.epoch if epoch is None else epoch
        if epoch is None:
            raise LeadershipLostError(f"not the holder of lease {self.name!r}")
        async with ledger_errors():
            held = await conn.fetchval(queries()["lease_hold"], self.name, self.holder, epoch)
        if held is None:
            if epoch == self.epoch:
                self.lose("epoch no longer current")
            raise LeadershipLostError(f"lease {self.name!r} epoch {epoch} is no longer current")

    @asynccontextmanager
    async def transaction(self, epoch: int | None = None) -> AsyncIterator[Connection]:
        """A ledger transaction that commits only under this holding."""
        async with ledger_errors(), self._pool.acquire() as conn, conn.transaction():
            await self.hold(conn, epoch)
            yield conn
