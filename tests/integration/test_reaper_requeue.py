"""The reaper takes back running jobs: a dead worker's, an expired lease's,
a stopped worker's. Each becomes a failed attempt under the retry policy, the
new execution's outcome is the only one recorded, and the old message never
runs again."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import bus, ledger
from workron._embedded import NatsServer
from workron.events import JobFinished, ReportSucceeded, report_id
from workron.liveness import ExecutionRef
from workron.reaper import Reaper
from workron.telemetry import Metrics
from workron.worker import Context, Registry, Worker

from ._reaper_support import (
    FAST_HB,
    WorkerProcess,
    dispatcher,
    events,
    fast_reaper,
    job_row,
    leading,
    running,
    state_of,
    submit,
    until,
)
from .test_worker import Reports
from .test_worker import submit as publish_work

registry = Registry()


@registry.task("rp.hang_first")
async def hang_first(ctx: Context, payload: object) -> dict[str, Any]:
    if ctx.attempt == 1:
        await asyncio.sleep(3600)
    return {"attempt": ctx.attempt, "worker": ctx.worker_id}


async def running_on(pool: ledger.Pool, job_id: UUID, worker_id: str) -> bool:
    row = await job_row(pool, job_id)
    return bool(row["state"] == "running" and row["worker_id"] == worker_id)


async def left_running(pool: ledger.Pool, job_id: UUID) -> bool:
    return await state_of(pool, job_id) != "running"


async def kill_and_requeue(
    pool: ledger.Pool,
    nc: NATS,
    js: JetStreamContext,
    nats_url: str,
    tmp: Path,
    *,
    heartbeat_s: float,
    reaper: Reaper,
) -> tuple[UUID, float]:
    """Run a job on a worker process, kill -9 it; (job, seconds kill → requeue)."""
    process = WorkerProcess(tmp, nats_url, "w-a", heartbeat_s)
    try:
        job_id = await submit(pool, js, task="rp.hang_first", max_attempts=3, backoff={"base_s": 0})
        await until(lambda: running_on(pool, job_id, "w-a"), timeout=30)
        # Its heartbeats name the execution (with the delivery's ack subject).
        await until(lambda: _named(pool, "w-a", job_id), timeout=10)
    finally:
        process.kill(signal.SIGKILL)
    killed = time.monotonic()
    await until(lambda: left_running(pool, job_id), timeout=30)
    return job_id, time.monotonic() - killed


async def _named(pool: ledger.Pool, worker_id: str, job_id: UUID) -> bool:
    executions = await pool.fetchval("SELECT executions FROM workers WHERE id = $1", worker_id)
    return executions is not None and str(job_id) in executions


async def finish_on_another_worker(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, job_id: UUID
) -> None:
    worker_b = Worker(nc=nc, worker_id="w-b", registry=registry, heartbeat_s=FAST_HB)
    async with running(worker_b):
        await until(lambda: _state_is(pool, job_id, "succeeded"), timeout=15)
    row = await job_row(pool, job_id)
    assert msgspec.json.decode(row["result"]) == {"attempt": 2, "worker": "w-b"}
    history = await events(pool, job_id)
    kinds = [kind for kind, _, _ in history]
    assert kinds.count("succeeded") == 1 and "fenced" not in kinds, history
    retrying = [detail for kind, attempt, detail in history if kind == "retrying"]
    assert len(retrying) == 1 and "worker w-a died" in (retrying[0] or ""), history
    # The dead worker's message was acked for it: nothing is left to run again.
    assert (await js.stream_info("WORK")).state.messages == 0


async def _state_is(pool: ledger.Pool, job_id: UUID, state: str) -> bool:
    return await state_of(pool, job_id) == state


async def test_a_dead_workers_job_runs_again_elsewhere_exactly_once(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    metrics = Metrics()
    reaper = fast_reaper(pool, nc, metrics)
    async with running(reaper, dispatcher(pool, nc)):
        await leading(reaper)
        job_id, took = await kill_and_requeue(
            pool, nc, js, nats_server.url, tmp_path, heartbeat_s=FAST_HB, reaper=reaper
        )
        # Three missed heartbeats (0.6 s), then a scan: well within 2 s.
        assert took < 3 * FAST_HB + 1.5, took
        await finish_on_another_worker(pool, nc, js, job_id)
    assert (
        metrics.registry.get_sample_value("workron_jobs_reaped_total", {"why": "worker_dead"}) == 1
    )


async def test_detection_to_requeue_with_default_timings(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Heartbeat 2 s, dead after 6 s, a scan every second: requeued within 10 s."""
    reaper = Reaper(pool, nc, Metrics())  # every default
    async with running(reaper, dispatcher(pool, nc)):
        await leading(reaper)
        job_id, took = await kill_and_requeue(
            pool, nc, js, nats_server.url, tmp_path, heartbeat_s=2.0, reaper=reaper
        )
    print(f"\ndetection-to-requeue with default timings: {took:.2f}s")
    assert 4.0 < took <= 10.0, took
    row = await job_row(pool, job_id)
    assert (row["state"], row["attempt"]) in {("pending", 2), ("dispatched", 2)}


