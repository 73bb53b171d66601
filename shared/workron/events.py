"""Wire types: what travels over HTTP and JetStream.

Every type is a msgspec Struct. Messages on a stream form one tagged union
per stream with explicit tags, so renaming a class never changes the wire.
Schema evolution follows msgspec's rules: new fields get defaults; fields are
never retyped or reordered.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MAX_RESULT_BYTES",
    "Backoff",
    "Dependency",
    "Event",
    "Finished",
    "JobFinished",
    "JobSpec",
    "JobState",
    "JobsFinished",
    "Report",
    "ReportBatch",
    "ReportCancelled",
    "ReportFailed",
    "ReportStarted",
    "ReportSucceeded",
    "Resources",
    "Submission",
    "Work",
    "finished_jobs",
    "report_id",
]

#: Largest encoded job payload accepted (JSON bytes).
MAX_PAYLOAD_BYTES = 512 * 1024
#: Largest encoded handler result stored in the ledger (JSON bytes).
MAX_RESULT_BYTES = 256 * 1024

QueueName = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Queue name: letters, digits, _ and -")
]
TaskName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$")]
Label = Annotated[str, Meta(max_length=256)]


class JobState(enum.StrEnum):
    BLOCKED = "blocked"
    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Gang states: reserved on a worker, draining before preemption.
    RESERVED = "reserved"
    DRAINING = "draining"
    PREEMPTED = "preempted"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Backoff(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Retry delay: ``min(max_s, base_s * factor**(attempt-1))``, with full jitter."""

    base_s: Annotated[float, Meta(ge=0, le=3600)] = 1.0
    factor: Annotated[float, Meta(ge=1, le=10)] = 2.0
    max_s: Annotated[float, Meta(ge=0, le=86400)] = 300.0
    jitter: bool = True


