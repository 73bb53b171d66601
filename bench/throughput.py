"""End-to-end benchmark: jobs/s and submit→start latency against `workron up`.

    .venv/bin/python bench/throughput.py --jobs 5000 --rate 200 --seconds 10

Starts `workron up` in a scratch data directory (or uses a running one with
--api-url/--nats-url/--database-url), submits no-op jobs through the SDK over
NATS, and prints:

- warm-up: a few jobs run first, so the latency figures do not include the
  workers' start (`workron up` reports ready before its local workers are);
- throughput: N jobs published as fast as the SDK pipelines them; time from
  the first publish until every job's `job.finished` event arrived;
- latency: jobs published at a fixed rate; submit→start is the worker's
  start time (recorded in the ledger) minus the client's clock just before
  publishing. Same machine, same clock.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from uuid import UUID

import asyncpg
import msgspec

from _system import start_up
from workron.client import Publisher
from workron.events import Finished as FinishedMessage
from workron.events import JobSpec, finished_jobs

NOOP = JobSpec(task="workron.noop", max_attempts=1)


class Finished:
    """Counts job.finished events for a set of ids (core NATS subscription)."""

    def __init__(self) -> None:
        self.wanted: set[UUID] = set()
        self.seen: dict[UUID, str] = {}
        self.done = asyncio.Event()
        self._decoder = msgspec.json.Decoder(FinishedMessage)

    async def handler(self, msg: object) -> None:
        # One job.finished, or a dispatcher's batch of them.
        for event in finished_jobs(self._decoder.decode(msg.data)):  # type: ignore[attr-defined]
            self.seen[event.job_id] = event.state
        if self.wanted and self.wanted.issubset(self.seen):
            self.done.set()


async def throughput(nats_url: str, n: int, chunk: int, label: str = "throughput") -> None:
    publisher, nc = await Publisher.connect(nats_url)
    finished = Finished()
    sub = await nc.subscribe("workron.evt.job.finished", cb=finished.handler)
    ids: list[UUID] = []
    start = time.perf_counter()
    for offset in range(0, n, chunk):
        batch = await publisher.publish_many([NOOP] * min(chunk, n - offset))
        ids.extend(batch)
    published = time.perf_counter() - start
    finished.wanted = set(ids)
    if finished.wanted.issubset(finished.seen):
        finished.done.set()
    await asyncio.wait_for(finished.done.wait(), timeout=max(120, n / 100))
    total = time.perf_counter() - start
    failed = sum(1 for i in ids if finished.seen[i] != "succeeded")
    await sub.unsubscribe()
    await nc.close()
    print(
        f"{label}: {n} jobs published in {published:.2f}s ({n / published:,.0f}/s); "
        f"all finished in {total:.2f}s → {n / total:,.0f} jobs/s end to end; failed {failed}"
    )


async def latency(nats_url: str, database_url: str, rate: float, seconds: float) -> None:
    publisher, nc = await Publisher.connect(nats_url)
    finished = Finished()
    sub = await nc.subscribe("workron.evt.job.finished", cb=finished.handler)
    sent: dict[UUID, float] = {}
    interval = 1.0 / rate
    count = int(rate * seconds)
    begin = time.perf_counter()
    for i in range(count):
        target = begin + i * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = time.time()
        job_id = await publisher.publish(NOOP)
        sent[job_id] = t0
    finished.wanted = set(sent)
    if finished.wanted.issubset(finished.seen):
        finished.done.set()
    await asyncio.wait_for(finished.done.wait(), timeout=60)
    await sub.unsubscribe()
    await nc.close()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT id, extract(epoch FROM started_at) AS s FROM jobs WHERE id = ANY($1::uuid[])",
            list(sent),
        )
    finally:
        await conn.close()
    waits = sorted((float(r["s"]) - sent[r["id"]]) * 1000 for r in rows if r["s"] is not None)
    q = statistics.quantiles(waits, n=100)
    print(
        f"latency at {rate:.0f} jobs/s for {seconds:.0f}s ({len(waits)} jobs): "
        f"submit→start p50 {q[49]:.2f} ms, p90 {q[89]:.2f} ms, p99 {q[98]:.2f} ms, "
        f"max {waits[-1]:.2f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--nats-url")
    parser.add_argument("--database-url")
    args = parser.parse_args()
    proc = None
    if args.nats_url and args.database_url:
        urls = {"NATS": args.nats_url, "PostgreSQL": args.database_url}
    else:
        scratch = Path(tempfile.mkdtemp(prefix="workron-bench-"))
        proc, urls = start_up(scratch, args.workers, args.concurrency)
        print(f"workron up: {urls}")
    try:
        await throughput(urls["NATS"], 20, 20, label="warm-up")
        await latency(urls["NATS"], urls["PostgreSQL"], args.rate, args.seconds)
        await throughput(urls["NATS"], args.jobs, args.chunk)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    asyncio.run(main())
