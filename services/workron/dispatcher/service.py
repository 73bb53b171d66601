"""The dispatcher service: applies worker reports and dispatches due jobs.

Loops, supervised together:

- ``reports``: batches from the REPORTS stream's durable consumer, applied
  in one transaction each (``apply.py``), then acked in bulk. A ledger that
  is away gets the batch nak'ed with a delay, never terminated; a batch that
  fails otherwise is retried one report at a time so that one bad report is
  recorded as a dead letter instead of holding back the rest.
- ``scheduler``: dispatches pending jobs when due (``scheduler.py``); sleeps
  until the next one is due, at most ``idle_s``, woken early by retries
  decided here and by NOTIFY ``workron_pending`` (a trigger on ``jobs``).
- ``listen``: the LISTEN connection for those notifications.
- ``maintenance``: prunes inbox rows older than any redelivery could be.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections import deque
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from workron import bus, outbox
from workron._pull import Puller
from workron._service import supervise
from workron._wake import Listener, sleep
from workron.dispatcher import live, scheduler
from workron.dispatcher.apply import CONSUMER, BatchResult, Early, apply_batch, dead_letter
from workron.dispatcher.reports import Incoming
from workron.errors import LedgerUnavailableError
from workron.ledger import KeyedTransactions, Pool, prune_inbox
from workron.telemetry import Metrics

__all__ = ["CHANNEL", "Dispatcher", "Idle"]

log = logging.getLogger(__name__)

#: Batches settling (publishing, acking) at once, in order, while the next is applied.
_SETTLING = 2
# Retries while the ledger is away: 0.2 s doubling to 5 s, well inside AckWait.
_HOLD_FIRST_S = 0.2
_HOLD_MAX_S = 5.0

#: Channel notified when a job becomes pending (migration 0002).
CHANNEL = "workron_pending"


@dataclass(slots=True)
class _Applied:
    """What applying a batch of messages decided, to act on after commit."""

    #: The stream's messages applied, and the reports of each.
    msgs: Sequence[Msg]
    decoded: Sequence[Sequence[Incoming]]
    #: Each transaction's reports and what it decided (one, unless the batch
    #: was narrowed down to its reports).
    results: list[tuple[Sequence[Incoming], BatchResult]] = field(default_factory=list)
    #: Positions (among the batch's reports) recorded as dead letters.
    dead: set[int] = field(default_factory=set)
    #: The ledger went away while stopping: the messages go back to the stream.
    hand_back: bool = False
    #: Work messages published before their transaction committed, by message id.
    early: dict[str, outbox.Sending] = field(default_factory=dict)
    #: Stream messages whose reports live copies applied before: to ack.
    known: Sequence[Msg] = ()


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
        self._nak_delay_s = nak_delay_s
        self._inbox_keep_s = inbox_keep_s
        self._prune_every_s = prune_every_s
        self._prune_batch = prune_batch
        self._rng = rng
        self._stop = asyncio.Event()
        #: Set when a job may have become due: a retry decided here, or NOTIFY.
        self._pending = asyncio.Event()
        self.listener = Listener(pool, [CHANNEL], self._pending.set)
        self._sweeper = outbox.Sweeper(pool)
        #: The reports' transactions: one connection, each begun by the last.
        self._keyed = KeyedTransactions(pool)
        self._live = live.Recent()

    async def run(self) -> None:
        await supervise(
            self.name,
            {
                "listen": self.listener.run(self._stop),
                "reports": self._reports_loop(),
                "scheduler": self._scheduler_loop(),
                "maintenance": self._maintenance_loop(),
                "outbox": self._sweeper.run(self._stop),
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
        await self._sweeper.sweep()
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
                applied = await self._apply_messages(msgs)
                while len(settling) >= _SETTLING:
                    await settling.popleft()
                before = settling[-1] if settling else None
                settling.append(
                    asyncio.create_task(
                        self._finish(applied, after=before), name="workron.dispatcher.settle"
                    )
                )
        finally:
            await self._keyed.close()
            for task in settling:
                await task

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Apply one batch of report messages and settle them with the bus."""
        try:
            applied = await self._apply_messages(msgs)
        finally:
            await self._keyed.close()
        await self._finish(applied)

    async def _apply_messages(self, msgs: Sequence[Msg]) -> _Applied:
        batch = live.split(msgs, self._live)
        items = [item for reports in batch.decoded for item in reports]
        applied = await self._apply(items, batch.stream, batch.decoded, batch.live)
        applied.known = batch.known
        return applied

    async def _finish(self, applied: _Applied, *, after: asyncio.Task[None] | None = None) -> None:
        """Publish what the batch decided, then settle its messages; ``after``
        the batch before has."""
        if after is not None:
            await after
        sent = {m: bool((await outbox.confirm(s)).acked) for m, s in applied.early.items()}
        for items, result in applied.results:
            # Published before the acks: the work of released dependents is
            # the next hop of a DAG, and an ack can wait.
            self._sweeper.add([row for row, message in result.finished if sent.get(message.msg_id)])
            if rows := [row for row in result.finished if not sent.get(row[1].msg_id)]:
                published = await outbox.publish(self._js, rows)
                self._sweeper.add(published.acked)
            if result.observed.retried:
                self._pending.set()  # this process's scheduler; NOTIFY tells the others
            self._record(items, result)
        if applied.hand_back:
            await self._settle(applied.msgs, nak=True)
            await self._settle(applied.known)
            return
        # A message none of whose reports can ever apply (it does not decode,
        # or names no job) is terminated; any other is acked, its dead
        # letters recorded.
        term, first = set(), 0
        for index, reports in enumerate(applied.decoded):
            if all(p in applied.dead for p in range(first, first + len(reports))):
                term.add(index)
            first += len(reports)
        await self._settle([*applied.msgs, *applied.known], term=term)

    async def _apply(
        self,
        items: Sequence[Incoming],
        msgs: Sequence[Msg],
        decoded: Sequence[Sequence[Incoming]] = (),
        copies: Sequence[Incoming] = (),
    ) -> _Applied:
        """Apply ``items``: what they decided, and the positions of those
        recorded as dead letters; or ``hand_back`` to nak ``msgs``. Live
        ``copies`` of reports go first, on a first try only."""
        applied = _Applied(msgs, decoded)
        delay = _HOLD_FIRST_S
        resolve = True
        early = functools.partial(self._early, applied)
        if (copies and await self._apply_with_copies(applied, copies, items, early)) or not items:
            return applied
        while True:
            try:
                result = await apply_batch(
                    self._keyed, items, self._rng, resolve=resolve, early=early
                )
                break
            except LedgerUnavailableError as exc:
                if self._stop.is_set():
                    applied.hand_back = True  # leaving while the ledger is away
                    return applied
                # Hold the batch rather than nak it: every nak spends one of
                # the consumer's MaxDeliver deliveries, and an outage longer
                # than those would drop outcomes. in_progress renews AckWait
                # without spending one.
                log.warning(
                    "ledger unavailable; holding the batch",
                    extra={"action": "dispatcher.hold", "error": str(exc), "messages": len(msgs)},
                )
                await self._settle(msgs, in_progress=True)
                await sleep(delay, self._stop)
                delay = min(delay * 2, _HOLD_MAX_S)
            except Exception as exc:  # any other failure is narrowed down to its report
                if resolve:
                    # Record the outcomes without resolving their dependents
                    # here: the resolver does that from their job.finished.
                    log.warning(
                        "batch failed; applying it again without resolving dependents",
                        extra={"action": "dispatcher.resolve", "reports": len(items)},
                        exc_info=True,
                    )
                    resolve = False
                    continue
                if len(items) == 1:
                    applied.hand_back = not await self._reject(items[0], exc)
                    applied.dead = {0}
                    return applied
                log.warning(
                    "batch failed; applying its reports one by one",
                    extra={"action": "dispatcher.isolate", "reports": len(items)},
                    exc_info=True,
                )
                for position, item in enumerate(items):
                    alone = await self._apply([item], msgs)
                    applied.results += alone.results
                    applied.early.update(alone.early)
                    if alone.hand_back:
                        applied.hand_back = True
                        return applied
                    if alone.dead:
                        applied.dead.add(position)
                return applied
        applied.results.append((items, result))
        applied.dead = {position for position, _ in result.poison}
        return applied

    async def _apply_with_copies(
        self,
        applied: _Applied,
        copies: Sequence[Incoming],
        items: Sequence[Incoming],
        early: Early,
    ) -> bool:
        """Apply live copies of reports with ``items``; False if that failed."""
        both = [*copies, *items]
        try:
            result = await apply_batch(self._keyed, both, self._rng, early=early)
        except Exception:  # the originals will do: the stream's messages alone, as usual
            log.info("batch with live copies failed", extra={"action": "dispatcher.live"})
            return False
        self._live.add(item.msg_id for item in copies if item.msg_id is not None)
        applied.results.append((both, result))
        applied.dead = {p - len(copies) for p, _ in result.poison if p >= len(copies)}
        return True

    async def _early(self, applied: _Applied, message: outbox.Message) -> None:
        """Publish a work message before its transaction commits (``apply.Early``)."""
        applied.early[message.msg_id] = await outbox.start(self._js, [(0, message)])
        # One turn of the loop: the client's flusher writes the message now,
        # not after the ledger statement is built and sent.
        await asyncio.sleep(0)

    async def _reject(self, item: Incoming, exc: Exception) -> bool:
        """A report that cannot be applied on its own: recorded as a dead
        letter. False when that failed too (the message goes back)."""
        log.error(
            "report cannot be applied",
            extra={"action": "dispatcher.dead_letter", "msg_id": item.msg_id},
            exc_info=exc,
        )
        try:
            await dead_letter(self._pool, item, f"cannot be applied: {exc!r}")
        except Exception:  # recording failed too: let JetStream bring it back
            log.warning("dead letter not recorded", extra={"action": "dispatcher.nak"})
            return False
        self._metrics.dead_letters.labels(source="reports").inc()
        return True

    async def _settle(
        self,
        msgs: Sequence[Msg],
        *,
        term: Container[int] = (),
        nak: bool = False,
        in_progress: bool = False,
    ) -> None:
        """Ack ``msgs`` (or nak them all, renew them all, or term those at positions ``term``).

        Pipelined, then one flush. Not ``ack_sync``: the server spends about
        0.15 ms on each ack of a work-queue stream that syncs every write, and
        waiting for that halves the throughput. A lost ack costs only a
        redelivery, which the inbox recognises.
        """
        if not msgs:
            return
        try:
            for position, msg in enumerate(msgs):
                if in_progress:
                    await msg.in_progress()
                elif nak:
                    await msg.nak(delay=self._nak_delay_s)
                elif position in term:
                    await msg.term()
                else:
                    await msg.ack()
            await self._nc.flush()
        except NatsError as exc:
            log.warning(
                "settling messages failed", extra={"action": "dispatcher.ack", "error": str(exc)}
            )

    def _record(self, items: Sequence[Incoming], result: BatchResult) -> None:
        metrics, observed = self._metrics, result.observed
        metrics.batch_size.labels(stage="reports").observe(len(items))
        for queue, outcome in observed.completed:
            metrics.completed.labels(queue=queue, outcome=outcome).inc()
        for queue in observed.retried:
            metrics.retried.labels(queue=queue).inc()
        for queue, seconds in observed.queue_wait:
            metrics.queue_wait.labels(queue=queue).observe(seconds)
        for queue, outcome, seconds in observed.run_time:
            metrics.run_time.labels(queue=queue, outcome=outcome).observe(seconds)
        for _, queue in result.dependents.released:
            metrics.resolver_released.labels(queue=queue).inc()
        for _, queue in result.dependents.cancelled:
            metrics.resolver_cancelled.labels(queue=queue).inc()
        for reason, job_id in observed.fenced:
            metrics.fenced.labels(reason=reason).inc()
            log.info(
                "report fenced",
                extra={"action": "dispatcher.fenced", "job_id": str(job_id), "reason": reason},
            )
        if result.poison:
            metrics.dead_letters.labels(source="reports").inc(len(result.poison))
            for position, reason in result.poison:
                report = items[position].report
                log.warning(
                    "report dead-lettered",
                    extra={
                        "action": "dispatcher.dead_letter",
                        "msg_id": items[position].msg_id,
                        "job_id": str(report.job_id) if report else None,
                        "error": reason,
                    },
                )

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
