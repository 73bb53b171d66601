"""Dead workers and the running jobs they leave behind.

A worker that missed its heartbeats is marked dead. Its running jobs, those
of workers that stopped without finishing them, those a live worker's
heartbeats stopped naming (it restarted under the same id), those of workers
never heard from, and jobs whose ledger lease ran out, are orphans
(``reaper_orphans``): each gets the dispatcher's retry decision for a failed
attempt (``verdicts.reap_decision``), written under the reaper's lease.

Not before their worker's reports are in: a worker may have reported an
outcome just before it died, and that report may still wait in REPORTS
(the dispatcher lagging or restarting). Giving the job a new attempt first
would fence a real outcome and run the job again. So an orphan is taken
only once every report stored when it was first seen has been handled:
REPORTS is a work queue, so that is "first sequence past the mark", or the
dispatcher's consumer having nothing pending at all (a report past its
MaxDeliver stays in the stream, never delivered again). A ledger outage
makes reports wait, and orphans with them; so does a dispatcher that is
down, for at most ``max_wait_s``: then the orphan is taken anyway, since a
job must not stay stuck behind a report that may never come.
"""

from __future__ import annotations

import random
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from uuid import UUID

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from workron import bus, outbox
from workron.errors import ConflictError
from workron.events import Backoff, JobState
from workron.jobs import event_rows, finished_message
from workron.leases import LeaderLease
from workron.ledger import Connection, Record, queries
from workron.reaper.verdicts import Orphan, ack_subject, reap_decision, why_reaped
from workron.states import Decision, JobRow

__all__ = ["Backlog", "Reaped", "mark_dead", "reap", "reports_backlog"]

_decode_backoff = msgspec.json.Decoder(Backoff)


@dataclass(frozen=True, slots=True)
class Backlog:
    """The REPORTS stream at one moment."""

    first_seq: int
    last_seq: int
    messages: int
    #: The dispatcher's consumer had nothing pending, read after the stream.
    idle: bool = False

    def applied_through(self, seq: int) -> bool:
        """True when no report stored at or before ``seq`` is still waiting."""
        return self.idle or self.messages == 0 or self.first_seq > seq


async def reports_backlog(js: JetStreamContext) -> Backlog:
    """Raises nats errors when the server cannot say."""
    try:
        state = (await js.stream_info("REPORTS")).state
    except NotFoundError:
        return Backlog(0, 0, 0)  # no stream: nothing can be waiting in it
    try:
        consumer = await js.consumer_info("REPORTS", "dispatcher")
        idle = not consumer.num_pending and not consumer.num_ack_pending
    except NotFoundError:
        idle = False  # nobody applies reports: the stream alone can tell
    return Backlog(state.first_seq, state.last_seq, state.messages, idle)


async def mark_dead(lease: LeaderLease, misses: int, hearing_for_s: float) -> list[Record]:
    """Mark workers that missed ``misses`` heartbeats dead; their rows."""
    async with lease.transaction() as conn:
        rows: list[Record] = await conn.fetch(
            queries()["reaper_workers_mark_dead"], misses, hearing_for_s
        )
    return rows


@dataclass(slots=True)
class Reaped:
    """What one pass did; ``finished`` rows are published by the caller after commit."""

    taken: list[tuple[Orphan, Decision]] = field(default_factory=list)
    finished: list[tuple[int, outbox.Message]] = field(default_factory=list)
    #: Orphans seen but left for a later pass (their reports may still come).
    waiting: int = 0


def _orphan(record: Record) -> Orphan:
    why, error = why_reaped(record["why"], record["worker_id"])
    row = JobRow(
        state=JobState.RUNNING,
        attempt=record["attempt"],
        delivery=record["delivery"],
        max_attempts=record["max_attempts"],
        backoff=_decode_backoff.decode(record["backoff"]),
    )
    ack = ack_subject(record["executions"], record["id"], row.attempt, row.delivery)
    return Orphan(record["id"], record["queue"], row, record["worker_id"], why, error, ack)


async def reap(
    lease: LeaderLease,
    backlog: Backlog,
    marks: MutableMapping[UUID, tuple[int, float]],
    *,
    judge_leases: bool,
    unknown_after_s: float,
    batch: int,
    max_wait_s: float,
    rng: random.Random | None = None,
) -> Reaped:
    """Take back up to ``batch`` orphans whose reports are all in.

    ``marks`` remembers, per orphan, the last REPORTS sequence and the time
    when it was first seen (kept by the caller between passes). Raises
    LeadershipLostError, LedgerUnavailableError.
    """
    result = Reaped()
    now = time.monotonic()
    async with lease.transaction() as conn:
        records = await conn.fetch(
            queries()["reaper_orphans"], batch, judge_leases, bus.LEASE_S, unknown_after_s
        )
        ready: list[Orphan] = []
        for record in records:
            mark, first_seen = marks.setdefault(record["id"], (backlog.last_seq, now))
            if backlog.applied_through(mark) or now - first_seen >= max_wait_s:
                ready.append(_orphan(record))
            else:
                result.waiting += 1
        if len(records) < batch:  # a complete view: forget what is no orphan now
            orphans = {r["id"] for r in records}
            for job_id in [j for j in marks if j not in orphans]:
                del marks[job_id]
        if ready:
            result.taken = [(o, reap_decision(o, rng)) for o in ready]
            result.finished = await _write(conn, result.taken)
    for orphan, _ in result.taken:
        marks.pop(orphan.id, None)
    return result


async def _write(
    conn: Connection, taken: Sequence[tuple[Orphan, Decision]]
) -> list[tuple[int, outbox.Message]]:
    written = await conn.fetch(
        queries()["reaper_requeue"],
        [o.id for o, _ in taken],
        [o.row.attempt for o, _ in taken],
        [o.row.delivery for o, _ in taken],
        [o.worker_id for o, _ in taken],
        [d.row.state.value for _, d in taken],
        [d.row.attempt for _, d in taken],
        [d.row.delivery for _, d in taken],
        [o.error for o, _ in taken],
        [d.retry_in for _, d in taken],
    )
    if len(written) != len(taken):
        # The rows are locked since they were read: a bug if this happens.
        # Refusing the pass beats writing a decision on another row.
        missed = {o.id for o, _ in taken} - {r["id"] for r in written}
        raise ConflictError(f"guarded requeue missed jobs {sorted(missed)}")
    events = []
    finished = []
    for orphan, decision in taken:
        detail = orphan.error
        if decision.kind == "retrying":
            detail = f"{orphan.error} (attempt {decision.row.attempt} in {decision.retry_in:.3f}s)"
        else:
            finished.append(
                finished_message(
                    orphan.id, orphan.queue, JobState.FAILED, orphan.row.attempt, orphan.error
                )
            )
        events.append(
            (
                orphan.id,
                decision.kind,
                orphan.row.attempt,
                orphan.row.delivery,
                orphan.worker_id,
                detail,
            )
        )
    await conn.execute(queries()["job_events_insert"], *event_rows(events))
    ids = await outbox.insert(conn, finished, own=True)
    return list(zip(ids, finished, strict=True))
