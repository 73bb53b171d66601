"""Helpers for the DAG tests: run every service until a set of jobs is terminal."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any
from uuid import UUID

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from workron import dags, events, ledger
from workron.dag_api import DagSpec, DagSubmitted
from workron.dispatcher.service import Dispatcher
from workron.relay.service import Relay
from workron.resolver.service import Resolver
from workron.telemetry import Metrics
from workron.worker import Context, NonRetryable, Registry, Retry, Worker, builtin

handlers = Registry()


@handlers.task("t.fail")
async def _fail(ctx: Context, payload: Any) -> None:
    raise NonRetryable(f"failing on purpose: {payload}")


@handlers.task("t.fail_once")
async def _fail_once(ctx: Context, payload: Any) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise NonRetryable("the first attempt fails for good")
    return {"attempt": ctx.attempt}


@handlers.task("t.flaky_parents")
async def _flaky_parents(ctx: Context, payload: Any) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise Retry("the first attempt fails")
    return {"parents": ctx.parents, "attempt": ctx.attempt}


@handlers.task("t.parents")
async def _parents(ctx: Context, payload: Any) -> dict[str, Any]:
    return {"parents": ctx.parents, "omitted": ctx.parents_omitted}


def spec(jobs: Sequence[dict[str, Any]], **fields: Any) -> DagSpec:
    return msgspec.convert({"jobs": list(jobs), **fields}, DagSpec)


def echo(ref: str, *deps: Any, **fields: Any) -> dict[str, Any]:
    return {"ref": ref, "task": "workron.echo", "payload": ref, "depends_on": list(deps), **fields}


class System:
    """Relay, dispatcher, resolver(s) and a burst worker, stepped by hand."""

    def __init__(self, pool: ledger.Pool, nc: NATS, *, resolvers: int = 1, **kw: Any) -> None:
        self.pool = pool
        self.metrics = Metrics()
        self.relay = Relay(pool, nc, self.metrics)
        self.dispatcher = Dispatcher(pool, nc, self.metrics)
        self.resolvers = [Resolver(pool, nc, self.metrics, **kw) for _ in range(resolvers)]
        self.worker = Worker(nc=nc, registry=[builtin, handlers], concurrency=16)
        self.js = nc.jetstream()

    async def submit(self, dag: DagSpec) -> DagSubmitted:
        return await dags.submit(self.pool, self.js, dag)

    async def step(self) -> None:
        await self.relay.run_until_idle()
        await self.worker.run(burst=True)
        await self.dispatcher.run_until_idle()
        for resolver in self.resolvers:
            await resolver.run_until_idle()

    async def settle(self, ids: Sequence[UUID], rounds: int = 400) -> None:
        """Step until every job of ``ids`` is terminal."""
        for _ in range(rounds):
            await self.step()
            if await self.open(ids) == 0:
                return
        raise AssertionError(f"{await self.open(ids)} jobs still open")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Every service's real loop in the background (latency like production)."""
        services: list[Any] = [self.relay, self.dispatcher, *self.resolvers, self.worker]
        tasks = [asyncio.create_task(s.run()) for s in services]
        try:
            yield
        finally:
            for service in services:
                service.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)

    async def wait(self, ids: Sequence[UUID], timeout: float = 60.0) -> None:
        """Poll (bounded) until every job of ``ids`` is terminal."""
        async with asyncio.timeout(timeout):
            while await self.open(ids):
                await asyncio.sleep(0.02)

    async def open(self, ids: Sequence[UUID]) -> int:
        count: int = await self.pool.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[])"
            " AND state NOT IN ('succeeded', 'failed', 'cancelled')",
            list(ids),
        )
        return count

    async def states(self, submitted: DagSubmitted) -> dict[str, str]:
        rows = await self.pool.fetch(
            "SELECT dag_ref, state FROM jobs WHERE dag_id = $1", submitted.id
        )
        return {r["dag_ref"]: r["state"] for r in rows}

    async def job(self, job_id: UUID) -> dict[str, Any]:
        row = await self.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        assert row is not None
        found = dict(row.items())
        if found["result"] is not None:
            found["result"] = msgspec.json.decode(found["result"])
        return found


class Finished:
    """Every job.finished seen on core NATS (a subscriber's view)."""

    def __init__(self) -> None:
        self.states: dict[UUID, list[str]] = {}

    async def on_msg(self, msg: Msg) -> None:
        decoded = msgspec.json.decode(msg.data, type=events.Finished)
        for event in events.finished_jobs(decoded):
            self.states.setdefault(event.job_id, []).append(event.state)
