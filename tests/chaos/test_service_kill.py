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
from .conftest import assert_clean, judge
from .harness import Cluster, marker_command, reaper_missing
from .load import Load, marker_spec, submit_http, submit_nats


async def run(
    cluster: Cluster,
    say: Callable[[str], None],
    *,
    name: str,
    jobs: int,
    rate: float,
    seed: int = 11,
) -> None:
    services = ["admission", "relay", "dispatcher"]
    if reaper_missing() is None:
        services.append("reaper")
    for service in services:
        cluster.add(service)
    cluster.add_worker("w1", concurrency=8)
    cluster.add_worker("w2", concurrency=8)
    await cluster.start()

    load = Load()
    command = marker_command(cluster.exec_log, 0.1)
    half = jobs // 2
    over_http = [marker_spec(command, f"{name}-http-{i}") for i in range(half)]
    over_nats = [marker_spec(command, f"{name}-nats-{i}") for i in range(jobs - half)]
    submitting = asyncio.gather(
        submit_http(load, cluster.api_url, over_http, rate=rate / 2),
        submit_nats(load, cluster.nats_url, over_nats, rate=rate / 2),
    )
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
