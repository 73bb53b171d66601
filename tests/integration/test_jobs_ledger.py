"""Submission into the ledger: one transaction per batch, idempotency, outbox."""

from __future__ import annotations

import msgspec
import pytest
from nats.js import JetStreamContext

from workron import jobs, ledger
from workron._ids import uuid7
from workron.errors import ConflictError, NotFoundError
from workron.events import JobSpec, JobState, Work


async def test_plain_job_is_dispatched_with_its_work_message(
    pool: ledger.Pool, js: JetStreamContext
) -> None:
    job = jobs.plan(uuid7(), JobSpec(task="t.add", payload={"a": 1}))
    [(job_id, created)] = await jobs.submit(pool, js, [job])
    assert created and job_id == job.id
    stored = await jobs.get(pool, job_id)
    assert stored.state is JobState.DISPATCHED and stored.payload == {"a": 1}
    # Published by the writer and removed from the outbox.
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    sub = await js.pull_subscribe("workron.work.default", durable="probe", stream="WORK")
    [msg] = await sub.fetch(1, timeout=2)
    work = msgspec.json.decode(msg.data, type=Work)
    assert work.job_id == job_id and work.attempt == 1
    assert msgspec.json.decode(work.payload) == {"a": 1}
    assert msg.headers and msg.headers["Nats-Msg-Id"] == f"work:{job_id}:1"


async def test_without_bus_the_outbox_keeps_the_message(pool: ledger.Pool) -> None:
    job = jobs.plan(uuid7(), JobSpec(command=["echo", "hi"]))
    await jobs.submit(pool, None, [job])
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1


async def test_delayed_job_is_pending(pool: ledger.Pool) -> None:
    job = jobs.plan(uuid7(), JobSpec(command="sleep 1", shell=True, delay_s=60))
    await jobs.submit(pool, None, [job])
    stored = await jobs.get(pool, job.id)
    assert stored.state is JobState.PENDING
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_idempotency_key_returns_the_first_job(pool: ledger.Pool) -> None:
    spec = JobSpec(command=["true"], idempotency_key="k1")
    first, second, third = (jobs.plan(uuid7(), spec) for _ in range(3))
    results = await jobs.submit(pool, None, [first, second])
    assert results == [(first.id, True), (first.id, False)]
    assert await jobs.submit(pool, None, [third]) == [(first.id, False)]
    # Redelivery of the same submission id is also recognised.
    assert await jobs.submit(pool, None, [first]) == [(first.id, False)]
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 1


async def test_cancel_and_conflict(pool: ledger.Pool) -> None:
    job = jobs.plan(uuid7(), JobSpec(command=["true"], delay_s=60))
    await jobs.submit(pool, None, [job])
    cancelled = await jobs.cancel(pool, None, job.id)
    assert cancelled.state is JobState.CANCELLED
    with pytest.raises(ConflictError):
        await jobs.cancel(pool, None, job.id)
    with pytest.raises(NotFoundError):
        await jobs.cancel(pool, None, uuid7())
    kinds = [e.kind for e in await jobs.list_events(pool, job.id)]
    assert kinds == ["submitted", "cancelled"]


async def test_list_pages_with_cursor(pool: ledger.Pool) -> None:
    planned = [jobs.plan(uuid7(), JobSpec(command=["true"], queue="q")) for _ in range(5)]
    await jobs.submit(pool, None, planned)
    page, cursor = await jobs.list_jobs(pool, queue="q", limit=2)
    seen = [j.id for j in page]
    while cursor is not None:
        page, cursor = await jobs.list_jobs(pool, queue="q", limit=2, cursor=cursor)
        seen += [j.id for j in page]
    assert seen == [j.id for j in reversed(planned)]


async def test_same_submission_twice_in_one_batch_is_written_once(pool: ledger.Pool) -> None:
    job = jobs.plan(uuid7(), JobSpec(command=["true"]))
    assert await jobs.submit(pool, None, [job, job]) == [(job.id, True), (job.id, False)]
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1
    assert await pool.fetchval("SELECT count(*) FROM job_events") == 1


async def test_keyed_transaction_is_one_transaction_and_leaves_the_session_as_it_was(
    pool: ledger.Pool,
) -> None:
    async with pool.acquire() as conn:
        await conn.execute("CREATE TEMP TABLE plan_probe (n integer)")
        async with ledger.keyed_transaction(conn):
            assert conn.is_in_transaction()
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
            assert await conn.fetchval("SHOW enable_seqscan") == "off"
            await conn.execute("INSERT INTO plan_probe VALUES (1)")
        with pytest.raises(ZeroDivisionError):
            async with ledger.keyed_transaction(conn):
                await conn.execute("INSERT INTO plan_probe VALUES (2)")
                raise ZeroDivisionError
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SHOW plan_cache_mode") == "auto"
        assert await conn.fetchval("SHOW enable_seqscan") == "on"
        assert await conn.fetch("SELECT n FROM plan_probe") == [(1,)]
