"""A worker's reports on their way to the dispatcher, in batches under load.

Every stored JetStream message costs the server a write and, with
``sync_interval: always``, an fsync; a busy worker making one message per
report spends most of its bus budget there. So reports for one subject go
out one message at a time: while a message waits for its PubAck, the
reports made meanwhile gather, and the next message carries them all
(``ReportBatch``). A quiet worker sends each report alone, at once, as a
plain report with its ``Nats-Msg-Id``; nothing waits for a batch to fill.

``send`` returns once the message holding the report is stored, and raises
what the publish raised otherwise; the caller retries its own report,
which then joins a later batch. The dispatcher's inbox records each report
by its own id, so a report stored twice is applied once.
"""

from __future__ import annotations

import asyncio
from collections import deque

import msgspec
from nats.js import JetStreamContext

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
    """Publishes reports, one message in flight per subject."""

    #: One PubAck; a slow fsync is a few ms, a stalled server is retried.
    def __init__(self, js: JetStreamContext, *, timeout: float = 2.0) -> None:
        self._js = js
        self._timeout = timeout
        self._waiting: dict[str, deque[_Waiting]] = {}
        #: The task publishing for each subject, while there is one.
        self._flushing: dict[str, asyncio.Task[None]] = {}

    async def send(self, subject: str, report: Report) -> None:
        """Publish ``report`` on ``subject``; returns once it is stored."""
        waiting = _Waiting(report, _encoder.encode(report))
        self._waiting.setdefault(subject, deque()).append(waiting)
        if subject not in self._flushing:
            self._flushing[subject] = asyncio.create_task(
                self._flush(subject), name=f"workron.reports.{subject}"
            )
        # A caller that stops waiting cancels only its future: its report
        # may still go out with the others, as a publish already sent would.
        await waiting.done

    async def aclose(self) -> None:
        """Wait for the messages on their way."""
        tasks = list(self._flushing.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _take(self, subject: str) -> list[_Waiting]:
        waiting = self._waiting.get(subject, deque())
        taken: list[_Waiting] = []
        size = 0
        while waiting and (not taken or size + len(waiting[0].data) <= _BATCH_BYTES):
            item = waiting.popleft()
            taken.append(item)
            size += len(item.data)
        return taken

    async def _flush(self, subject: str) -> None:
        batch: list[_Waiting] = []
        try:
            while batch := self._take(subject):
                try:
                    await self._publish(subject, batch)
                except Exception as exc:  # each sender decides whether to retry
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(exc)
                else:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_result(None)
        finally:
            del self._flushing[subject]
            # Only when this task is cancelled: no sender is left waiting.
            for item in [*batch, *self._waiting.pop(subject, deque())]:
                item.done.cancel()

    async def _publish(self, subject: str, batch: list[_Waiting]) -> None:
        if len(batch) == 1:
            (item,) = batch
            headers = {"Nats-Msg-Id": report_id(item.report)}
            await self._js.publish(subject, item.data, timeout=self._timeout, headers=headers)
            return
        # No Nats-Msg-Id: a batch is never published again as such (a failed
        # one is retried report by report, in other batches).
        data = _encoder.encode(ReportBatch(reports=[item.report for item in batch]))
        await self._js.publish(subject, data, timeout=self._timeout)
