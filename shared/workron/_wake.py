"""Waking sleeping loops: LISTEN/NOTIFY on a dedicated ledger connection,
and sleeps that end early when an event is set.

A notification is only a hint that work may be waiting. Every loop woken
this way also polls, so a lost notification (the connection dropped, the
listener was re-establishing) costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from workron.errors import LedgerUnavailableError
from workron.ledger import Connection, Pool, ledger_errors

__all__ = ["Listener", "sleep"]

log = logging.getLogger(__name__)


async def sleep(timeout: float, *events: asyncio.Event) -> None:
    """Sleep ``timeout`` seconds, or less if one of ``events`` is set."""
    if timeout <= 0 or any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        # Let the cancellations run so no task outlives this call.
        await asyncio.gather(*waiters, return_exceptions=True)


class Listener:
    """LISTEN on ``channels`` and call ``wake`` on each notification.

    The connection is taken from the pool for as long as ``run`` runs and is
    replaced when it drops. ``wake`` is also called after every (re)connect:
    notifications sent while nobody listened are gone.
    """

    def __init__(
        self,
        pool: Pool,
        channels: Sequence[str],
        wake: Callable[[], None],
        *,
        ping_s: float = 10.0,
    ) -> None:
        self._pool = pool
        self._channels = tuple(channels)
        self._wake = wake
        self._ping_s = ping_s
        #: Set while listening (tests wait on it before relying on NOTIFY).
        self.ready = asyncio.Event()
        #: Backend pid of the listening connection, while there is one.
        self.server_pid: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self._listen(stop)
                failures = 0
            except LedgerUnavailableError as exc:
                failures += 1
                log.warning(
                    "listener connection lost",
                    extra={"action": "ledger.listen.lost", "error": str(exc)},
                )
            finally:
                self.ready.clear()
                self.server_pid = None
            # Back off while the ledger is away, capped so recovery is quick.
            await sleep(min(5.0, 0.05 * 2**failures) if failures else 0.0, stop)

    def _notified(self, *_: object) -> None:
        self._wake()

    async def _listen(self, stop: asyncio.Event) -> None:
        async with ledger_errors():
            conn: Connection = await self._pool.acquire()
        lost = asyncio.Event()

        def on_terminate(_: object) -> None:
            lost.set()

        try:
            async with ledger_errors():
                conn.add_termination_listener(on_terminate)
                for channel in self._channels:
                    await conn.add_listener(channel, self._notified)
                self.server_pid = conn.get_server_pid()
            self.ready.set()
            log.debug("listening", extra={"action": "ledger.listen", "channels": self._channels})
            self._wake()
            while not stop.is_set():
                await sleep(self._ping_s, stop, lost)
                if lost.is_set():
                    raise LedgerUnavailableError("listener connection closed")
                if not stop.is_set():
                    # A silently dead TCP connection raises no termination
                    # callback; a ping finds it.
                    await self._ping(conn)
        finally:
            await self._release(conn, on_terminate)

    @staticmethod
    async def _ping(conn: Connection) -> None:
        try:
            async with ledger_errors():
                await conn.fetchval("SELECT 1", timeout=5.0)
        except TimeoutError as exc:
            raise LedgerUnavailableError("listener connection does not answer") from exc

    async def _release(self, conn: Connection, on_terminate: Callable[[object], None]) -> None:
        # The pool replaces a closed connection. One that died mid-call may
        # have been taken back by the pool already and refuses every call:
        # then nothing is left to do.
        try:
            async with ledger_errors():
                conn.remove_termination_listener(on_terminate)
                if not conn.is_closed():
                    for channel in self._channels:
                        await conn.remove_listener(channel, self._notified)
                await self._pool.release(conn)
        except LedgerUnavailableError:
            log.debug("listener release failed", extra={"action": "ledger.listen"}, exc_info=True)
