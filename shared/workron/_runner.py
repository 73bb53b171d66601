"""Pulling work for a worker: one pull loop per queue, all within the
worker's concurrency.

A worker never holds a message it has no free slot for: a message's lease
(AckWait) starts ticking at delivery, so a pre-fetched message waiting in
the client would lose time and could expire before it even starts. Each
pull request therefore asks for at most the slots that are free, and every
message that arrives starts at once.

The requests speak JetStream's pull API directly over core NATS, because
nats-py's ``fetch(batch > 1, timeout)`` keeps the first message until the
batch fills or the timeout ends. One request with ``no_wait`` and
``expires`` does what a worker wants: the server holds it until the first
message arrives (or it expires, 408), delivers that message and whatever
else is waiting up to the batch, and ends it with a 404 status — or
silently, when the batch is filled exactly. Each request has its own reply
subject, so the status that ends an old request (one given up on after a
disconnect) is never taken for the end of the current one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

__all__ = ["Slots", "WorkPuller"]

log = logging.getLogger(__name__)

# Local wait beyond a request's server-side expiry: normally the server's 408
# ends it first; past this margin the request is assumed lost (a disconnect).
_MARGIN_S = 1.0
# Pause after the server refused a pull request (consumer missing or moving),
# so a worker does not spin on it.
_REFUSED_PAUSE_S = 1.0
# Bound on unsubscribing at close: a dead connection must not hold shutdown.
_CLOSE_S = 2.0


class Slots:
    """A worker's concurrency, shared by the pull loops of its queues.

    ``running + reserved <= limit`` always holds: ``reserved`` counts the
    credits of pull requests still open at the server, each of which may
    turn into a running job at any moment.
    """

    def __init__(self, limit: int, queues: int) -> None:
        self.limit = limit
        self.running = 0
        self.reserved = 0
        self._queues = queues
        self._open = 0  # pull requests open now
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.limit - self.running - self.reserved

    async def reserve(self) -> int:
        """Wait for a free slot, then reserve a batch for one pull request.

        Slots are shared out among the queues without an open request, so a
        quiet queue's lingering request cannot hold every slot while another
        queue has a backlog. With one queue that is simply every free slot.
        """
        while self.free < 1:
            self._changed.clear()
            await self._changed.wait()
        waiting_queues = max(1, self._queues - self._open)
        batch = -(-self.free // waiting_queues)  # ceiling division
        self.reserved += batch
        self._open += 1
        return batch

    def release(self, unused: int) -> None:
        """A pull request ended with ``unused`` credits left."""
        self.reserved -= unused
        self._open -= 1
        self._changed.set()

    def take_reserved(self) -> None:
        """A message arrived on a request's credit."""
        self.reserved -= 1
        self.running += 1

    def take_spare(self) -> bool:
        """A message arrived with no credit for it (late, for a request given up on)."""
        if self.free < 1:
            return False
        self.running += 1
        return True

    def finish(self) -> None:
        """A job ended; its slot is free."""
        self.running -= 1
        self._changed.set()


