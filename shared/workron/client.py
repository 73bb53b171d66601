"""The client SDK: submit, inspect, wait for and cancel jobs.

``Client`` speaks HTTP to the admission service. ``Publisher`` submits over
JetStream from any service: the PubAck is the acknowledgement (the stream is
on disk), so a job published is a job that will run.

    async with Client("http://127.0.0.1:8080") as client:
        job = await client.submit(command=["echo", "hello"])
        done = await client.wait(job.id)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any
from uuid import UUID

import httpx
import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import bus, errors
from workron._ids import uuid7
from workron.api import ErrorBody, Job, JobEvent, JobPage
from workron.dag_api import Dag, DagProgress, DagSpec, DagSubmitted
from workron.events import JobSpec, JobState, Submission
from workron.recovery_api import DeadLetterPage, WorkerInfo
from workron.telemetry import new_traceparent

__all__ = ["APIError", "Client", "Publisher", "WaitTimeoutError"]

_STATUS_ERRORS: dict[int, type[errors.WorkronError]] = {
    404: errors.NotFoundError,
    409: errors.ConflictError,
    413: errors.PayloadTooLargeError,
    422: errors.ValidationError,
    503: errors.LedgerUnavailableError,
}
_json = msgspec.json.Encoder()


class APIError(errors.WorkronError):
    """The API answered with an error."""

    def __init__(self, status: int, code: str, message: str, field: str | None) -> None:
        super().__init__(message, field=field)
        self.status = status
        self.code = code


class WaitTimeoutError(errors.WorkronError, TimeoutError):
    """The job did not finish in time."""

    code = "timeout"


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = msgspec.json.decode(response.content, type=ErrorBody).error
        code, message, field = body.code, body.message, body.field
    except msgspec.DecodeError:
        code, message, field = "http_error", response.text or response.reason_phrase, None
    kind = _STATUS_ERRORS.get(response.status_code)
    if kind is not None:
        error = kind(message, field=field)
        error.code = code
        raise error
    raise APIError(response.status_code, code, message, field)


def _spec(spec: JobSpec | None, fields: dict[str, Any]) -> JobSpec:
    if spec is not None and fields:
        raise TypeError("pass a JobSpec or keyword fields, not both")
    return spec if spec is not None else msgspec.convert(fields, JobSpec)


class Client:
    """Async HTTP client for the admission API."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        *,
        timeout: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def _request(self, method: str, path: str, **kw: Any) -> bytes:
        response = await self._http.request(method, path, **kw)
        _raise_for(response)
        return response.content

    async def submit(self, spec: JobSpec | None = None, **fields: Any) -> Job:
        """Submit a job; ``fields`` are JobSpec fields (``command=…`` or ``task=…``)."""
        body = _json.encode(_spec(spec, fields))
        content = await self._request(
            "POST", "/v1/jobs", content=body, headers={"content-type": "application/json"}
        )
        return msgspec.json.decode(content, type=Job)

    async def get(self, job_id: UUID | str) -> Job:
        return msgspec.json.decode(await self._request("GET", f"/v1/jobs/{job_id}"), type=Job)

    async def list_jobs(
        self,
        *,
        state: JobState | str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        params = {"state": state, "queue": queue, "task": task, "limit": limit, "cursor": cursor}
        content = await self._request(
            "GET", "/v1/jobs", params={k: str(v) for k, v in params.items() if v is not None}
        )
        return msgspec.json.decode(content, type=JobPage)

    async def iter_jobs(self, **filters: Any) -> AsyncIterator[Job]:
        """Every job matching ``filters``, newest first, following the cursor."""
        cursor = None
        while True:
            page = await self.list_jobs(cursor=cursor, **filters)
            for job in page.items:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def events(self, job_id: UUID | str) -> list[JobEvent]:
        content = await self._request("GET", f"/v1/jobs/{job_id}/events")
        return msgspec.json.decode(content, type=list[JobEvent])

    async def cancel(self, job_id: UUID | str) -> Job:
        return msgspec.json.decode(
            await self._request("POST", f"/v1/jobs/{job_id}/cancel"), type=Job
        )

    async def retry(self, job_id: UUID | str) -> Job:
        """Run a failed or cancelled job again (next attempt, its budget anew)."""
        return msgspec.json.decode(
            await self._request("POST", f"/v1/jobs/{job_id}/retry"), type=Job
        )

    async def workers(self, *, state: str | None = None) -> list[WorkerInfo]:
        """Registered workers: queues, resources, last heartbeat, state, jobs."""
        params = {"state": state} if state else {}
        content = await self._request("GET", "/v1/workers", params=params)
        return msgspec.json.decode(content, type=list[WorkerInfo])

    async def dead_letters(
        self, *, source: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> DeadLetterPage:
        """Bus messages given up on, newest first."""
        params = {"source": source, "limit": limit, "cursor": cursor}
        content = await self._request(
            "GET",
            "/v1/dead-letters",
            params={k: str(v) for k, v in params.items() if v is not None},
        )
        return msgspec.json.decode(content, type=DeadLetterPage)

    async def wait(
        self, job_id: UUID | str, *, timeout: float | None = None, poll_s: float = 0.05
    ) -> Job:
        """Poll until the job is terminal; raise WaitTimeoutError after ``timeout`` seconds.

        Polling backs off from ``poll_s`` to one second, so a long job costs
        one request a second.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_s
        while True:
            job = await self.get(job_id)
            if job.state.terminal:
                return job
            if deadline is not None and time.monotonic() + delay > deadline:
                raise WaitTimeoutError(f"job {job_id} is still {job.state} after {timeout}s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    async def submit_dag(
        self,
        spec: DagSpec | None = None,
        *,
        jobs: Sequence[Any] | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> DagSubmitted:
        """Submit a whole DAG atomically: a DagSpec, or its ``jobs`` (DagJobs or
        dicts with ``ref``, ``depends_on``…), ``name`` and ``idempotency_key``."""
        if spec is None:
            fields = {"jobs": list(jobs or []), "name": name, "idempotency_key": idempotency_key}
            spec = msgspec.convert({k: v for k, v in fields.items() if v is not None}, DagSpec)
        elif jobs is not None:
            raise TypeError("pass a DagSpec or jobs, not both")
        content = await self._request(
            "POST",
            "/v1/dags",
            content=_json.encode(spec),
            headers={"content-type": "application/json"},
        )
        return msgspec.json.decode(content, type=DagSubmitted)

    async def get_dag(self, dag_id: UUID | str) -> Dag:
        return msgspec.json.decode(await self._request("GET", f"/v1/dags/{dag_id}"), type=Dag)

    async def dag_progress(self, dag_id: UUID | str) -> DagProgress:
        """The DAG's counts by state and timings, without its jobs and edges:
        cheap to poll however large the DAG."""
        content = await self._request("GET", f"/v1/dags/{dag_id}/progress")
        return msgspec.json.decode(content, type=DagProgress)

    async def cancel_dag(self, dag_id: UUID | str) -> Dag:
        """Cancel every unfinished job of the DAG."""
        content = await self._request("POST", f"/v1/dags/{dag_id}/cancel")
        return msgspec.json.decode(content, type=Dag)

    async def wait_dag(
        self, dag_id: UUID | str, *, timeout: float | None = None, poll_s: float = 0.1
    ) -> Dag:
        """Poll until every job of the DAG is terminal; WaitTimeoutError after ``timeout`` s.

        Polls the DAG's progress; the whole DAG is fetched once, at the end.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_s
        while True:
            progress = await self.dag_progress(dag_id)
            if progress.state != "running":
                return await self.get_dag(dag_id)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise WaitTimeoutError(f"DAG {dag_id} is still running after {timeout}s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)


class Publisher:
    """Submit jobs over JetStream (``workron.submit.<queue>``).

    The sender chooses the job id, so it is known before the PubAck, and a
    retried publish is dropped by the stream's duplicate window.
    """

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    @classmethod
    async def connect(cls, nats_url: str) -> tuple[Publisher, NATS]:
        nc = await bus.connect(nats_url, name="workron-publisher")
        return cls(nc.jetstream()), nc

    def _message(self, spec: JobSpec, job_id: UUID | None) -> tuple[Submission, dict[str, str]]:
        submission = Submission(id=job_id or uuid7(), job=spec, traceparent=new_traceparent())
        headers = {"Nats-Msg-Id": f"sub:{submission.id}"}
        if submission.traceparent:
            headers["traceparent"] = submission.traceparent
        return submission, headers

    async def publish(
        self, spec: JobSpec | None = None, *, job_id: UUID | None = None, **fields: Any
    ) -> UUID:
        """Publish one job and wait for its PubAck; returns the job id."""
        submission, headers = self._message(_spec(spec, fields), job_id)
        await self._js.publish(
            bus.submit_subject(submission.job.queue), _json.encode(submission), headers=headers
        )
        return submission.id

    async def publish_many(self, specs: Sequence[JobSpec], *, timeout: float = 30.0) -> list[UUID]:
        """Publish many jobs pipelined (no round trip each); returns their ids in order."""
        futures = []
        ids = []
        for spec in specs:
            submission, headers = self._message(spec, None)
            futures.append(
                await self._js.publish_async(
                    bus.submit_subject(spec.queue), _json.encode(submission), headers=headers
                )
            )
            ids.append(submission.id)
        await asyncio.wait_for(asyncio.gather(*futures), timeout)
        return ids
