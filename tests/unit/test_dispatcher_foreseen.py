"""The work message a batch foresees for its single dependent."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import msgspec
import pytest

from workron.dispatcher.apply import _foreseen
from workron.events import Work

from .test_dispatcher_reports import JOB, job

CHILD = uuid.UUID("01900000-0000-7000-8000-0000000000c1")
OTHER = uuid.UUID("01900000-0000-7000-8000-0000000000f2")


def child(**changes: Any) -> dict[str, Any]:
    row = {
        "id": CHILD, "state": "blocked", "unmet": 2, "due": True, "queue": "q",
        "priority": 0, "run_at": None, "attempt": 1, "max_attempts": 3, "task": "t.join",
        "payload": '{"n": 1}', "command": None, "shell": False, "timeout_s": None,
        "checkpoint": None, "traceparent": None,
        "parent_ids": [JOB, OTHER], "parent_keys": ["a", "b"],
        "parent_results": ["null", '{"from": "b"}'],
    }  # fmt: skip
    return {**row, **changes}


def parent(result: str | None, **changes: Any) -> Any:
    return dataclasses.replace(job(), result=result, waiters=[CHILD], next=child(**changes))


def test_the_last_parent_of_a_due_job_foresees_its_work_with_fresh_results() -> None:
    found = _foreseen([parent('{"from": "a"}', unmet=1)], {CHILD: 1})
    assert found is not None
    job_id, message = found
    work = msgspec.json.decode(message.payload, type=Work)
    assert (job_id, work.job_id, work.task, work.attempt) == (CHILD, CHILD, "t.join", 1)
    # The result this batch writes, not the one read before it: the other
    # parent's result is the one in the ledger.
    assert work.parents == {"a": msgspec.Raw(b'{"from": "a"}'), "b": msgspec.Raw(b'{"from": "b"}')}


@pytest.mark.parametrize(
    "changes",
    [
        {"unmet": 2},  # another parent is still to finish
        {"unmet": 1, "due": False},  # released to pending, not dispatched
        {"unmet": 1, "state": "cancelled"},  # cancelled meanwhile
    ],
)
def test_nothing_is_foreseen_unless_the_job_is_dispatched_now(changes: dict[str, Any]) -> None:
    assert _foreseen([parent('{"from": "a"}', **changes)], {CHILD: 1}) is None


def test_a_dependent_without_its_row_is_not_foreseen() -> None:
    bare = dataclasses.replace(job(), result="null", waiters=[CHILD])
    assert _foreseen([bare], {CHILD: 1}) is None
