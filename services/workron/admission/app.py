"""The HTTP API (DESIGN §5): jobs, health, metrics and the OpenAPI document.

Litestar routes, validates (the msgspec types of ``workron.events`` and
``workron.api``) and documents; this module only wires routes to the ledger
operations of ``workron.jobs``. Every error leaves through ``_http_errors``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Litestar, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, QueryParameter
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from workron import jobs
from workron._ids import uuid7
from workron.admission._http_errors import MAX_BODY_BYTES, RETRY_AFTER_S, exception_handlers
from workron.api import ErrorBody, Job, JobEvent, JobPage
from workron.errors import LedgerUnavailableError
from workron.events import JobSpec, JobState
from workron.ledger import Pool, ledger_errors, queries
from workron.telemetry import Metrics, new_traceparent

__all__ = ["AppContext", "Health", "Readiness", "create_app", "openapi_document"]

#: How long /readyz waits for PostgreSQL before calling it unavailable.
READY_TIMEOUT_S = 2.0

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_ERROR_DESCRIPTIONS = {
    400: "The body is not JSON.",
    404: "No such job.",
    409: "The job is not in a state that allows this.",
    413: "The body or the job's payload is too large.",
    422: "A field is invalid; `field` names it (a JSON path for the body).",
    503: "The ledger is unavailable; retry after `Retry-After` seconds.",
}


@dataclass(frozen=True, slots=True)
class AppContext:
    """What the routes use. The process owns each of these and closes them."""

    pool: Pool
    #: None when the API runs without NATS: the relay then publishes the work.
    js: JetStreamContext | None
    metrics: Metrics
    #: The NATS connection /readyz checks; None when NATS is not used.
    nc: NATS | None = None


class Health(msgspec.Struct, kw_only=True):
    status: str = "ok"


class Readiness(msgspec.Struct, kw_only=True):
    ready: bool
    #: ``ok`` or ``unavailable``.
    ledger: str
    #: ``ok``, ``disconnected``, or ``disabled`` when the API runs without NATS.
    nats: str


def _errors(*statuses: int) -> dict[int, ResponseSpec]:
    return {
        status: ResponseSpec(
            ErrorBody, description=_ERROR_DESCRIPTIONS[status], generate_examples=False
        )
        for status in statuses
    }


@post(
    "/v1/jobs",
    status_code=201,
    summary="Submit a job",
    description="201 with the new job; 200 with the earlier job when `idempotency_key` matched.",
    responses={
        200: ResponseSpec(Job, description="An earlier job had this idempotency key."),
        **_errors(400, 413, 422, 503),
    },
)
async def submit_job(
    ctx: NamedDependency[AppContext],
    data: JSONBody[JobSpec],
    traceparent: Annotated[
        str | None,
        HeaderParameter(name="traceparent", description="W3C trace context to continue"),
    ] = None,
) -> Response[Job]:
    # Continue the caller's trace when it sent a well-formed one; else start one.
    trace = traceparent if traceparent and _TRACEPARENT.match(traceparent) else new_traceparent()
    planned = jobs.plan(uuid7(), data, traceparent=trace)
    [(job_id, created)] = await jobs.submit(ctx.pool, ctx.js, [planned])
    job = await jobs.get(ctx.pool, job_id)
    if not created:
        return Response(job, status_code=200)
    ctx.metrics.submitted.labels(job.queue).inc()
    return Response(job, status_code=201, headers={"Location": f"/v1/jobs/{job_id}"})


@get("/v1/jobs", summary="List jobs, newest first", responses=_errors(422, 503))
async def list_jobs(
    ctx: NamedDependency[AppContext],
    # Litestar reserves the name `state`; the query parameter keeps it.
    job_state: Annotated[JobState | None, QueryParameter(name="state")] = None,
    queue: FromQuery[str | None] = None,
    task: FromQuery[str | None] = None,
    cursor: Annotated[
        UUID | None, QueryParameter(description="`next_cursor` of the previous page")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
) -> JobPage:
    items, next_cursor = await jobs.list_jobs(
        ctx.pool,
        state=job_state.value if job_state is not None else None,
        queue=queue,
        task=task,
        cursor=cursor,
        limit=limit,
    )
    return JobPage(items=items, next_cursor=None if next_cursor is None else str(next_cursor))


@get("/v1/jobs/{job_id:uuid}", summary="Get a job", responses=_errors(404, 503))
async def get_job(ctx: NamedDependency[AppContext], job_id: FromPath[UUID]) -> Job:
    return await jobs.get(ctx.pool, job_id)


@post(
    "/v1/jobs/{job_id:uuid}/cancel",
    status_code=200,
    summary="Cancel a job that has not finished",
    responses=_errors(404, 409, 503),
)
async def cancel_job(ctx: NamedDependency[AppContext], job_id: FromPath[UUID]) -> Job:
    return await jobs.cancel(ctx.pool, ctx.js, job_id)


@get("/v1/jobs/{job_id:uuid}/events", summary="A job's history", responses=_errors(404, 503))
async def job_events(ctx: NamedDependency[AppContext], job_id: FromPath[UUID]) -> list[JobEvent]:
    return await jobs.list_events(ctx.pool, job_id)


@get("/healthz", summary="The process is alive")
async def healthz() -> Health:
    return Health()


@get(
    "/readyz",
    summary="PostgreSQL answers and NATS is connected",
    responses={503: ResponseSpec(Readiness, description="Not ready.", generate_examples=False)},
)
async def readyz(ctx: NamedDependency[AppContext]) -> Response[Readiness]:
    ledger_state = "ok"
    try:
        async with asyncio.timeout(READY_TIMEOUT_S), ledger_errors():
            await ctx.pool.fetchval(queries()["health_ping"])
    except (LedgerUnavailableError, TimeoutError):
        ledger_state = "unavailable"
    if ctx.nc is None:
        nats_state = "disabled"
    else:
        nats_state = "ok" if ctx.nc.is_connected else "disconnected"
    ready = ledger_state == "ok" and nats_state != "disconnected"
    body = Readiness(ready=ready, ledger=ledger_state, nats=nats_state)
    if ready:
        return Response(body, status_code=200)
    return Response(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST)
async def prometheus_metrics(ctx: NamedDependency[AppContext]) -> bytes:
    return generate_latest(ctx.metrics.registry)


def _version() -> str:
    try:
        return importlib.metadata.version("workron")
    except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


def _build(ctx: AppContext | None) -> Litestar:
    def provide_ctx() -> AppContext:
        if ctx is None:
            raise RuntimeError("this app was built without connections (OpenAPI only)")
        return ctx

    # Their handlers use AppContext from here.
    from workron.admission import dag_routes, failure_routes

    return Litestar(
        route_handlers=[
            submit_job,
            list_jobs,
            get_job,
            cancel_job,
            job_events,
            *dag_routes.ROUTES,
            *failure_routes.ROUTES,
            healthz,
            readyz,
            prometheus_metrics,
        ],
        dependencies={"ctx": Provide(provide_ctx, sync_to_thread=False, use_cache=True)},
        exception_handlers=exception_handlers(ctx.metrics if ctx else Metrics()),
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="Workron",
            version=_version(),
            description="Distributed job scheduler: submit, list, inspect and cancel jobs.",
            # The document's router sits at /openapi.json itself: Litestar adds
            # a catch-all 404 page under that router's path, which at "/"
            # would answer every unknown route with HTML.
            path="/openapi.json",
            render_plugins=[JsonRenderPlugin(path="/")],
        ),
        # The process configures logging (JSON lines); Litestar must not.
        logging_config=None,
    )


def create_app(ctx: AppContext) -> Litestar:
    """The admission API over ``ctx``'s connections."""
    return _build(ctx)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document, built without any connection."""
    # Defaults in the document are Structs (``Backoff()``): make it plain JSON.
    document: dict[str, Any] = msgspec.to_builtins(_build(None).openapi_schema.to_schema())
    return document
