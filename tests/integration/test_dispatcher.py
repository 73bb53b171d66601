"""The dispatcher against real NATS and PostgreSQL: reports applied once and
fenced by token, retries with backoff, dispatch of due jobs by priority."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from uuid import UUID

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import jobs, ledger
from workron._ids import uuid7
from workron._pull import Puller
from workron.dispatcher import Dispatcher
from workron.dispatcher.apply import apply_batch
from workron.dispatcher.reports import decode
from workron.dispatcher.service import Idle
from workron.events import (
    JobFinished,
    JobSpec,
    JobState,
    Report,
    ReportBatch,
    ReportFailed,
    ReportStarted,
    ReportSucceeded,
    Work,
    report_id,
)
from workron.telemetry import Metrics

_encode = msgspec.json.Encoder()


async def submit(pool: ledger.Pool, js: JetStreamContext, **spec: object) -> UUID:
    planned = jobs.plan(uuid7(), msgspec.convert({"task": "t.run", **spec}, JobSpec))
    [(job_id, _)] = await jobs.submit(pool, js, [planned])
    return job_id


async def send(js: JetStreamContext, *reports: Report, queue: str = "default") -> None:
    for report in reports:
        await js.publish(
            f"workron.report.{queue}",
            _encode.encode(report),
            headers={"Nats-Msg-Id": report_id(report)},
        )


def started(job_id: UUID, attempt: int = 1, delivery: int = 1, worker: str = "w1") -> Report:
    return ReportStarted(
        job_id=job_id, attempt=attempt, delivery=delivery, worker_id=worker, at=1.7e9
    )


def succeeded(job_id: UUID, delivery: int = 1, result: bytes = b'{"answer":42}') -> Report:
    return ReportSucceeded(
        job_id=job_id, attempt=1, delivery=delivery, worker_id="w1", at=1.7e9 + 2,
        result=msgspec.Raw(result),
    )  # fmt: skip


def failed(job_id: UUID, attempt: int, *, retryable: bool = True) -> Report:
    return ReportFailed(
        job_id=job_id, attempt=attempt, delivery=1, worker_id="w1", at=1.7e9 + 1,
        error=f"boom {attempt}", retryable=retryable,
    )  # fmt: skip


async def kinds(pool: ledger.Pool, job_id: UUID) -> list[str]:
    return [e.kind for e in await jobs.list_events(pool, job_id)]


async def fenced_count(pool: ledger.Pool) -> int | None:
    value: int | None = await pool.fetchval(
        "SELECT value FROM counters WHERE name = 'fenced_reports'"
    )
    return value


async def make_due(pool: ledger.Pool) -> None:
    await pool.execute(
        "UPDATE jobs SET run_at = now() - interval '1 second' WHERE state = 'pending'"
    )


async def latest_work(js: JetStreamContext, queue: str = "default") -> tuple[Work, str]:
    stored = await js.get_last_msg("WORK", f"workron.work.{queue}")
    assert stored.data is not None and stored.headers
    return msgspec.json.decode(stored.data, type=Work), stored.headers["Nats-Msg-Id"]


async def retry_in(pool: ledger.Pool, job_id: UUID) -> float:
    seconds: float = await pool.fetchval(
        "SELECT extract(epoch FROM run_at - now())::float8 FROM jobs WHERE id = $1", job_id
    )
    return seconds


async def reports_settled(js: JetStreamContext) -> None:
    """Acked or terminated, every report leaves the work-queue stream (acks are
    not waited for, so this waits, bounded)."""
    async with asyncio.timeout(5):
        while (await js.stream_info("REPORTS")).state.messages:
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(dispatcher: Dispatcher) -> AsyncIterator[None]:
    task = asyncio.create_task(dispatcher.run())
    try:
        await asyncio.wait_for(dispatcher.listener.ready.wait(), 5)
        yield
    finally:
        dispatcher.stop()
        await asyncio.wait_for(task, 15)


def dispatcher(pool: ledger.Pool, nc: NATS, **options: object) -> Dispatcher:
    return Dispatcher(pool, nc, Metrics(), rng=random.Random(7), **options)  # type: ignore[arg-type]


async def test_started_then_succeeded_is_recorded_once(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js)
    d = dispatcher(pool, nc)
    await send(js, started(job_id), succeeded(job_id))
    assert await d.run_until_idle() == Idle(reports=2, dispatched=0)
    job = await jobs.get(pool, job_id)
    assert job.state is JobState.SUCCEEDED and job.result == {"answer": 42}
    assert (job.token, job.worker_id, job.error) == ("1.1", "w1", None)
    assert job.started_at and job.started_at.timestamp() == 1.7e9
    assert job.finished_at and job.finished_at.timestamp() == 1.7e9 + 2
    assert await kinds(pool, job_id) == ["submitted", "started", "succeeded"]
    stored = await js.get_last_msg("EVENTS", "workron.evt.job.finished")
    assert stored.data is not None
    assert msgspec.json.decode(stored.data, type=JobFinished) == JobFinished(
        job_id=job_id, queue="default", state="succeeded", attempt=1, resolved=True
    )
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    await reports_settled(js)
    assert d._metrics.completed.labels(queue="default", outcome="succeeded")._value.get() == 1
    assert await d.run_until_idle() == Idle(reports=0, dispatched=0)


async def test_stale_fencing_token_is_rejected_and_counted(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js)
    d = dispatcher(pool, nc)
    await send(js, started(job_id, delivery=1, worker="w1"))
    await d.run_until_idle()
    # Redelivery 2 takes the execution over; delivery 1's late success is fenced.
    await send(js, started(job_id, delivery=2, worker="w2"), succeeded(job_id, delivery=1))
    await d.run_until_idle()
    job = await jobs.get(pool, job_id)
    assert (job.state, job.token, job.worker_id) == (JobState.RUNNING, "1.2", "w2")
    assert await fenced_count(pool) == 1
    events = await jobs.list_events(pool, job_id)
    [fence] = [e for e in events if e.kind == "fenced"]
    assert (fence.delivery, fence.worker_id) == (1, "w1")
    assert fence.detail and fence.detail.startswith("stale_token")
    assert d._metrics.fenced.labels(reason="stale_token")._value.get() == 1
    await send(js, succeeded(job_id, delivery=2))
    await d.run_until_idle()
    assert (await jobs.get(pool, job_id)).state is JobState.SUCCEEDED


async def test_redelivered_report_applies_once(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js)
    report = succeeded(job_id)
    (item,) = decode("workron.report.default", _encode.encode(report), {"Nats-Msg-Id": "r-1"})
    keyed = ledger.KeyedTransactions(pool)
    first = await apply_batch(keyed, [item, item])  # a duplicate inside one batch, too
    again = await apply_batch(keyed, [item])
    await keyed.close()
    assert (first.applied, first.duplicates, len(first.finished)) == (1, 1, 1)
    assert (again.applied, again.duplicates, again.finished) == (0, 1, [])
    assert await kinds(pool, job_id) == ["submitted", "succeeded"]
    assert await fenced_count(pool) is None  # a duplicate is not a fenced write


async def test_failures_retry_with_backoff_until_max_attempts(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js, max_attempts=3, backoff={"base_s": 10, "factor": 2})
    d = dispatcher(pool, nc)
    for attempt, cap in ((1, 10.0), (2, 20.0)):
        await send(js, started(job_id, attempt), failed(job_id, attempt))
        await d.run_until_idle()
        job = await jobs.get(pool, job_id)
        assert (job.state, job.attempt, job.token) == (
            JobState.PENDING,
            attempt + 1,
            f"{attempt + 1}.0",
        )
        assert job.error == f"boom {attempt}"
        assert -1.0 <= await retry_in(pool, job_id) <= cap  # full jitter in [0, cap]
        assert (await d.run_until_idle()).dispatched == 0  # not due yet
        await make_due(pool)
        assert (await d.run_until_idle()).dispatched == 1
        work, msg_id = await latest_work(js)
        assert (work.job_id, work.attempt, msg_id) == (
            job_id,
            attempt + 1,
            f"work:{job_id}:{attempt + 1}",
        )
    await send(js, started(job_id, 3), failed(job_id, 3))
    await d.run_until_idle()
    job = await jobs.get(pool, job_id)
    assert (job.state, job.attempt, job.error) == (JobState.FAILED, 3, "boom 3")
    assert await kinds(pool, job_id) == [
        "submitted",
        *["started", "retrying", "dispatched"] * 2,
        "started",
        "failed",
    ]
    stored = await js.get_last_msg("EVENTS", "workron.evt.job.finished")
    assert stored.data is not None
    finished = msgspec.json.decode(stored.data, type=JobFinished)
    assert (finished.state, finished.attempt, finished.error) == ("failed", 3, "boom 3")
    assert d._metrics.retried.labels(queue="default")._value.get() == 2


async def test_non_retryable_failure_fails_at_once(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js, max_attempts=5)
    await send(js, started(job_id), failed(job_id, 1, retryable=False))
    await dispatcher(pool, nc).run_until_idle()
    job = await jobs.get(pool, job_id)
    assert (job.state, job.attempt, job.error) == (JobState.FAILED, 1, "boom 1")


async def test_due_jobs_are_dispatched_by_priority(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    low, high, mid = [await submit(pool, js, delay_s=3600, priority=p) for p in (-3, 5, 0)]
    await make_due(pool)
    later = await submit(pool, js, delay_s=3600)
    d = dispatcher(pool, nc)
    assert await d.run_until_idle() == Idle(reports=0, dispatched=3)
    order = []
    for seq in (1, 2, 3):
        stored = await js.get_msg("WORK", seq)
        assert stored.data is not None
        order.append(msgspec.json.decode(stored.data, type=Work).job_id)
    assert order == [high, mid, low]
    for job_id in order:
        assert (await jobs.get(pool, job_id)).state is JobState.DISPATCHED
        assert await kinds(pool, job_id) == ["submitted", "dispatched"]
    assert (await jobs.get(pool, later)).state is JobState.PENDING
    assert (await d.run_until_idle()).dispatched == 0  # dispatched once


async def test_cancelled_jobs_late_success_is_rejected(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js)
    d = dispatcher(pool, nc)
    await send(js, started(job_id))
    await d.run_until_idle()
    await jobs.cancel(pool, js, job_id)
    await send(js, succeeded(job_id))
    await d.run_until_idle()
    job = await jobs.get(pool, job_id)
    assert job.state is JobState.CANCELLED and job.result is None
    assert await fenced_count(pool) == 1
    assert (await kinds(pool, job_id))[-1] == "fenced"


async def test_bad_messages_are_terminated_and_recorded(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js)
    await js.publish("workron.report.default", b"not json", headers={"Nats-Msg-Id": "junk"})
    await send(js, started(uuid7()), started(job_id))  # an unknown job, then a good one
    d = dispatcher(pool, nc)
    assert (await d.run_until_idle()).reports == 3
    letters = await pool.fetch("SELECT source, msg_id, reason FROM dead_letters ORDER BY id")
    assert [r["source"] for r in letters] == ["reports", "reports"]
    assert letters[0]["msg_id"] == "junk" and letters[0]["reason"].startswith("undecodable")
    assert "does not exist" in letters[1]["reason"]
    assert (await jobs.get(pool, job_id)).state is JobState.RUNNING
    await reports_settled(js)
    assert d._metrics.dead_letters.labels(source="reports")._value.get() == 2


async def test_a_workers_batch_applies_report_by_report(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    first, second = await submit(pool, js), await submit(pool, js)
    stranger = uuid7()
    short = msgspec.structs.replace(succeeded(second), started_at=1.7e9 + 1)
    batch = ReportBatch(reports=[started(first), succeeded(first), started(stranger), short])
    await js.publish("workron.report.default", _encode.encode(batch))
    d = dispatcher(pool, nc)
    assert (await d.run_until_idle()).reports == 1  # one message
    assert (await jobs.get(pool, first)).state is JobState.SUCCEEDED
    # A short job's start came with its outcome: recorded as both.
    job = await jobs.get(pool, second)
    assert job.state is JobState.SUCCEEDED
    assert job.started_at and job.started_at.timestamp() == 1.7e9 + 1
    assert await kinds(pool, second) == ["submitted", "started", "succeeded"]
    # The report on a job that does not exist is a dead letter of its own,
    # not the message: the others in it applied.
    letters = await pool.fetch("SELECT msg_id, reason, body FROM dead_letters")
    assert [r["msg_id"] for r in letters] == [report_id(started(stranger))]
    assert "does not exist" in letters[0]["reason"]
    assert msgspec.json.decode(letters[0]["body"], type=ReportStarted).job_id == stranger
    await reports_settled(js)
    # Each report by its own id: the same reports sent alone change nothing.
    await send(js, succeeded(first), short)
    await d.run_until_idle()
    assert await kinds(pool, first) == ["submitted", "started", "succeeded"]
    assert await kinds(pool, second) == ["submitted", "started", "succeeded"]


async def test_ledger_unavailable_holds_the_batch_until_stop(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, database_url: str
) -> None:
    job_id = await submit(pool, js)
    gone = await ledger.connect(database_url, min_size=1, max_size=1)
    await gone.close()
    await send(js, started(job_id))
    async with Puller(nc, "REPORTS", "dispatcher") as puller:
        batch = await puller.fetch(10, wait=5)
        held = dispatcher(gone, nc, nak_delay_s=0.1)
        holding = asyncio.create_task(held.handle(batch))
        # Held, not nak'ed: a nak would spend one of MaxDeliver's deliveries
        # per retry, and a long outage would drop the report.
        deadline = asyncio.get_running_loop().time() + 1.5
        while asyncio.get_running_loop().time() < deadline:
            info = await js.consumer_info("REPORTS", "dispatcher")
            assert info.num_redelivered == 0 and info.num_ack_pending == 1
            assert not holding.done()
            await asyncio.sleep(0.1)
        held.stop()
        await asyncio.wait_for(holding, timeout=10)
        assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
        # Handed back on stop, not terminated: JetStream brings it back.
        redelivered = await puller.fetch(10, wait=5)
        assert [m.metadata.num_delivered for m in redelivered] == [2]
        await dispatcher(pool, nc).handle(redelivered)
    assert (await jobs.get(pool, job_id)).state is JobState.RUNNING


async def test_running_dispatcher_redispatches_a_prompt_retry(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    # Zero backoff and an idle poll far beyond the test's patience: only the
    # in-process wake-up explains a prompt second attempt.
    job_id = await submit(pool, js, backoff={"base_s": 0})
    work = await nc.subscribe("workron.work.default")
    async with running(dispatcher(pool, nc, idle_s=60.0)):
        await send(js, started(job_id), failed(job_id, 1))
        message = await work.next_msg(timeout=5)
        assert msgspec.json.decode(message.data, type=Work).attempt == 2


async def test_notify_wakes_the_scheduler_for_new_pending_jobs(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    work = await nc.subscribe("workron.work.default")

    async def insert_due() -> UUID:
        job_id = uuid7()
        await pool.execute(
            "INSERT INTO jobs (id, queue, state, command)"
            " VALUES ($1, 'default', 'pending', '[\"true\"]')",
            job_id,
        )
        return job_id

    async with running(dispatcher(pool, nc, idle_s=60.0)):
        await insert_due()
        await work.next_msg(timeout=5)  # the first pass may have found this one
        second = await insert_due()
        message = await work.next_msg(timeout=5)
        assert msgspec.json.decode(message.data, type=Work).job_id == second


async def test_inbox_is_pruned_in_batches(pool: ledger.Pool, nc: NATS) -> None:
    await pool.execute(
        """INSERT INTO inbox (consumer, msg_id, processed_at)
           SELECT c, 'm' || i, now() - make_interval(hours => h)
           FROM unnest(ARRAY['dispatcher', 'dispatcher', 'dispatcher', 'dispatcher', 'other'],
                       ARRAY[1, 2, 3, 4, 5], ARRAY[2, 2, 2, 0, 2]) AS t(c, i, h)"""
    )
    assert await dispatcher(pool, nc, prune_batch=2).prune_inbox() == 3
    left = await pool.fetch("SELECT consumer, msg_id FROM inbox ORDER BY msg_id")
    assert [(r["consumer"], r["msg_id"]) for r in left] == [("dispatcher", "m4"), ("other", "m5")]


def live_copy(report: Report) -> tuple[str, bytes, dict[str, str]]:
    """A worker's core-NATS copy of a report sent alone (bus.LIVE_REPORTS)."""
    headers = {"Nats-Msg-Id": report_id(report)}
    return "workron.live.report.default", _encode.encode(report), headers


