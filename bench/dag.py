"""DAG benchmark: admission of a 10,000-node DAG, resolution rate, per-hop latency.

    .venv/bin/python bench/dag.py [--width 9998] [--depth 100]

Starts `workron up` in a scratch data directory (or uses a running system
with --api-url/--nats-url/--database-url) and prints:

- admission: a wide fan-out/fan-in DAG (1 root → N no-op jobs → 1 sink) of
  N + 2 nodes, submitted over HTTP (`POST /v1/dags`, client time including
  encoding), and once more in-process (`workron.dags.submit` on its own
  pool: validation, one transaction, publish);
- resolution: nodes finished per second for that DAG, from the end of its
  admission until the sink finished (ledger timestamps);
- chain: a DEPTH-long chain of no-op jobs; per hop, the child's start minus
  its parent's end (both recorded by the worker on one clock): median, p90;
- resolver alone: the same fan on a queue no worker serves; the bench marks
  the jobs finished in the ledger and publishes their job.finished events,
  as a reaper or a cancel would, and times the resolver service releasing
  the next layer (events applied per second, without the cost of running
  the jobs). Normally the dispatcher resolves a job's dependents in the
  transaction that records its outcome, and the resolver only confirms.

Targets: admission ≤ 1 s, ≥ 3,000 nodes/s, ≤ 5 ms per hop. No assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from _system import start_up
from workron import dags, ledger
from workron.client import Client
from workron.dag_api import DagSpec

NOOP: dict[str, Any] = {"task": "workron.noop", "max_attempts": 1}


def fan(width: int) -> DagSpec:
    middle = [f"m{i}" for i in range(width)]
    jobs = [
        {"ref": "root", **NOOP},
        *({"ref": m, **NOOP, "depends_on": ["root"]} for m in middle),
        {"ref": "sink", **NOOP, "depends_on": middle},
    ]
    return msgspec.convert({"jobs": jobs, "name": f"fan-{width}"}, DagSpec)


def chain(depth: int) -> DagSpec:
    jobs = [{"ref": "n0", **NOOP}]
    jobs += [{"ref": f"n{i}", **NOOP, "depends_on": [f"n{i - 1}"]} for i in range(1, depth)]
    return msgspec.convert({"jobs": jobs, "name": f"chain-{depth}"}, DagSpec)


async def wait_done(conn: asyncpg.Connection, dag_id: UUID, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        open_jobs = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE dag_id = $1"
            " AND state NOT IN ('succeeded', 'failed', 'cancelled')",
            dag_id,
        )
        if open_jobs == 0:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"DAG {dag_id} did not finish in {timeout}s")


async def resolution(conn: asyncpg.Connection, dag_id: UUID, admitted_at: float) -> str:
    await wait_done(conn, dag_id)
    row = await conn.fetchrow(
        "SELECT count(*) AS n, count(*) FILTER (WHERE state <> 'succeeded') AS bad,"
        " extract(epoch FROM max(finished_at)) AS last FROM jobs WHERE dag_id = $1",
        dag_id,
    )
    seconds = float(row["last"]) - admitted_at
    return (
        f"{row['n']} nodes resolved in {seconds:.2f}s → {row['n'] / seconds:,.0f} nodes/s"
        f" (not succeeded: {row['bad']})"
    )


async def fan_bench(api_url: str, nats_url: str, database_url: str, width: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with Client(api_url, timeout=120) as client:
            spec = fan(width)
            start = time.perf_counter()
            submitted = await client.submit_dag(spec)
            admitted_at = time.time()
            took = time.perf_counter() - start
        print(f"admission over HTTP: {len(spec.jobs)} nodes in {took * 1000:.0f} ms")
        print(f"resolution: {await resolution(conn, submitted.id, admitted_at)}")

        from workron import bus

        pool = await ledger.connect(database_url)
        nc = await bus.connect(nats_url, name="bench-dag")
        try:
            spec = fan(width)
            start = time.perf_counter()
            again = await dags.submit(pool, nc.jetstream(), spec)
            admitted_at = time.time()
            took = time.perf_counter() - start
            print(f"admission in-process: {len(spec.jobs)} nodes in {took * 1000:.0f} ms")
            print(f"resolution: {await resolution(conn, again.id, admitted_at)}")
        finally:
            await nc.close()
            await pool.close()
    finally:
        await conn.close()


async def chain_bench(api_url: str, database_url: str, depth: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with Client(api_url) as client:
            submitted = await client.submit_dag(chain(depth))
        await wait_done(conn, submitted.id)
        rows = {
            r["dag_ref"]: r
            for r in await conn.fetch(
                "SELECT dag_ref, extract(epoch FROM started_at) AS s,"
                " extract(epoch FROM finished_at) AS f FROM jobs WHERE dag_id = $1",
                submitted.id,
            )
        }
    finally:
        await conn.close()
    hops = sorted(
        (float(rows[f"n{i}"]["s"]) - float(rows[f"n{i - 1}"]["f"])) * 1000 for i in range(1, depth)
    )
    q = statistics.quantiles(hops, n=10)
    print(
        f"chain of {depth}: parent end → child start median {statistics.median(hops):.2f} ms,"
        f" p90 {q[8]:.2f} ms, max {hops[-1]:.2f} ms"
    )


async def finish_layer(
    conn: asyncpg.Connection, nc: Any, ids: list[UUID], state: str = "succeeded"
) -> None:
    """Mark ``ids`` finished in the ledger and publish their job.finished,
    in batches of 500 per message as a busy dispatcher does."""
    from workron.events import JobState
    from workron.jobs import finished_event, finished_messages

    await conn.execute(
        "UPDATE jobs SET state = $2, finished_at = now() WHERE id = ANY($1::uuid[])", ids, state
    )
    js = nc.jetstream()
    futures = []
    for start in range(0, len(ids), 500):
        events = [
            finished_event(job_id, "bench-idle", JobState(state), 1)
            for job_id in ids[start : start + 500]
        ]
        for message in finished_messages(events):
            futures.append(
                await js.publish_async(message.subject, message.payload, headers=message.headers())
            )
    await asyncio.gather(*futures)


async def until_dispatched(conn: asyncpg.Connection, ids: list[UUID]) -> None:
    """Until none of ``ids`` is blocked (released, or cancelled)."""
    while await conn.fetchval(
        "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND state = 'blocked'", ids
    ):
        await asyncio.sleep(0.01)


async def resolver_bench(api_url: str, nats_url: str, database_url: str, width: int) -> None:
    from workron import bus

    spec = fan(width)
    idle = msgspec.convert(
        {"jobs": [{**msgspec.to_builtins(j), "queue": "bench-idle"} for j in spec.jobs]}, DagSpec
    )
    conn = await asyncpg.connect(database_url)
    nc = await bus.connect(nats_url, name="bench-dag-resolver")
    try:
        async with Client(api_url, timeout=120) as client:
            submitted = await client.submit_dag(idle)
        ids = submitted.jobs
        middle = [ids[f"m{i}"] for i in range(width)]
        start = time.perf_counter()
        await finish_layer(conn, nc, [ids["root"]])
        await until_dispatched(conn, middle)
        fan_out = time.perf_counter() - start
        start = time.perf_counter()
        await finish_layer(conn, nc, middle)
        await until_dispatched(conn, [ids["sink"]])
        fan_in = time.perf_counter() - start
        print(
            f"resolver alone: 1 event releasing {width} jobs in {fan_out * 1000:.0f} ms"
            f" → {width / fan_out:,.0f} nodes/s;"
            f" {width} events (one release) in {fan_in:.2f}s → {width / fan_in:,.0f} events/s"
        )
        # A failure at the root: every other node is cancelled by the cascade.
        async with Client(api_url, timeout=120) as client:
            doomed = (await client.submit_dag(idle)).jobs
        rest = [job_id for ref, job_id in doomed.items() if ref != "root"]
        start = time.perf_counter()
        await finish_layer(conn, nc, [doomed["root"]], "failed")
        await until_dispatched(conn, rest)
        cascade = time.perf_counter() - start
        print(
            f"resolver alone: 1 failure cancelling {len(rest)} jobs in {cascade * 1000:.0f} ms"
            f" → {len(rest) / cascade:,.0f} nodes/s"
        )
    finally:
        await nc.close()
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=9998, help="middle layer of the fan")
    parser.add_argument("--depth", type=int, default=100, help="length of the chain")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--parts", default="chain,fan,resolver,chain", help="which measures, in order"
    )
    parser.add_argument("--api-url")
    parser.add_argument("--nats-url")
    parser.add_argument("--database-url")
    args = parser.parse_args()
    proc = None
    if args.api_url and args.nats_url and args.database_url:
        urls = {"API": args.api_url, "NATS": args.nats_url, "PostgreSQL": args.database_url}
    else:
        scratch = Path(tempfile.mkdtemp(prefix="workron-bench-dag-"))
        proc, urls = start_up(scratch, args.workers, args.concurrency)
        print(f"workron up: {urls}")
    try:
        for part in args.parts.split(","):
            if part == "chain":
                await chain_bench(urls["API"], urls["PostgreSQL"], args.depth)
            elif part == "fan":
                await fan_bench(urls["API"], urls["NATS"], urls["PostgreSQL"], args.width)
            elif part == "resolver":
                await resolver_bench(urls["API"], urls["NATS"], urls["PostgreSQL"], args.width)
            else:
                parser.error(f"unknown part {part!r}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    asyncio.run(main())
