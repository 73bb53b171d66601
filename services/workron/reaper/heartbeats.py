"""Recording a batch of worker heartbeats in the ledger, and the replies.

One transaction per batch: the workers' rows (upserted, stamped with the
database clock), the ledger leases of the executions they name (renewed only
for each job's current execution on that very worker), and the tokens the
replies are decided from. Executions a stopping worker handed back go back
to ``dispatched`` in a second, short transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from workron.events import JobState
from workron.jobs import event_rows
from workron.ledger import Pool, ledger_errors, queries
from workron.liveness import ExecutionRef, Heartbeat, HeartbeatReply, StopOrder
from workron.reaper.verdicts import Token, stop_reason

__all__ = ["Recorded", "decode", "encode_reply", "record"]

log = logging.getLogger(__name__)

_decode = msgspec.json.Decoder(Heartbeat)
_json = msgspec.json.Encoder()


def decode(data: bytes) -> Heartbeat | str:
    """The heartbeat, or why it is not one."""
    if b"\\u0000" in data:
        # PostgreSQL text cannot hold NUL: refused here, alone, rather than
        # failing the whole batch it would be written with.
        return "not a heartbeat: a string holds \\u0000"
    try:
        return _decode.decode(data)
    except msgspec.DecodeError as exc:
        return f"not a heartbeat: {exc}"


def encode_reply(reply: HeartbeatReply) -> bytes:
    return _json.encode(reply)


@dataclass(slots=True)
class Recorded:
    """The replies to a batch, in its order, and what it changed."""

    replies: list[HeartbeatReply] = field(default_factory=list)
    renewed: int = 0
    handed_back: int = 0


def _refs_json(refs: Sequence[ExecutionRef]) -> str:
    return _json.encode(refs).decode()


async def record(pool: Pool, beats: Sequence[Heartbeat], lease_s: float) -> Recorded:
    """Record ``beats`` (several from one worker allowed); a reply for each.

    Raises LedgerUnavailableError: nothing was recorded then.
    """
    # One row per worker: the last heartbeat of the batch is the freshest.
    latest = {beat.worker_id: beat for beat in beats}
    workers = list(latest.values())
    executions = [(b.worker_id, ref) for b in workers for ref in b.executions]
    asked = sorted({ref.job_id for b in beats for ref in b.executions})
    async with ledger_errors(), pool.acquire() as conn, conn.transaction():
        await conn.execute(
            queries()["reaper_workers_upsert"],
            [b.worker_id for b in workers],
            [b.instance for b in workers],
            [b.state for b in workers],
            [_json.encode(b.queues).decode() for b in workers],
            [b.resources.cpu for b in workers],
            [b.resources.memory_mb for b in workers],
            [b.resources.vram_mb for b in workers],
            [_json.encode(b.tags).decode() for b in workers],
            [b.hostname for b in workers],
            [b.version for b in workers],
            [b.interval_s for b in workers],
            [len(b.executions) for b in workers],
            [_refs_json(b.executions) for b in workers],
            [datetime.fromtimestamp(b.started_at, UTC) for b in workers],
        )
        renewed = await conn.fetch(
            queries()["reaper_jobs_renew"],
            [ref.job_id for _, ref in executions],
            [ref.attempt for _, ref in executions],
            [ref.delivery for _, ref in executions],
            [worker for worker, _ in executions],
            lease_s,
        )
        tokens = {
            r["id"]: Token(JobState(r["state"]), r["attempt"], r["delivery"])
            for r in await conn.fetch(queries()["reaper_jobs_tokens"], asked)
        }
    result = Recorded(renewed=len(renewed))
    for beat in beats:
        stop = []
        for ref in beat.executions:
            reason = stop_reason(ref, tokens.get(ref.job_id))
            if reason is not None:
                stop.append(
                    StopOrder(
                        job_id=ref.job_id, attempt=ref.attempt, delivery=ref.delivery, reason=reason
                    )
                )
        result.replies.append(HeartbeatReply(stop=stop))
    back = [(b.worker_id, ref) for b in workers if b.state == "stopped" for ref in b.handed_back]
    if back:
        result.handed_back = await _hand_back(pool, back)
    return result


async def _hand_back(pool: Pool, back: Sequence[tuple[str, ExecutionRef]]) -> int:
    """A stopped worker gave these back: the jobs wait in their queues again."""
    async with ledger_errors(), pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            queries()["reaper_jobs_hand_back"],
            [ref.job_id for _, ref in back],
            [ref.attempt for _, ref in back],
            [ref.delivery for _, ref in back],
            [worker for worker, _ in back],
        )
        workers = {ref.job_id: worker for worker, ref in back}
        if rows:
            await conn.execute(
                queries()["job_events_insert"],
                *event_rows(
                    [
                        (
                            r["id"],
                            "handed_back",
                            r["attempt"],
                            r["delivery"],
                            workers.get(r["id"]),
                            "the worker stopped; the job waits for another",
                        )
                        for r in rows
                    ]
                ),
            )
    for r in rows:
        log.info(
            "job handed back",
            extra={"action": "reaper.hand_back", "job_id": str(r["id"])},
        )
    return len(rows)
