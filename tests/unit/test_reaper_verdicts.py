"""The reaper's pure decisions, and the small pure pieces of liveness."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workron import bus
from workron._control import ControlListener
from workron._heartbeat import machine_resources
from workron.dispatcher.reports import Locked, plan_batch
from workron.events import Backoff, JobState, ReportCancelled, ReportSucceeded
from workron.liveness import CancelJob, ExecutionRef, cancel_message
from workron.reaper.advisories import parse
from workron.reaper.heartbeats import decode
from workron.reaper.orphans import Backlog
from workron.reaper.verdicts import (
    Orphan,
    Token,
    ack_subject,
    lost_in_queue,
    reap_decision,
    stop_reason,
    why_reaped,
)
from workron.states import JobRow, Rejected, apply_report

JOB = uuid.UUID("01900000-0000-7000-8000-000000000001")


def ref(attempt: int = 2, delivery: int = 1) -> ExecutionRef:
    return ExecutionRef(job_id=JOB, attempt=attempt, delivery=delivery)


@pytest.mark.parametrize(
    ("state", "attempt", "delivery", "expected"),
    [
        (JobState.RUNNING, 2, 1, None),  # current
        (JobState.DISPATCHED, 2, 0, None),  # its `started` is on its way
        (JobState.SUCCEEDED, 2, 1, None),  # reported, ack on its way
        (JobState.RUNNING, 2, 2, "fenced"),  # a redelivery took over
        (JobState.PENDING, 3, 0, "superseded"),  # retried, reaped, re-dispatched
        (JobState.FAILED, 3, 1, "superseded"),
        (JobState.CANCELLED, 2, 1, "cancelled"),
        (JobState.CANCELLED, 2, 0, "cancelled"),
        (JobState.CANCELLED, 3, 0, "superseded"),  # cancelled, then retried by request
        (JobState.SUCCEEDED, 2, 0, "superseded"),  # done by an earlier delivery
        (JobState.RUNNING, 1, 5, None),  # older than the execution: not the ledger's to judge
    ],
)
def test_stop_reason(state: JobState, attempt: int, delivery: int, expected: str | None) -> None:
    assert stop_reason(ref(), Token(state, attempt, delivery)) == expected


def test_unknown_jobs_run_on() -> None:
    assert stop_reason(ref(), None) is None


def orphan(attempt: int, max_attempts: int, why_key: str = "dead") -> Orphan:
    why, error = why_reaped(why_key, "w1")
    row = JobRow(JobState.RUNNING, attempt, 1, max_attempts, Backoff(base_s=4, jitter=False))
    return Orphan(JOB, "q", row, "w1", why, error)


def test_an_orphan_is_a_failed_attempt_under_the_retry_policy() -> None:
    decision = reap_decision(orphan(1, 3), random.Random(1))
    assert decision.kind == "retrying" and decision.retry_in == 4.0
    assert (decision.row.state, decision.row.attempt, decision.row.delivery) == (
        JobState.PENDING, 2, 0
    )  # fmt: skip
    last = reap_decision(orphan(3, 3))
    assert last.kind == "failed" and last.row.state is JobState.FAILED
    assert last.row.attempt == 3


def test_why_reaped() -> None:
    assert why_reaped("dead", "w1") == ("worker_dead", "worker w1 died (missed its heartbeats)")
    assert why_reaped("stopped", "w1")[0] == "worker_stopped"
    assert why_reaped("untracked", "w1")[0] == "not_running"
    assert why_reaped("unknown", "w1")[0] == "worker_unknown"
    assert why_reaped("expired", "w1") == (
        "lease_expired", "lease expired: worker w1 stopped renewing it"
    )  # fmt: skip


def test_ack_subject_finds_the_execution_in_the_last_heartbeat() -> None:
    refs = [
        ExecutionRef(job_id=JOB, attempt=1, delivery=1, ack="$JS.ACK.a"),
        ExecutionRef(job_id=JOB, attempt=2, delivery=1, ack="$JS.ACK.b"),
    ]
    executions = msgspec.json.encode(refs).decode()
    assert ack_subject(executions, JOB, 2, 1) == "$JS.ACK.b"
    assert ack_subject(executions, JOB, 2, 2) is None
    assert ack_subject("[]", JOB, 1, 1) is None
    assert ack_subject(None, JOB, 1, 1) is None
    assert ack_subject("not json", JOB, 1, 1) is None


def test_lost_in_queue_by_counts_then_ids() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    candidates = [(a, 1), (b, 2)]
    assert lost_in_queue(candidates, in_stream=0, live=5, present=None) == [a, b]
    assert lost_in_queue(candidates, in_stream=5, live=5, present=None) == []
    assert lost_in_queue(candidates, in_stream=9, live=5, present=None) == []
    assert lost_in_queue(candidates, in_stream=3, live=5, present=None) is None
    present = {f"work:{a}:1", f"work:{b}:1"}  # b's message is of an older attempt
    assert lost_in_queue(candidates, in_stream=3, live=5, present=present) == [b]


@given(
    first=st.integers(min_value=1, max_value=1000),
    extra=st.integers(min_value=0, max_value=1000),
    mark=st.integers(min_value=0, max_value=3000),
)
def test_backlog_waits_for_every_report_up_to_the_mark(first: int, extra: int, mark: int) -> None:
    waiting = Backlog(first_seq=first, last_seq=first + extra, messages=extra + 1)
    assert waiting.applied_through(mark) == (mark < first)
    assert Backlog(first_seq=first, last_seq=first - 1, messages=0).applied_through(mark)
    # Nothing pending at the consumer: a report past MaxDeliver stays in the
    # stream, never delivered again, and must not hold orphans back.
    assert Backlog(first, first + extra, extra + 1, idle=True).applied_through(mark)


def test_a_cancel_confirmation_is_history_not_a_fenced_write() -> None:
    row = JobRow(JobState.CANCELLED, 2, 1, 3, Backoff())
    confirm = ReportCancelled(job_id=JOB, attempt=2, delivery=1, worker_id="w", at=1.0)
    assert apply_report(row, confirm) == Rejected("cancel_confirmed")
    late = ReportSucceeded(job_id=JOB, attempt=2, delivery=1, worker_id="w", at=1.0)
    assert apply_report(row, late) == Rejected("job_finished")
    older = ReportCancelled(job_id=JOB, attempt=1, delivery=1, worker_id="w", at=1.0)
    assert apply_report(row, older) == Rejected("job_finished")

    locked = Locked(
        id=JOB, queue="q", old=row, row=row, run_at=datetime.now(UTC), worker_id="w",
        started_at=None, finished_at=None, error=None,
    )  # fmt: skip
    plan = plan_batch({JOB: locked}, [confirm])
    assert plan.fenced == 0 and not locked.touched
    assert plan.events == [(JOB, "stopped", 2, 1, "w", "cancelled")]


def test_subject_tokens_and_cancel_messages() -> None:
    assert bus.subject_token("host.example.com-12") == "host_example_com-12"
    assert bus.subject_token("a b*>") == "a_b__"
    assert bus.subject_token("") == "_"
    assert bus.control_subject("w.1") == "workron.control.w_1"
    assert bus.heartbeat_subject("w.1") == "workron.hb.w_1"
    subject, payload, msg_id = cancel_message(JOB, 2, worker_id=None, reason="r")
    assert (subject, msg_id) == (bus.CONTROL_BROADCAST, f"cancel:{JOB}:2")
    assert msgspec.json.decode(payload, type=CancelJob) == CancelJob(
        job_id=JOB, attempt=2, reason="r"
    )
    assert cancel_message(JOB, 2, worker_id="w", reason="r")[0] == "workron.control.w"


def test_control_listener_remembers_cancels_for_a_while() -> None:
    listener = ControlListener(None, "w", lambda _: None, keep_s=600, max_entries=2)  # type: ignore[arg-type]
    listener.remember(CancelJob(job_id=JOB, attempt=2))
    assert listener.cancelled(JOB, 1) and listener.cancelled(JOB, 2)
    assert not listener.cancelled(JOB, 3)  # a retry after the cancel runs
    listener.remember(CancelJob(job_id=JOB, attempt=1))  # older news changes nothing
    assert listener.cancelled(JOB, 2)
    others = [uuid.uuid4(), uuid.uuid4()]
    for other in others:
        listener.remember(CancelJob(job_id=other, attempt=1))
    assert not listener.cancelled(JOB, 1)  # the oldest went past max_entries
    assert all(listener.cancelled(o, 1) for o in others)


def test_machine_resources() -> None:
    resources = machine_resources(vram_mb=24576)
    assert resources.cpu >= 1 and resources.memory_mb > 0 and resources.vram_mb == 24576


def test_a_heartbeat_holding_nul_is_refused_on_its_own() -> None:
    assert decode(b'{"type": "heartbeat", "worker_id": "a\\u0000"}') == (
        "not a heartbeat: a string holds \\u0000"
    )
    assert isinstance(decode(b"{}"), str)


def test_advisories_are_parsed() -> None:
    body = b'{"stream": "WORK", "consumer": "work-q", "stream_seq": 9, "deliveries": 5}'
    advisory = parse("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.WORK.work-q", body)
    assert advisory is not None and advisory.source == "WORK/work-q"
    assert advisory.describe() == (
        "not acknowledged after 5 deliveries (MaxDeliver); stream WORK sequence 9"
    )
    terminated = parse(
        "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.WORK.work-q",
        body[:-1] + b', "reason": "bad payload"}',
    )
    assert terminated is not None and terminated.describe().endswith(
        "deliveries: bad payload; stream WORK sequence 9"
    )
    assert parse("$JS.EVENT.ADVISORY.CONSUMER.CREATED.WORK.x", body) is None
    assert parse("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.WORK.x", b"{") is None
