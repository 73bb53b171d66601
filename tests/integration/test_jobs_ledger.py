"""Submission into the ledger: one transaction per batch, idempotency, outbox."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
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
    # Only the job written has its event, stamped with the state it was written in.
    events = await pool.fetch("SELECT job_id, kind, attempt, detail FROM job_events")
    assert [tuple(e) for e in events] == [(first.id, "submitted", 1, "dispatched")]


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


async def test_keyed_transactions_commit_begin_the_next_and_leave_the_session_as_it_was(
    pool: ledger.Pool,
) -> None:
    keyed = ledger.KeyedTransactions(pool)
    count = "SELECT coalesce(sum(value), 0) FROM counters WHERE name LIKE 'probe%'"
    add = "INSERT INTO counters (name, value) VALUES ('probe' || $1::bigint, $1::bigint)"
    async with keyed.transaction() as conn:
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
        assert await conn.fetchval("SHOW enable_seqscan") == "off"
        await conn.execute(add, 1)
        assert await pool.fetchval(count) == 0  # not yet committed
    assert await pool.fetchval(count) == 1
    assert conn.is_in_transaction()  # the next one, begun with the COMMIT
    async with keyed.transaction() as again:
        assert again is conn
        assert await conn.fetchval("SHOW enable_hashjoin") == "off"
    with pytest.raises(ZeroDivisionError):
        async with keyed.transaction() as conn:
            await conn.execute(add, 10)
            raise ZeroDivisionError
    assert await pool.fetchval(count) == 1  # rolled back, the connection given back
    async with keyed.transaction() as conn:
        await conn.execute(add, 100)
    await keyed.close()
    assert await pool.fetchval(count) == 101
    async with pool.acquire() as plain:  # the pool's connections are as they were
        assert await plain.fetchval("SHOW plan_cache_mode") == "auto"
        assert await plain.fetchval("SHOW enable_seqscan") == "on"


async def test_a_transaction_begun_ahead_stamps_the_time_its_statements_run(
    pool: ledger.Pool,
) -> None:
    keyed = ledger.KeyedTransactions(pool)
    async with keyed.transaction():
        pass
    await asyncio.sleep(0.3)  # a batch arriving a while after the last commit
    async with keyed.transaction() as conn:
        stale = await conn.fetchval("SELECT extract(epoch FROM statement_timestamp() - now())")
        ahead = await conn.fetchval(
            "INSERT INTO outbox (subject, payload, headers) VALUES ('probe', '', '{}')"
            " RETURNING extract(epoch FROM statement_timestamp() - available_at)"
        )
    await keyed.close()
    assert stale >= 0.25  # now() is when the transaction began
    assert ahead == 0  # the default is the statement's time, not the BEGIN's


async def test_a_begun_transaction_whose_connection_died_is_replaced(
    pool: ledger.Pool,
) -> None:
    keyed = ledger.KeyedTransactions(pool)
    async with keyed.transaction() as conn:
        pid = conn.get_server_pid()
    await pool.execute("SELECT pg_terminate_backend($1)", pid)
    for _ in range(100):  # the client hears of it when the socket closes
        with contextlib.suppress(asyncpg.InterfaceError):  # detached from the pool: gone
            if not conn.is_closed():
                await asyncio.sleep(0.02)
                continue
        break
    async with keyed.transaction() as fresh:
        assert fresh.get_server_pid() != pid
        assert await fresh.fetchval("SELECT 1") == 1
    await keyed.close()
