"""kill -9 a worker mid-job, again and again, restarting it each time.

The jobs a dead worker held are redelivered when their lease ends, and run
again elsewhere; each still gets exactly one recorded outcome. The lease is
the work consumer's AckWait: 30 s in production, shortened here to 3 s by
creating the queue's consumer before any worker starts (workers take the
lease from the live consumer), so a redelivery takes seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable

import pytest

from .checker import Verdict
from .conftest import assert_clean, judge, short_lease
from .harness import Cluster, marker_command
from .load import Load, marker_spec, submit_http

LEASE_S = 3.0


async def run(
    cluster: Cluster,
    say: Callable[[str], None],
    *,
    name: str,
    jobs: int,
    rate: float,
    kills: int,
    job_s: float,
    seed: int = 7,
) -> None:
    await short_lease(cluster.nats_url, LEASE_S)
    for kind in ("admission", "relay", "dispatcher"):
        cluster.add(kind)
    workers = ["w1", "w2", "w3"]
    for worker in workers:
        cluster.add_worker(worker, concurrency=4)
    await cluster.start()

    load = Load()
    command = marker_command(cluster.exec_log, job_s)
    specs = [marker_spec(command, f"{name}-{i}") for i in range(jobs)]
    submitting = asyncio.create_task(submit_http(load, cluster.api_url, specs, rate=rate))

    rng = random.Random(seed)
    killed_mid_job = 0
    for _, victim in zip(range(kills), itertools.cycle(workers), strict=False):
        if rng.random() < 0.5:
            victim = rng.choice(workers)
        if await cluster.running_on(victim, timeout=10):
            killed_mid_job += 1
        cluster.kill(victim)
        await cluster.restart(victim)
    await submitting

    summary = await judge(cluster, load, timeout=90, lease_s=LEASE_S, say=say, name=name)
    assert_clean(summary, load, succeeded=jobs)
    assert killed_mid_job > 0
    # Jobs held by the dead workers ran again: the kills really hit work.
    assert summary.reexecuted > 0, summary.line()
    assert summary[Verdict.SUCCEEDED_ONCE] == jobs


async def test_kill_worker_mid_job_repeatedly(cluster: Cluster, say: Callable[[str], None]) -> None:
    await run(cluster, say, name="kill-worker", jobs=60, rate=12, kills=4, job_s=0.4)


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_kill_worker_mid_job_soak(cluster: Cluster, say: Callable[[str], None]) -> None:
    await run(cluster, say, name="kill-worker-soak", jobs=1200, rate=10, kills=60, job_s=0.5)
