"""The resolver service: releases the dependents of finished jobs, cascades failures.

Loops, supervised together:

- ``events``: batches of ``job.finished`` from the ``resolver`` durable
  consumer on EVENTS; each batch is one transaction: inbox rows first (a
  redelivered event is skipped), then ``_resolve.apply`` (release what is
  satisfied, cancel what is doomed, outbox rows for both), then a bulk ack
  and the outbox rows published by this process right after commit.
- ``maintenance``: prunes old inbox rows, and sweeps the ledger for
  finished jobs whose edges are still open though their event is long past
  (aged out of the stream, or given up on after MaxDeliver): the bus is
  transport, the ledger decides.

Several resolvers may run at once: they share the durable consumer, and
``_resolve.apply`` locks dependents in id order before writing.

The dispatcher resolves the dependents of the jobs whose reports it applies
in that same transaction and says so in their events (``resolved``); the
resolver acks those without a transaction. The resolver is what acts on outcomes
recorded anywhere else (a cancel request, the reaper, a DAG cancel), and
the backstop should that fast path fail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container, Sequence
from dataclasses import dataclass
from uuid import UUID

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from workron import _resolve, outbox
from workron._pull import Puller
from workron._service import supervise
from workron._wake import sleep
from workron.errors import LedgerUnavailableError
from workron.events import Finished, JobFinished, finished_jobs
from workron.jobs import finished_id
from workron.ledger import Pool, ledger_errors, prune_inbox, queries
from workron.telemetry import Metrics

__all__ = ["CONSUMER", "Resolver"]

log = logging.getLogger(__name__)

#: Durable consumer on EVENTS (declared in ``workron.bus``) and its inbox name.
CONSUMER = _resolve.INBOX
_STREAM = "EVENTS"
_decode = msgspec.json.Decoder(Finished)


@dataclass(frozen=True, slots=True)
class _Item:
    msg_id: str | None
    event: JobFinished | None
    data: bytes
    error: str | None = None


def _items(msg: Msg) -> list[_Item]:
    """The events of one message: one, or each of a ``JobsFinished``."""
    header = msg.headers.get("Nats-Msg-Id") if msg.headers else None
    try:
        decoded = _decode.decode(msg.data)
    except msgspec.DecodeError as exc:
        return [_Item(header, None, msg.data, f"undecodable job.finished: {exc}")]
    # Each with the id the outbox gives it alone (jobs.finished_id): one per attempt.
    found = finished_jobs(decoded)
    if len(found) == 1 and header:
        return [_Item(header, found[0], msg.data)]
    return [_Item(finished_id(e.job_id, e.attempt), e, msg.data) for e in found]


class Resolver:
    """Apply ``job.finished`` events to the jobs that depend on them."""

    name = "resolver"

    def __init__(
        self,
        pool: Pool,
        nc: NATS,
        metrics: Metrics,
        *,
        batch: int = 1000,
        fetch_wait_s: float = 1.0,
        nak_delay_s: float = 2.0,
        inbox_keep_s: float = 3600.0,
        maintain_every_s: float = 30.0,
        sweep_after_s: float = 120.0,
        sweep_batch: int = 1000,
        prune_batch: int = 10000,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._js = nc.jetstream()
        self._metrics = metrics
        self._batch = batch
        self._fetch_wait_s = fetch_wait_s
        self._nak_delay_s = nak_delay_s
        self._inbox_keep_s = inbox_keep_s
        self._maintain_every_s = maintain_every_s
        self._sweep_after_s = sweep_after_s
        self._sweep_batch = sweep_batch
        self._prune_batch = prune_batch
        self._stop = asyncio.Event()
        self._sweeper = outbox.Sweeper(pool)

    async def run(self) -> None:
        await supervise(
            self.name,
            {
                "events": self._events_loop(),
                "maintenance": self._maintenance_loop(),
                "outbox": self._sweeper.run(self._stop),
            },
            self._stop,
        )

    def stop(self) -> None:
        self._stop.set()

    async def run_until_idle(self) -> int:
        """Apply every event waiting now; returns how many events were handled
        (a ``JobsFinished`` message counts each of its events)."""
        handled = 0
        async with Puller(self._nc, _STREAM, CONSUMER) as puller:
            while msgs := await puller.fetch(self._batch, wait=0):
                await self.handle(msgs)
                handled += sum(len(_items(m)) for m in msgs)
        await self._sweeper.sweep()
        return handled

    async def _events_loop(self) -> None:
        while not self._stop.is_set():
            try:
                async with Puller(self._nc, _STREAM, CONSUMER) as puller:
                    while not self._stop.is_set():
                        msgs = await puller.fetch(self._batch, self._fetch_wait_s)
                        if msgs:
                            # The next batch gathers while this one is handled.
                            await puller.ask(self._batch, self._fetch_wait_s)
                            await self.handle(msgs)
            except NatsError as exc:
                log.warning("bus unavailable", extra={"action": "resolver.bus", "error": str(exc)})
                await sleep(1.0, self._stop)

    # -- one batch ---------------------------------------------------------

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Apply one batch of events and settle it with the bus."""
        decoded = [_items(m) for m in msgs]
        items = [item for events in decoded for item in events]
        # Only a message that does not decode is poison, and it is one item.
        poison = [i for i, events in enumerate(decoded) if events[0].event is None]
        try:
            applied = await self._apply(items)
        except LedgerUnavailableError as exc:
            log.warning(
                "ledger unavailable; batch nak'ed",
                extra={"action": "resolver.nak", "error": str(exc), "messages": len(msgs)},
            )
            await self._settle(msgs, nak=True)
            return
        except Exception:  # narrowed down to the event, which is retried later
            if len(msgs) > 1:
                log.warning(
                    "batch failed; applying its events one by one",
                    extra={"action": "resolver.isolate", "messages": len(msgs)},
                    exc_info=True,
                )
                for msg in msgs:
                    await self.handle([msg])
                return
            # A lock conflict or a bug: redelivery retries it, and the sweep
            # applies it from the ledger should the bus give up.
            log.error(
                "event cannot be applied; retrying later",
                extra={"action": "resolver.retry", "msg_id": items[0].msg_id},
                exc_info=True,
            )
            await self._settle(msgs, nak=True)
            return
        if applied.rows:  # released work first: the acks can wait
            published = await outbox.publish(self._js, applied.rows)
            self._sweeper.add(published.acked)
        await self._settle(msgs, term=set(poison))
        self._record(applied, len(items), [decoded[i][0] for i in poison])

    async def _apply(self, items: Sequence[_Item]) -> _Batch:
        # Events whose dependents were resolved where they were recorded
        # need no transaction: usually every event of the batch.
        items = [item for item in items if item.event is None or not item.event.resolved]
        if not items:
            return _Batch(_resolve.Applied(), [], 0)
        async with ledger_errors(), self._pool.acquire() as conn, conn.transaction():
            poison = [item for item in items if item.event is None]
            if poison:
                await conn.execute(
                    queries()["dead_letter_insert"],
                    [CONSUMER] * len(poison),
                    ["workron.evt.job.finished"] * len(poison),
                    [item.msg_id for item in poison],
                    [item.error or "" for item in poison],
                    [item.data for item in poison],
                )
            # Sorted: resolvers inserting overlapping ids take the index
            # entries in one order.
            ids = sorted({item.msg_id for item in items if item.event and item.msg_id})
            fresh = {
                r["msg_id"]
                for r in await conn.fetch(queries()["resolver_inbox_insert"], CONSUMER, ids)
            }
            outcomes: dict[UUID, bool] = {}
            for item in items:
                if item.event is not None and item.msg_id in fresh:
                    outcomes[item.event.job_id] = item.event.state == "succeeded"
            if outcomes and all(outcomes.values()):
                # Successes only, the common case: no failure to cascade.
                # Their edges are settled once: by the dispatcher that
                # recorded them, which finished first, or here.
                applied = await _resolve.release_succeeded(conn, list(outcomes))
            else:
                applied = await _resolve.apply(conn, outcomes)
            rows = await outbox.insert(conn, applied.messages, own=True)
        return _Batch(applied, list(zip(rows, applied.messages, strict=True)), len(fresh))

    async def _settle(
        self, msgs: Sequence[Msg], *, term: Container[int] = (), nak: bool = False
    ) -> None:
        """Ack (or nak, or term ``term``) pipelined, then one flush: a lost ack
        costs only a redelivery, which the inbox recognises."""
        try:
            for position, msg in enumerate(msgs):
                if nak:
                    await msg.nak(delay=self._nak_delay_s)
                elif position in term:
                    await msg.term()
                else:
                    await msg.ack()
            await self._nc.flush()
        except NatsError as exc:
            log.warning("settling failed", extra={"action": "resolver.ack", "error": str(exc)})

    def _record(self, batch: _Batch, size: int, poison: Sequence[_Item]) -> None:
        self._metrics.batch_size.labels(stage="resolver").observe(size)
        for job_id, queue in batch.applied.released:
            self._metrics.resolver_released.labels(queue=queue).inc()
            log.debug("job released", extra={"action": "resolver.release", "job_id": str(job_id)})
        for job_id, queue in batch.applied.cancelled:
            self._metrics.resolver_cancelled.labels(queue=queue).inc()
            log.info(
                "job cancelled: upstream failed",
                extra={"action": "resolver.cancel", "job_id": str(job_id)},
            )
        if poison:
            self._metrics.dead_letters.labels(source=CONSUMER).inc(len(poison))
            for item in poison:
                log.warning(
                    "event dead-lettered",
                    extra={"action": "resolver.dead_letter", "msg_id": item.msg_id,
                           "error": item.error},
                )  # fmt: skip

    # -- maintenance -------------------------------------------------------

    async def sweep(self) -> int:
        """Apply finished jobs whose edges are still open long after they finished."""
        total = 0
        while not self._stop.is_set():
            async with ledger_errors(), self._pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    queries()["resolver_stranded"], self._sweep_after_s, self._sweep_batch
                )
                if not rows:
                    return total
                outcomes = {r["id"]: r["state"] == "succeeded" for r in rows}
                applied = await _resolve.apply(conn, outcomes)
                ids = await outbox.insert(conn, applied.messages, own=True)
            log.warning(
                "applied finished jobs the bus never delivered",
                extra={"action": "resolver.sweep", "jobs": len(rows)},
            )
            await outbox.publish_own(
                self._pool, self._js, list(zip(ids, applied.messages, strict=True))
            )
            self._record(_Batch(applied, [], len(rows)), len(rows), [])
            total += len(rows)
            if len(rows) < self._sweep_batch:
                break
        return total

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
                await self.prune_inbox()
                await self.sweep()
            except LedgerUnavailableError as exc:
                log.warning(
                    "maintenance failed", extra={"action": "resolver.maintain", "error": str(exc)}
                )
            await sleep(self._maintain_every_s, self._stop)


@dataclass(frozen=True, slots=True)
class _Batch:
    applied: _resolve.Applied
    #: Outbox rows to publish after commit.
    rows: list[tuple[int, outbox.Message]]
    #: Events applied for the first time (not redeliveries).
    fresh: int
