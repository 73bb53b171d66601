"""Worker reports: decoding them, and folding a batch of them over the jobs
they touch. Pure functions; the ledger I/O is in ``apply.py``.

Reports of one batch apply in message order, each to the row the previous
ones left, so a batch holding ``started`` and ``succeeded`` of one job ends
as one write of the final row.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec

from workron.events import (
    MAX_RESULT_BYTES,
    Backoff,
    JobFinished,
    JobState,
    Report,
    ReportBatch,
    ReportCancelled,
    ReportFailed,
    ReportStarted,
    ReportSucceeded,
    report_id,
)
from workron.jobs import EventRow, finished_event
from workron.ledger import Record
from workron.states import Decision, JobRow, Rejected, apply_report

__all__ = [
    "Incoming",
    "Locked",
    "Observed",
    "Plan",
    "admit_result",
    "decode",
    "locked",
    "plan_batch",
]

_decode_message = msgspec.json.Decoder(Report | ReportBatch)
_encode = msgspec.json.Encoder()
_decode_backoff = msgspec.json.Decoder(Backoff)
# A NUL escape (preceded by an even number of backslashes): jsonb refuses it.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message from the REPORTS stream, decoded."""

    subject: str
    data: bytes
    #: Inbox key; None only for an undecodable message without a header.
    msg_id: str | None
    report: Report | None = None
    #: Why the message is not a report, when it is not.
    error: str | None = None


def decode(subject: str, data: bytes, headers: Mapping[str, str] | None) -> list[Incoming]:
    """The reports of one message: one, or those of a ``ReportBatch``."""
    header_id = headers.get("Nats-Msg-Id") if headers else None
    try:
        decoded = _decode_message.decode(data)
    except msgspec.DecodeError as exc:
        return [Incoming(subject, data, header_id, error=f"undecodable report: {exc}")]
    if isinstance(decoded, ReportBatch):
        return [Incoming(subject, _encode.encode(r), report_id(r), r) for r in decoded.reports]
    return [Incoming(subject, data, header_id or report_id(decoded), decoded)]


def admit_result(report: Report) -> Report:
    """A success whose result the ledger cannot keep becomes a non-retryable failure.

    Failing is the honest outcome: a dependent or a waiting client would
    otherwise read a missing or cut result as the job's answer, and running
    it again would produce the same result.
    """
    if not isinstance(report, ReportSucceeded):
        return report
    raw = bytes(report.result)
    if len(raw) > MAX_RESULT_BYTES:
        error = f"result is {len(raw)} bytes; the limit is {MAX_RESULT_BYTES}"
    elif _NUL_ESCAPE.search(raw):
        error = "result contains a \\u0000 escape, which the ledger cannot store"
    else:
        return report
    return ReportFailed(
        job_id=report.job_id,
        attempt=report.attempt,
        delivery=report.delivery,
        worker_id=report.worker_id,
        at=report.at,
        error=error,
        retryable=False,
    )


@dataclass(slots=True)
class Locked:
    """A job row as read under lock, and what the batch has made of it so far."""

    id: UUID
    queue: str
    old: JobRow
    row: JobRow
    run_at: datetime
    worker_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    #: The jobs that depend on it through open edges.
    waiters: list[UUID] = field(default_factory=list)
    #: Its only waiter's row, as ``dispatcher_take_batch`` reads it (keys
    #: without ``next_``), if it has exactly one.
    next: dict[str, Any] | None = None
    result: str | None = None
    retry_in: float | None = None
    touched: bool = False


def locked(record: Record) -> Locked:
    row = JobRow(
        state=JobState(record["state"]),
        attempt=record["attempt"],
        delivery=record["delivery"],
        max_attempts=record["max_attempts"],
        backoff=_decode_backoff.decode(record["backoff"]),
    )
    return Locked(
        id=record["id"],
        queue=record["queue"],
        old=row,
        row=row,
        run_at=record["run_at"],
        worker_id=record["worker_id"],
        started_at=record["started_at"],
        finished_at=record["finished_at"],
        error=record["error"],
        waiters=record["waiters"],
        next=_next(record),
    )


def _next(record: Record) -> dict[str, Any] | None:
    if record["next_id"] is None:
        return None
    return {key[5:]: record[key] for key in record.keys() if key.startswith("next_")}


