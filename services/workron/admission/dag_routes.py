"""The DAG routes: submit a whole DAG atomically, show one or its progress, cancel one.

Wired into the app by ``app._build``; the ledger work is in ``workron.dags``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Annotated, Any
from uuid import UUID

from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody

from workron import dags
from workron.admission.app import AppContext, _errors
from workron.dag_api import MAX_DAG_BODY_BYTES, Dag, DagProgress, DagSpec, DagSubmitted
from workron.telemetry import new_traceparent

__all__ = ["ROUTES"]

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


@post(
    "/v1/dags",
    status_code=201,
    summary="Submit a DAG of jobs atomically",
    description=(
        "Every job and dependency is written in one transaction, or nothing is. "
        "`depends_on` names refs of this DAG or ids of existing jobs. 201 with the "
        "job id of each ref; 200 with the earlier DAG when `idempotency_key` matched. "
        "Limits: 10,000 jobs, 100,000 dependencies, a 16 MiB body."
    ),
    request_max_body_size=MAX_DAG_BODY_BYTES,
    responses={
        200: ResponseSpec(DagSubmitted, description="An earlier DAG had this idempotency key."),
        **_errors(400, 413, 422, 503),
    },
)
async def submit_dag(
    ctx: NamedDependency[AppContext],
    data: JSONBody[DagSpec],
    traceparent: Annotated[
        str | None,
        HeaderParameter(name="traceparent", description="W3C trace context to continue"),
    ] = None,
) -> Response[DagSubmitted]:
    # One trace for the whole DAG: its jobs are one piece of work.
    trace = traceparent if traceparent and _TRACEPARENT.match(traceparent) else new_traceparent()
    submitted = await dags.submit(ctx.pool, ctx.js, data, traceparent=trace)
    if not submitted.created:
        return Response(submitted, status_code=200)
    for queue, count in Counter(job.queue for job in data.jobs).items():
        ctx.metrics.submitted.labels(queue).inc(count)
    return Response(submitted, status_code=201, headers={"Location": f"/v1/dags/{submitted.id}"})


@get(
    "/v1/dags/{dag_id:uuid}",
    summary="A DAG: its jobs, dependencies, counts by state and critical path",
    responses=_errors(404, 503),
)
async def get_dag(ctx: NamedDependency[AppContext], dag_id: FromPath[UUID]) -> Dag:
    return await dags.get(ctx.pool, dag_id)


@get(
    "/v1/dags/{dag_id:uuid}/progress",
    summary="A DAG's counts by state and timings, without its jobs and edges",
    description=(
        "What a follower polls: one aggregate over the DAG's jobs, small and cheap "
        "whatever the DAG's size. `GET /v1/dags/{id}` gives the jobs and edges."
    ),
    responses=_errors(404, 503),
)
async def get_dag_progress(ctx: NamedDependency[AppContext], dag_id: FromPath[UUID]) -> DagProgress:
    return await dags.progress(ctx.pool, dag_id)


@post(
    "/v1/dags/{dag_id:uuid}/cancel",
    status_code=200,
    summary="Cancel every unfinished job of a DAG",
    responses=_errors(404, 409, 503),
)
async def cancel_dag(ctx: NamedDependency[AppContext], dag_id: FromPath[UUID]) -> Dag:
    return await dags.cancel(ctx.pool, ctx.js, dag_id)


ROUTES: list[Any] = [submit_dag, get_dag, get_dag_progress, cancel_dag]
