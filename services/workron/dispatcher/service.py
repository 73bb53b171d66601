"""The dispatcher service: applies worker reports and dispatches due jobs.

Loops, supervised together:

- ``reports``: batches from the REPORTS stream's durable consumer and live
  copies of reports, each applied in one transaction and then settled with
  the bus (``batches.py``), the next pulled while one is applied.
- ``scheduler``: dispatches pending jobs when due (``scheduler.py``); sleeps
  until the next one is due, at most ``idle_s``, woken early by retries
  decided here and by NOTIFY ``workron_pending`` (a trigger on ``jobs``).
- ``listen``: the LISTEN connection for those notifications.
- ``maintenance``: prunes inbox rows older than any redelivery could be.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from workron import bus
from workron._pull import Puller
from workron._service import supervise
from workron._wake import Listener, sleep
from workron.dispatcher import scheduler
from workron.dispatcher.apply import CONSUMER
from workron.dispatcher.batches import Batches
from workron.errors import LedgerUnavailableError
from workron.ledger import Pool, prune_inbox
from workron.telemetry import Metrics

__all__ = ["CHANNEL", "Dispatcher", "Idle"]

log = logging.getLogger(__name__)

#: Batches settling (publishing, acking) at once, in order, while the next is applied.
_SETTLING = 2

#: Channel notified when a job becomes pending (migration 0002).
CHANNEL = "workron_pending"


@dataclass(frozen=True, slots=True)
class Idle:
    """What one ``run_until_idle`` did."""

    reports: int
    dispatched: int


class Dispatcher:
    """Apply worker reports to the ledger and dispatch pending jobs when due."""

    name = "dispatcher"

    def __init__(
        self,
        pool: Pool,
        nc: NATS,
        metrics: Metrics,
        *,
        batch: int = 1000,
        dispatch_batch: int = 1000,
        fetch_wait_s: float = 1.0,
        idle_s: float = 1.0,
        nak_delay_s: float = 2.0,
        inbox_keep_s: float = 3600.0,
        prune_every_s: float = 60.0,
        prune_batch: int = 10000,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._js = nc.jetstream()
        self._metrics = metrics
        self._batch = batch
        self._dispatch_batch = dispatch_batch
        self._fetch_wait_s = fetch_wait_s
        self._idle_s = idle_s
        self._inbox_keep_s = inbox_keep_s
        self._prune_every_s = prune_every_s
        self._prune_batch = prune_batch
        self._stop = asyncio.Event()
        #: Set when a job may have become due: a retry decided here, or NOTIFY.
        self._pending = asyncio.Event()
        self.listener = Listener(pool, [CHANNEL], self._pending.set)
        self._batches = Batches(
            pool,
            nc,
            metrics,
            stop=self._stop,
            wake=self._pending.set,
            nak_delay_s=nak_delay_s,
            rng=rng,
        )

    async def run(self) -> None:
        await supervise(
            self.name,
            {
                "listen": self.listener.run(self._stop),
                "reports": self._reports_loop(),
                "scheduler": self._scheduler_loop(),
                "maintenance": self._maintenance_loop(),
                "outbox": self._batches.sweeper.run(self._stop),
            },
            self._stop,
        )

    def stop(self) -> None:
        self._stop.set()
        self._pending.set()

    async def run_until_idle(self) -> Idle:
        """Apply every report waiting now, then dispatch every job due now."""
        reports = 0
        async with Puller(self._nc, "REPORTS", CONSUMER) as puller:
            while msgs := await puller.fetch(self._batch, wait=0):
                await self.handle(msgs)
                reports += len(msgs)
        await self._batches.sweeper.sweep()
        return Idle(reports, await self.dispatch_due())

    # -- reports -----------------------------------------------------------

    async def _reports_loop(self) -> None:
        while not self._stop.is_set():
            try:
                async with Puller(self._nc, "REPORTS", CONSUMER) as puller:

                    async def copy(msg: Msg) -> None:
                        puller.put(msg)

                    sub = await self._nc.subscribe(
                        bus.LIVE_REPORTS, queue=bus.DISPATCHER_QUEUE_GROUP, cb=copy
                    )
                    try:
                        await self._pull_reports(puller)
                    finally:
                        with contextlib.suppress(NatsError):
                            await sub.unsubscribe()
            except NatsError as exc:
                log.warning(
                    "bus unavailable", extra={"action": "dispatcher.bus", "error": str(exc)}
                )
                await sleep(1.0, self._stop)

    async def _pull_reports(self, puller: Puller) -> None:
        """Apply batch after batch; each settles while the next is pulled.

        The next pull request goes out as soon as a batch arrives: a DAG's
        next report, sent by a worker that may have run the work published
        before this batch commits, is then delivered while the batch is
        applied. Live copies of reports (``live.py``) join the batches.

        Batches settle in order, each after the one before; at most
        ``_SETTLING`` are on their way, so a batch's PubAcks and acks hold
        back neither the next batch nor the one after.
        """
        settling: deque[asyncio.Task[None]] = deque()
        try:
            while not self._stop.is_set():
                msgs = await puller.fetch(self._batch, self._fetch_wait_s)
                if not msgs:
                    continue
                # The next reports gather while this batch is applied.
                await puller.ask(self._batch, self._fetch_wait_s)
                applied = await self._batches.apply(msgs)
                while len(settling) >= _SETTLING:
                    await settling.popleft()
                before = settling[-1] if settling else None
                settling.append(
                    asyncio.create_task(
                        self._batches.finish(applied, after=before),
                        name="workron.dispatcher.settle",
                    )
                )
        finally:
            await self._batches.close()
            for task in settling:
                await task

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Apply one batch of report messages and settle them with the bus."""
        try:
            applied = await self._batches.apply(msgs)
        finally:
            await self._batches.close()
        await self._batches.finish(applied)

    # -- scheduler ---------------------------------------------------------

    async def dispatch_due(self) -> int:
        """Dispatch every job due now, batch after batch."""
        total = 0
        while True:
            taken = await scheduler.dispatch_due(
                self._pool, self._js, self._metrics, self._dispatch_batch
            )
            total += taken
            if taken < self._dispatch_batch or self._stop.is_set():
                return total

    async def _scheduler_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            # Cleared first: a wake-up during this round starts another one.
            self._pending.clear()
            try:
                await self.dispatch_due()
                due_in = await scheduler.next_due(self._pool)
                failures = 0
            except LedgerUnavailableError as exc:
                failures += 1
                due_in = min(5.0, 0.1 * 2**failures)
                log.warning(
                    "ledger unavailable",
                    extra={"action": "dispatcher.unavailable", "error": str(exc)},
                )
            # Overdue yet not taken: another dispatcher holds those rows. Look
            # again shortly rather than spin on them.
            delay = self._idle_s if due_in is None else min(self._idle_s, max(due_in, 0.02))
            await sleep(delay, self._pending, self._stop)

    # -- maintenance -------------------------------------------------------

    async def prune_inbox(self) -> int:
        """Delete this consumer's old inbox rows (``inbox_keep_s``), in bounded batches."""
        return await prune_inbox(
            self._pool,
            CONSUMER,
            keep_s=self._inbox_keep_s,
            batch=self._prune_batch,
            stop=self._stop.is_set,
        )

    async def _maintenance_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pruned = await self.prune_inbox()
                if pruned:
                    log.info("inbox pruned", extra={"action": "dispatcher.prune", "rows": pruned})
            except LedgerUnavailableError as exc:
                log.warning("prune failed", extra={"action": "dispatcher.prune", "error": str(exc)})
            await sleep(self._prune_every_s, self._stop)
