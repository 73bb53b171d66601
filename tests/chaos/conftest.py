"""Chaos fixtures: a cluster of real processes per test, and the judge that
waits for the jobs and runs the checker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest

from workron import bus, ledger

from .checker import Summary, Verdict, check, read_executions, read_ledger
from .harness import Cluster, PrivatePostgres, marker_command, reaper_missing
from .load import Load, marker_spec, submit_http, submit_nats

_TERMINAL = ["succeeded", "failed", "cancelled"]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@contextlib.asynccontextmanager
async def _running(
    tmp_path: Path, database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    running = Cluster(tmp_path, database_url)
    await asyncio.to_thread(running.nats.start)
    try:
        yield running
    finally:
        await asyncio.to_thread(running.close)
        if request.node.stash.get(_FAILED, True):
            print(f"\n===== chaos logs ({tmp_path}) =====\n{running.logs()}")


@pytest.fixture
async def cluster(
    tmp_path: Path, database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    """nats-server started, on the test database; the test declares the processes."""
    async with _running(tmp_path, database_url, request) as running:
        yield running


@pytest.fixture
async def private_pg(tmp_path: Path) -> AsyncIterator[PrivatePostgres]:
    """A PostgreSQL of this test's own, migrated, which the test may crash."""
    pg = PrivatePostgres(tmp_path / "pg")
    await asyncio.to_thread(pg.start)
    try:
        pool = await ledger.connect(pg.url, min_size=1, max_size=1)
        try:
            await ledger.migrate(pool)
        finally:
            await pool.close()
        yield pg
    finally:
        await asyncio.to_thread(pg.cleanup)


@pytest.fixture
async def pg_cluster(
    tmp_path: Path, private_pg: PrivatePostgres, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    """Like ``cluster``, on a private PostgreSQL (``cluster.pg``)."""
    async with _running(tmp_path, private_pg.url, request) as running:
        running.pg = private_pg
        yield running


@pytest.fixture
def say(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print to the terminal even without ``-s``: the figures go in the release notes."""

    def emit(line: str) -> None:
        with capsys.disabled():
            print(line)

    return emit


async def short_lease(nats_url: str, lease_s: float, queue: str = "default") -> None:
    """Create the queue's work consumer with a short AckWait before any worker starts.

    Workers create it only when missing and take their lease from the live
    AckWait, so a test can shorten the 30 s production lease and see a
    killed worker's job redelivered within seconds.
    """
    nc = await bus.connect(nats_url, name="chaos-setup")
    try:
        js = nc.jetstream()
        await bus.apply(js)
        config = dataclasses.replace(bus.work_consumer(queue), ack_wait=lease_s)
        await js.add_consumer("WORK", config)
    finally:
        await nc.close()


async def wait_terminal(database_url: str, ids: Sequence[UUID], timeout: float) -> int:
    """Poll the ledger until every job in ``ids`` is terminal; returns how many are not."""
    deadline = time.monotonic() + timeout
    open_jobs = len(ids)
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(database_url)
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.2)  # the ledger may be restarting
            continue
        try:
            while time.monotonic() < deadline:
                done = await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND state = ANY($2)",
                    list(ids),
                    _TERMINAL,
                )
                open_jobs = len(ids) - done
                if open_jobs == 0:
                    return 0
                await asyncio.sleep(0.2)
        finally:
            await conn.close()
    return open_jobs


async def judge(
    cluster: Cluster,
    load: Load,
    *,
    timeout: float,
    lease_s: float | None,
    say: Callable[[str], None],
    name: str,
) -> Summary:
    """Wait for every acknowledged job, then classify each; prints the checker line."""
    started = time.monotonic()
    await wait_terminal(cluster.database_url, load.ids, timeout)
    conn = await asyncpg.connect(cluster.database_url)
    try:
        jobs, events, fenced = await read_ledger(conn, load.ids)
    finally:
        await conn.close()
    summary = check(
        load.ids,
        jobs,
        events,
        fenced_counter=fenced,
        executions=read_executions(cluster.exec_log),
        last_fault_at=cluster.last_fault_at,
        last_ack_at=load.last_ack_at,
        lease_s=lease_s,
    )
    say(
        f"\n[chaos] {name}: {summary.line()} faults={len(cluster.faults)}"
        f" waited_s={time.monotonic() - started:.1f}\n[chaos] {name}: load {load.line()}"
    )
    return summary


def assert_clean(summary: Summary, load: Load, *, succeeded: int | None = None) -> None:
    """No acknowledged job lost, doubled, overlapping or inconsistent."""
    assert not summary.problems, f"{summary.line()}\n{summary.explain()}"
    assert not load.unacked, f"submissions never acknowledged: {load.unacked[:5]}"
    if succeeded is not None:
        assert summary[Verdict.SUCCEEDED_ONCE] == succeeded, summary.line()


async def start_full_cluster(cluster: Cluster) -> list[str]:
    """Every service (the reaper when it exists) and two workers of 8; returns the services."""
    services = ["admission", "relay", "dispatcher"]
    if reaper_missing() is None:
        services.append("reaper")
    for service in services:
        cluster.add(service)
    cluster.add_worker("w1", concurrency=8)
    cluster.add_worker("w2", concurrency=8)
    await cluster.start()
    return services


def submit_mixed(
    load: Load,
    cluster: Cluster,
    *,
    name: str,
    jobs: int,
    rate: float,
    run_s: float,
    give_up_s: float = 60.0,
) -> asyncio.Future[list[None]]:
    """Marker jobs of ``run_s`` seconds, half over HTTP and half over NATS, at ``rate``."""
    command = marker_command(cluster.exec_log, run_s)
    half = jobs // 2
    over_http = [marker_spec(command, f"{name}-http-{i}") for i in range(half)]
    over_nats = [marker_spec(command, f"{name}-nats-{i}") for i in range(jobs - half)]
    return asyncio.gather(
        submit_http(load, cluster.api_url, over_http, rate=rate / 2, give_up_s=give_up_s),
        submit_nats(load, cluster.nats_url, over_nats, rate=rate / 2, give_up_s=give_up_s),
    )
