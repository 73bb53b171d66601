"""HTTP API types of failure handling: the worker registry and dead letters.

Shared by the admission service and the client SDK, like ``workron.api``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

import msgspec

from workron.events import Resources

__all__ = ["DeadLetter", "DeadLetterPage", "WorkerExecution", "WorkerInfo"]


class WorkerExecution(msgspec.Struct, kw_only=True):
    """A job a worker named in its last heartbeat, with its fencing token."""

    job_id: UUID
    attempt: int
    delivery: int


class WorkerInfo(msgspec.Struct, kw_only=True):
    id: str
    #: ``alive``; ``draining`` (stopping, finishing its jobs); ``dead`` (missed
    #: three heartbeats: its jobs were taken back); ``stopped`` (left cleanly).
    state: Literal["alive", "draining", "dead", "stopped"]
    queues: list[str]
    resources: Resources
    tags: dict[str, str] = {}
    #: The name other machines reach it by.
    hostname: str = ""
    version: str = ""
    heartbeat_s: float
    #: Executions in its last heartbeat.
    running: int
    jobs: list[WorkerExecution] = []
    #: When the worker process started (its own clock).
    started_at: datetime | None = None
    registered_at: datetime
    #: Its last heartbeat, by the database clock.
    last_seen: datetime
    #: Seconds since ``last_seen``, by the same clock.
    seen_s_ago: float
    #: When it died or stopped.
    left_at: datetime | None = None


class DeadLetter(msgspec.Struct, kw_only=True):
    """A bus message given up on (terminated, or past its MaxDeliver), and why."""

    id: int
    #: Who gave up: ``reports``, ``admission``, ``outbox``, or ``<stream>/<consumer>``.
    source: str
    subject: str | None = None
    msg_id: str | None = None
    reason: str
    #: The message as it was (base64 in JSON), when it could still be read.
    body: bytes | None = None
    at: datetime


class DeadLetterPage(msgspec.Struct, kw_only=True):
    items: list[DeadLetter]
    #: Pass as ``cursor`` for the next (older) page; null on the last page.
    next_cursor: str | None = None
