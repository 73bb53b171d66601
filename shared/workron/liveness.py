"""Wire types of worker liveness and control.

``Heartbeat`` is a core-NATS request from a worker on
``workron.hb.<worker_id>`` (see ``bus.HEARTBEAT_S``); the leading reaper
answers with a ``HeartbeatReply``. ``CancelJob`` travels on the CONTROL
stream, to ``workron.control.<worker_id>`` or, for a job no worker has
started yet, to every worker (``bus.CONTROL_BROADCAST``). Same evolution
rules as ``workron.events``: new fields get defaults, nothing is retyped.
"""

from __future__ import annotations

from typing import Literal
from uuid import UUID

import msgspec
from msgspec import Struct

from workron import bus
from workron.events import Resources

__all__ = [
    "CancelJob",
    "Control",
    "ExecutionRef",
    "Heartbeat",
    "HeartbeatReply",
    "StopOrder",
    "StopReason",
    "WorkerState",
    "cancel_message",
]

WorkerState = Literal["alive", "draining", "stopped"]
#: Why the ledger wants an execution stopped:
#: ``cancelled`` — the job was cancelled: stop, report ``cancelled``, ack;
#: ``superseded`` — the ledger gave the job a new attempt or finished it:
#: stop without a report and ack the message, which can never count again;
#: ``fenced`` — another delivery of the same message took over: stop without
#: a report and leave the message alone (it is that delivery's now).
StopReason = Literal["cancelled", "superseded", "fenced"]


class ExecutionRef(Struct, frozen=True, kw_only=True):
    """One execution a worker holds: a job and its fencing token."""

    job_id: UUID
    attempt: int
    delivery: int
    #: Reply subject of the delivery (``$JS.ACK…``). Once the reaper gives
    #: the job a new attempt it acks the old delivery through it, so the
    #: superseded message is never run again.
    ack: str | None = None


class Heartbeat(Struct, frozen=True, kw_only=True, tag="heartbeat", tag_field="type"):
    """A worker's registration and proof of life, sent every ``interval_s``."""

    worker_id: str
    #: One per run of the worker: a restart under the same id shows.
    instance: str
    state: WorkerState = "alive"
    #: This worker's heartbeat period; it is dead after ``bus.HEARTBEAT_MISSES``.
    interval_s: float
    queues: list[str]
    resources: Resources = Resources()
    tags: dict[str, str] = {}
    #: The name other machines reach this worker by.
    hostname: str = ""
    version: str = ""
    #: When the worker started (epoch seconds, its own clock).
    started_at: float
    #: Every execution it runs now. Their ledger leases are renewed.
    executions: list[ExecutionRef] = []
    #: Executions a stopping worker gave back (nak) for another worker to run.
    handed_back: list[ExecutionRef] = []


class StopOrder(Struct, frozen=True, kw_only=True):
    job_id: UUID
    attempt: int
    delivery: int
    reason: StopReason


class HeartbeatReply(Struct, frozen=True, kw_only=True, tag="heartbeat.reply", tag_field="type"):
    """The reaper heard the heartbeat; ``stop`` names executions to end."""

    stop: list[StopOrder] = []
    #: Set when the heartbeat was heard but not recorded (the ledger is away).
    #: The reaper judges nobody dead while it cannot record heartbeats.
    error: str | None = None


class CancelJob(Struct, frozen=True, kw_only=True, tag="cancel", tag_field="type"):
    """Stop the executions of ``job_id`` at ``attempt`` (or skip it, if not started)."""

    job_id: UUID
    attempt: int
    reason: str = "cancelled by request"


#: Everything on the CONTROL stream (one member so far; tagged for more).
Control = CancelJob

_encode = msgspec.json.Encoder()


def cancel_message(
    job_id: UUID, attempt: int, *, worker_id: str | None, reason: str
) -> tuple[str, bytes, str]:
    """(subject, payload, Nats-Msg-Id) of the cancel for one execution.

    To the worker running it when the ledger knows one; otherwise to every
    worker, since whichever fetches the work message later must skip it.
    """
    subject = bus.CONTROL_BROADCAST if worker_id is None else bus.control_subject(worker_id)
    payload = _encode.encode(CancelJob(job_id=job_id, attempt=attempt, reason=reason))
    return subject, payload, f"cancel:{job_id}:{attempt}"
