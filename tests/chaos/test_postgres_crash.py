"""Stop PostgreSQL immediately under load (``pg_ctl stop -m immediate``: no
checkpoint, crash recovery at the next start), then start it again.

Every submission acknowledged before, during and after the outage survives
and finishes once. During the outage HTTP clients get 503 with
``Retry-After``, never a 500; NATS submissions are acknowledged by the
stream and wait there for the ledger. The test runs its own PostgreSQL:
it must never crash the one other tests share.
"""

from __future__ import annotations

import asyncio
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
    outages: int,
    down_s: float,
    timeout: float = 120,
) -> None:
    await start_full_cluster(cluster)

    load = Load()
    give_up_s = 60 + outages * down_s
    submitting = submit_mixed(
        load, cluster, name=name, jobs=jobs, rate=rate, run_s=0.1,
        give_up_s=give_up_s,
    )  # fmt: skip
    # Outages spread over the load: each gap, outage and restart in its share.
    between_s = max(0.5, (jobs / rate - outages * (down_s + 1.0)) / (outages + 1))
    for _ in range(outages):
        await asyncio.sleep(between_s)  # pacing the faults across the load
        await asyncio.to_thread(cluster.stop_postgres)
        await asyncio.sleep(down_s)
        await cluster.restart_postgres()
    await submitting

    summary = await judge(cluster, load, timeout=timeout, lease_s=None, say=say, name=name)
    assert_clean(summary, load, succeeded=jobs)
    assert summary[Verdict.SUCCEEDED_ONCE] == jobs
    # Clients saw the outage, as a 503 with Retry-After, and never a 500.
    assert load.statuses[503] > 0, load.line()
    assert load.missing_retry_after == 0, load.line()
    assert not [code for code in load.statuses if code >= 500 and code != 503], load.line()
    dead = [part.name for part in cluster.parts.values() if not part.alive]
    assert not dead, f"exited while PostgreSQL was away: {dead}"


async def test_stop_postgres_immediately_and_restart(
    pg_cluster: Cluster, say: Callable[[str], None]
) -> None:
    await run(pg_cluster, say, name="stop-postgres", jobs=120, rate=12, outages=1, down_s=4.0)


@pytest.mark.soak
@pytest.mark.timeout(1200)
async def test_stop_postgres_immediately_and_restart_soak(
    pg_cluster: Cluster, say: Callable[[str], None]
) -> None:
    await run(
        pg_cluster, say, name="stop-postgres-soak", jobs=1800, rate=12, outages=12, down_s=5.0,
        timeout=300,
    )  # fmt: skip
