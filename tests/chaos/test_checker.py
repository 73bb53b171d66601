"""The chaos checker on hand-made rows: each verdict can be reached, and the
histories that real faults leave behind (a redelivery after a kill, a fenced
late report, a retry) are not mistaken for violations."""

from __future__ import annotations

import itertools
from pathlib import Path
from uuid import uuid4

import pytest

from .checker import Event, JobRow, Verdict, check, classify, read_executions

JOB = uuid4()
_ids = itertools.count(1)


def ev(kind: str, token: str = "1.1", at: float = 0.0, worker: str | None = "w1") -> Event:
    attempt, delivery = (int(x) for x in token.split("."))
    return Event(next(_ids), JOB, at, kind, attempt, delivery, worker)


def submitted() -> Event:
    return ev("submitted", "1.0", worker=None)


def verdict(state: str | None, events: list[Event], lease_s: float | None = 3.0) -> Verdict:
    job = None if state is None else JobRow(JOB, state)
    return classify(JOB, job, events, lease_s=lease_s, slack_s=0.2).verdict


def test_one_execution_one_outcome() -> None:
    history = [submitted(), ev("started", at=0.1), ev("succeeded", at=0.4)]
    assert verdict("succeeded", history) is Verdict.SUCCEEDED_ONCE


def test_a_failure_after_retries_is_one_outcome() -> None:
    history = [
        submitted(),
        ev("started", "1.1", 0.1),
        ev("retrying", "1.1", 0.2),
        ev("dispatched", "2.0", 1.0, worker=None),
        ev("started", "2.1", 1.1),
        ev("failed", "2.1", 1.2),
    ]
    assert verdict("failed", history) is Verdict.FAILED_ONCE


@pytest.mark.parametrize("state", [None, "running", "dispatched", "pending"])
def test_missing_or_unfinished_is_lost(state: str | None) -> None:
    assert verdict(state, [submitted(), ev("started")]) is Verdict.LOST


def test_two_outcomes_are_double() -> None:
    history = [ev("started", "1.1", 0), ev("succeeded", "1.1", 1), ev("succeeded", "1.2", 5)]
    assert verdict("succeeded", history) is Verdict.DOUBLE


def test_anything_accepted_after_the_outcome_is_a_flap() -> None:
    history = [ev("started", "1.1", 0), ev("succeeded", "1.1", 1), ev("started", "1.2", 5)]
    assert verdict("succeeded", history) is Verdict.DOUBLE


def test_fenced_reports_after_the_outcome_are_fine() -> None:
    history = [
        ev("started", "1.1", 0),
        ev("succeeded", "1.1", 1),
        ev("fenced", "1.2", 5, worker="w2"),
    ]
    assert verdict("succeeded", history) is Verdict.SUCCEEDED_ONCE


def test_redelivery_after_the_lease_ran_out_is_fine() -> None:
    # A worker killed mid-job: its execution never reports again; JetStream
    # redelivers after AckWait and another worker finishes the job.
    history = [
        submitted(),
        ev("started", "1.1", 10.0, "w1"),
        ev("started", "1.2", 13.1, "w2"),
        ev("succeeded", "1.2", 13.5, "w2"),
    ]
    assert verdict("succeeded", history) is Verdict.SUCCEEDED_ONCE


def test_stopped_worker_is_fenced_not_overlapping() -> None:
    # SIGSTOP past the lease, SIGCONT: the late success is refused.
    history = [
        ev("started", "1.1", 10.0, "w1"),
        ev("started", "1.2", 13.2, "w2"),
        ev("succeeded", "1.2", 13.6, "w2"),
        ev("fenced", "1.1", 20.0, "w1"),
    ]
    assert verdict("succeeded", history) is Verdict.SUCCEEDED_ONCE


def test_second_start_inside_the_first_lease_overlaps() -> None:
    history = [
        ev("started", "1.1", 10.0, "w1"),
        ev("started", "1.2", 11.0, "w2"),
        ev("succeeded", "1.2", 11.4, "w2"),
    ]
    assert verdict("succeeded", history) is Verdict.OVERLAPPING
    # Without a lease to judge by, only the row order can show an overlap.
    assert verdict("succeeded", history, lease_s=None) is Verdict.SUCCEEDED_ONCE


