"""Jobs in the ledger: submission in batches, reading, cancelling.

A plain job (no delay, nothing to wait for) is written as ``dispatched``
together with its work message in the outbox, and the writer publishes that
message right after commit: submit → worker is one transaction and one
publish. Delayed jobs are written ``pending`` for the dispatcher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec
from nats.js import JetStreamContext

from workron import _parents, liveness, outbox
from workron.api import Job, JobEvent
from workron.errors import ConflictError, NotFoundError, PayloadTooLargeError, ValidationError
from workron.events import (
    MAX_PAYLOAD_BYTES,
    Backoff,
    Dependency,
    JobFinished,
    JobsFinished,
    JobSpec,
    JobState,
    Resources,
    Work,
)
from workron.ledger import Connection, Pool, Record, ledger_errors, queries
from workron.states import CANCELLABLE

__all__ = [
    "Dep",
    "NewJob",
    "cancel",
    "check_spec",
    "event_rows",
    "finished_event",
    "finished_id",
    "finished_message",
    "finished_messages",
    "get",
    "list_events",
    "list_jobs",
    "plan",
    "submit",
    "work_message",
    "write",
]

_json = msgspec.json.Encoder()
_decode_backoff = msgspec.json.Decoder(Backoff)
_decode_labels = msgspec.json.Decoder(dict[str, str])
_decode_any = msgspec.json.Decoder()
_CANCELLABLE = sorted(CANCELLABLE)


@dataclass(frozen=True, slots=True)
class Dep:
    """One dependency of a new job: an edge ``job_deps (job_id, depends_on)``."""

    parent: UUID
    allow_failure: bool
    #: JSON path of the dependency in the request, for errors about it.
    field: str


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated submission with its id and initial state decided."""

    id: UUID
    spec: JobSpec
    state: JobState
    run_at: datetime | None
    payload_json: str
    traceparent: str | None = None
    #: The jobs it waits for; a job with any is written ``blocked``.
    deps: tuple[Dep, ...] = ()
    dag_id: UUID | None = None
    dag_ref: str | None = None


def check_spec(spec: JobSpec) -> None:
    """Rules across fields that the msgspec types cannot state. Raises ValidationError.

    ``field`` is the JSON path of the offending field, like msgspec's own errors.
    """
    if (spec.command is None) == (spec.task is None):
        raise ValidationError(
            "give exactly one of `command` (a program to run) or `task` (a handler name)",
            field="$.command",
        )
    if spec.command is not None and len(spec.command) == 0:
        raise ValidationError("`command` must not be empty", field="$.command")
    if spec.shell and not isinstance(spec.command, str):
        raise ValidationError("`shell` = true needs `command` as one string", field="$.shell")
    if spec.run_at is not None and spec.delay_s is not None:
        raise ValidationError("give `run_at` or `delay_s`, not both", field="$.delay_s")


def _dependencies(spec: JobSpec) -> tuple[Dep, ...]:
    """A single submission's ``depends_on``: ids of existing jobs, each once."""
    deps: dict[UUID, Dep] = {}
    for k, dep in enumerate(spec.depends_on):
        name, allow = dep, spec.allow_failure
        if isinstance(dep, Dependency):
            name = dep.job
            allow = spec.allow_failure if dep.allow_failure is None else dep.allow_failure
        field = f"$.depends_on[{k}]"
        try:
            parent = UUID(str(name))
        except ValueError:
            raise ValidationError(f"{name!r} is not a job id", field=field) from None
        if parent in deps:
            raise ValidationError(f"job {parent} is listed twice", field=field)
        deps[parent] = Dep(parent, allow, field)
    return tuple(deps.values())


