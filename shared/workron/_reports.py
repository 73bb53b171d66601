"""A worker's reports on their way to the dispatcher, in batches under load.

Every stored JetStream message costs the server a write and, with
``sync_interval: always``, an fsync; a busy worker making one message per
report spends most of its bus budget there. So reports for one subject go
out one message at a time: while a message waits for its PubAck, the
reports made meanwhile gather, and the next message carries them all
(``ReportBatch``). A quiet worker sends each report alone, at once, as a
plain report with its ``Nats-Msg-Id``; nothing waits for a batch to fill.
Such a report also goes out over core NATS (``bus.LIVE_REPORTS``), for a
dispatcher to apply before the stream has stored the original.

``send`` returns once the message holding the report is stored, and raises
what the publish raised otherwise; the caller retries its own report,
which then joins a later batch. The dispatcher's inbox records each report
by its own id, so a report stored twice is applied once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from workron import bus
from workron.events import Report, ReportBatch, report_id

__all__ = ["ReportSender"]

#: Bytes of reports per message: well inside REPORTS' 1 MiB max_msg_size
#: (a report carries a result of up to MAX_RESULT_BYTES).
_BATCH_BYTES = 512 * 1024

_encoder = msgspec.json.Encoder()


class _Waiting:
    __slots__ = ("data", "done", "report")

    def __init__(self, report: Report, data: bytes) -> None:
        self.report = report
        self.data = data
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class ReportSender:
    """Publishes reports, one message in flight per queue; with ``live``, a
    report sent alone is also published there, on core NATS."""

    #: One PubAck; a slow fsync is a few ms, a stalled server is retried.
    def __init__(
        self, js: JetStreamContext, *, live: NATS | None = None, timeout: float = 2.0
    ) -> None:
        self._js = js
        self._live = live
        self._timeout = timeout
        self._waiting: dict[str, deque[_Waiting]] = {}
        #: The task publishing for each subject, while there is one.
        self._flushing: dict[str, asyncio.Task[None]] = {}

    async def send(self, queue: str, report: Report) -> None:
        """Publish ``report`` for ``queue``; returns once it is stored."""
        waiting = _Waiting(report, _encoder.encode(report))
        self._waiting.setdefault(queue, deque()).append(waiting)
        if queue not in self._flushing:
            self._flushing[queue] = asyncio.create_task(
                self._flush(queue), name=f"workron.reports.{queue}"
            )
        # A caller that stops waiting cancels only its future: its report
        # may still go out with the others, as a publish already sent would.
        await waiting.done

    async def aclose(self) -> None:
        """Wait for the messages on their way."""
        tasks = list(self._flushing.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _take(self, queue: str) -> list[_Waiting]:
        waiting = self._waiting.get(queue, deque())
        taken: list[_Waiting] = []
        size = 0
        while waiting and (not taken or size + len(waiting[0].data) <= _BATCH_BYTES):
            item = waiting.popleft()
            taken.append(item)
            size += len(item.data)
        return taken

    async def _flush(self, queue: str) -> None:
        batch: list[_Waiting] = []
        try:
            while batch := self._take(queue):
                try:
                    await self._publish(queue, batch)
                except Exception as exc:  # each sender decides whether to retry
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(exc)
                else:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_result(None)
        finally:
            del self._flushing[queue]
            # Only when this task is cancelled: no sender is left waiting.
            for item in [*batch, *self._waiting.pop(queue, deque())]:
                item.done.cancel()

    async def _publish(self, queue: str, batch: list[_Waiting]) -> None:
        subject = bus.report_subject(queue)
        if len(batch) == 1:
            (item,) = batch
            headers = {"Nats-Msg-Id": report_id(item.report)}
            if self._live is not None:
                # First, and written alone (one turn of the loop lets the
                # client's flusher write it): the server may route what it
                # reads in one go only after storing the original. If it
                # cannot go, the original, stored, is what counts anyway.
                with contextlib.suppress(NatsError):
                    await self._live.publish(
                        bus.live_report_subject(queue), item.data, headers=headers
                    )
                    await asyncio.sleep(0)
            await self._js.publish(subject, item.data, timeout=self._timeout, headers=headers)
            return
        # No Nats-Msg-Id: a batch is never published again as such (a failed
        # one is retried report by report, in other batches).
        data = _encoder.encode(ReportBatch(reports=[item.report for item in batch]))
        await self._js.publish(subject, data, timeout=self._timeout)
