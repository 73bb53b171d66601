"""JetStream contracts: every stream and consumer, declared once as data.

``apply()`` creates or updates them idempotently; it runs at service start-up,
after every reconnect (a nats-server may come back with its store lost) and
from ``workron migrate``. A test reads the live configuration back from
nats-server and compares it with these declarations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from workron._redeclare import Redeclare, Redeclarer

__all__ = [
    "CONSUMERS",
    "CONTROL_BROADCAST",
    "HEARTBEAT_MISSES",
    "HEARTBEAT_S",
    "STREAMS",
    "Redeclare",
    "apply",
    "connect",
    "control_subject",
    "heartbeat_subject",
    "live_report_subject",
    "submit_subject",
    "work_consumer",
    "work_subject",
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DAY = 86400.0

# Broker-side dedupe of Nats-Msg-Id. Two minutes covers the relay's retry of a
# batch whose PubAcks were lost and a client's retry of a timed-out publish;
# beyond it the ledger's inbox and guarded updates make replays harmless.
DUPLICATE_WINDOW = 120.0

#: Lease of one execution on a work message; a worker renews it with
#: in_progress (+WPI) every LEASE_S / 3 while the job runs.
LEASE_S = 30.0


def submit_subject(queue: str) -> str:
    return f"workron.submit.{queue}"


def work_subject(queue: str) -> str:
    return f"workron.work.{queue}"


#: Worker liveness, as data like the stream contracts below.
#:
#: Heartbeats travel over core NATS, not a stream: each one is worthless once
#: the next is sent, so storing them would cost an fsync for nothing. They are
#: requests, not plain publishes: the reply proves the reaper heard the worker
#: (a worker that hears nothing for longer than it takes to be declared dead
#: stops its executions first), and it names the executions the ledger no
#: longer wants run. Only the leading reaper subscribes, in a queue group so
#: a leader handover never splits one heartbeat in two; with no reaper
#: running the worker gets "no responders" and carries on: nobody can judge
#: it dead then, and a new leader listens for a full dead-after period before
#: it judges anyone.
HEARTBEAT_S = 2.0
#: Heartbeats a worker may miss in a row; the next miss makes it dead.
HEARTBEAT_MISSES = 3
#: What the reapers subscribe to, and their queue group.
HEARTBEAT_SUBJECTS = "workron.hb.*"
REAPER_QUEUE_GROUP = "workron-reaper"
#: Control messages for every worker: cancels of jobs no worker has started
#: yet (dispatched), so whichever worker later fetches the message skips it.
#: Each worker reads its own subject and this one through one ordered
#: (ephemeral, server-cleaned) consumer on CONTROL, from the stream's start:
#: a worker that starts late still learns of recent cancels, and a durable
#: per worker would outlive the worker for nothing.
CONTROL_BROADCAST = "workron.control._all"
#: JetStream advisories the reaper records as dead letters.
ADVISORY_MAX_DELIVERIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"
ADVISORY_TERMINATED = "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.>"
#: (stream, consumer) pairs that record a dead letter themselves before they
#: terminate a message; their termination advisories are not recorded twice.
SELF_RECORDING = frozenset({("SUBMIT", "admission"), ("REPORTS", "dispatcher")})

_TOKEN_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def subject_token(name: str) -> str:
    """``name`` as one subject token (worker ids may hold dots, e.g. hostnames).

    Two ids may map to one token: messages on it name their job and token,
    so a worker ignores what is not its own.
    """
    return "".join(c if c in _TOKEN_SAFE else "_" for c in name) or "_"


def heartbeat_subject(worker_id: str) -> str:
    return f"workron.hb.{subject_token(worker_id)}"


def control_subject(worker_id: str) -> str:
    return f"workron.control.{subject_token(worker_id)}"


def report_subject(queue: str) -> str:
    return f"workron.report.{queue}"


#: A quiet worker's reports also go out over core NATS, on this subject's
#: twin of their REPORTS subject, to the dispatchers (a queue group). A
#: dispatcher applies such a copy at once, without waiting for the stream to
#: store (and fsync) the original; the original, which the worker waits for
#: before it acks its work, stays the durable record: the inbox, keyed by
#: report id, applies whichever comes first and recognises the other. A copy
#: lost on the way costs nothing but time.
LIVE_REPORTS = "workron.live.report.*"
DISPATCHER_QUEUE_GROUP = "workron-dispatcher"


def live_report_subject(queue: str) -> str:
    return f"workron.live.report.{queue}"


def _stream(name: str, subjects: list[str], **kw: object) -> StreamConfig:
    # File storage everywhere: an acknowledged message must survive a restart.
    # One replica on one machine; a cluster deploy sets 3 (see deploy/).
    base: dict[str, object] = {
        "storage": StorageType.FILE,
        "num_replicas": 1,
        "duplicate_window": DUPLICATE_WINDOW,
        "discard": DiscardPolicy.OLD,
    }
    base.update(kw)
    return StreamConfig(name=name, subjects=subjects, **base)  # type: ignore[arg-type]


STREAMS: tuple[StreamConfig, ...] = (
    # Submissions from any service; removed once admission has written them
    # to the ledger (work-queue). Refuse new messages rather than drop
    # acknowledged ones when full.
    _stream(
        "SUBMIT",
        ["workron.submit.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        max_msg_size=1 * MiB,
        max_bytes=4096 * MiB,
        discard=DiscardPolicy.NEW,
    ),
    # Ledger transitions for services and any subscriber: an event log kept a
    # week, bounded in size.
    _stream(
        "EVENTS",
        ["workron.evt.>"],
        retention=RetentionPolicy.LIMITS,
        max_msg_size=1 * MiB,
        max_age=7 * DAY,
        max_bytes=2048 * MiB,
    ),
    # Ready jobs. One durable pull consumer per queue, shared by its workers;
    # a message leaves once a worker acks it after its report is stored. The
    # ledger can always rebuild it, so a size bound with DiscardNew is safe.
    _stream(
        "WORK",
        ["workron.work.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        max_msg_size=1 * MiB,
        max_bytes=4096 * MiB,
        discard=DiscardPolicy.NEW,
    ),
    # Placements for one worker (gang tasks, resource-matched jobs).
    _stream(
        "ASSIGN",
        ["workron.assign.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        max_msg_size=1 * MiB,
        max_age=1 * DAY,
        max_bytes=1024 * MiB,
    ),
    # Worker → dispatcher reports; removed once applied to the ledger.
    _stream(
        "REPORTS",
        ["workron.report.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        max_msg_size=1 * MiB,
        max_bytes=4096 * MiB,
        discard=DiscardPolicy.NEW,
    ),
    # Drain and cancel for one worker: worthless after a few minutes, when
    # the ledger and reaper have moved on.
    _stream(
        "CONTROL",
        ["workron.control.>"],
        retention=RetentionPolicy.LIMITS,
        max_msg_size=64 * 1024,
        max_age=600.0,
        max_bytes=64 * MiB,
    ),
)


def _durable(name: str, subject: str, **kw: object) -> ConsumerConfig:
    base: dict[str, object] = {
        "durable_name": name,
        "filter_subject": subject,
        "ack_policy": AckPolicy.EXPLICIT,
        "deliver_policy": DeliverPolicy.ALL,
    }
    base.update(kw)
    return ConsumerConfig(**base)  # type: ignore[arg-type]


# No BackOff lists: the server then takes AckWait from BackOff[0], so a slow
# batch would be redelivered while still being written. Consumers that fail
# a message nak it with an explicit delay instead.

#: (stream, consumer) pairs applied at start-up. Work consumers are per queue,
#: made by ``work_consumer`` when a worker or the dispatcher first sees it.
CONSUMERS: tuple[tuple[str, ConsumerConfig], ...] = (
    (
        "SUBMIT",
        # Admission writes a batch in one transaction; 30 s covers a slow
        # commit. Five deliveries, then the max-delivery advisory records it
        # as a dead letter: a message that fails five times is poison.
        _durable(
            "admission",
            "workron.submit.>",
            ack_wait=30.0,
            max_deliver=5,
            max_ack_pending=20000,
        ),
    ),
    (
        "REPORTS",
        # Reports carry outcomes: retried more patiently than submissions,
        # but never forever. Batches of thousands are applied in one commit.
        _durable(
            "dispatcher",
            "workron.report.>",
            ack_wait=30.0,
            max_deliver=10,
            max_ack_pending=20000,
        ),
    ),
    (
        "EVENTS",
        # The resolver applies job.finished events in batches, one commit
        # each; 30 s covers a slow batch (a cascade over a large DAG). Twenty
        # deliveries ride out a ledger outage of minutes with the nak delay;
        # past them the resolver's sweep of finished jobs with open edges
        # (the ledger is the truth) applies what the bus gave up on. From
        # the stream's start: a resolver created late still sees every event,
        # and the ledger's resolved edges make the replay a no-op.
        _durable(
            "resolver",
            "workron.evt.job.finished",
            ack_wait=30.0,
            max_deliver=20,
            max_ack_pending=20000,
        ),
    ),
)


def work_consumer(queue: str, *, max_ack_pending: int = 10000) -> ConsumerConfig:
    """The shared durable consumer of one queue's work messages.

    AckWait is the lease: a worker that stops renewing it (``in_progress``)
    loses the job to redelivery, and its late reports are fenced by the
    ledger. MaxAckPending is the queue's concurrency cap. MaxDeliver is
    unlimited: attempts are counted and capped by the ledger, not the bus.
    """
    return _durable(
        f"work-{queue}",
        work_subject(queue),
        ack_wait=LEASE_S,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
    )


async def connect(
    url: str, *, name: str, on_reconnect: Redeclare | None = None, **kw: object
) -> NATS:
    """Connect with unlimited reconnects: services outlive nats-server restarts.

    ``on_reconnect(js)`` runs after every reconnect, in a task retried until
    it succeeds or the connection closes: services pass ``apply``, so
    streams lost with the server's store come back without a restart.
    """
    nc = NATS()
    options: dict[str, Any] = {
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        **kw,
    }
    if on_reconnect is not None:
        redeclarer = Redeclarer(nc, on_reconnect, name)
        options |= redeclarer.callbacks(kw.get("reconnected_cb"), kw.get("closed_cb"))
    await nc.connect(url, **options)
    return nc


def _differs(live: object, wanted: object) -> bool:
    """True when a field set in ``wanted`` has another value in ``live``."""
    for field, value in vars(wanted).items():
        if value is None or field in {"name", "durable_name"}:
            continue
        if getattr(live, field, None) != value:
            return True
    return False


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        info = await js.stream_info(config.name or "")
    except NotFoundError:
        await js.add_stream(config)
        log.info("stream created", extra={"action": "bus.stream.create", "stream": config.name})
        return
    if _differs(info.config, config):
        await js.update_stream(config)
        log.info("stream updated", extra={"action": "bus.stream.update", "stream": config.name})


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    try:
        info = await js.consumer_info(stream, config.durable_name or "")
    except NotFoundError:
        await js.add_consumer(stream, config)
        return
    if _differs(info.config, config):
        # add_consumer with the same durable name updates it in place.
        await js.add_consumer(stream, config)


async def apply(js: JetStreamContext, queues: Iterable[str] = ()) -> None:
    """Create or update every declared stream and consumer (idempotent)."""
    for stream in STREAMS:
        await ensure_stream(js, stream)
    for stream_name, consumer in CONSUMERS:
        await ensure_consumer(js, stream_name, consumer)
    for queue in queues:
        await ensure_consumer(js, "WORK", work_consumer(queue))