def plan(
    job_id: UUID,
    spec: JobSpec,
    *,
    traceparent: str | None = None,
    deps: Sequence[Dep] | None = None,
    dag_id: UUID | None = None,
    dag_ref: str | None = None,
) -> NewJob:
    """Decide a submission's initial state. Raises ValidationError, PayloadTooLargeError.

    ``deps`` are the dependencies already resolved (a DAG's refs); without
    it, ``spec.depends_on`` must hold job ids.
    """
    check_spec(spec)
    resolved = tuple(deps) if deps is not None else _dependencies(spec)
    payload_json = _json.encode(spec.payload).decode()
    if len(payload_json) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(
            f"payload is {len(payload_json)} bytes; the limit is {MAX_PAYLOAD_BYTES}",
            field="$.payload",
        )
    run_at = spec.run_at
    if spec.delay_s is not None:
        run_at = datetime.now(UTC) + timedelta(seconds=spec.delay_s)
    if run_at is not None and run_at.tzinfo is None:
        run_at = run_at.replace(tzinfo=UTC)  # naive times are UTC
    delayed = run_at is not None and run_at > datetime.now(UTC)
    state = JobState.PENDING if delayed else JobState.DISPATCHED
    if resolved:
        state = JobState.BLOCKED  # the resolver (or admission) releases it
    return NewJob(job_id, spec, state, run_at, payload_json, traceparent, resolved, dag_id, dag_ref)


def work_message(
    job_id: UUID,
    *,
    queue: str,
    attempt: int,
    max_attempts: int,
    task: str | None,
    payload_json: str | None,
    command: list[str] | str | None,
    shell: bool,
    timeout_s: float | None,
    checkpoint: bytes | None = None,
    traceparent: str | None = None,
    parents: Mapping[str, str] | None = None,
) -> outbox.Message:
    """The work message of one attempt; ``parents`` maps keys to result JSON
    (as many as fit the message, see ``_parents``)."""
    work = Work(
        job_id=job_id,
        attempt=attempt,
        max_attempts=max_attempts,
        queue=queue,
        task=task,
        payload=msgspec.Raw((payload_json or "null").encode()),
        command=command,
        shell=shell,
        timeout_s=timeout_s,
        checkpoint=checkpoint,
        traceparent=traceparent,
    )
    if parents:
        work = _parents.attach(work, parents)
    return outbox.Message(
        subject=f"workron.work.{queue}",
        payload=_json.encode(work),
        # One work message per attempt: a replay of the same decision is
        # dropped by JetStream's duplicate window.
        msg_id=f"work:{job_id}:{attempt}",
        traceparent=traceparent,
    )


def finished_id(job_id: UUID, attempt: int) -> str:
    """The message id of an attempt's ``job.finished``."""
    return f"fin:{job_id}:{attempt}"


def finished_event(
    job_id: UUID, queue: str, state: JobState, attempt: int, error: str | None = None
) -> JobFinished:
    return JobFinished(job_id=job_id, queue=queue, state=state.value, attempt=attempt, error=error)  # type: ignore[arg-type]


def finished_message(
    job_id: UUID, queue: str, state: JobState, attempt: int, error: str | None = None
) -> outbox.Message:
    return finished_messages([finished_event(job_id, queue, state, attempt, error)])[0]


#: Bytes of events per ``JobsFinished``: well inside EVENTS' max_msg_size.
_FINISHED_BATCH_BYTES = 256 * 1024


def finished_messages(events: Sequence[JobFinished]) -> list[outbox.Message]:
    """The messages announcing ``events``: each alone, or several per
    ``JobsFinished`` — one stored message instead of one per job."""
    encoded = [_json.encode(event) for event in events]
    chunks: list[list[int]] = []
    size = 0
    for i, data in enumerate(encoded):
        if not chunks or size + len(data) > _FINISHED_BATCH_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += len(data)
    messages = []
    for chunk in chunks:
        first = events[chunk[0]]
        if len(chunk) == 1:
            # Per attempt: a job retried by request finishes again, and that
            # event must not be dropped as a duplicate of the first.
            payload, msg_id = encoded[chunk[0]], finished_id(first.job_id, first.attempt)
        else:
            payload = _json.encode(JobsFinished(jobs=[events[i] for i in chunk]))
            msg_id = f"fins:{first.job_id}:{first.attempt}:{len(chunk)}"
        messages.append(
            outbox.Message(subject="workron.evt.job.finished", payload=payload, msg_id=msg_id)
        )
    return messages


def _stop_running(job_id: UUID, row: Record, reason: str) -> list[outbox.Message]:
    """The cancel an execution of a just-cancelled job must hear, if one may run."""
    previous = row["previous_state"]
    if previous not in (JobState.DISPATCHED, JobState.RUNNING):
        return []
    # Running: its worker is known. Dispatched: whichever worker fetches it.
    worker = row["worker_id"] if previous == JobState.RUNNING else None
    subject, payload, msg_id = liveness.cancel_message(
        job_id, row["attempt"], worker_id=worker, reason=reason
    )
    return [outbox.Message(subject=subject, payload=payload, msg_id=msg_id)]


