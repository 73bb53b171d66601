"""The reaper's decisions, as pure functions: what a heartbeat's execution
must do, what happens to an orphaned job, which unstarted jobs lost their
work message. The ledger I/O that applies them is in the other modules."""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from uuid import UUID

import msgspec

from workron.events import JobState, ReportFailed
from workron.liveness import ExecutionRef, StopReason
from workron.states import Decision, JobRow, apply_report

__all__ = [
    "Orphan",
    "Token",
    "Why",
    "ack_subject",
    "lost_in_queue",
    "reap_decision",
    "stop_reason",
    "why_reaped",
]

#: The ``why`` label of ``workron_jobs_reaped``.
Why = Literal[
    "worker_dead",
    "worker_stopped",
    "not_running",
    "worker_unknown",
    "lease_expired",
    "message_lost",
]

_decode_refs = msgspec.json.Decoder(list[ExecutionRef])


@dataclass(frozen=True, slots=True)
class Token:
    """A job's state and fencing token in the ledger."""

    state: JobState
    attempt: int
    delivery: int


def stop_reason(ref: ExecutionRef, current: Token | None) -> StopReason | None:
    """What the execution a heartbeat names must do: None to run on.

    Mirrors ``states.apply_report``: an execution is current while the
    ledger is at its attempt with no later delivery. A delivery the ledger
    has not seen start yet (its ``started`` report is on its way) is
    current too. Jobs the ledger does not know are left alone.
    """
    if current is None or current.attempt < ref.attempt:
        return None
    if current.attempt > ref.attempt:
        return "superseded"  # retried, re-dispatched, reaped, or retried by request
    if current.state is JobState.CANCELLED:
        return "cancelled"
    if current.delivery > ref.delivery:
        return "fenced"  # a redelivery of the same message took over
    if current.state.terminal and current.delivery < ref.delivery:
        # Finished by an earlier delivery whose ack came too late: this
        # redelivery runs a job that is done.
        return "superseded"
    return None


@dataclass(frozen=True, slots=True)
class Orphan:
    """A running job whose execution the reaper takes back."""

    id: UUID
    queue: str
    row: JobRow
    worker_id: str | None
    why: Why
    error: str
    #: Reply subject of the orphaned delivery, when its worker's last
    #: heartbeat named it: acked once the job has moved on.
    ack: str | None = None


def why_reaped(why: str, worker_id: str | None) -> tuple[Why, str]:
    """The metric label and the error recorded for one orphaned execution,
    from the ``why`` of ``reaper_orphans``."""
    if why == "dead":
        return "worker_dead", f"worker {worker_id} died (missed its heartbeats)"
    if why == "stopped":
        return "worker_stopped", f"worker {worker_id} stopped without finishing it"
    if why == "untracked":
        return "not_running", f"worker {worker_id} no longer runs it (restarted, or lost it)"
    if why == "unknown":
        return "worker_unknown", f"worker {worker_id} was never heard from: presumed dead"
    return "lease_expired", f"lease expired: worker {worker_id} stopped renewing it"


def reap_decision(orphan: Orphan, rng: random.Random | None = None) -> Decision:
    """The dispatcher's own retry decision, as if the worker had reported a
    retryable failure: a new attempt after the backoff, or failed when the
    attempts are spent.

    A new attempt rather than a redelivery of the same one: the death counts
    against ``max_attempts``, so a job that kills its worker (OOM, segfault)
    cannot take the fleet down forever. The old attempt's token is fenced
    from then on, and its message is acked so it never runs again.
    """
    report = ReportFailed(
        job_id=orphan.id,
        attempt=orphan.row.attempt,
        delivery=orphan.row.delivery,
        worker_id=orphan.worker_id or "",
        at=time.time(),
        error=orphan.error,
        retryable=True,
    )
    decision = apply_report(orphan.row, report, rng)
    assert isinstance(decision, Decision), decision  # a running row always takes a failure
    return decision


def ack_subject(executions: str | None, job_id: UUID, attempt: int, delivery: int) -> str | None:
    """The reply subject of one execution in a worker's last heartbeat (JSON)."""
    if not executions:
        return None
    try:
        refs = _decode_refs.decode(executions)
    except msgspec.DecodeError:
        return None
    for ref in refs:
        if ref.job_id == job_id and ref.attempt == attempt and ref.delivery == delivery:
            return ref.ack
    return None


def lost_in_queue(
    candidates: Sequence[tuple[UUID, int]],
    *,
    in_stream: int,
    live: int,
    present: Collection[str] | None,
) -> list[UUID] | None:
    """Which unstarted jobs of one queue lost their work message.

    ``in_stream``: messages on the queue's subject in WORK; ``live``: the
    ledger's jobs of the queue that hold one (dispatched or running);
    ``present``: the ``Nats-Msg-Id`` of every message on the subject, when
    it was read. None means "cannot tell yet" (read the messages first).

    The counts decide cheaply: an empty subject lost them all; at least as
    many messages as live jobs lost none (stale messages of old attempts can
    hide a loss for a while, until workers consume them). In between, only
    the message ids can tell.
    """
    if in_stream == 0:
        return [job_id for job_id, _ in candidates]
    if in_stream >= live:
        return []
    if present is None:
        return None
    return [job_id for job_id, attempt in candidates if f"work:{job_id}:{attempt}" not in present]


def group_by_queue(
    rows: Sequence[tuple[UUID, str, int]],
) -> Mapping[str, list[tuple[UUID, int]]]:
    """(job id, attempt) of ``(job id, queue, attempt)`` rows, by queue."""
    queues: dict[str, list[tuple[UUID, int]]] = {}
    for job_id, queue, attempt in rows:
        queues.setdefault(queue, []).append((job_id, attempt))
    return queues
