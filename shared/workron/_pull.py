"""Batches from a durable JetStream pull consumer without waiting for them to fill.

nats-py's ``fetch(batch > 1, timeout)`` sends a lingering pull request that
the server holds until the batch is full or the request expires, so on a
quiet stream the first message waits out the whole timeout. JetStream's
pull API can do better in one request: ``no_wait`` together with
``expires`` waits for the first message, then delivers what is waiting
and ends with a 404 status instead of holding on. This module speaks that
API directly over core NATS.

Each pull request gets its own reply subject. Status messages come on it,
so one that ends an old request (one this side stopped waiting for) is
never mistaken for the end of the current one. Stream messages keep their
own subject; those that arrive late for an old request are real deliveries
and are handed out with the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from types import TracebackType

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

__all__ = ["Puller"]

log = logging.getLogger(__name__)

# Extra local wait beyond the server-side expiry, so the server's own
# "request timeout" status normally ends a request before we give up on it.
_MARGIN_S = 1.0


def _status(msg: Msg) -> str | None:
    return msg.headers.get("Status") if msg.headers else None


class Puller:
    """Pull batches from the durable consumer ``consumer`` of ``stream`` (bound, never created).

    At most one pull request is open at a time. ``ask`` opens one ahead of
    the next ``fetch``, so messages that arrive while the caller works on a
    batch are already here when it asks for the next one.

    Use as an async context manager; messages still queued locally at exit
    are nak'ed so another consumer instance gets them at once.
    """

    def __init__(
        self, nc: NATS, stream: str, consumer: str, *, api_prefix: str = "$JS.API"
    ) -> None:
        self._nc = nc
        self._subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._queue: deque[Msg] = deque()
        self._changed = asyncio.Event()
        self._sub: Subscription | None = None
        self._prefix = ""
        self._seq = 0
        #: Reply subject of the open request, and when to give up on it.
        self._open: str | None = None
        self._deadline = 0.0
        #: The status and description a refused request ended with.
        self._refused: tuple[str, str] | None = None

    async def __aenter__(self) -> Puller:
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._deliver)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except NatsError:
                log.debug("unsubscribe failed", extra={"action": "bus.pull"}, exc_info=True)
        for msg in self._take():
            if not msg.reply:
                continue  # handed in from core NATS (``put``): nothing to give back
            try:
                await msg.nak()
            except NatsError:
                break  # the connection is gone; AckWait brings them back

    async def _deliver(self, msg: Msg) -> None:
        status = _status(msg)
        if status is None:
            # Stream messages keep their own subject, so a late one for an
            # old request is handed out too, with the next batch. A request
            # that delivers is as good as over: the server sends what is
            # waiting and ends it, so the next ``ask`` need not wait for
            # its status.
            self._queue.append(msg)
            self._open = None
        elif msg.subject == self._open and status != "100":
            # 404 no messages / 408 expired: the request is over. 409
            # (consumer deleted, leadership change, limits) and 503 (no such
            # consumer) are worth a log line. Statuses of older requests,
            # given up on, end nothing.
            self._open = None
            if status not in ("404", "408"):
                description = msg.headers.get("Description", "") if msg.headers else ""
                self._refused = (status, description.strip())
        else:
            return
        self._changed.set()

    def put(self, msg: Msg) -> None:
        """Hand in a message from elsewhere, for the next batch (``fetch``
        returns it with the stream's)."""
        self._queue.append(msg)
        self._changed.set()

    def _take(self) -> list[Msg]:
        msgs = list(self._queue)
        self._queue.clear()
        return msgs

    async def ask(self, batch: int, wait: float) -> None:
        """Open a request for up to ``batch`` messages, unless one is open: the
        server holds it at most ``wait`` s for the first message (with
        ``wait=0`` it delivers only what is waiting), then delivers what is
        waiting and ends it."""
        if self._sub is None:
            raise RuntimeError("Puller used outside its context")
        if self._open is not None:
            return
        self._seq += 1
        reply = f"{self._prefix}.{self._seq}"
        request: dict[str, object] = {"batch": batch, "no_wait": True}
        if wait > 0:
            request["expires"] = int(wait * 1e9)
        await self._nc.publish(self._subject, json.dumps(request).encode(), reply=reply)
        self._open = reply
        self._deadline = asyncio.get_running_loop().time() + wait + _MARGIN_S

    async def fetch(self, batch: int, wait: float) -> list[Msg]:
        """About ``batch`` messages: what has arrived, or else the first to
        arrive within ``wait`` s and whatever is waiting with it. ``wait=0``
        only takes what is waiting.

        Late deliveries for an earlier request join the batch, so it may hold
        a few more than ``batch``.
        """
        if self._sub is None:
            raise RuntimeError("Puller used outside its context")
        loop = asyncio.get_running_loop()
        asked = False
        while True:
            self._changed.clear()
            if msgs := self._take():
                return msgs
            if self._refused is not None:
                await self._unusable(*self._refused)
                return []
            if self._open is None:
                if asked:
                    return []  # the request ended with nothing for us
                await self.ask(batch, wait)
                asked = True
            remaining = self._deadline - loop.time()
            if remaining <= 0:
                self._open = None  # lost (a disconnect): the next fetch asks again
                return []
            with contextlib.suppress(TimeoutError):  # then the loop looks again
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    async def _unusable(self, status: str, description: str) -> None:
        self._refused = None
        log.warning(
            "pull request refused",
            extra={"action": "bus.pull", "status": status, "error": description},
        )
        # Do not spin on a consumer that is missing or moving: wait out the
        # request's time before the caller asks again.
        await asyncio.sleep(
            max(0.0, self._deadline - _MARGIN_S - asyncio.get_running_loop().time())
        )