@dataclass(slots=True)
class Observed:
    """What the metrics are told once the batch has committed."""

    completed: list[tuple[str, str]] = field(default_factory=list)  # (queue, outcome)
    retried: list[str] = field(default_factory=list)  # queue
    queue_wait: list[tuple[str, float]] = field(default_factory=list)
    run_time: list[tuple[str, str, float]] = field(default_factory=list)
    fenced: list[tuple[str, UUID]] = field(default_factory=list)  # (reason, job id)


@dataclass(slots=True)
class Plan:
    events: list[EventRow] = field(default_factory=list)
    #: ``job.finished`` of the jobs the batch finished (``finished_messages``).
    finished: list[JobFinished] = field(default_factory=list)
    #: Positions (in the reports given) of reports for jobs that do not exist.
    unknown: list[int] = field(default_factory=list)
    observed: Observed = field(default_factory=Observed)

    @property
    def fenced(self) -> int:
        return len(self.observed.fenced)


def plan_batch(
    jobs: Mapping[UUID, Locked], reports: Sequence[Report], rng: random.Random | None = None
) -> Plan:
    """Apply ``reports`` in order to ``jobs`` (mutated in place); collect the side effects."""
    plan = Plan()
    for position, report in enumerate(reports):
        job = jobs.get(report.job_id)
        if job is None:
            plan.unknown.append(position)
            continue
        report = admit_result(report)
        outcome = apply_report(job.row, report, rng)
        if isinstance(outcome, Rejected):
            _fence(plan, job, report, outcome)
        else:
            _take(plan, job, report, outcome)
    return plan


def _fence(plan: Plan, job: Locked, report: Report, rejected: Rejected) -> None:
    if rejected.reason == "cancel_confirmed" and isinstance(report, ReportCancelled):
        # The cancel reached the worker: history, not a fenced write.
        plan.events.append(
            (job.id, "stopped", report.attempt, report.delivery, report.worker_id, report.reason)
        )
        return
    tag = report.__struct_config__.tag
    detail = (
        f"{rejected.reason}: {tag} from {report.attempt}.{report.delivery}, "
        f"ledger at {job.row.attempt}.{job.row.delivery} {job.row.state.value}"
    )
    plan.events.append(
        (job.id, "fenced", report.attempt, report.delivery, report.worker_id, detail)
    )
    plan.observed.fenced.append((rejected.reason, job.id))


def _take(plan: Plan, job: Locked, report: Report, decision: Decision) -> None:
    at = datetime.fromtimestamp(report.at, UTC)
    job.row = decision.row
    job.touched = True
    job.worker_id = report.worker_id
    detail: str | None = None
    if isinstance(report, ReportStarted):
        _started(plan, job, report, report.at)
    elif report.started_at is not None and job.started_at is None:
        # A short execution reports its start with its outcome.
        _started(plan, job, report, report.started_at)
    if decision.kind != "started" and job.started_at is not None:
        run_s = max(0.0, report.at - job.started_at.timestamp())
        plan.observed.run_time.append((job.queue, decision.kind, run_s))
    match report:
        case ReportSucceeded():
            job.result = bytes(report.result).decode()
            job.error = None
        case ReportFailed():
            job.error = detail = report.error
            if decision.kind == "retrying":
                job.retry_in = decision.retry_in
                next_attempt = decision.row.attempt
                detail = f"{report.error} (attempt {next_attempt} in {decision.retry_in:.3f}s)"
                plan.observed.retried.append(job.queue)
                job.started_at = None  # the next attempt has not started
        case ReportCancelled():
            job.error = detail = report.reason
    state = decision.row.state
    if state.terminal:
        job.finished_at = at
        plan.finished.append(
            finished_event(job.id, job.queue, state, decision.row.attempt, job.error)
        )
        plan.observed.completed.append((job.queue, state.value))
    plan.events.append(
        (job.id, decision.kind, report.attempt, report.delivery, report.worker_id, detail)
    )


def _started(plan: Plan, job: Locked, report: Report, at: float) -> None:
    job.started_at = datetime.fromtimestamp(at, UTC)
    # Counted from when the job was due (released, for a DAG node): an
    # intended delay, or time blocked on parents, is not waiting.
    plan.observed.queue_wait.append((job.queue, max(0.0, at - job.run_at.timestamp())))
    if not isinstance(report, ReportStarted):
        plan.events.append(
            (job.id, "started", report.attempt, report.delivery, report.worker_id, None)
        )
