"""kill -9 nats-server under load, and restart it on the same port.

With its store intact (``sync_interval: always``: every PubAck was on
disk), everything acknowledged is still there after the restart; services
and workers reconnect by themselves, and work in flight is redelivered when
its lease ends (3 s here, as in ``test_worker_kill``).

With its store wiped, JetStream has forgotten everything: streams,
consumers, messages. The ledger is the truth, so every acknowledged job must
still finish: the reaper re-dispatches ledger jobs whose message is gone,
and the streams must be declared again by whoever reconnects first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from .checker import Verdict
from .conftest import assert_clean, judge, short_lease, start_full_cluster, submit_mixed
from .harness import Cluster, reaper_missing
from .load import Load

LEASE_S = 3.0


async def run(
    cluster: Cluster,
    say: Callable[[str], None],
    *,
    name: str,
    jobs: int,
    rate: float,
    outages: int,
    down_s: float,
    wipe: bool,
    timeout: float = 120,
) -> None:
    await short_lease(cluster.nats_url, LEASE_S)
    await start_full_cluster(cluster)

    load = Load()
    give_up_s = 60 + outages * down_s
    submitting = submit_mixed(
        load, cluster, name=name, jobs=jobs, rate=rate, run_s=0.3,
        give_up_s=give_up_s,
    )  # fmt: skip
    # Outages spread over the load: each gap, outage and restart in its share.
    between_s = max(0.5, (jobs / rate - outages * (down_s + 1.0)) / (outages + 1))
    for _ in range(outages):
        # Pacing the faults across the load, not waiting on state.
        await asyncio.sleep(between_s)
        cluster.kill_nats()
        if wipe:
            cluster.wipe_nats()
        await asyncio.sleep(down_s)
        await cluster.restart_nats()
    await submitting

    summary = await judge(cluster, load, timeout=timeout, lease_s=LEASE_S, say=say, name=name)
    assert_clean(summary, load, succeeded=jobs)
    assert summary[Verdict.SUCCEEDED_ONCE] == jobs
    assert all(part.alive for part in cluster.parts.values()), "a process died with the bus"


async def test_kill_nats_and_restart(cluster: Cluster, say: Callable[[str], None]) -> None:
    await run(cluster, say, name="kill-nats", jobs=120, rate=12, outages=2, down_s=2.0, wipe=False)


@pytest.mark.soak
@pytest.mark.timeout(1200)
async def test_kill_nats_and_restart_soak(cluster: Cluster, say: Callable[[str], None]) -> None:
    await run(
        cluster, say, name="kill-nats-soak", jobs=1800, rate=12, outages=20, down_s=3.0,
        wipe=False, timeout=300,
    )  # fmt: skip


@pytest.fixture
def reaper() -> None:
    if (why := reaper_missing()) is not None:
        pytest.skip(f"needs the reaper's re-dispatch of lost messages; {why}")


@pytest.mark.usefixtures("reaper")
async def test_wipe_nats_store_and_restart(cluster: Cluster, say: Callable[[str], None]) -> None:
    await run(cluster, say, name="wipe-nats", jobs=80, rate=12, outages=1, down_s=2.0, wipe=True)


@pytest.mark.soak
@pytest.mark.timeout(1200)
@pytest.mark.usefixtures("reaper")
async def test_wipe_nats_store_and_restart_soak(
    cluster: Cluster, say: Callable[[str], None]
) -> None:
    await run(
        cluster, say, name="wipe-nats-soak", jobs=1200, rate=12, outages=8, down_s=3.0,
        wipe=True, timeout=300,
    )  # fmt: skip
