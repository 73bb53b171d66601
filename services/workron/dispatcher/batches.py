"""What the dispatcher does with each batch of report messages.

The ``reports`` loop (``service.py``) pulls the batches; here each one is
applied in one transaction (``apply.py``), live copies of reports first
(``live.py``). A ledger that is away gets the batch held, never terminated;
a batch that fails otherwise is applied again without resolving dependents,
then one report at a time, so that one bad report is recorded as a dead
letter instead of holding back the rest. Once applied, a batch's work and
events are published and its messages acked, nak'ed or terminated.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from workron import outbox
from workron._wake import sleep
from workron.dispatcher import live
from workron.dispatcher.apply import BatchResult, Early, apply_batch, dead_letter
from workron.dispatcher.reports import Incoming
from workron.errors import LedgerUnavailableError
from workron.ledger import KeyedTransactions, Pool
from workron.telemetry import Metrics

__all__ = ["Applied", "Batches"]

log = logging.getLogger(__name__)

# Retries while the ledger is away: 0.2 s doubling to 5 s, well inside AckWait.
_HOLD_FIRST_S = 0.2
_HOLD_MAX_S = 5.0


@dataclass(slots=True)
class Applied:
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


class Batches:
    """Apply batches of report messages to the ledger, then settle them with the bus."""

    def __init__(
        self,
        pool: Pool,
        nc: NATS,
        metrics: Metrics,
        *,
        stop: asyncio.Event,
        wake: Callable[[], None],
        nak_delay_s: float,
        rng: random.Random | None,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._js = nc.jetstream()
        self._metrics = metrics
        #: Set when the service stops: a batch the ledger cannot take goes back.
        self._stop = stop
        #: Called when a report decided a retry: a job may have become due.
        self._wake = wake
        self._nak_delay_s = nak_delay_s
        self._rng = rng
        #: Deletes the outbox rows of what was published here.
        self.sweeper = outbox.Sweeper(pool)
        #: The batches' transactions: one connection, each begun by the last.
        self._keyed = KeyedTransactions(pool)
        self._live = live.Recent()

    async def close(self) -> None:
        """End the transaction begun for the next batch."""
        await self._keyed.close()

    async def apply(self, msgs: Sequence[Msg]) -> Applied:
        """Apply a batch of the stream's messages and live copies (``finish`` settles it)."""
        batch = live.split(msgs, self._live)
        items = [item for reports in batch.decoded for item in reports]
        applied = await self._apply(items, batch.stream, batch.decoded, batch.live)
        applied.known = batch.known
        return applied

    async def finish(self, applied: Applied, *, after: asyncio.Task[None] | None = None) -> None:
        """Publish what the batch decided, then settle its messages; ``after``
        the batch before has."""
        if after is not None:
            await after
        sent = {m: bool((await outbox.confirm(s)).acked) for m, s in applied.early.items()}
        for items, result in applied.results:
            # Published before the acks: the work of released dependents is
            # the next hop of a DAG, and an ack can wait.
            self.sweeper.add([row for row, message in result.finished if sent.get(message.msg_id)])
            if rows := [row for row in result.finished if not sent.get(row[1].msg_id)]:
                published = await outbox.publish(self._js, rows)
                self.sweeper.add(published.acked)
            if result.observed.retried:
                self._wake()  # this process's scheduler; NOTIFY tells the others
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
    ) -> Applied:
        """Apply ``items``: what they decided, and the positions of those
        recorded as dead letters; or ``hand_back`` to nak ``msgs``. Live
        ``copies`` of reports go first, on a first try only."""
        applied = Applied(msgs, decoded)
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
        applied: Applied,
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

    async def _early(self, applied: Applied, message: outbox.Message) -> None:
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
