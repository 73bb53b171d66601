"""Re-dispatch of ledger jobs whose work message JetStream lost (a purged
stream, a wiped store, one deleted message), and nothing else."""

from __future__ import annotations

from uuid import UUID

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import ledger
from workron.reaper import Reaper
from workron.telemetry import Metrics
from workron.worker import Worker, builtin

from ._reaper_support import dispatcher, events, job_row, submit


async def age(pool: ledger.Pool, seconds: float = 120.0) -> None:
    """As if every dispatched job had waited ``seconds`` without a start."""
    await pool.execute(
        "UPDATE jobs SET dispatched_at = now() - make_interval(secs => $1)"
        " WHERE state = 'dispatched'",
        seconds,
    )


async def run_to_the_end(pool: ledger.Pool, nc: NATS, ids: list[UUID]) -> None:
    for _ in range(20):
        await dispatcher(pool, nc).run_until_idle()
        await Worker(nc=nc, registry=builtin, worker_id="w-lost").run(burst=True)
        await dispatcher(pool, nc).run_until_idle()
        states = await pool.fetch("SELECT state FROM jobs WHERE id = ANY($1::uuid[])", ids)
        if {r["state"] for r in states} == {"succeeded"}:
            return
    raise AssertionError(f"jobs still open: {[r['state'] for r in states]}")


async def test_jobs_of_a_purged_work_stream_are_dispatched_again(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    ids = [await submit(pool, js, task="workron.echo", payload=i) for i in range(3)]
    await js.purge_stream("WORK")
    await age(pool)
    metrics = Metrics()
    done = await Reaper(pool, nc, metrics).run_until_idle()
    assert done.redispatched == 3
    for job_id in ids:
        row = await job_row(pool, job_id)
        # A new attempt (any surviving copy of attempt 1 is fenced), not
        # charged to the budget: it never ran.
        assert (row["state"], row["attempt"], row["max_attempts"]) == ("pending", 2, 4)
        assert ("redispatched", 1) in [(k, a) for k, a, _ in await events(pool, job_id)]
    await run_to_the_end(pool, nc, ids)
    results = {
        r["id"]: (r["attempt"], msgspec.json.decode(r["result"]))
        for r in await pool.fetch("SELECT id, attempt, result FROM jobs")
    }
    assert results == {job_id: (2, i) for i, job_id in enumerate(ids)}
    assert (
        metrics.registry.get_sample_value("workron_jobs_reaped_total", {"why": "message_lost"}) == 3
    )


async def test_waiting_messages_are_not_lost(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """A long queue is not a lost message; nor is one still in the outbox."""
    queued = [await submit(pool, js) for _ in range(2)]
    unpublished = await submit(pool, None)  # its message waits for the relay
    await age(pool)
    assert (await Reaper(pool, nc, Metrics()).run_until_idle()).redispatched == 0
    for job_id in [*queued, unpublished]:
        row = await job_row(pool, job_id)
        assert (row["state"], row["attempt"]) == ("dispatched", 1)


async def test_one_deleted_message_is_found_among_others(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    ids = [await submit(pool, js) for _ in range(3)]
    victim = ids[1]
    info = await js.stream_info("WORK")
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        stored = await js.get_msg("WORK", seq)
        if (stored.headers or {}).get("Nats-Msg-Id") == f"work:{victim}:1":
            await js.delete_msg("WORK", seq)
    await age(pool)
    assert (await Reaper(pool, nc, Metrics()).run_until_idle()).redispatched == 1
    assert [(await job_row(pool, j))["attempt"] for j in ids] == [1, 2, 1]


async def test_a_wiped_store_is_rebuilt_and_its_jobs_dispatched_again(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js, task="workron.echo", payload="back")
    await js.delete_stream("WORK")  # as good as a wiped store directory
    await age(pool)
    assert (await Reaper(pool, nc, Metrics()).run_until_idle()).redispatched == 1
    assert (await js.stream_info("WORK")).config.subjects == ["workron.work.>"]
    assert (await js.consumer_info("WORK", "work-default")).config.ack_wait == 30
    await run_to_the_end(pool, nc, [job_id])


async def test_a_job_that_keeps_losing_its_message_fails(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js)
    reaper = Reaper(pool, nc, Metrics(), max_redispatch=2)
    for attempt in (1, 2):
        await js.purge_stream("WORK")
        await age(pool)
        assert (await reaper.run_until_idle()).redispatched == 1
        await dispatcher(pool, nc).run_until_idle()
        assert (await job_row(pool, job_id))["attempt"] == attempt + 1
    await js.purge_stream("WORK")
    await age(pool)
    await reaper.run_until_idle()
    row = await job_row(pool, job_id)
    assert (row["state"], row["attempt"]) == ("failed", 3)
    assert "lost from JetStream too many times" in row["error"]
