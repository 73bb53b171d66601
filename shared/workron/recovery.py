"""Ledger operations behind the failure-handling API: retrying a finished
job, the worker registry, dead letters."""

from __future__ import annotations

from uuid import UUID

import msgspec

from workron import _reopen, jobs
from workron.api import Job
from workron.errors import ConflictError, NotFoundError
from workron.events import JobState, Resources
from workron.ledger import Pool, Record, ledger_errors, queries
from workron.recovery_api import DeadLetter, DeadLetterPage, WorkerExecution, WorkerInfo

__all__ = ["RETRYABLE", "dead_letters", "retry", "workers"]

#: States a retry may leave: a job that failed, or was cancelled.
RETRYABLE = (JobState.FAILED, JobState.CANCELLED)

_decode_tags = msgspec.json.Decoder(dict[str, str])
_decode_runs = msgspec.json.Decoder(list[WorkerExecution])


async def retry(pool: Pool, job_id: UUID, reason: str = "retried by request") -> Job:
    """Run a failed or cancelled job again. Raises NotFoundError or ConflictError.

    The job gets the next attempt number, so every execution before it is
    fenced, and the attempts budget it was submitted with: ``max_attempts``
    grows by that many (attempt 4 of 6 after a retry of a job allowed 3).
    The dispatcher dispatches it from ``pending`` at once (``blocked`` while
    a parent of it runs again); its history keeps every earlier attempt and
    error.

    Inside a DAG, the descendants the cascade cancelled because of it are
    reopened in the same transaction (``_reopen``). A job that an upstream
    failure keeps from running (cancelled with ``upstream_failed: <id>``) is
    refused with ConflictError naming the upstream job to retry instead.
    """
    async with ledger_errors(), pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(queries()["recovery_lock_job"], job_id)
        if current is None:
            raise NotFoundError(f"job {job_id} not found", field="id")
        if current["state"] not in RETRYABLE:
            raise ConflictError(
                f"job {job_id} is {current['state']}; only failed or cancelled jobs are retried",
                field="state",
            )
        edges = await _reopen.edges_into(conn, [job_id])
        culprits = sorted(c for e in edges if (c := _reopen.blocker(e)) is not None)
        if culprits:
            raise ConflictError(
                f"job {job_id} cannot run: its upstream job {culprits[0]} did not succeed;"
                f" retry {culprits[0]} instead",
                field="state",
            )
        reopening = await _reopen.reopen(conn, job_id, current["attempt"])
        state = JobState.BLOCKED if reopening.unmet else JobState.PENDING
        row = await conn.fetchrow(
            queries()["recovery_new_attempt"],
            [job_id], [state.value], [reopening.unmet], [s.value for s in RETRYABLE],
        )  # fmt: skip
        if row is None:  # locked above: cannot happen
            raise ConflictError(f"job {job_id} changed during its retry", field="state")
        budget = row["max_attempts"] - row["attempt"] + 1
        detail = f"{reason}: attempt {row['attempt']}, {budget} attempt(s) allowed"
        if reopening.reopened:
            detail += f"; {len(reopening.reopened)} downstream job(s) reopened"
        if reopening.unmet:
            detail += f"; waiting for {reopening.unmet} upstream job(s)"
        await conn.execute(
            queries()["job_events_insert"],
            *jobs.event_rows([(job_id, "retried", row["attempt"], 0, None, detail)]),
        )
    return await jobs.get(pool, job_id)


def _worker(row: Record) -> WorkerInfo:
    return WorkerInfo(
        id=row["id"],
        state=row["state"],
        queues=list(row["queues"]),
        resources=Resources(cpu=row["cpu"], memory_mb=row["memory_mb"], vram_mb=row["vram_mb"]),
        tags=_decode_tags.decode(row["tags"]),
        hostname=row["hostname"],
        version=row["version"],
        heartbeat_s=row["heartbeat_s"],
        running=row["running"],
        jobs=_decode_runs.decode(row["executions"]),
        started_at=row["started_at"],
        registered_at=row["registered_at"],
        last_seen=row["last_seen"],
        seen_s_ago=max(0.0, row["seen_s_ago"]),
        left_at=row["left_at"],
    )


async def workers(pool: Pool, *, state: str | None = None) -> list[WorkerInfo]:
    """Registered workers (the dead and stopped for a day), by id."""
    async with ledger_errors():
        rows = await pool.fetch(queries()["recovery_workers"], state)
    return [_worker(r) for r in rows]


async def dead_letters(
    pool: Pool, *, source: str | None = None, cursor: int | None = None, limit: int = 50
) -> DeadLetterPage:
    """Dead letters, newest first."""
    async with ledger_errors():
        rows = await pool.fetch(queries()["recovery_dead_letters"], source, cursor, limit + 1)
    items = [
        DeadLetter(
            id=r["id"],
            source=r["source"],
            subject=r["subject"],
            msg_id=r["msg_id"],
            reason=r["reason"],
            body=None if r["body"] is None else bytes(r["body"]),
            at=r["at"],
        )
        for r in rows[:limit]
    ]
    next_cursor = str(items[-1].id) if len(rows) > limit else None
    return DeadLetterPage(items=items, next_cursor=next_cursor)