async def test_expired_lease_is_taken_back_by_the_retry_policy(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """No heartbeat renewed a running job (its worker, with a long period,
    still names it): once the ledger lease ends, the attempt counts as failed."""
    retried = await submit(pool, js, max_attempts=2, backoff={"base_s": 0})
    last = await submit(pool, js, max_attempts=1)
    named = [ExecutionRef(job_id=j, attempt=1, delivery=1) for j in (retried, last)]
    await pool.execute(
        "INSERT INTO workers (id, instance, state, heartbeat_s, executions)"
        " VALUES ('w-ghost', 'i', 'alive', 100, $1)",
        msgspec.json.encode(named).decode(),
    )
    await pool.execute(
        "UPDATE jobs SET state = 'running', worker_id = 'w-ghost', delivery = 1,"
        " lease_until = now() - interval '1 second' WHERE id = ANY($1::uuid[])",
        [retried, last],
    )
    metrics = Metrics()
    reaper = Reaper(pool, nc, metrics, judge_leases_after_s=0)
    done = await reaper.run_until_idle()
    assert done.leading and done.reaped == 2
    row = await job_row(pool, retried)
    assert (row["state"], row["attempt"], row["delivery"]) == ("pending", 2, 0)
    assert row["error"].startswith("lease expired: worker w-ghost") and row["lease_until"] is None
    row = await job_row(pool, last)
    assert (row["state"], row["attempt"]) == ("failed", 1)
    assert row["finished_at"] is not None
    # Its end is announced like any other.
    stored = await js.get_last_msg("EVENTS", "workron.evt.job.finished")
    finished = msgspec.json.decode(stored.data or b"", type=JobFinished)
    assert (finished.job_id, finished.state) == (last, "failed")
    assert (stored.headers or {})["Nats-Msg-Id"] == f"fin:{last}:1"
    assert (
        metrics.registry.get_sample_value("workron_jobs_reaped_total", {"why": "lease_expired"})
        == 2
    )
    # Nothing is judged twice.
    assert (await reaper.run_until_idle()).reaped == 0


async def test_an_orphan_waits_for_its_workers_reports(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """A worker reported success and died before the dispatcher applied it:
    the report wins, the job is not run again."""
    job_id = await submit(pool, js)
    await pool.execute(
        "INSERT INTO workers (id, instance, state, heartbeat_s, left_at)"
        " VALUES ('w-gone', 'i', 'dead', 0.2, now())"
    )
    await pool.execute(
        "UPDATE jobs SET state = 'running', worker_id = 'w-gone', delivery = 1 WHERE id = $1",
        job_id,
    )
    report = ReportSucceeded(
        job_id=job_id, attempt=1, delivery=1, worker_id="w-gone", at=time.time(),
        result=msgspec.Raw(b'"done"'),
    )  # fmt: skip
    await js.publish(
        "workron.report.default",
        msgspec.json.encode(report),
        headers={"Nats-Msg-Id": report_id(report)},
    )
    reaper = Reaper(pool, nc, Metrics())
    first = await reaper.run_until_idle()
    assert (first.reaped, first.waiting) == (0, 1)
    assert await state_of(pool, job_id) == "running"
    await dispatcher(pool, nc).run_until_idle()
    assert (await reaper.run_until_idle()).reaped == 0
    row = await job_row(pool, job_id)
    assert (row["state"], row["attempt"]) == ("succeeded", 1)
    assert await pool.fetchval("SELECT value FROM counters WHERE name = 'fenced_reports'") is None


async def test_an_orphan_waits_for_reports_only_so_long(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """Reports that nobody applies (the dispatcher is down) hold an orphan
    back for ``report_wait_s`` at most: a job must not stay stuck."""
    job_id = await submit(pool, js)
    await pool.execute(
        "INSERT INTO workers (id, instance, state, heartbeat_s, left_at)"
        " VALUES ('w-gone', 'i', 'dead', 0.2, now())"
    )
    await pool.execute(
        "UPDATE jobs SET state = 'running', worker_id = 'w-gone', delivery = 1 WHERE id = $1",
        job_id,
    )
    await js.publish("workron.report.default", b"a report nobody applies")
    patient = Reaper(pool, nc, Metrics())
    assert (await patient.run_until_idle()).waiting == 1
    await patient.lease.release()
    done = await Reaper(pool, nc, Metrics(), report_wait_s=0).run_until_idle()
    assert done.reaped == 1
    assert (await job_row(pool, job_id))["attempt"] == 2


async def test_a_superseded_execution_is_stopped_by_its_heartbeat_reply(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """The ledger gave the job a new attempt while the worker still runs the
    old one (it was cut off, say): the next heartbeat reply stops it, and its
    message is acked so it never runs again."""
    reaper = fast_reaper(pool, nc)
    stopped = asyncio.Event()
    local = Registry()

    @local.task("rp.hang")
    async def hang(ctx: Context, payload: object) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()

    worker = Worker(nc=nc, worker_id="w-cut", registry=local, heartbeat_s=FAST_HB)
    async with running(reaper, dispatcher(pool, nc), worker):
        await leading(reaper)
        job_id = await submit(pool, js, task="rp.hang")
        await until(lambda: running_on(pool, job_id, "w-cut"))
        await pool.execute(
            "UPDATE jobs SET state = 'pending', attempt = 2, delivery = 0,"
            " run_at = now() + interval '1 hour' WHERE id = $1",
            job_id,
        )
        await asyncio.wait_for(stopped.wait(), 5)

        async def work_gone() -> bool:
            return (await js.stream_info("WORK")).state.messages == 0

        await until(work_gone)
    kinds = [kind for kind, _, _ in await events(pool, job_id)]
    assert kinds.count("fenced") == 0  # it stopped without reporting


async def test_a_worker_cut_off_from_the_reaper_stops_its_executions(
    nc: NATS, js: JetStreamContext
) -> None:
    """Heartbeats go unanswered (the reaper hears nothing, yet it listens):
    the worker stops its executions before it can be declared dead."""
    silent = await nc.subscribe("workron.hb.*")  # takes heartbeats, never answers
    stopped = asyncio.Event()
    local = Registry()

    @local.task("rp.hang")
    async def hang(ctx: Context, payload: object) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()

    worker = Worker(nc=nc, worker_id="w-alone", registry=local, heartbeat_s=FAST_HB)
    async with running(worker):
        started = time.monotonic()
        job_id = await publish_work(js, task="rp.hang")
        await asyncio.wait_for(stopped.wait(), 5)
        took = time.monotonic() - started
    await silent.unsubscribe()
    # After the first unanswered heartbeat; before the reaper could judge
    # three missed (counted from the worker's start, a little before `started`).
    assert FAST_HB < took < 3 * FAST_HB + 0.2, took
    reports = Reports(js)
    await reports.drain()
    assert reports.outcome_of(job_id) is None  # stopped, nothing reported


async def test_a_stopping_worker_hands_its_jobs_back(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """Past the grace period a stopping worker hands its job back: the ledger
    puts it back in the queue (no attempt charged), another worker runs it."""
    reaper = fast_reaper(pool, nc)
    local = Registry()

    @local.task("rp.hang_first")
    async def first(ctx: Context, payload: object) -> int:
        if ctx.worker_id == "w-leaving":
            await asyncio.sleep(3600)
        return ctx.attempt

    leaving = Worker(nc=nc, worker_id="w-leaving", registry=local, grace_s=0.1, heartbeat_s=FAST_HB)
    async with running(reaper, dispatcher(pool, nc)):
        await leading(reaper)
        async with running(leaving):
            job_id = await submit(pool, js, task="rp.hang_first")
            await until(lambda: running_on(pool, job_id, "w-leaving"))
        row = await until(lambda: _handed_back(pool, job_id))
        assert (row["state"], row["attempt"], row["worker_id"]) == ("dispatched", 1, None)
        staying = Worker(nc=nc, worker_id="w-staying", registry=local, heartbeat_s=FAST_HB)
        async with running(staying):
            await until(lambda: _state_is(pool, job_id, "succeeded"))
    row = await job_row(pool, job_id)
    assert (row["attempt"], msgspec.json.decode(row["result"])) == (1, 1)
    kinds = [kind for kind, _, _ in await events(pool, job_id)]
    assert "handed_back" in kinds and "retrying" not in kinds


async def _handed_back(pool: ledger.Pool, job_id: UUID) -> ledger.Record | None:
    row = await job_row(pool, job_id)
    return row if row["state"] == "dispatched" and row["worker_id"] is None else None


async def test_a_redelivered_message_of_a_superseded_attempt_is_not_run(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """Its first holder died before the reaper could ack it; the job has a new
    attempt since. The worker that gets the redelivery asks first (one
    heartbeat), learns it is superseded, and acks it unrun."""
    ran = asyncio.Event()
    local = Registry()

    @local.task("rp.once")
    async def once(ctx: Context, payload: object) -> None:
        ran.set()

    reaper = fast_reaper(pool, nc)
    job_id = await submit(pool, js, task="rp.once")
    # The first holder took the message and vanished (handed back unacked).
    await js.add_consumer("WORK", bus.work_consumer("default"))
    holder = await js.pull_subscribe_bind("work-default", stream="WORK")
    [msg] = await holder.fetch(1, timeout=5)
    await msg.nak()
    await pool.execute(
        "UPDATE jobs SET state = 'pending', attempt = 2, run_at = now() + interval '1 hour'"
        " WHERE id = $1",
        job_id,
    )
    worker = Worker(nc=nc, worker_id="w-next", registry=local, heartbeat_s=FAST_HB)
    async with running(reaper):
        await leading(reaper)
        async with running(worker):

            async def work_gone() -> bool:
                return (await js.stream_info("WORK")).state.messages == 0

            await until(work_gone)
    assert not ran.is_set()
    assert (await job_row(pool, job_id))["state"] == "pending"


async def test_jobs_of_a_worker_restarted_under_its_id_are_taken_back(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    """kill -9, then the same id starts again at once (a supervisor): never
    dead, yet its new instance's heartbeats do not name the old job."""
    reaper = fast_reaper(pool, nc)
    async with running(reaper, dispatcher(pool, nc)):
        await leading(reaper)
        process = WorkerProcess(tmp_path, nats_server.url, "w-same", FAST_HB)
        try:
            job_id = await submit(pool, js, task="rp.hang_first", backoff={"base_s": 0})
            await until(lambda: running_on(pool, job_id, "w-same"), timeout=30)
            await until(lambda: _named(pool, "w-same", job_id))
        finally:
            process.kill(signal.SIGKILL)
        again = Worker(nc=nc, worker_id="w-same", registry=registry, heartbeat_s=FAST_HB)
        async with running(again):
            await until(lambda: _state_is(pool, job_id, "succeeded"), timeout=15)
    assert await pool.fetchval("SELECT state FROM workers WHERE id = 'w-same'") == "stopped"
    history = await events(pool, job_id)
    retrying = [d for kind, _, d in history if kind == "retrying"]
    assert len(retrying) == 1 and "no longer runs it" in (retrying[0] or ""), history
    assert (await job_row(pool, job_id))["attempt"] == 2


async def test_jobs_of_a_worker_never_heard_from_are_taken_back(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """It died before any reaper heard it: no row, no heartbeat, ever."""
    job_id = await submit(pool, js, backoff={"base_s": 0})
    await pool.execute(
        "UPDATE jobs SET state = 'running', worker_id = 'w-never', delivery = 1,"
        " lease_until = now() + interval '30 seconds' WHERE id = $1",
        job_id,
    )
    reaper = fast_reaper(pool, nc)
    async with running(reaper):
        await leading(reaper)
        started = time.monotonic()
        await until(lambda: left_running(pool, job_id))
        took = time.monotonic() - started
    # Not before the reaper had listened long enough to have heard it.
    assert took >= 3 * FAST_HB, took
    assert "never heard from" in (await job_row(pool, job_id))["error"]
