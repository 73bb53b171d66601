"""The job state machine and retry policy, as pure functions.

The ledger applies what these decide with guarded updates
(``UPDATE … WHERE state = … AND attempt = … AND delivery = …``); keeping the
decision pure makes it testable without a database.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

from workron.events import (
    Backoff,
    JobState,
    Report,
    ReportCancelled,
    ReportFailed,
    ReportStarted,
    ReportSucceeded,
)

__all__ = [
    "CANCELLABLE",
    "Decision",
    "JobRow",
    "Rejected",
    "apply_report",
    "backoff_delay",
]

#: States a cancel request may leave (everything not yet terminal).
CANCELLABLE = frozenset(
    {
        JobState.BLOCKED,
        JobState.PENDING,
        JobState.DISPATCHED,
        JobState.RUNNING,
        JobState.RESERVED,
        JobState.DRAINING,
        JobState.PREEMPTED,
    }
)
#: States in which an execution may be reporting.
_EXECUTING = frozenset({JobState.DISPATCHED, JobState.RUNNING})


@dataclass(frozen=True, slots=True)
class JobRow:
    """The part of a job row that decides how a report applies."""

    state: JobState
    attempt: int
    delivery: int
    max_attempts: int
    backoff: Backoff


@dataclass(frozen=True, slots=True)
class Decision:
    """The report applies: ``row`` is the job afterwards; ``kind`` names the history event."""

    row: JobRow
    kind: Literal["started", "succeeded", "failed", "retrying", "cancelled"]
    #: Seconds until the next attempt may run (``retrying`` only).
    retry_in: float = 0.0


@dataclass(frozen=True, slots=True)
class Rejected:
    """The report does not apply and changes nothing."""

    #: ``stale_token``: an older execution than the ledger's current one
    #: (a fenced write); ``job_finished``: the job is terminal already;
    #: ``cancel_confirmed``: a worker confirms it stopped the execution of a
    #: job cancelled in the ledger (recorded, not a fenced write).
    reason: Literal["stale_token", "job_finished", "not_running", "cancel_confirmed"]


def backoff_delay(backoff: Backoff, attempt: int, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempt + 1`` after attempt ``attempt`` failed.

    Exponential with "full jitter": uniform in ``[0, cap]``, which spreads a
    burst of failures instead of retrying them in lockstep.
    """
    exponent = min(attempt - 1, 64)  # bounded so the power cannot overflow
    cap = min(backoff.max_s, backoff.base_s * backoff.factor**exponent)
    if not backoff.jitter:
        return cap
    return (rng or random).uniform(0.0, cap)


def apply_report(
    row: JobRow, report: Report, rng: random.Random | None = None
) -> Decision | Rejected:
    """Decide what ``report`` does to a job in state ``row``.

    The fencing token is ``(attempt, delivery)``. A report from another
    attempt is stale. Within the current attempt, a JetStream redelivery
    (higher ``delivery``) takes the execution over; reports from a lower
    delivery than the ledger's are stale.
    """
    if row.state.terminal:
        if (
            row.state is JobState.CANCELLED
            and isinstance(report, ReportCancelled)
            and report.attempt == row.attempt
        ):
            return Rejected("cancel_confirmed")
        return Rejected("job_finished")
    if report.attempt != row.attempt or report.delivery < row.delivery:
        return Rejected("stale_token")
    if row.state not in _EXECUTING:
        return Rejected("not_running")
    taken = replace(row, delivery=report.delivery)
    match report:
        case ReportStarted():
            if report.delivery == row.delivery and row.state is JobState.RUNNING:
                return Rejected("stale_token")  # a second start of the same execution
            return Decision(replace(taken, state=JobState.RUNNING), "started")
        case ReportSucceeded():
            return Decision(replace(taken, state=JobState.SUCCEEDED), "succeeded")
        case ReportCancelled():
            return Decision(replace(taken, state=JobState.CANCELLED), "cancelled")
        case ReportFailed():
            if report.retryable and row.attempt < row.max_attempts:
                delay = backoff_delay(row.backoff, row.attempt, rng)
                retry = replace(row, state=JobState.PENDING, attempt=row.attempt + 1, delivery=0)
                return Decision(retry, "retrying", retry_in=delay)
            return Decision(replace(taken, state=JobState.FAILED), "failed")
    raise AssertionError(f"unknown report {report!r}")  # pragma: no cover
