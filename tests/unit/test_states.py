"""The job state machine and retry policy."""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workron.events import (
    Backoff,
    JobState,
    ReportCancelled,
    ReportFailed,
    ReportStarted,
    ReportSucceeded,
)
from workron.states import Decision, JobRow, Rejected, apply_report, backoff_delay

JOB = uuid.uuid4()


def row(state: JobState = JobState.DISPATCHED, attempt: int = 1, delivery: int = 0) -> JobRow:
    return JobRow(
        state=state, attempt=attempt, delivery=delivery, max_attempts=3, backoff=Backoff()
    )


def started(attempt: int = 1, delivery: int = 1) -> ReportStarted:
    return ReportStarted(job_id=JOB, attempt=attempt, delivery=delivery, worker_id="w", at=0.0)


def failed(attempt: int = 1, delivery: int = 1, *, retryable: bool = True) -> ReportFailed:
    return ReportFailed(
        job_id=JOB, attempt=attempt, delivery=delivery, worker_id="w", at=0.0, error="boom",
        retryable=retryable,
    )  # fmt: skip


def succeeded(attempt: int = 1, delivery: int = 1) -> ReportSucceeded:
    return ReportSucceeded(job_id=JOB, attempt=attempt, delivery=delivery, worker_id="w", at=0.0)


def test_start_then_success() -> None:
    running = apply_report(row(), started())
    assert isinstance(running, Decision) and running.kind == "started"
    assert running.row.state is JobState.RUNNING and running.row.delivery == 1
    done = apply_report(running.row, succeeded())
    assert isinstance(done, Decision) and done.row.state is JobState.SUCCEEDED


def test_success_without_seen_start_is_accepted() -> None:
    # The started report may be applied after the outcome (redelivery order).
    done = apply_report(row(), succeeded())
    assert isinstance(done, Decision) and done.row.state is JobState.SUCCEEDED


def test_redelivery_takes_over_and_fences_the_old_execution() -> None:
    first = apply_report(row(), started(delivery=1))
    assert isinstance(first, Decision)
    second = apply_report(first.row, started(delivery=2))
    assert isinstance(second, Decision) and second.row.delivery == 2
    assert apply_report(second.row, succeeded(delivery=1)) == Rejected("stale_token")
    assert apply_report(second.row, started(delivery=1)) == Rejected("stale_token")


def test_duplicate_start_is_rejected() -> None:
    running = apply_report(row(), started())
    assert isinstance(running, Decision)
    assert apply_report(running.row, started()) == Rejected("stale_token")


def test_old_attempt_is_fenced() -> None:
    assert apply_report(row(attempt=2), succeeded(attempt=1)) == Rejected("stale_token")


def test_finished_job_rejects_everything() -> None:
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        assert apply_report(row(state), succeeded()) == Rejected("job_finished")


def test_pending_job_rejects_reports() -> None:
    assert apply_report(row(JobState.PENDING), started()) == Rejected("not_running")


def test_failure_retries_until_max_attempts() -> None:
    current = row()
    for attempt in (1, 2):
        decision = apply_report(current, failed(attempt=attempt))
        assert isinstance(decision, Decision) and decision.kind == "retrying"
        assert decision.row.state is JobState.PENDING
        assert decision.row.attempt == attempt + 1 and decision.row.delivery == 0
        current = JobRow(JobState.DISPATCHED, decision.row.attempt, 0, 3, Backoff())
    final = apply_report(current, failed(attempt=3))
    assert isinstance(final, Decision) and final.kind == "failed"
    assert final.row.state is JobState.FAILED and final.row.attempt == 3


def test_non_retryable_failure_is_final() -> None:
    decision = apply_report(row(), failed(retryable=False))
    assert isinstance(decision, Decision) and decision.row.state is JobState.FAILED


def test_cancelled_report() -> None:
    decision = apply_report(row(JobState.RUNNING, delivery=1), ReportCancelled(
        job_id=JOB, attempt=1, delivery=1, worker_id="w", at=0.0))  # fmt: skip
    assert isinstance(decision, Decision) and decision.row.state is JobState.CANCELLED


@given(
    base=st.floats(0, 100),
    factor=st.floats(1, 10),
    cap=st.floats(0, 3600),
    attempt=st.integers(1, 10_000),
    seed=st.integers(0, 2**32),
)
def test_backoff_within_bounds(
    base: float, factor: float, cap: float, attempt: int, seed: int
) -> None:
    policy = Backoff(base_s=base, factor=factor, max_s=cap)
    bound = min(cap, base * factor ** min(attempt - 1, 64))
    delay = backoff_delay(policy, attempt, random.Random(seed))
    assert 0 <= delay <= bound
    assert backoff_delay(Backoff(base_s=base, factor=factor, max_s=cap, jitter=False), attempt) == (
        pytest.approx(bound)
    )


def test_backoff_grows_exponentially_without_jitter() -> None:
    policy = Backoff(base_s=1, factor=2, max_s=10, jitter=False)
    assert [backoff_delay(policy, a) for a in range(1, 7)] == [1, 2, 4, 8, 10, 10]


@given(st.lists(st.tuples(st.sampled_from(["started", "succeeded", "failed"]),
                          st.integers(1, 3), st.integers(1, 4)), max_size=30))  # fmt: skip
def test_at_most_one_terminal_outcome(reports: list[tuple[str, int, int]]) -> None:
    """Whatever reports arrive, in whatever order, the job ends terminal at most once
    and never moves backwards from a terminal state."""
    current = row()
    terminal_decisions = 0
    kinds = {"started": started, "succeeded": succeeded, "failed": failed}
    for kind, attempt, delivery in reports:
        decision = apply_report(current, kinds[kind](attempt=attempt, delivery=delivery))
        if isinstance(decision, Decision):
            if current.state.terminal:
                raise AssertionError("a terminal job changed")
            if decision.row.state.terminal:
                terminal_decisions += 1
            current = decision.row
            if current.state is JobState.PENDING:  # the dispatcher re-dispatches
                current = JobRow(JobState.DISPATCHED, current.attempt, 0, 3, Backoff())
    assert terminal_decisions <= 1
