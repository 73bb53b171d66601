"""Wire types: constraints live in the types, tags never change."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from workron.events import JobFinished, JobSpec, Report, ReportFailed, Submission, Work


def test_defaults() -> None:
    spec = msgspec.json.decode(b'{"command": ["echo", "hi"]}', type=JobSpec)
    assert spec.queue == "default" and spec.max_attempts == 3 and spec.priority == 0


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"task": "t", "max_attempts": 0}', "$.max_attempts"),
        (b'{"task": "t", "queue": "has space"}', "$.queue"),
        (b'{"task": "t", "backoff": {"base_s": -1}}', "$.backoff.base_s"),
        (b'{"task": "t", "resources": {"vram_mb": -5}}', "$.resources.vram_mb"),
        (b'{"task": "t", "surprise": 1}', "surprise"),
        (b'{"task": "1bad"}', "$.task"),
    ],
)
def test_errors_name_the_field(body: bytes, path: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(body, type=JobSpec)
    assert path in str(info.value)


def test_tags_are_explicit_and_stable() -> None:
    job = uuid.uuid4()
    failed = ReportFailed(job_id=job, attempt=1, delivery=1, worker_id="w", at=1.0, error="x")
    wire = msgspec.json.decode(msgspec.json.encode(failed))
    assert wire["type"] == "failed"
    assert msgspec.json.decode(msgspec.json.encode(failed), type=Report) == failed
    assert (
        msgspec.json.decode(
            msgspec.json.encode(Work(job_id=job, attempt=1, max_attempts=1, queue="q"))
        )["type"]
        == "work"
    )
    assert (
        msgspec.json.decode(msgspec.json.encode(Submission(id=job, job=JobSpec(task="t"))))["type"]
        == "submit"
    )
    finished = JobFinished(job_id=job, queue="q", state="succeeded", attempt=1)
    assert msgspec.json.decode(msgspec.json.encode(finished))["type"] == "job.finished"
