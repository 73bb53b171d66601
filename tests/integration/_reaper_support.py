"""Helpers for the reaper's integration tests: fast timings, services run as
tasks, workers as real subprocesses, bounded polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import jobs, ledger
from workron._ids import uuid7
from workron.dispatcher import Dispatcher
from workron.events import JobSpec
from workron.reaper import Reaper
from workron.telemetry import Metrics

T = TypeVar("T")

#: Heartbeat period of the test workers: dead after three missed (0.6 s).
FAST_HB = 0.2

HANDLERS = textwrap.dedent(
    """
    import asyncio
    from workron.worker import Context, Registry

    registry = Registry()

    @registry.task("rp.hang_first")
    async def hang_first(ctx: Context, payload: object) -> dict:
        # The first attempt never ends (its worker is killed); later ones do.
        if ctx.attempt == 1:
            await asyncio.sleep(3600)
        return {"attempt": ctx.attempt, "worker": ctx.worker_id}

    @registry.task("rp.hang")
    async def hang(ctx: Context, payload: object) -> None:
        await asyncio.sleep(3600)
    """
)


def fast_reaper(pool: ledger.Pool, nc: NATS, metrics: Metrics | None = None, **kw: Any) -> Reaper:
    options: dict[str, Any] = {
        "lease_ttl_s": 1.0,
        "renew_s": 0.1,
        "scan_s": 0.05,
        "judge_leases_after_s": 3 * FAST_HB,
    }
    options.update(kw)
    return Reaper(pool, nc, metrics or Metrics(), **options)


@contextlib.asynccontextmanager
async def running(*services: Any) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run services (anything with run()/stop()) as tasks; stop them at exit."""
    tasks = [asyncio.create_task(s.run()) for s in services]
    try:
        yield tasks
    finally:
        for service in services:
            service.stop()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result


async def until(check: Callable[[], Awaitable[T]], timeout: float = 10.0, every: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(every)


async def leading(reaper: Reaper, timeout: float = 10.0) -> None:
    """Wait until ``reaper`` leads (and hears heartbeats)."""

    async def check() -> bool:
        return reaper.lease.leading

    await until(check, timeout)


async def submit(pool: ledger.Pool, js: JetStreamContext | None, **spec: Any) -> UUID:
    planned = jobs.plan(uuid7(), msgspec.convert({"task": "rp.hang", **spec}, JobSpec))
    [(job_id, _)] = await jobs.submit(pool, js, [planned])
    return job_id


async def job_row(pool: ledger.Pool, job_id: UUID) -> Any:
    return await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)


async def state_of(pool: ledger.Pool, job_id: UUID) -> str:
    state: str = await pool.fetchval("SELECT state FROM jobs WHERE id = $1", job_id)
    return state


async def events(pool: ledger.Pool, job_id: UUID) -> list[tuple[str, int, str | None]]:
    return [(e.kind, e.attempt, e.detail) for e in await jobs.list_events(pool, job_id)]


def dispatcher(pool: ledger.Pool, nc: NATS) -> Dispatcher:
    return Dispatcher(pool, nc, Metrics(), fetch_wait_s=0.1, idle_s=0.1)


class WorkerProcess:
    """``workron worker`` as a real subprocess, for kill -9."""

    def __init__(self, tmp: Path, nats_url: str, worker_id: str, heartbeat_s: float) -> None:
        (tmp / "rp_handlers.py").write_text(HANDLERS)
        env = dict(os.environ, PYTHONPATH=str(tmp), WORKRON_LOG_LEVEL="WARNING")
        argv = [sys.executable, "-m", "workron.cli", "worker", "--nats-url", nats_url]
        argv += ["--app", "rp_handlers:registry", "--worker-id", worker_id]
        argv += ["--heartbeat", str(heartbeat_s), "--concurrency", "2"]
        self.log = open(tmp / f"{worker_id}.log", "wb")  # closed in kill()
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)
        self.log.close()
