"""Cancelling jobs that run, or are about to: the worker stops the handler
or the command's whole process group and confirms; a job cancelled before
any worker started it never runs."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from uuid import UUID

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import bus, jobs, ledger
from workron.worker import Context, Registry, Worker

from ._reaper_support import (
    FAST_HB,
    dispatcher,
    events,
    fast_reaper,
    job_row,
    leading,
    running,
    submit,
    until,
)
from .test_worker import process_gone


async def running_on(pool: ledger.Pool, job_id: UUID, worker_id: str) -> bool:
    row = await job_row(pool, job_id)
    return bool(row["state"] == "running" and row["worker_id"] == worker_id)


async def confirmed(pool: ledger.Pool, job_id: UUID) -> list[tuple[str, int, str | None]]:
    """The job's history once the worker confirmed the stop."""
    history = await events(pool, job_id)
    return history if any(kind == "stopped" for kind, _, _ in history) else []


async def check_cancelled(pool: ledger.Pool, js: JetStreamContext, job_id: UUID) -> str:
    history = await until(lambda: confirmed(pool, job_id))
    kinds = [kind for kind, _, _ in history]
    assert kinds.count("cancelled") == 1 and "fenced" not in kinds, history
    assert (await job_row(pool, job_id))["state"] == "cancelled"
    # The confirmation is not a fenced write.
    assert await pool.fetchval("SELECT value FROM counters WHERE name = 'fenced_reports'") is None

    async def work_gone() -> bool:  # acked: it never runs again
        return (await js.stream_info("WORK")).state.messages == 0

    await until(work_gone)
    detail = next(d for kind, _, d in history if kind == "stopped")
    return detail or ""


#: No reaper runs in most of these tests, and heartbeats are rare: only the
#: control message can stop the execution this quickly.
SLOW_HB = 30.0


async def test_cancel_stops_a_running_async_handler(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    interrupted = asyncio.Event()
    registry = Registry()

    @registry.task("c.hang")
    async def hang(ctx: Context, payload: object) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    worker = Worker(nc=nc, worker_id="w-c1", registry=registry, heartbeat_s=SLOW_HB)
    async with running(dispatcher(pool, nc), worker):
        job_id = await submit(pool, js, task="c.hang")
        await until(lambda: running_on(pool, job_id, "w-c1"))
        cancelled = await jobs.cancel(pool, js, job_id)
        assert cancelled.state == "cancelled"
        await asyncio.wait_for(interrupted.wait(), 5)
        detail = await check_cancelled(pool, js, job_id)
    assert detail == "stopped: the job was cancelled"
    # The control message went to that worker.
    stored = await js.get_last_msg("CONTROL", bus.control_subject("w-c1"))
    assert (stored.headers or {})["Nats-Msg-Id"] == f"cancel:{job_id}:1"


async def test_a_sync_handler_sees_ctx_cancelled(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    saw: list[bool] = []
    begun = threading.Event()
    registry = Registry()

    @registry.task("c.spin")
    def spin(ctx: Context, payload: object) -> str:
        begun.set()
        while not ctx.cancel_event.wait(0.02):
            pass
        saw.append(ctx.cancelled)
        return "too late to count"

    worker = Worker(nc=nc, worker_id="w-c2", registry=registry, heartbeat_s=SLOW_HB)
    async with running(dispatcher(pool, nc), worker):
        job_id = await submit(pool, js, task="c.spin")
        await until(lambda: running_on(pool, job_id, "w-c2"))
        await jobs.cancel(pool, js, job_id)
        await check_cancelled(pool, js, job_id)
    assert begun.is_set() and saw == [True]


async def test_cancel_kills_a_running_commands_process_group(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    # The grandchild ignores SIGTERM: only the SIGKILL after kill_grace_s stops it.
    script = f"sh -c 'trap \"\" TERM; sleep 60' & echo $! > {pid_file}; wait"
    worker = Worker(
        nc=nc,
        worker_id="w-c3",
        kill_grace_s=0.3,
        heartbeat_s=SLOW_HB,
    )
    async with running(dispatcher(pool, nc), worker):
        job_id = await submit(pool, js, task=None, command=script, shell=True)
        await until(lambda: running_on(pool, job_id, "w-c3"))
        await until(lambda: _exists(pid_file))
        await jobs.cancel(pool, js, job_id)
        await check_cancelled(pool, js, job_id)
    assert process_gone(int(pid_file.read_text()))


async def _exists(path: Path) -> bool:
    return path.exists() and bool(path.read_text().strip())


async def test_a_job_cancelled_before_it_started_never_runs(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    ran = asyncio.Event()
    registry = Registry()

    @registry.task("c.never")
    async def never(ctx: Context, payload: object) -> None:
        ran.set()

    job_id = await submit(pool, js, task="c.never")  # dispatched: its message waits
    await jobs.cancel(pool, js, job_id)
    # The worker starts only now: it learns of the cancel from the CONTROL
    # stream before it fetches any work.
    worker = Worker(nc=nc, worker_id="w-c4", registry=registry, heartbeat_s=SLOW_HB)
    async with running(dispatcher(pool, nc), worker):
        detail = await check_cancelled(pool, js, job_id)
    assert not ran.is_set()
    assert detail == "skipped: cancelled before it started"


async def test_a_missed_cancel_arrives_with_the_heartbeat_reply(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """The control message never came (written without one, here): the
    reaper's reply to the next heartbeat stops the execution all the same."""
    interrupted = asyncio.Event()
    registry = Registry()

    @registry.task("c.hang")
    async def hang(ctx: Context, payload: object) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    reaper = fast_reaper(pool, nc)
    worker = Worker(nc=nc, worker_id="w-c5", registry=registry, heartbeat_s=FAST_HB)
    async with running(reaper, dispatcher(pool, nc), worker):
        await leading(reaper)
        job_id = await submit(pool, js, task="c.hang")
        await until(lambda: running_on(pool, job_id, "w-c5"))
        await pool.execute("UPDATE jobs SET state = 'cancelled' WHERE id = $1", job_id)
        await pool.execute(
            "INSERT INTO job_events (job_id, kind, attempt) VALUES ($1, 'cancelled', 1)", job_id
        )
        await asyncio.wait_for(interrupted.wait(), 5)
        await check_cancelled(pool, js, job_id)