async def until_state(
    pool: ledger.Pool, nc: NATS, job_id: UUID, state: JobState, report: Report
) -> None:
    """Send the live copy of ``report`` until the job is in ``state`` (the
    dispatcher subscribes some time after it starts)."""
    subject, data, headers = live_copy(report)
    async with asyncio.timeout(10):
        while (await jobs.get(pool, job_id)).state is not state:
            await nc.publish(subject, data, headers=headers)
            await asyncio.sleep(0.05)


async def test_a_live_copy_applies_at_once_and_its_original_applies_nothing(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js)
    report = started(job_id)
    async with running(dispatcher(pool, nc)):
        await until_state(pool, nc, job_id, JobState.RUNNING, report)
        assert (await js.stream_info("REPORTS")).state.messages == 0  # applied from the copy
        await send(js, report)  # the original, stored, comes later
        await reports_settled(js)  # and is acked
        await send(js, succeeded(job_id))  # a report with no copy applies as ever
        async with asyncio.timeout(5):
            while (await jobs.get(pool, job_id)).state is not JobState.SUCCEEDED:
                await asyncio.sleep(0.02)
    assert await kinds(pool, job_id) == ["submitted", "started", "succeeded"]
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_a_live_copy_in_a_batch_that_fails_is_dropped_for_its_original(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workron.dispatcher import batches

    real = batches.apply_batch
    tried: list[int] = []

    async def failing(*args: object, **kwargs: object) -> object:
        tried.append(1)
        raise RuntimeError("the batch with the live copy fails")

    probe, job_id = await submit(pool, js), await submit(pool, js)
    async with running(dispatcher(pool, nc)):
        await until_state(pool, nc, probe, JobState.RUNNING, started(probe))  # copies arrive
        monkeypatch.setattr(batches, "apply_batch", failing)
        report = started(job_id)
        subject, data, headers = live_copy(report)
        await nc.publish(subject, data, headers=headers)
        async with asyncio.timeout(5):
            while not tried:
                await asyncio.sleep(0.01)
        monkeypatch.setattr(batches, "apply_batch", real)
        # Not retried, not dead-lettered, not held: the job waits for the original.
        assert tried == [1]
        assert (await jobs.get(pool, job_id)).state is JobState.DISPATCHED
        await send(js, report)
        async with asyncio.timeout(5):
            while (await jobs.get(pool, job_id)).state is not JobState.RUNNING:
                await asyncio.sleep(0.02)
        await reports_settled(js)
    assert await kinds(pool, job_id) == ["submitted", "started"]
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
