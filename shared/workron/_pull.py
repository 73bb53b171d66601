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
import json
import logging
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

    Use as an async context manager; messages still queued locally at exit
    are nak'ed so another consumer instance gets them at once.
    """

    def __init__(
        self, nc: NATS, stream: str, consumer: str, *, api_prefix: str = "$JS.API"
    ) -> None:
        self._nc = nc
        self._subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Subscription | None = None
        self._prefix = ""
        self._seq = 0

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
        for msg in self._leftovers():
            try:
                await msg.nak()
            except NatsError:
                break  # the connection is gone; AckWait brings them back

    async def _deliver(self, msg: Msg) -> None:
        self._queue.put_nowait(msg)

    def _leftovers(self) -> list[Msg]:
        msgs = []
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            if _status(msg) is None:
                msgs.append(msg)
        return msgs

    async def fetch(self, batch: int, wait: float) -> list[Msg]:
        """About ``batch`` messages: wait at most ``wait`` s for the first, then
        take what is waiting. ``wait=0`` only takes what is waiting.

        Late deliveries for an earlier request join the batch, so it may hold
        a few more than ``batch``.
        """
        if self._sub is None:
            raise RuntimeError("Puller used outside its context")
        msgs = self._leftovers()
        if len(msgs) >= batch:
            return msgs
        needed = batch - len(msgs)
        self._seq += 1
        reply = f"{self._prefix}.{self._seq}"
        request: dict[str, object] = {"batch": needed, "no_wait": True}
        if wait > 0 and not msgs:
            request["expires"] = int(wait * 1e9)
        await self._nc.publish(self._subject, json.dumps(request).encode(), reply=reply)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (wait if "expires" in request else 0.0) + _MARGIN_S
        try:
            async with asyncio.timeout_at(deadline):
                while needed > 0:
                    msg = await self._queue.get()
                    status = _status(msg)
                    if status is None:
                        # Stream messages keep their own subject, so a late one
                        # for an old request counts here too; at worst this
                        # batch ends early and the rest come with the next.
                        msgs.append(msg)
                        needed -= 1
                    elif msg.subject == reply and status != "100":
                        # 404 no messages / 408 expired: this request is over.
                        # 409 (consumer deleted, leadership change, limits) and
                        # 503 (no such consumer) are worth a log line.
                        if status not in ("404", "408"):
                            await self._unusable(status, msg, deadline)
                        break
        except TimeoutError:
            pass  # whatever arrived is the batch; late arrivals come next time
        return msgs

    async def _unusable(self, status: str, msg: Msg, deadline: float) -> None:
        description = msg.headers.get("Description", "") if msg.headers else ""
        log.warning(
            "pull request refused",
            extra={"action": "bus.pull", "status": status, "error": description.strip()},
        )
        # Do not spin on a consumer that is missing or moving: wait out the
        # request's time before the caller asks again.
        await asyncio.sleep(max(0.0, deadline - _MARGIN_S - asyncio.get_running_loop().time()))
