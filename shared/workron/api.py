"""HTTP API types, shared by the admission service and the client SDK."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from workron.events import Backoff, JobState, Resources

__all__ = ["ErrorBody", "ErrorDetail", "Job", "JobEvent", "JobPage", "Submitted"]


class Job(msgspec.Struct, kw_only=True):
    id: UUID
    queue: str
    state: JobState
    priority: int
    task: str | None = None
    payload: Any = None
    command: list[str] | str | None = None
    shell: bool = False
    attempt: int
    max_attempts: int
    #: Fencing token of the current execution: ``<attempt>.<delivery>``.
    token: str
    backoff: Backoff = Backoff()
    timeout_s: float | None = None
    run_at: datetime
    idempotency_key: str | None = None
    resources: Resources = Resources()
    labels: dict[str, str] = {}
    result: Any = None
    error: str | None = None
    worker_id: str | None = None
    created_at: datetime
    dispatched_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobPage(msgspec.Struct, kw_only=True):
    items: list[Job]
    #: Pass as ``cursor`` to get the next page; null on the last page.
    next_cursor: str | None = None


class JobEvent(msgspec.Struct, kw_only=True):
    at: datetime
    kind: str
    attempt: int
    delivery: int = 0
    worker_id: str | None = None
    detail: str | None = None


class Submitted(msgspec.Struct, kw_only=True):
    id: UUID
    state: JobState
    #: False when an earlier submission with the same idempotency key (or id) won.
    created: bool


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: str
    message: str
    field: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail
