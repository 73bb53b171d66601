"""Bugs the chaos runs found, each shown by a test.

Each test stays as a regression test once its bug is fixed; a bug still open
is marked ``xfail(strict=True)``, so the suite stays green while it is there
and turns red (XPASS) the day it is fixed, when the mark goes. The reaper is
never started here: each test is about a service's own behaviour, not about
what the reaper can mend afterwards.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from workron import bus

from .conftest import judge, wait_terminal
from .harness import Cluster, marker_command
from .load import Load, marker_spec, submit_http

#: Bound on the outage: JetStream gives up on an unapplied report after the
#: REPORTS consumer's MaxDeliver (10) deliveries, one per nak delay (2 s),
#: about 20 s into the outage; a dispatcher that held its batch instead
#: would keep it past this.
LONG_OUTAGE_S = 40.0


async def _reports_abandoned(js: JetStreamContext, timeout: float) -> bool:
    """Wait until reports sit in REPORTS with none pending or in flight for the
    dispatcher: JetStream will never deliver them again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.consumer_info("REPORTS", "dispatcher")
        stored = (await js.stream_info("REPORTS")).state.messages
        if stored and not info.num_pending and not info.num_ack_pending:
            return True
        await asyncio.sleep(0.5)
    return False


async def _reports_left(js: JetStreamContext, timeout: float) -> int:
    """Reports still in REPORTS once they are acked, or after ``timeout``: the
    dispatcher acks a batch just after the commit that applies it."""
    deadline = time.monotonic() + timeout
    while (left := (await js.stream_info("REPORTS")).state.messages) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.05)
    return left


@pytest.mark.timeout(180)
async def test_reports_survive_a_long_ledger_outage(
    pg_cluster: Cluster, say: Callable[[str], None]
) -> None:
    cluster = pg_cluster
    for kind in ("admission", "relay", "dispatcher"):
        cluster.add(kind)
    cluster.add_worker("w1", concurrency=8)
    await cluster.start()
    load = Load()
    command = marker_command(cluster.exec_log, 1.0)
    specs = [marker_spec(command, f"long-outage-{i}") for i in range(6)]
    await submit_http(load, cluster.api_url, specs, rate=50)
    assert await cluster.running_on("w1", timeout=15)
    # The jobs end during the outage: their reports wait in REPORTS.
    await asyncio.to_thread(cluster.stop_postgres)
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        abandoned = await _reports_abandoned(js, timeout=LONG_OUTAGE_S)
        await cluster.restart_postgres()
        open_jobs = await wait_terminal(cluster.database_url, load.ids, timeout=10)
        left = await _reports_left(js, timeout=5)
    finally:
        await nc.close()
    say(f"[chaos] long-outage: reports abandoned by JetStream during the outage: {abandoned}")
    summary = await judge(cluster, load, timeout=0, lease_s=None, say=say, name="long-outage")
    assert left == 0, f"{left} reports never applied; {open_jobs} jobs still open"
    assert not summary.problems, summary.line()


async def test_services_redeclare_streams_after_the_store_is_lost(
    cluster: Cluster, say: Callable[[str], None]
) -> None:
    for kind in ("admission", "relay", "dispatcher"):
        cluster.add(kind)
    cluster.add_worker("w1", concurrency=4)
    await cluster.start()
    cluster.kill_nats()
    cluster.wipe_nats()
    await cluster.restart_nats()
    # A job acknowledged after the wipe needs no re-dispatch: only streams.
    load = Load()
    command = marker_command(cluster.exec_log, 0.1)
    await submit_http(load, cluster.api_url, [marker_spec(command, "after-wipe")], rate=1)
    open_jobs = await wait_terminal(cluster.database_url, load.ids, timeout=10)

    missing = []
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        for stream in bus.STREAMS:
            try:
                await js.stream_info(stream.name or "")
            except NotFoundError:
                missing.append(stream.name)
    finally:
        await nc.close()
    assert not missing and open_jobs == 0, f"streams missing: {missing}; open jobs: {open_jobs}"


async def test_worker_cli_writes_json_logs(cluster: Cluster) -> None:
    command = [sys.executable, "-m", "workron.cli", "worker", "--nats-url", cluster.nats_url]
    process = await asyncio.create_subprocess_exec(
        *command,
        env={**cluster.env("w1"), "WORKRON_LOG_LEVEL": "INFO"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 30
        # Started once it waits for work at the server with a pull request.
        while time.monotonic() < deadline:
            try:
                if (await js.consumer_info("WORK", "work-default")).num_waiting:
                    break
            except NotFoundError:
                pass
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert b'"action": "worker.start"' in output, output.decode(errors="replace")[-500:]
