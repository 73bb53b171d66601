"""Control messages for one worker: cancels, from the CONTROL stream.

One ordered consumer (ephemeral, flow-controlled, deleted by the server when
the worker goes) reads the worker's own subject and the broadcast subject
from the start of the stream, whose messages live ten minutes: a worker that
starts late still learns of a job cancelled while its message waited in a
queue. Cancels are remembered for as long, so a work message fetched after
its cancel is skipped instead of run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from uuid import UUID

import msgspec
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from workron import bus
from workron.liveness import CancelJob, Control

__all__ = ["ControlListener"]

log = logging.getLogger(__name__)

_decode = msgspec.json.Decoder(Control)


class ControlListener:
    """Cancels addressed to ``worker_id`` or to every worker.

    ``on_cancel`` runs for each one (the worker stops matching executions);
    ``cancelled()`` answers for work that arrives later.
    """

    def __init__(
        self,
        js: JetStreamContext,
        worker_id: str,
        on_cancel: Callable[[CancelJob], None],
        *,
        keep_s: float = 600.0,
        max_entries: int = 100_000,
    ) -> None:
        self._js = js
        self._subjects = [bus.control_subject(worker_id), bus.CONTROL_BROADCAST]
        self._on_cancel = on_cancel
        self._keep_s = keep_s
        self._max_entries = max_entries
        #: job id → (highest attempt cancelled, when heard), oldest first.
        self._cancelled: OrderedDict[UUID, tuple[int, float]] = OrderedDict()
        self._sub: JetStreamContext.PushSubscription | None = None
        self._seen_seq = 0  # stream sequence of the last message handled

    async def open(self, catch_up_s: float = 2.0) -> None:
        """Subscribe, and read what the stream holds already before returning,
        so the worker knows recent cancels before it fetches any work.

        A failure is logged, not raised: heartbeat replies carry cancels
        too, so the worker runs on without this shortcut."""
        config = ConsumerConfig(filter_subjects=self._subjects, deliver_policy=DeliverPolicy.ALL)
        try:
            self._sub = await self._js.subscribe(
                bus.CONTROL_BROADCAST,
                stream="CONTROL",
                ordered_consumer=True,
                config=config,
                cb=self._on_msg,
            )
            await self._catch_up(self._sub, catch_up_s)
        except (NatsError, TimeoutError) as exc:
            log.warning(
                "control messages unavailable",
                extra={"action": "worker.control.subscribe", "error": repr(exc)},
            )

    async def _catch_up(self, sub: JetStreamContext.PushSubscription, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await sub.consumer_info()
            delivered = info.delivered.stream_seq if info.delivered else 0
            if not info.num_pending and self._seen_seq >= (delivered or 0):
                return
            if loop.time() >= deadline:
                raise TimeoutError("control messages not read in time")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            await sub.unsubscribe()
        except (NatsError, TimeoutError):
            log.debug("control unsubscribe failed", extra={"action": "worker.control"})

    def cancelled(self, job_id: UUID, attempt: int) -> bool:
        """True when attempt ``attempt`` of the job (or a later one) was cancelled."""
        entry = self._cancelled.get(job_id)
        return entry is not None and attempt <= entry[0]

    def remember(self, cancel: CancelJob) -> None:
        now = time.monotonic()
        entry = self._cancelled.pop(cancel.job_id, None)
        attempt = max(cancel.attempt, entry[0]) if entry else cancel.attempt
        self._cancelled[cancel.job_id] = (attempt, now)
        # Oldest first: drop what is past keeping, and the excess.
        while self._cancelled:
            _, (_, heard) = next(iter(self._cancelled.items()))
            if now - heard <= self._keep_s and len(self._cancelled) <= self._max_entries:
                break
            self._cancelled.popitem(last=False)

    async def _on_msg(self, msg: Msg) -> None:
        self._seen_seq = max(self._seen_seq, msg.metadata.sequence.stream)
        try:
            cancel = _decode.decode(msg.data)
        except msgspec.DecodeError as exc:
            # From a newer sender, or not ours at all: nothing to act on.
            log.warning(
                "control message ignored",
                extra={"action": "worker.control.invalid", "error": str(exc)},
            )
            return
        self.remember(cancel)
        self._on_cancel(cancel)
