"""Failure-handling routes: retry a failed job, the worker registry, dead letters.

Wired into the app by ``app._build``; the ledger work is in ``workron.recovery``.
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from litestar import get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter

from workron import recovery
from workron.admission.app import AppContext, _errors
from workron.api import Job
from workron.recovery_api import DeadLetterPage, WorkerInfo

__all__ = ["ROUTES"]


@post(
    "/v1/jobs/{job_id:uuid}/retry",
    status_code=200,
    summary="Run a failed or cancelled job again",
    description=(
        "The job gets the next attempt number and the attempts budget it was submitted "
        "with (`max_attempts` grows by that many), and is dispatched at once (`blocked` "
        "while a parent of it runs again). Its history keeps every earlier attempt and "
        "error. In a DAG, the descendants the cascade cancelled because of it are "
        "reopened (`blocked` again) in the same transaction. 409 for a job that has not "
        "finished, that succeeded, or that an upstream failure keeps from running "
        "(the message names the upstream job to retry instead)."
    ),
    responses=_errors(404, 409, 503),
)
async def retry_job(ctx: NamedDependency[AppContext], job_id: FromPath[UUID]) -> Job:
    return await recovery.retry(ctx.pool, job_id)


@get(
    "/v1/workers",
    summary="Registered workers",
    description=(
        "Every worker that heartbeated in the last day: queues, resources, last "
        "heartbeat (database clock), state and the jobs it runs."
    ),
    responses=_errors(422, 503),
)
async def list_workers(
    ctx: NamedDependency[AppContext],
    worker_state: Annotated[
        Literal["alive", "draining", "dead", "stopped"] | None, QueryParameter(name="state")
    ] = None,
) -> list[WorkerInfo]:
    return await recovery.workers(ctx.pool, state=worker_state)


@get(
    "/v1/dead-letters",
    summary="Bus messages given up on, newest first",
    description=(
        "Messages terminated as poison or past their MaxDeliver, with the reason and, "
        "when it could still be read, the message itself (base64)."
    ),
    responses=_errors(422, 503),
)
async def list_dead_letters(
    ctx: NamedDependency[AppContext],
    source: Annotated[str | None, QueryParameter(description="who gave up on it")] = None,
    cursor: Annotated[
        int | None, QueryParameter(description="`next_cursor` of the previous page")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
) -> DeadLetterPage:
    return await recovery.dead_letters(ctx.pool, source=source, cursor=cursor, limit=limit)


ROUTES = [retry_job, list_workers, list_dead_letters]
