"""kill -9 the services in a loop while clients submit, over HTTP and NATS.

admission, relay and dispatcher (and the reaper, once it exists) are killed
one after another, at random, and restarted at once on the same port. No
acknowledged job may be lost and none may get two outcomes. Workers are
left alone: their faults have their own tests.

Recovery is bounded by the services' own leases on the bus: a dispatcher
killed while holding a batch of reports gets it back after the REPORTS
consumer's AckWait (30 s), and an admission killed between commit and
publish leaves the work message to the relay (after ``OWN_GRACE_S``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from .checker import Verdict
from .conftest import assert_clean, judge, start_full_cluster, submit_mixed
from .harness import Cluster
from .load import Load


async def run(
    cluster: Cluster,
    say: Callable[[str], None],
    *,
    name: str,
    jobs: int,
    rate: float,
    seed: int = 11,
) -> None:
    services = await start_full_cluster(cluster)

    load = Load()
    submitting = submit_mixed(
        load, cluster, name=name, jobs=jobs, rate=rate, run_s=0.1,
    )  # fmt: skip
    rng = random.Random(seed)
    victims: list[str] = []
    # Every service in turn (shuffled each round), for as long as clients submit.
    while not submitting.done():
        if not victims:
            victims = rng.sample(services, len(services))
        await asyncio.sleep(rng.uniform(0.2, 1.0))  # pacing the faults, not waiting on state
        victim = victims.pop()
        cluster.kill(victim)
        await cluster.restart(victim)
    await submitting

    summary = await judge(cluster, load, timeout=120, lease_s=None, say=say, name=name)
    say(f"[chaos] {name}: services killed: {', '.join(f.part for f in cluster.faults[::2])}")
    assert_clean(summary, load, succeeded=jobs)
    assert summary[Verdict.SUCCEEDED_ONCE] == jobs


async def test_kill_services_in_a_loop(cluster: Cluster, say: Callable[[str], None]) -> None:
    await run(cluster, say, name="kill-services", jobs=160, rate=16)


@pytest.mark.soak
@pytest.mark.timeout(1200)
async def test_kill_services_in_a_loop_soak(cluster: Cluster, say: Callable[[str], None]) -> None:
    await run(cluster, say, name="kill-services-soak", jobs=4000, rate=16)