#: (job id, kind, attempt, delivery, worker, detail): a ``job_events`` row.
EventRow = tuple[UUID, str, int, int, str | None, str | None]


def event_rows(events: Sequence[EventRow]) -> tuple[list[Any], ...]:
    """Columns for ``job_events_insert`` from (job_id, kind, attempt, delivery, worker, detail)."""
    return tuple(list(column) for column in zip(*events, strict=True)) if events else ([],) * 6


def _work_of(job: NewJob) -> outbox.Message:
    spec = job.spec
    return work_message(
        job.id,
        queue=spec.queue,
        attempt=1,
        max_attempts=spec.max_attempts,
        task=spec.task,
        payload_json=job.payload_json,
        command=spec.command,
        shell=spec.shell,
        timeout_s=spec.timeout_s,
        traceparent=job.traceparent,
    )


async def _insert(
    conn: Connection, batch: Sequence[NewJob]
) -> tuple[list[tuple[UUID, bool]], list[tuple[int, outbox.Message]]]:
    # The same submission twice in one batch (a redelivery caught up with
    # its original) is written once; the later copy reports created=False.
    jobs = list({j.id: j for j in reversed(batch)}.values())[::-1]
    specs = [j.spec for j in jobs]
    inserted = {
        r["id"]
        for r in await conn.fetch(
            queries()["jobs_insert"],
            [j.id for j in jobs],
            [s.queue for s in specs],
            [j.state.value for j in jobs],
            [s.priority for s in specs],
            [s.task for s in specs],
            [
                j.payload_json if s.task is not None else None
                for j, s in zip(jobs, specs, strict=True)
            ],
            [None if s.command is None else _json.encode(s.command).decode() for s in specs],
            [s.shell for s in specs],
            [s.max_attempts for s in specs],
            [_json.encode(s.backoff).decode() for s in specs],
            [s.timeout_s for s in specs],
            [j.run_at for j in jobs],
            [s.idempotency_key for s in specs],
            [s.resources.cpu for s in specs],
            [s.resources.memory_mb for s in specs],
            [s.resources.vram_mb for s in specs],
            [_json.encode(s.labels).decode() for s in specs],
            [j.traceparent for j in jobs],
            [j.dag_id for j in jobs],
            [j.dag_ref for j in jobs],
            [len(j.deps) for j in jobs],
        )
    }
    lost = [j for j in jobs if j.id not in inserted]
    winners: dict[object, UUID] = {}
    if lost:
        for row in await conn.fetch(
            queries()["jobs_find_existing"],
            [j.id for j in lost],
            [j.spec.idempotency_key for j in lost if j.spec.idempotency_key],
        ):
            winners[row["id"]] = row["id"]
            if row["idempotency_key"]:
                winners[row["idempotency_key"]] = row["id"]
    results: list[tuple[UUID, bool]] = []
    reported: set[UUID] = set()
    for job in batch:
        if job.id in inserted and job.id not in reported:
            reported.add(job.id)
            results.append((job.id, True))
        elif job.id in inserted:
            results.append((job.id, False))
        else:
            winner = winners.get(job.id) or winners.get(job.spec.idempotency_key)
            if winner is None:
                # Neither the id nor the key matched: a conflict on a row
                # that has since gone. Cannot happen while jobs are kept.
                raise ConflictError("submission conflicted with a vanished job")
            results.append((winner, False))
    fresh = [j for j in jobs if j.id in inserted]
    messages = [_work_of(j) for j in fresh if j.state is JobState.DISPATCHED]
    if any(j.deps for j in fresh):
        from workron import _resolve  # imports this module

        messages += await _resolve.link(conn, [j for j in fresh if j.deps])
    ids = await outbox.insert(conn, messages, own=True)
    return results, list(zip(ids, messages, strict=True))


