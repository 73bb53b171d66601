"""Work messages JetStream lost, and the streams themselves.

The ledger is the truth: a job ``dispatched`` long ago that no worker has
started must have a message in WORK. If the store was wiped or the stream
purged, it has none, and nothing would ever run the job. This pass finds
those jobs and gives each a new attempt (dispatched again by the
dispatcher), without charging it to the job's budget: it never ran.

A new attempt, never the same message again: a copy of ``work:<job>:<n>``
published past the duplicate window would start a second execution of
attempt n with delivery 1 again, which the ledger could not tell from the
first. With attempt n+1, any surviving copy of the old message is fenced
(its reports are stale, and heartbeats stop it as superseded).

Cheap first: a queue whose subject holds at least as many messages as the
ledger has live jobs lost nothing; an empty subject lost everything. Only
in between are the message ids read (bounded). Jobs whose message still
waits in the outbox are not lost. A job that keeps losing its message is
failed after ``max_redispatch`` tries, so nothing loops forever.

The same pass recreates missing streams and consumers (a wiped store).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from workron import bus, outbox
from workron.events import JobState
from workron.jobs import event_rows, finished_message
from workron.leases import LeaderLease
from workron.ledger import Pool, Record, ledger_errors, queries
from workron.reaper.verdicts import group_by_queue, lost_in_queue

__all__ = ["Lost", "Redispatched", "ensure_contracts", "find_lost", "redispatch"]

log = logging.getLogger(__name__)


async def ensure_contracts(js: JetStreamContext, queues: Iterable[str]) -> list[str]:
    """Create every declared stream and consumer that is missing; the streams
    that were. Work consumers are only created, never changed: their
    MaxAckPending is the queue's concurrency cap, set by whoever runs it."""
    missing = []
    for stream in bus.STREAMS:
        try:
            await js.stream_info(stream.name or "")
        except NotFoundError:
            missing.append(stream.name or "")
        await bus.ensure_stream(js, stream)
    for stream_name, consumer in bus.CONSUMERS:
        await bus.ensure_consumer(js, stream_name, consumer)
    for queue in queues:
        wanted = bus.work_consumer(queue)
        try:
            await js.consumer_info("WORK", wanted.durable_name or "")
        except NotFoundError:
            await js.add_consumer("WORK", wanted)
    if missing:
        log.warning(
            "JetStream streams were missing and are rebuilt",
            extra={"action": "reaper.contracts", "streams": ",".join(missing)},
        )
    return missing


@dataclass(slots=True)
class Lost:
    """Unstarted jobs whose message is gone: (job id, attempt, dispatched_at)."""

    again: list[tuple[UUID, int, datetime]] = field(default_factory=list)
    #: Lost too often: failed instead.
    give_up: list[tuple[UUID, int, datetime]] = field(default_factory=list)


async def _present(
    js: JetStreamContext, subject: str, first_seq: int, limit: int
) -> set[str] | None:
    """Nats-Msg-Id of the messages on ``subject`` (None: more than ``limit``)."""
    ids: set[str] = set()
    seq = max(first_seq, 1)
    for _ in range(limit):
        try:
            msg = await js.get_msg("WORK", seq, subject=subject, next=True)
        except NotFoundError:
            return ids
        if msg.headers and (msg_id := msg.headers.get("Nats-Msg-Id")):
            ids.add(msg_id)
        seq = (msg.seq or seq) + 1
    return None


async def find_lost(
    pool: Pool,
    js: JetStreamContext,
    *,
    older_than_s: float,
    max_redispatch: int,
    batch: int = 1000,
    scan_limit: int = 10_000,
) -> Lost:
    """Raises LedgerUnavailableError, and nats errors when JetStream cannot say."""
    async with ledger_errors():
        rows = await pool.fetch(queries()["reaper_unstarted"], older_than_s, batch)
    rows = [r for r in rows if not r["in_outbox"]]
    if not rows:
        return Lost()
    by_id: dict[UUID, Record] = {r["id"]: r for r in rows}
    queues = group_by_queue([(r["id"], r["queue"], r["attempt"]) for r in rows])
    async with ledger_errors():
        live = {
            r["queue"]: r["live"]
            for r in await pool.fetch(queries()["reaper_live_counts"], list(queues))
        }
    result = Lost()
    for queue, candidates in queues.items():
        subject = bus.work_subject(queue)
        try:
            info = await js.stream_info("WORK", subjects_filter=subject)
            in_stream = (info.state.subjects or {}).get(subject, 0)
            first_seq = info.state.first_seq
        except NotFoundError:
            in_stream, first_seq = 0, 0
        gone = lost_in_queue(candidates, in_stream=in_stream, live=live.get(queue, 0), present=None)
        if gone is None:
            present = await _present(js, subject, first_seq, scan_limit)
            gone = lost_in_queue(
                candidates, in_stream=in_stream, live=live.get(queue, 0), present=present
            )
        for job_id in gone or ():
            row = by_id[job_id]
            item = (job_id, row["attempt"], row["dispatched_at"])
            (result.give_up if row["redispatched"] >= max_redispatch else result.again).append(item)
    return result


@dataclass(slots=True)
class Redispatched:
    again: list[Record] = field(default_factory=list)
    failed: list[Record] = field(default_factory=list)
    finished: list[tuple[int, outbox.Message]] = field(default_factory=list)


def _columns(items: Sequence[tuple[UUID, int, datetime]]) -> list[list[object]]:
    return [[i[0] for i in items], [i[1] for i in items], [i[2] for i in items]]


async def redispatch(lease: LeaderLease, lost: Lost) -> Redispatched:
    """Apply ``lost`` under the lease. Raises LeadershipLostError, LedgerUnavailableError."""
    done = Redispatched()
    async with lease.transaction() as conn:
        if lost.again:
            done.again = await conn.fetch(queries()["reaper_redispatch"], *_columns(lost.again))
        if lost.give_up:
            reason = "the work message was lost from JetStream too many times"
            done.failed = await conn.fetch(
                queries()["reaper_fail_unstarted"], *_columns(lost.give_up), reason
            )
            messages = [
                finished_message(r["id"], r["queue"], JobState.FAILED, r["attempt"], reason)
                for r in done.failed
            ]
            ids = await outbox.insert(conn, messages, own=True)
            done.finished = list(zip(ids, messages, strict=True))
        events = [
            (
                r["id"],
                "redispatched",
                r["attempt"] - 1,
                0,
                None,
                f"work message lost from JetStream; attempt {r['attempt']} (not charged)",
            )
            for r in done.again
        ] + [
            (r["id"], "failed", r["attempt"], r["delivery"], None, "work message lost too often")
            for r in done.failed
        ]
        if events:
            await conn.execute(queries()["job_events_insert"], *event_rows(events))
    for r in done.again:
        log.warning(
            "work message lost: job dispatched again",
            extra={"action": "reaper.redispatch", "job_id": str(r["id"]), "attempt": r["attempt"]},
        )
    return done