@dataclass(slots=True)
class _Request:
    reply: str
    credits: int
    delivered: int = 0
    status: str | None = None
    description: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class WorkPuller:
    """The pull loop of one queue over its shared durable consumer.

    ``start(msg)`` is called for every message delivered within the slots
    reserved for it; it must start the job without blocking.
    """

    def __init__(
        self,
        nc: NATS,
        queue: str,
        consumer: str,
        *,
        slots: Slots,
        start: Callable[[Msg], None],
        ensure_consumer: Callable[[], Awaitable[object]],
        expires_s: float,
        stream: str = "WORK",
        api_prefix: str = "$JS.API",
    ) -> None:
        self.queue = queue
        self._nc = nc
        self._slots = slots
        self._start = start
        self._ensure_consumer = ensure_consumer
        self._expires_s = expires_s
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._request: _Request | None = None
        self._seq = 0
        self._closing = False
        self._late: list[Msg] = []  # arrived after stop_taking(), to hand back

    async def open(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    def stop_taking(self) -> None:
        """From now on, no message that arrives is run; ``close()`` hands them back."""
        self._closing = True

    async def close(self) -> None:
        """Stop taking work, unsubscribe, then hand back what arrived meanwhile."""
        self._closing = True
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                # drain = unsubscribe, then a round trip: what the server sent
                # before it saw the unsubscribe still reaches ``_on_msg``
                # instead of being dropped (and waiting out AckWait).
                async with asyncio.timeout(_CLOSE_S):
                    await sub.drain()  # type: ignore[no-untyped-call]
            except (NatsError, TimeoutError):
                log.warning(
                    "pull subscription not drained",
                    extra={"action": "worker.pull.close", "queue": self.queue},
                    exc_info=True,
                )
        # Nak only now: a message handed back while one of our pull requests
        # was still open at the server could be sent straight back to it.
        late, self._late = self._late, []
        for msg in late:
            await self._hand_back(msg)

    async def run(self, *, burst: bool = False) -> None:
        """Pull until cancelled; with ``burst``, until a request finds nothing waiting."""
        loop = asyncio.get_running_loop()
        # In burst mode a request lingers only briefly: "nothing waiting" is
        # what ends the loop.
        expires = min(self._expires_s, 0.1) if burst else self._expires_s
        while not self._closing:
            batch = await self._slots.reserve()
            if self._closing:
                self._slots.release(batch)
                return
            self._seq += 1
            request = _Request(reply=f"{self._inbox}.{self._seq}", credits=batch)
            self._request = request
            try:
                body = {"batch": batch, "no_wait": True, "expires": int(expires * 1e9)}
                await self._nc.publish(
                    self._next_subject, json.dumps(body).encode(), reply=request.reply
                )
                async with asyncio.timeout_at(loop.time() + expires + _MARGIN_S):
                    await request.done.wait()
            except TimeoutError:
                log.info(
                    "pull request lost",
                    extra={"action": "worker.pull.lost", "queue": self.queue},
                )
            finally:
                self._request = None
                self._slots.release(request.credits)
            if request.status not in (None, "404", "408"):
                await self._refused(request)
            elif burst and request.delivered == 0 and request.status is not None:
                return

    async def _refused(self, request: _Request) -> None:
        # 409: consumer deleted, leadership change, request limits;
        # 503: no such consumer or JetStream unavailable. Recreate the
        # consumer if it went away, without spinning.
        log.warning(
            "pull request refused",
            extra={
                "action": "worker.pull.refused",
                "queue": self.queue,
                "status": request.status,
                "error": request.description,
            },
        )
        await asyncio.sleep(_REFUSED_PAUSE_S)
        try:
            await self._ensure_consumer()
        except NatsError:
            log.warning(
                "work consumer not available",
                extra={"action": "worker.pull.consumer", "queue": self.queue},
                exc_info=True,
            )

    async def _on_msg(self, msg: Msg) -> None:
        if msg.subject.startswith(f"{self._inbox}."):
            self._on_status(msg)
            return
        request = self._request
        if self._closing:
            self._late.append(msg)
        elif request is not None and request.credits > 0:
            request.credits -= 1
            request.delivered += 1
            self._slots.take_reserved()
            if request.credits == 0:
                request.done.set()  # filled exactly: the server sends no status
            self._start(msg)
        elif self._slots.take_spare():
            self._start(msg)
        else:
            await self._hand_back(msg)

    def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        request = self._request
        # 100 is an idle heartbeat; a status for another reply subject ends
        # a request given up on already.
        if status == "100" or request is None or msg.subject != request.reply:
            return
        request.status = status
        request.description = str(headers.get("Description", "")).strip()
        request.done.set()

    async def _hand_back(self, msg: Msg) -> None:
        """Nak a message this worker will not run, so another gets it at once."""
        try:
            await msg.nak()
        except NatsError:
            # The connection is gone: the message comes back after AckWait.
            log.debug("nak failed", extra={"action": "worker.pull.nak"}, exc_info=True)
