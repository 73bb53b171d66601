"""kill -9 the reaper in a loop while workers die mid-job under it.

Two reapers run, one leading (leader lease in the ledger). Each round kills
one of them at random and restarts it, then kills a worker that is running
a job and starts a replacement under a new id (as a restarted process gets
by default: hostname-pid). The work consumer keeps its production lease
(30 s) so that what brings the dead workers' jobs back quickly is the
reaper's dead-worker detection (three missed 2 s heartbeats), not
JetStream's redelivery. No job may be lost, get two outcomes, or run under
two valid leases at once (the reaper must end the dead execution's attempt
before the job runs again).

The last two tests pin two cases these runs found the reaper missing (it
handles them now): a worker restarted under its own id before it could be
judged dead, and one that died before any reaper had heard of it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import asyncpg
import pytest

from workron import bus

from .checker import Verdict
from .conftest import assert_clean, judge
from .harness import Cluster, marker_command, reaper_missing
from .load import Load, marker_spec, submit_http

#: How soon the reaper must take a dead worker's jobs back: its detection
#: (3 x 2 s heartbeats) plus a leader hand-over (5 s lease TTL, then 6 s of
#: hearing), well under the 30 s lease it replaces.
TAKEBACK_S = bus.LEASE_S * 0.8


@pytest.fixture(autouse=True)
def reaper() -> None:
    if (why := reaper_missing()) is not None:
        pytest.skip(why)


@dataclass(frozen=True, slots=True)
class Orphans:
    """What the ledger showed of a worker the moment it was killed."""

    worker: str
    killed_at: float
    #: Jobs running on it.
    jobs: list[UUID]
    #: Whether the reaper had a row for it (had ever heard its heartbeat).
    registered: bool


async def kill_worker(cluster: Cluster, conn: asyncpg.Connection, worker: str) -> Orphans:
    running = "SELECT id FROM jobs WHERE state = 'running' AND worker_id = $1"
    jobs = await conn.fetch(running, worker)
    registered = await conn.fetchval("SELECT count(*) > 0 FROM workers WHERE id = $1", worker)
    cluster.kill(worker)
    return Orphans(worker, time.time(), [r["id"] for r in jobs], bool(registered))


async def takeback_delays(
    conn: asyncpg.Connection, orphans: list[Orphans], timeout: float = 0.0
) -> tuple[list[float], list[str]]:
    """Seconds from each kill until the reaper ended the dead execution's
    attempt, and the jobs not taken back (waiting at most ``timeout``).

    These jobs never fail by themselves, so a ``retrying`` (or ``failed``)
    row naming the dead worker is the reaper's. A job the dead worker
    finished just before the kill has its own outcome and is left out.
    """
    deadline = time.monotonic() + timeout
    while True:
        delays: list[float] = []
        missing: list[str] = []
        for o in orphans:
            for job_id in o.jobs:
                rows = await conn.fetch(
                    "SELECT kind, extract(epoch FROM at)::float8 AS at FROM job_events"
                    " WHERE job_id = $1 AND worker_id = $2 ORDER BY id",
                    job_id,
                    o.worker,
                )
                if any(r["kind"] == "succeeded" for r in rows):
                    continue
                taken = [r["at"] for r in rows if r["kind"] in ("retrying", "failed")]
                if taken:
                    delays.append(taken[0] - o.killed_at)
                else:
                    missing.append(f"{job_id} of {o.worker}: {[r['kind'] for r in rows]}")
        if not missing or time.monotonic() > deadline:
            return delays, missing
        await asyncio.sleep(0.2)


async def run(
    cluster: Cluster,
    say: Callable[[str], None],
    *,
    name: str,
    jobs: int,
    rate: float,
    rounds: int,
    takeback: bool,
    seed: int = 5,
) -> None:
    """``takeback``: also require every dead worker's running jobs to be taken
    back by the reaper within ``TAKEBACK_S``. That needs a leader that lives
    through a hand-over and a dead-after window (about 12 s); the soak kills
    reapers faster than that, so there JetStream's lease does part of the
    work, and the figures are only reported."""
    reapers = ["r1", "r2"]
    workers = ["w1", "w2", "w3"]
    for kind in ("admission", "relay", "dispatcher"):
        cluster.add(kind)
    for reaper_name in reapers:
        cluster.add("reaper", reaper_name)
    for worker in workers:
        cluster.add_worker(worker, concurrency=4)
    # Reapers first: a worker registers with its first heartbeat the leader hears.
    await cluster.start("admission", "relay", "dispatcher", *reapers)
    await cluster.start(*workers)

    load = Load()
    command = marker_command(cluster.exec_log, 0.5)
    specs = [marker_spec(command, f"{name}-{i}") for i in range(jobs)]
    submitting = asyncio.create_task(submit_http(load, cluster.api_url, specs, rate=rate))
    rng = random.Random(seed)
    orphans: list[Orphans] = []
    conn = await asyncpg.connect(cluster.database_url)
    try:
        for n in range(rounds):
            victim = rng.choice(reapers)
            cluster.kill(victim)
            await cluster.restart(victim)
            slot = rng.randrange(len(workers))
            await cluster.running_on(workers[slot], timeout=10)
            orphans.append(await kill_worker(cluster, conn, workers[slot]))
            workers[slot] = f"{workers[slot][:2]}-{n}"
            cluster.add_worker(workers[slot], concurrency=4)
            await cluster.start(workers[slot])
        await submitting
        summary = await judge(cluster, load, timeout=120, lease_s=bus.LEASE_S, say=say, name=name)
        delays, missing = await takeback_delays(conn, orphans)
    finally:
        await conn.close()
    unheard = sum(len(o.jobs) for o in orphans if not o.registered)
    say(
        f"[chaos] {name}: reaper took back {len(delays)} jobs of dead workers, slowest"
        f" {max(delays, default=0):.1f}s after the kill; {unheard} on never-registered workers"
    )
    assert_clean(summary, load, succeeded=jobs)
    assert summary[Verdict.SUCCEEDED_ONCE] == jobs
    if takeback:
        assert not missing, missing
        assert delays and max(delays) < TAKEBACK_S, delays
    else:
        say(f"[chaos] {name}: dead workers' jobs the JetStream lease brought back: {len(missing)}")


async def test_kill_reaper_in_a_loop(cluster: Cluster, say: Callable[[str], None]) -> None:
    await run(cluster, say, name="kill-reaper", jobs=80, rate=8, rounds=4, takeback=True)


@pytest.mark.soak
@pytest.mark.timeout(1200)
async def test_kill_reaper_in_a_loop_soak(cluster: Cluster, say: Callable[[str], None]) -> None:
    await run(cluster, say, name="kill-reaper-soak", jobs=1500, rate=8, rounds=60, takeback=False)


async def _one_worker_dies(
    cluster: Cluster, say: Callable[[str], None], *, name: str, reaper_first: bool
) -> None:
    """w1 dies running jobs; the reaper must take them back well inside the lease."""
    for kind in ("admission", "relay", "dispatcher", "reaper"):
        cluster.add(kind)
    cluster.add_worker("w1", concurrency=4)
    cluster.add_worker("w2", concurrency=4)
    await cluster.start("admission", "relay", "dispatcher", *(["reaper"] if reaper_first else []))
    await cluster.start("w1")
    load = Load()
    command = marker_command(cluster.exec_log, 5.0)
    specs = [marker_spec(command, f"{name}-{i}") for i in range(4)]
    conn = await asyncpg.connect(cluster.database_url)
    try:
        await submit_http(load, cluster.api_url, specs, rate=20)
        assert await cluster.running_on("w1", timeout=10)
        # Running as the ledger sees it: a job reports its start once it has
        # run for a moment (a worker dying before is JetStream's to redeliver).
        async with asyncio.timeout(5):
            while not await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE state = 'running' AND worker_id = 'w1'"
            ):
                await asyncio.sleep(0.02)
        orphans = await kill_worker(cluster, conn, "w1")
        assert orphans.jobs
        if reaper_first:
            # Same id, new instance: as `--worker-id w1` under a supervisor.
            await cluster.restart("w1")
            await cluster.start("w2")
        else:
            await cluster.start("reaper", "w2")
        delays, missing = await takeback_delays(conn, [orphans], timeout=TAKEBACK_S / 2)
        taken = ", ".join(f"{d:.1f}" for d in delays)
        say(f"[chaos] {name}: taken back after [{taken}] s; not taken back: {len(missing)}")
        assert not missing and max(delays) < TAKEBACK_S / 2, missing
        summary = await judge(cluster, load, timeout=60, lease_s=bus.LEASE_S, say=say, name=name)
    finally:
        await conn.close()
    assert_clean(summary, load, succeeded=len(specs))


async def test_worker_restarted_under_its_id(cluster: Cluster, say: Callable[[str], None]) -> None:
    await _one_worker_dies(cluster, say, name="restart-same-id", reaper_first=True)


async def test_worker_never_heard_of(cluster: Cluster, say: Callable[[str], None]) -> None:
    # It started and died while no reaper ran: no heartbeat was ever recorded.
    await _one_worker_dies(cluster, say, name="unregistered-worker", reaper_first=False)
