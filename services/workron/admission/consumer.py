"""The ``workron.submit.<queue>`` consumer: submissions from any service, in batches.

Whatever is waiting is taken as one batch (``Puller``: the first message
to arrive and what waits with it, never held until a batch fills), and the
next batch is asked for as soon as one arrives, so submissions arriving
while a batch is written are already here for the next. A batch is one
``jobs.write`` transaction; then its work messages are published and its
submissions acked, neither waiting for the server's replies before the
next batch. Redelivery is harmless (a lost ack, a crash before one): the
Submission id is the job's primary key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from uuid import UUID

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError

from workron import bus, jobs, outbox
from workron._pull import Puller
from workron.errors import LedgerUnavailableError, ValidationError, WorkronError
from workron.events import Submission
from workron.ledger import Pool, ledger_errors, queries
from workron.telemetry import Metrics, new_traceparent

__all__ = ["MAX_BATCH", "SubmitConsumer"]

log = logging.getLogger(__name__)

_decode = msgspec.json.Decoder(Submission)

# Bound to the durable consumer declared in workron.bus, never redefined here.
_STREAM, _DURABLE = next(
    (stream, c.durable_name or "") for stream, c in bus.CONSUMERS if c.durable_name == "admission"
)
_SOURCE = "admission"

#: Most submissions written in one transaction.
MAX_BATCH = 500
#: How long the first fetch of a batch waits for a message (bounds stop latency).
WAIT_S = 1.0
#: Delay of the redelivery when the consumer stops while the ledger is away.
NAK_DELAY_S = 2.0
# Retries while the ledger is away: 0.2 s doubling to 5 s, well inside AckWait.
_RETRY_FIRST_S = 0.2
_RETRY_MAX_S = 5.0

_Planned = tuple[Msg, jobs.NewJob]
_Poison = tuple[Msg, str]


class SubmitConsumer:
    """Pull submissions from the ``admission`` durable on SUBMIT and write them to the ledger."""

    def __init__(
        self,
        pool: Pool,
        nc: NATS,
        metrics: Metrics,
        *,
        stop: asyncio.Event | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._js = nc.jetstream()
        self._metrics = metrics
        self._stop = stop or asyncio.Event()
        self._max_batch = max_batch
        self._puller: Puller | None = None
        #: Work messages published, waiting for their PubAcks (``_confirm``).
        self._confirming: set[asyncio.Task[None]] = set()
        #: Deletes the outbox rows of work acked, in batches; run it beside
        #: ``run`` (``sweeper.run``). ``close`` sweeps what is left.
        self.sweeper = outbox.Sweeper(pool)

    async def open(self) -> None:
        """Bind to the durable consumer (it must exist: ``bus.apply`` declares it)."""
        if self._puller is None:
            await self._js.consumer_info(_STREAM, _DURABLE)  # fail fast when undeclared
            puller = Puller(self._nc, _STREAM, _DURABLE)
            await puller.__aenter__()
            self._puller = puller

    async def close(self) -> None:
        """Unbind; messages taken and not handled go back at once (nak)."""
        if self._puller is not None:
            puller, self._puller = self._puller, None
            await puller.__aexit__(None, None, None)
        await self._confirmed()

    async def _confirmed(self) -> None:
        """Wait until every work message published has its PubAck (or timed
        out), and delete the outbox rows of those acked."""
        while self._confirming:
            await asyncio.gather(*self._confirming)
        await self.sweeper.sweep()

    async def _confirm(self, sending: outbox.Sending) -> None:
        # Rows never acked stay in the outbox: the relay publishes them.
        self.sweeper.add((await outbox.confirm(sending)).acked)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Consume until stopped; a batch in hand is finished first."""
        await self.open()
        try:
            while not self._stop.is_set():
                try:
                    await self._step(WAIT_S)
                except ConnectionClosedError:
                    raise  # the process is closing NATS: nothing left to do
                except NatsError as exc:
                    # Reconnecting, or JetStream briefly unavailable: nothing
                    # was taken, so pausing loses nothing.
                    log.warning(
                        "fetch failed", extra={"action": "admission.submit.fetch", "error": exc}
                    )
                    await _pause(self._stop, 1.0)
        finally:
            await self.close()

    async def run_until_idle(self) -> int:
        """Process until no submission is waiting; returns how many messages were handled.

        A message redelivered within one fetch wait counts as waiting; one
        held back longer (a delayed nak) does not.
        """
        await self.open()
        info = await self._js.consumer_info(_STREAM, _DURABLE)
        if not (info.num_pending or info.num_ack_pending):
            return 0
        handled = 0
        while True:
            taken = await self._step(WAIT_S)
            handled += taken
            if not taken and not (await self._js.consumer_info(_STREAM, _DURABLE)).num_pending:
                await self._confirmed()
                return handled

    async def _step(self, timeout: float) -> int:
        batch = await self._fetch(timeout)
        if batch:
            self._metrics.batch_size.labels("admission.submit").observe(len(batch))
            await self._handle(batch)
        return len(batch)

    async def _fetch(self, timeout: float) -> list[Msg]:
        assert self._puller is not None
        batch = await self._puller.fetch(self._max_batch, timeout)
        if batch:
            # Submissions arriving while this batch is written gather for the next.
            await self._puller.ask(self._max_batch, timeout)
        return batch

    def _plan(self, batch: Sequence[Msg]) -> tuple[list[_Planned], list[_Poison]]:
        planned: list[_Planned] = []
        poison: list[_Poison] = []
        for msg in batch:
            try:
                submission = _decode.decode(msg.data)
                traceparent = (
                    submission.traceparent
                    or (msg.headers or {}).get("traceparent")
                    or new_traceparent()
                )
                job = jobs.plan(submission.id, submission.job, traceparent=traceparent)
            except msgspec.DecodeError as exc:  # msgspec.ValidationError included
                poison.append((msg, f"not a valid Submission: {exc}"))
            except WorkronError as exc:  # cross-field rules, payload size
                where = f" (at {exc.field})" if exc.field else ""
                poison.append((msg, f"{exc.code}: {exc.message}{where}"))
            else:
                planned.append((msg, job))
        return planned, poison

    async def _handle(self, batch: Sequence[Msg]) -> None:
        planned, rejected = self._plan(batch)
        delay = _RETRY_FIRST_S
        while True:
            refused: list[_Poison] = []
            try:
                # jobs.submit is idempotent and the dead letters are one
                # statement, so a retry after either failed doubles nothing.
                written = await self._submit(planned, refused)
                await self._record_dead_letters(rejected + refused)
                break
            except LedgerUnavailableError as exc:
                if self._stop.is_set():
                    # Leaving with the ledger away: hand the batch back for
                    # the next instance, never terminate it.
                    await _settle(batch, lambda m: m.nak(delay=NAK_DELAY_S))
                    return
                log.warning(
                    "ledger unavailable; holding the batch",
                    extra={"action": "admission.submit.hold", "held": len(batch), "error": exc},
                )
                # Keep the messages rather than nak them: every redelivery
                # spends one of the consumer's MaxDeliver attempts, and an
                # outage longer than those would lose acknowledged
                # submissions. in_progress renews AckWait without spending one.
                await _settle(batch, Msg.in_progress)
                await _pause(self._stop, delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        # Not ack_sync: a lost ack only brings the submission back, and the
        # next batch need not wait for the server's replies.
        await _settle([m for m, _ in written], Msg.ack)
        await _settle([m for m, _ in rejected + refused], Msg.term)

    async def _submit(self, planned: list[_Planned], refused: list[_Poison]) -> list[_Planned]:
        """Write ``planned`` in one transaction; returns those written.

        When the ledger refuses the batch's data, each job is tried alone so
        a single bad submission cannot sink the others; the refused ones are
        added to ``refused``.
        """
        if not planned:
            return []
        # One row per id: the same submission twice in a batch (a sender's
        # retry, a redelivery) is one job, and both messages are settled by it.
        unique: dict[UUID, jobs.NewJob] = {}
        for _, job in planned:
            unique.setdefault(job.id, job)
        try:
            results, rows = await jobs.write(self._pool, list(unique.values()))
        except ValidationError as exc:
            if len(unique) == 1:
                refused += [(msg, f"{exc.code}: {exc.message}") for msg, _ in planned]
                return []
            written: list[_Planned] = []
            for job_id in unique:
                alone = [item for item in planned if item[1].id == job_id]
                written += await self._submit(alone, refused)
            return written
        if rows:
            # The work goes out now; its PubAcks are awaited off this loop, so
            # the next batch need not wait for them. Rows never acked stay in
            # the outbox for the relay.
            sending = await outbox.start(self._js, rows)
            confirming = asyncio.create_task(
                self._confirm(sending), name="workron.admission.confirm"
            )
            self._confirming.add(confirming)
            confirming.add_done_callback(self._confirming.discard)
        for job, (_, created) in zip(unique.values(), results, strict=True):
            if created:
                self._metrics.submitted.labels(job.spec.queue).inc()
        return planned

    async def _record_dead_letters(self, poison: Sequence[_Poison]) -> None:
        if not poison:
            return
        async with ledger_errors():
            await self._pool.execute(
                queries()["dead_letter_insert"],
                [_SOURCE] * len(poison),
                [m.subject for m, _ in poison],
                [_msg_id(m) for m, _ in poison],
                [reason for _, reason in poison],
                [m.data for m, _ in poison],
            )
        for msg, reason in poison:
            self._metrics.dead_letters.labels(_SOURCE).inc()
            log.warning(
                "submission terminated",
                extra={
                    "action": "admission.submit.dead_letter",
                    "subject": msg.subject,
                    "msg_id": _msg_id(msg),
                    "reason": reason,
                },
            )


def _msg_id(msg: Msg) -> str:
    """The sender's Nats-Msg-Id, else the stream sequence (unique within SUBMIT)."""
    if msg.headers and (msg_id := msg.headers.get("Nats-Msg-Id")):
        return msg_id
    return f"{_STREAM}:{msg.metadata.sequence.stream}"


async def _settle(msgs: Sequence[Msg], how: Callable[[Msg], Awaitable[object]]) -> None:
    """Ack/nak/term messages concurrently; a lost ack only means a harmless redelivery."""
    if not msgs:
        return
    results = await asyncio.gather(*(how(m) for m in msgs), return_exceptions=True)
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        log.warning(
            "acknowledgements failed",
            extra={"action": "admission.submit.ack", "failed": len(failed), "error": failed[0]},
        )


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less when ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
