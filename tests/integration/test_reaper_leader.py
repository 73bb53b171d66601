"""Leader election: one reaper leads, a standby takes over within seconds of
its death or stop, and a deposed leader's writes are refused by the epoch."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import ledger
from workron._embedded import NatsServer
from workron.leases import LeaderLease, LeadershipLostError
from workron.reaper import Reaper
from workron.reaper.orphans import mark_dead
from workron.telemetry import Metrics

from ._reaper_support import fast_reaper, job_row, leading, running, submit, until


async def lease_row(pool: ledger.Pool) -> ledger.Record | None:
    row: ledger.Record | None = await pool.fetchrow(
        "SELECT * FROM leases WHERE name = 'reaper' AND expires_at > clock_timestamp()"
    )
    return row


async def test_one_leads_and_a_standby_takes_over_a_graceful_stop(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    metrics_1, metrics_2 = Metrics(), Metrics()
    first, second = fast_reaper(pool, nc, metrics_1), fast_reaper(pool, nc, metrics_2)
    task_1 = asyncio.create_task(first.run())
    await leading(first)
    async with running(second):
        # Several renewals later, still one leader.
        for _ in range(5):
            await asyncio.sleep(0.1)
            assert first.lease.leading and not second.lease.leading
        epoch = first.lease.epoch
        assert metrics_1.registry.get_sample_value("workron_leader", {"service": "reaper"}) == 1
        assert metrics_2.registry.get_sample_value("workron_leader", {"service": "reaper"}) == 0
        stopped = time.monotonic()
        first.stop()
        await asyncio.wait_for(task_1, 10)
        await leading(second, timeout=3)
        took = time.monotonic() - stopped
        assert second.lease.epoch == (epoch or 0) + 1
    # Released on stop: the standby needs one renewal period, not the TTL.
    assert took < 1.0, took


async def test_a_standby_takes_over_from_a_killed_leader_within_the_lease(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, nats_server: NatsServer,
    database_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    env = dict(os.environ, WORKRON_LOG_LEVEL="WARNING")
    argv = [sys.executable, "-m", "workron.cli", "reaper", "--nats-url", nats_server.url]
    argv += ["--database-url", database_url]
    with open(tmp_path / "reaper.log", "wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            held = await until(lambda: lease_row(pool), timeout=30)
            standby = Reaper(pool, nc, Metrics(), renew_s=0.2)  # default 5 s lease
            async with running(standby):
                await asyncio.sleep(0.5)
                assert not standby.lease.leading
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
                killed = time.monotonic()
                await leading(standby, timeout=10)
                took = time.monotonic() - killed
                assert standby.lease.epoch == held["epoch"] + 1
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    print(f"\nleader takeover after kill -9: {took:.2f}s")
    assert took < 5.0 + 1.0, took  # the lease TTL, plus a renewal period


async def test_a_deposed_leaders_writes_are_refused(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js, max_attempts=3)
    await pool.execute(
        "UPDATE jobs SET state = 'running', worker_id = 'w-x', delivery = 1,"
        " lease_until = now() - interval '1 second' WHERE id = $1",
        job_id,
    )
    old = Reaper(pool, nc, Metrics(), judge_leases_after_s=0)
    assert await old.lead_once()
    old_epoch = old.lease.epoch
    # The old leader stalls past its lease (a pause, a partition): a standby
    # takes over, while the old one still believes it leads.
    await pool.execute("UPDATE leases SET expires_at = clock_timestamp() - interval '1 second'")
    new = Reaper(pool, nc, Metrics(), judge_leases_after_s=0)
    assert await new.lead_once()
    assert new.lease.epoch == (old_epoch or 0) + 1 and old.lease.leading
    with pytest.raises(LeadershipLostError):
        await old.scan()
    with pytest.raises(LeadershipLostError):
        await mark_dead(old.lease, 3, 100.0)
    row = await job_row(pool, job_id)
    assert (row["state"], row["attempt"]) == ("running", 1)  # untouched
    assert not old.lease.leading  # it knows now
    # An explicit old epoch is refused even by the current holder's lease object.
    with pytest.raises(LeadershipLostError):
        async with new.lease.transaction(epoch=old_epoch):
            pass
    # The new leader's write goes through.
    assert (await new.run_until_idle()).reaped == 1
    row = await job_row(pool, job_id)
    assert (row["state"], row["attempt"]) == ("pending", 2)


async def test_lease_rules(pool: ledger.Pool) -> None:
    a = LeaderLease(pool, "test", holder="a", ttl_s=5)
    b = LeaderLease(pool, "test", holder="b", ttl_s=5)
    assert await a.acquire() and a.epoch == 1
    assert not await b.acquire()  # held
    assert await a.renew()
    # Expired: never renewed, only acquired again with a new epoch.
    await pool.execute("UPDATE leases SET expires_at = clock_timestamp() - interval '1 ms'")
    assert not await a.renew() and a.epoch is None
    assert await b.acquire() and b.epoch == 2
    await b.release()
    assert await a.acquire() and a.epoch == 3