def test_a_revoked_lease_may_be_followed_at_once() -> None:
    history = [
        ev("started", "1.1", 10.0, "w1"),
        ev("handed_back", "1.1", 10.5, worker="w1"),
        ev("started", "1.2", 11.0, "w2"),
        ev("succeeded", "1.2", 11.4, "w2"),
    ]
    assert verdict("succeeded", history) is Verdict.SUCCEEDED_ONCE


def test_a_retry_decided_by_the_ledger_ends_the_lease() -> None:
    # A reaper found w1 dead and gave the job a new attempt at once.
    history = [
        ev("started", "1.1", 10.0, "w1"),
        ev("retrying", "1.1", 16.0, worker=None),
        ev("started", "2.1", 16.5, "w2"),
        ev("succeeded", "2.1", 17.0, "w2"),
    ]
    assert verdict("succeeded", history, lease_s=30.0) is Verdict.SUCCEEDED_ONCE


def test_report_of_the_old_execution_accepted_after_the_new_start_overlaps() -> None:
    # Same timestamp (one transaction): only the row order shows it.
    history = [
        ev("started", "1.1", 10.0, "w1"),
        ev("started", "1.2", 20.0, "w2"),
        ev("checkpoint", "1.1", 20.0, "w1"),
        ev("succeeded", "1.2", 20.5, "w2"),
    ]
    assert verdict("succeeded", history, lease_s=None) is Verdict.OVERLAPPING


def test_terminal_without_matching_outcome_is_inconsistent() -> None:
    assert verdict("succeeded", [ev("started")]) is Verdict.INCONSISTENT
    assert verdict("failed", [ev("started"), ev("succeeded")]) is Verdict.INCONSISTENT


def test_cancel_by_request_is_one_outcome() -> None:
    history = [submitted(), ev("cancelled", "1.0", 1.0, worker=None)]
    assert verdict("cancelled", history) is Verdict.FAILED_ONCE


def test_summary_counts_each_job_once_and_measures_recovery(tmp_path: Path) -> None:
    ok, lost, double = JOB, uuid4(), uuid4()
    jobs = {
        ok: JobRow(ok, "succeeded", "w1", 105.0),
        double: JobRow(double, "succeeded", "w2", 104.0),
    }
    events = {
        ok: [ev("started", "1.1", 101), ev("succeeded", "1.1", 105)],
        double: [
            Event(next(_ids), double, 101, "succeeded", 1, 1, "w1"),
            Event(next(_ids), double, 102, "succeeded", 1, 2, "w2"),
            Event(next(_ids), double, 103, "fenced", 1, 1, "w1"),
        ],
    }
    log = tmp_path / "exec.log"
    log.write_text(
        f"{ok} 1.1 start 100.0 w1\n{ok} 1.1 end 100.3 w1\n"
        f"{double} 1.1 start 100.0 w1\n{double} 1.2 start 101.0 w2\n"
        f"{double} 1.2 end 101.3 w2\n{double} 1.1 en"  # torn by a kill
    )
    executions = read_executions(log)
    assert [(e.token, e.end) for e in executions] == [("1.1", 100.3), ("1.1", None), ("1.2", 101.3)]
    summary = check(
        [ok, lost, double, ok], jobs, events,
        fenced_counter=1, executions=executions, last_fault_at=100.0, last_ack_at=101.0,
    )  # fmt: skip
    assert (summary[Verdict.SUCCEEDED_ONCE], summary[Verdict.LOST], summary[Verdict.DOUBLE]) == (
        1,
        1,
        1,
    )
    assert summary.recover_s is None  # a lost job never finished
    assert summary.line().startswith(
        "jobs=3 succeeded_once=1 lost=1 double=1 overlapping=0 fenced=1 recover_s=n/a"
    )
    assert "executions=3 reexecuted=1" in summary.line() and "fenced_events=1" in summary.line()
    assert {c.job_id for c in summary.problems} == {lost, double}

    fine = check([ok], jobs, events, last_fault_at=100.0, last_ack_at=101.0)
    assert fine.recover_s == pytest.approx(5.0) and fine.drain_s == pytest.approx(4.0)
    assert not fine.problems
