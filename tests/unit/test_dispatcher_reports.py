"""Decoding reports and folding a batch of them over the jobs they touch."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from workron.dispatcher.reports import (
    Locked,
    admit_result,
    decode,
    plan_batch,
)
from workron.events import (
    MAX_RESULT_BYTES,
    Backoff,
    JobState,
    ReportBatch,
    ReportCancelled,
    ReportFailed,
    ReportStarted,
    ReportSucceeded,
    report_id,
)
from workron.states import JobRow

JOB = uuid.UUID("01900000-0000-7000-8000-000000000001")
T0 = 1_700_000_000.0


def job(state: JobState = JobState.DISPATCHED, *, attempt: int = 1, delivery: int = 0) -> Locked:
    row = JobRow(state, attempt, delivery, max_attempts=3, backoff=Backoff(base_s=10, factor=2))
    return Locked(
        id=JOB,
        queue="q",
        old=row,
        row=row,
        run_at=datetime.fromtimestamp(T0, UTC),
        worker_id=None,
        started_at=None,
        finished_at=None,
        error=None,
    )


def started(delivery: int = 1, *, attempt: int = 1, at: float = T0 + 1) -> ReportStarted:
    return ReportStarted(job_id=JOB, attempt=attempt, delivery=delivery, worker_id="w", at=at)


def succeeded(delivery: int = 1, result: bytes = b'{"ok":true}') -> ReportSucceeded:
    return ReportSucceeded(
        job_id=JOB, attempt=1, delivery=delivery, worker_id="w", at=T0 + 3,
        result=msgspec.Raw(result),
    )  # fmt: skip


def failed(*, retryable: bool = True) -> ReportFailed:
    return ReportFailed(
        job_id=JOB, attempt=1, delivery=1, worker_id="w", at=T0 + 2, error="boom",
        retryable=retryable,
    )  # fmt: skip


def test_report_id_matches_what_workers_send() -> None:
    assert report_id(started(2)) == f"started:{JOB}:1:2"


def test_decode_prefers_the_header_id() -> None:
    data = msgspec.json.encode(started())
    (given,) = decode("s", data, {"Nats-Msg-Id": "given"})
    assert given.msg_id == "given"
    (fallback,) = decode("s", data, None)
    assert fallback.msg_id == f"started:{JOB}:1:1" and fallback.report == started()


def test_a_batch_decodes_to_its_reports_each_with_its_own_id() -> None:
    batch = ReportBatch(reports=[started(), failed()])
    items = decode("workron.report.q", msgspec.json.encode(batch), None)
    assert [item.report for item in items] == [started(), failed()]
    assert [item.msg_id for item in items] == [f"started:{JOB}:1:1", f"failed:{JOB}:1:1"]
    # Each keeps a body of its own, for a dead letter.
    assert msgspec.json.decode(items[1].data, type=ReportFailed) == failed()


def test_undecodable_message_keeps_its_reason() -> None:
    (item,) = decode("workron.report.q", b'{"type": "exploded"}', {"Nats-Msg-Id": "x"})
    assert item.report is None and item.msg_id == "x"
    assert item.error and item.error.startswith("undecodable report")
    (nameless,) = decode("s", b"not json", None)
    assert nameless.msg_id is None


@pytest.mark.parametrize(
    "result",
    [b'"' + b"x" * MAX_RESULT_BYTES + b'"', b'{"a": "nul \\u0000 here"}'],
    ids=["too-large", "nul-escape"],
)
def test_unstorable_result_becomes_a_final_failure(result: bytes) -> None:
    admitted = admit_result(succeeded(result=result))
    assert isinstance(admitted, ReportFailed) and not admitted.retryable


def test_storable_results_pass() -> None:
    # An escaped backslash before "u0000" is text, not a NUL.
    for ok in (b"null", b'{"a": [1, 2]}', b'"\\\\u0000"'):
        report = succeeded(result=ok)
        assert admit_result(report) is report


def test_started_and_succeeded_in_one_batch_fold_into_one_row() -> None:
    jobs = {JOB: job()}
    plan = plan_batch(jobs, [started(), succeeded()])
    final = jobs[JOB]
    assert final.touched and final.row.state is JobState.SUCCEEDED and final.row.delivery == 1
    assert final.started_at == datetime.fromtimestamp(T0 + 1, UTC)
    assert final.finished_at == datetime.fromtimestamp(T0 + 3, UTC)
    assert final.result == '{"ok":true}'
    assert [e[1] for e in plan.events] == ["started", "succeeded"]
    [event] = plan.finished
    assert (event.job_id, event.state, event.attempt) == (JOB, "succeeded", 1)
    assert plan.observed.completed == [("q", "succeeded")]
    assert plan.observed.queue_wait == [("q", 1.0)]
    assert plan.observed.run_time == [("q", "succeeded", 2.0)]


def test_stale_report_is_fenced_and_changes_nothing() -> None:
    jobs = {JOB: job(JobState.RUNNING, delivery=2)}
    plan = plan_batch(jobs, [succeeded(delivery=1)])
    assert not jobs[JOB].touched and plan.fenced == 1
    [event] = plan.events
    assert event[1] == "fenced" and event[5] and event[5].startswith("stale_token")
    assert plan.observed.fenced == [("stale_token", JOB)]
    assert not plan.finished


def test_retry_schedules_the_next_attempt() -> None:
    jobs = {JOB: job(JobState.RUNNING, delivery=1)}
    jobs[JOB].started_at = datetime.fromtimestamp(T0 + 1, UTC)
    plan = plan_batch(jobs, [failed()], random.Random(1))
    final = jobs[JOB]
    assert final.started_at is None  # the next attempt has not started
    assert plan.observed.run_time == [("q", "retrying", 1.0)]
    assert (final.row.state, final.row.attempt, final.row.delivery) == (JobState.PENDING, 2, 0)
    assert final.retry_in is not None and 0 <= final.retry_in <= 10
    assert final.error == "boom" and not plan.finished
    assert plan.observed.retried == ["q"]
    assert [e[1] for e in plan.events] == ["retrying"]


def test_non_retryable_failure_finishes_the_job() -> None:
    jobs = {JOB: job(JobState.RUNNING, delivery=1)}
    plan = plan_batch(jobs, [failed(retryable=False)])
    assert jobs[JOB].row.state is JobState.FAILED and jobs[JOB].error == "boom"
    [finished] = plan.finished
    assert (finished.state, finished.error) == ("failed", "boom")


def test_cancelled_job_rejects_late_reports() -> None:
    jobs = {JOB: job(JobState.CANCELLED)}
    plan = plan_batch(jobs, [succeeded()])
    assert plan.observed.fenced == [("job_finished", JOB)] and not jobs[JOB].touched


def test_worker_cancellation_is_recorded() -> None:
    jobs = {JOB: job(JobState.RUNNING, delivery=1)}
    report = ReportCancelled(job_id=JOB, attempt=1, delivery=1, worker_id="w", at=T0, reason="bye")
    plan = plan_batch(jobs, [report])
    assert jobs[JOB].row.state is JobState.CANCELLED and jobs[JOB].error == "bye"
    assert plan.observed.completed == [("q", "cancelled")]


def test_reports_for_unknown_jobs_are_set_apart() -> None:
    other = ReportStarted(job_id=uuid.uuid4(), attempt=1, delivery=1, worker_id="w", at=T0)
    plan = plan_batch({JOB: job()}, [started(), other])
    assert plan.unknown == [1]