async def write(
    pool: Pool, jobs: Sequence[NewJob]
) -> tuple[list[tuple[UUID, bool]], list[tuple[int, outbox.Message]]]:
    """Write a batch of jobs in one transaction. Returns ``(job id, created)``
    per input, in order (``created`` is False when an earlier submission with
    the same id or idempotency key won), and the outbox rows the caller is to
    publish; the relay publishes them if it does not."""
    async with ledger_errors(), pool.acquire() as conn, conn.transaction():
        return await _insert(conn, jobs)


async def submit(
    pool: Pool, js: JetStreamContext | None, jobs: Sequence[NewJob]
) -> list[tuple[UUID, bool]]:
    """``write`` the jobs, then publish their work messages (without ``js``,
    the relay does)."""
    results, rows = await write(pool, jobs)
    if js is not None and rows:
        await outbox.publish_own(pool, js, rows)
    return results


def to_job(row: Record) -> Job:
    payload = row["payload"]
    result = row["result"]
    command = row["command"]
    return Job(
        id=row["id"],
        queue=row["queue"],
        state=JobState(row["state"]),
        priority=row["priority"],
        task=row["task"],
        payload=None if payload is None else _decode_any.decode(payload),
        command=None if command is None else _decode_any.decode(command),
        shell=row["shell"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        token=f"{row['attempt']}.{row['delivery']}",
        backoff=_decode_backoff.decode(row["backoff"]) if row["backoff"] != "{}" else Backoff(),
        timeout_s=row["timeout_s"],
        run_at=row["run_at"],
        idempotency_key=row["idempotency_key"],
        resources=Resources(cpu=row["cpu"], memory_mb=row["memory_mb"], vram_mb=row["vram_mb"]),
        labels=_decode_labels.decode(row["labels"]),
        result=None if result is None else _decode_any.decode(result),
        error=row["error"],
        worker_id=row["worker_id"],
        created_at=row["created_at"],
        dispatched_at=row["dispatched_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


async def get(pool: Pool, job_id: UUID) -> Job:
    async with ledger_errors():
        row = await pool.fetchrow(queries()["job_get"], job_id)
    if row is None:
        raise NotFoundError(f"job {job_id} not found", field="id")
    return to_job(row)


async def list_jobs(
    pool: Pool,
    *,
    state: str | None = None,
    queue: str | None = None,
    task: str | None = None,
    cursor: UUID | None = None,
    limit: int = 50,
) -> tuple[list[Job], UUID | None]:
    async with ledger_errors():
        rows = await pool.fetch(queries()["jobs_list"], state, queue, task, cursor, limit + 1)
    jobs = [to_job(r) for r in rows[:limit]]
    next_cursor = jobs[-1].id if len(rows) > limit else None
    return jobs, next_cursor


async def list_events(pool: Pool, job_id: UUID) -> list[JobEvent]:
    async with ledger_errors():
        rows = await pool.fetch(queries()["job_events_list"], job_id)
        if not rows and await pool.fetchrow(queries()["job_get"], job_id) is None:
            raise NotFoundError(f"job {job_id} not found", field="id")
    return [JobEvent(**dict(r.items())) for r in rows]


async def cancel(
    pool: Pool, js: JetStreamContext | None, job_id: UUID, reason: str = "cancelled by request"
) -> Job:
    """Cancel a job that has not finished. Raises NotFoundError or ConflictError.

    An execution that may be running is told to stop by a control message,
    written to the outbox in the same transaction.
    """
    async with ledger_errors(), pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(queries()["job_cancel"], job_id, reason, _CANCELLABLE)
        if row is None:
            current = await conn.fetchrow(queries()["job_get"], job_id)
            if current is None:
                raise NotFoundError(f"job {job_id} not found", field="id")
            raise ConflictError(
                f"job {job_id} is {current['state']}; only unfinished jobs can be cancelled",
                field="state",
            )
        await conn.execute(
            queries()["job_events_insert"],
            *event_rows([(job_id, "cancelled", row["attempt"], row["delivery"], None, reason)]),
        )
        message = finished_message(job_id, row["queue"], JobState.CANCELLED, row["attempt"], reason)
        messages = [message, *_stop_running(job_id, row, reason)]
        ids = await outbox.insert(conn, messages, own=js is not None)
    if js is not None:
        await outbox.publish_own(pool, js, list(zip(ids, messages, strict=True)))
    return await get(pool, job_id)
