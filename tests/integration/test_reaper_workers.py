"""The worker registry: workers register and heartbeat, the leading reaper
records them, a worker that stops heartbeating is declared dead, a worker
that leaves cleanly is ``stopped``; heartbeats renew the ledger leases of
current executions only."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import bus, ledger
from workron._embedded import NatsServer
from workron.events import Resources
from workron.liveness import ExecutionRef, Heartbeat, HeartbeatReply
from workron.worker import Registry, Worker, builtin

from ._reaper_support import (
    FAST_HB,
    WorkerProcess,
    fast_reaper,
    leading,
    running,
    submit,
    until,
)
from .test_worker import submit as publish_work


async def worker_row(pool: ledger.Pool, worker_id: str) -> ledger.Record | None:
    row: ledger.Record | None = await pool.fetchrow(
        "SELECT *, extract(epoch FROM last_seen)::float8 AS seen FROM workers WHERE id = $1",
        worker_id,
    )
    return row


async def test_worker_registers_heartbeats_and_stops_cleanly(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    reaper = fast_reaper(pool, nc)
    worker = Worker(
        nc=nc,
        worker_id="w-reg",
        queues=["default", "gpu"],
        registry=builtin,
        heartbeat_s=FAST_HB,
        resources=Resources(cpu=2, memory_mb=1024, vram_mb=8192),
        tags={"gpu": "a100"},
        hostname="box-1.example",
    )
    async with running(reaper):
        await leading(reaper)
        async with running(worker):
            row = await until(lambda: worker_row(pool, "w-reg"))
            assert row["state"] == "alive" and row["queues"] == ["default", "gpu"]
            assert (row["cpu"], row["memory_mb"], row["vram_mb"]) == (2, 1024, 8192)
            assert row["hostname"] == "box-1.example" and row["heartbeat_s"] == FAST_HB
            assert msgspec.json.decode(row["tags"]) == {"gpu": "a100"}
            assert row["version"] and row["started_at"] is not None
            first_seen = row["seen"]
            # Heartbeats keep coming: last_seen moves on (database clock).
            await until(
                lambda: _seen_after(pool, "w-reg", first_seen),
                timeout=5,
            )
        # A clean stop says so.
        row = await until(lambda: _in_state(pool, "w-reg", "stopped"))
        assert row["left_at"] is not None and row["running"] == 0


async def _seen_after(pool: ledger.Pool, worker_id: str, seen: float) -> bool:
    row = await worker_row(pool, worker_id)
    return row is not None and row["seen"] > seen


async def _in_state(pool: ledger.Pool, worker_id: str, state: str) -> ledger.Record | None:
    row = await worker_row(pool, worker_id)
    return row if row is not None and row["state"] == state else None


async def test_a_killed_worker_is_declared_dead(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    reaper = fast_reaper(pool, nc)
    async with running(reaper):
        process = WorkerProcess(tmp_path, nats_server.url, "w-kill", FAST_HB)
        try:
            await until(lambda: _in_state(pool, "w-kill", "alive"), timeout=30)
        finally:
            process.kill(signal.SIGKILL)  # no goodbye
        killed = time.monotonic()
        row = await until(lambda: _in_state(pool, "w-kill", "dead"), timeout=10)
        took = time.monotonic() - killed
    # Three missed heartbeats (0.6 s) and a scan; never before the misses.
    assert 3 * FAST_HB * 0.5 < took < 3 * FAST_HB + 2.0, took
    assert row["left_at"] is not None


async def test_heartbeats_renew_only_current_executions(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """A heartbeat renews the ledger lease of its job's current execution on
    that worker; a fenced execution's heartbeat renews nothing and is told to stop."""
    reaper = fast_reaper(pool, nc)
    current = await submit(pool, js)
    stale = await submit(pool, js)
    await pool.execute(
        "UPDATE jobs SET state = 'running', worker_id = 'w-hb', delivery = 1,"
        " lease_until = now() + interval '1 second' WHERE id = $1",
        current,
    )
    # The ledger moved `stale` to attempt 2: the heartbeat's attempt 1 is fenced.
    await pool.execute(
        "UPDATE jobs SET state = 'running', worker_id = 'w-other', attempt = 2, delivery = 1,"
        " lease_until = now() + interval '1 second' WHERE id = $1",
        stale,
    )
    beat = Heartbeat(
        worker_id="w-hb",
        instance="i1",
        interval_s=FAST_HB,
        queues=["default"],
        started_at=time.time(),
        executions=[
            ExecutionRef(job_id=current, attempt=1, delivery=1, ack="$JS.ACK.x"),
            ExecutionRef(job_id=stale, attempt=1, delivery=1),
        ],
    )
    async with running(reaper):
        await leading(reaper)
        reply_msg = await nc.request(
            bus.heartbeat_subject("w-hb"), msgspec.json.encode(beat), timeout=5
        )
    reply = msgspec.json.decode(reply_msg.data, type=HeartbeatReply)
    assert reply.error is None
    assert [(o.job_id, o.reason) for o in reply.stop] == [(stale, "superseded")]
    leases = {
        r["id"]: r["left"]
        for r in await pool.fetch(
            "SELECT id, extract(epoch FROM lease_until - now())::float8 AS left FROM jobs"
        )
    }
    assert leases[current] > bus.LEASE_S - 5  # renewed to a full lease
    assert leases[stale] < 2  # untouched
    executions = await pool.fetchval("SELECT executions FROM workers WHERE id = 'w-hb'")
    assert msgspec.json.decode(executions)[0]["ack"] == "$JS.ACK.x"


async def test_no_reaper_means_no_responders_and_the_worker_runs_on(
    nc: NATS, js: JetStreamContext
) -> None:
    """Without a reaper, heartbeats find nobody: the worker neither waits nor
    stops its executions (nobody can declare it dead)."""
    registry = Registry()
    done = asyncio.Event()

    @registry.task("slowish")
    async def slowish(ctx: object, payload: object) -> str:
        await asyncio.sleep(6 * FAST_HB)  # past the self-fencing moment
        done.set()
        return "ok"

    worker = Worker(nc=nc, worker_id="w-alone", registry=registry, heartbeat_s=FAST_HB)
    async with running(worker):
        await publish_work(js, task="slowish")
        await asyncio.wait_for(done.wait(), 10)