class Resources(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cpu: Annotated[float, Meta(ge=0, le=1024)] = 0
    memory_mb: Annotated[int, Meta(ge=0, le=16 * 1024 * 1024)] = 0
    vram_mb: Annotated[int, Meta(ge=0, le=16 * 1024 * 1024)] = 0


#: A dependency named by job id, or inside a DAG by the ref of one of its jobs.
DependencyRef = Annotated[str, Meta(min_length=1, max_length=64)]


class Dependency(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One dependency with its own failure policy (an edge of a DAG)."""

    job: DependencyRef
    #: Overrides the dependent job's ``allow_failure`` for this edge.
    allow_failure: bool | None = None


class JobSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A job as submitted: either ``command`` or ``task`` (+ ``payload``)."""

    queue: QueueName = "default"
    #: argv list, or a string that runs through ``/bin/sh -c`` only when ``shell`` is true.
    command: list[Annotated[str, Meta(max_length=65536)]] | str | None = None
    shell: bool = False
    task: TaskName | None = None
    payload: Any = None
    priority: Annotated[int, Meta(ge=-1000, le=1000)] = 0
    max_attempts: Annotated[int, Meta(ge=1, le=1000)] = 3
    backoff: Backoff = Backoff()
    timeout_s: Annotated[float, Meta(gt=0, le=30 * 86400)] | None = None
    run_at: datetime | None = None
    delay_s: Annotated[float, Meta(ge=0, le=366 * 86400)] | None = None
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    resources: Resources = Resources()
    labels: Annotated[dict[Label, Label], Meta(max_length=64)] = {}
    #: Jobs this one waits for: ids of existing jobs or, inside a DAG, refs of
    #: its other jobs. It runs once every one has succeeded (see allow_failure).
    depends_on: Annotated[list[DependencyRef | Dependency], Meta(max_length=10_000)] = []
    #: True: a dependency that failed or was cancelled counts as satisfied,
    #: instead of cancelling this job (``upstream_failed``).
    allow_failure: bool = False


class Submission(Struct, frozen=True, kw_only=True, tag="submit", tag_field="type"):
    """A job published on ``workron.submit.<queue>``; ``id`` is chosen by the sender."""

    id: UUID
    job: JobSpec
    traceparent: str | None = None


class Work(Struct, frozen=True, kw_only=True, tag="work", tag_field="type"):
    """A ready job on ``workron.work.<queue>``: everything a worker needs to run it."""

    job_id: UUID
    attempt: int
    max_attempts: int
    queue: str
    task: str | None = None
    payload: msgspec.Raw = msgspec.Raw(b"null")
    command: list[str] | str | None = None
    shell: bool = False
    timeout_s: float | None = None
    checkpoint: bytes | None = None
    traceparent: str | None = None
    #: Results of the jobs this one depended on (DAGs): keyed by the parent's
    #: ref when it is in the same DAG, else by its job id.
    parents: dict[str, msgspec.Raw] | None = None
    #: Keys of parents whose results did not fit in this message.
    parents_omitted: list[str] | None = None


class _Report(Struct, frozen=True, kw_only=True, tag_field="type"):
    """Worker → dispatcher, on ``workron.report.<queue>``.

    ``attempt`` and ``delivery`` form the fencing token of the execution.
    """

    job_id: UUID
    attempt: int
    delivery: int
    worker_id: str
    #: Worker's wall clock (epoch seconds) when the event happened.
    at: float
    #: On an outcome whose start was not reported on its own: when the
    #: execution started. Short jobs report once, not twice (``started`` is
    #: sent only for executions that outlast a moment).
    started_at: float | None = None


class ReportStarted(_Report, frozen=True, tag="started"):
    pass


class ReportSucceeded(_Report, frozen=True, tag="succeeded"):
    result: msgspec.Raw = msgspec.Raw(b"null")


class ReportFailed(_Report, frozen=True, tag="failed"):
    error: str
    #: False for errors no retry can fix (bad payload, unknown task).
    retryable: bool = True


class ReportCancelled(_Report, frozen=True, tag="cancelled"):
    reason: str = "cancelled"


Report = ReportStarted | ReportSucceeded | ReportFailed | ReportCancelled


class ReportBatch(Struct, frozen=True, kw_only=True, tag="reports", tag_field="type"):
    """Several reports in one message on ``workron.report.<queue>``: a busy
    worker's reports made while its previous message was being stored."""

    reports: list[Report]


def report_id(report: Report) -> str:
    """``<type>:<job_id>:<attempt>:<delivery>``: names a report and its
    execution (its ``Nats-Msg-Id`` when sent alone, its inbox key)."""
    tag = report.__struct_config__.tag
    return f"{tag}:{report.job_id}:{report.attempt}:{report.delivery}"


class JobFinished(Struct, frozen=True, kw_only=True, tag="job.finished", tag_field="type"):
    """Published on ``workron.evt.job.finished`` when a job reaches a terminal
    state: alone, or with others of one ledger transaction in ``JobsFinished``."""

    job_id: UUID
    queue: str
    state: Literal["succeeded", "failed", "cancelled"]
    attempt: int
    error: str | None = None
    #: The transaction that recorded this outcome also resolved every job
    #: depending on it (the dispatcher's fast path): the resolver has
    #: nothing left to apply. Admission resolves edges it adds later itself.
    resolved: bool = False


class JobsFinished(Struct, frozen=True, kw_only=True, tag="jobs.finished", tag_field="type"):
    """Several ``job.finished`` of one ledger transaction in one message, on
    ``workron.evt.job.finished``: a busy dispatcher's outcomes, or a cascade
    of cancels. Each keeps the id it would have alone (``fin:<job>:<attempt>``)
    for deduplication by its readers."""

    jobs: list[JobFinished]


#: What ``workron.evt.job.finished`` carries.
Finished = JobFinished | JobsFinished


def finished_jobs(message: Finished) -> list[JobFinished]:
    """The events of one ``workron.evt.job.finished`` message."""
    return message.jobs if isinstance(message, JobsFinished) else [message]


Event = JobFinished
