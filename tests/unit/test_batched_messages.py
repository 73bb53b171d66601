"""Several reports, or several job.finished, in one stored message."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import pytest

from workron import jobs
from workron._reports import ReportSender
from workron.events import (
    Finished,
    JobFinished,
    JobsFinished,
    JobState,
    Report,
    ReportBatch,
    ReportStarted,
    finished_jobs,
    report_id,
)


def started(n: int) -> ReportStarted:
    return ReportStarted(job_id=uuid.UUID(int=n), attempt=1, delivery=1, worker_id="w", at=1.0)


class HeldJetStream:
    """Stands in for JetStream: each publish waits until the test lets it through."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, str] | None]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def publish(
        self, subject: str, data: bytes, *, timeout: float, headers: dict[str, str] | None = None
    ) -> None:
        self.published.append((subject, data, headers))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail


def reports_in(data: bytes) -> list[Report]:
    decoded = msgspec.json.decode(data, type=Report | ReportBatch)
    return decoded.reports if isinstance(decoded, ReportBatch) else [decoded]


async def test_reports_made_while_one_is_stored_go_out_together() -> None:
    js = HeldJetStream()
    sender = ReportSender(js)  # type: ignore[arg-type]
    first = asyncio.create_task(sender.send("s", started(0)))
    await asyncio.sleep(0)  # the first message is on its way, alone
    rest = [asyncio.create_task(sender.send("s", started(n))) for n in range(1, 5)]
    await asyncio.sleep(0)
    assert len(js.published) == 1 and not first.done()
    js.gate.set()
    await asyncio.gather(first, *rest)
    assert [len(reports_in(data)) for _, data, _ in js.published] == [1, 4]
    # Alone, a report keeps its Nats-Msg-Id; a batch has none (each report
    # is known by its own id, in the dispatcher's inbox).
    assert js.published[0][2] == {"Nats-Msg-Id": report_id(started(0))}
    assert js.published[1][2] is None
    assert [r.job_id for r in reports_in(js.published[1][1])] == [
        uuid.UUID(int=n) for n in range(1, 5)
    ]
    await sender.aclose()


async def test_a_failed_batch_fails_every_sender_in_it() -> None:
    js = HeldJetStream()
    js.fail = TimeoutError("no PubAck")
    js.gate.set()
    sender = ReportSender(js)  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(sender.send("s", started(n)) for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, TimeoutError) for r in results)
    # Nothing is left behind: the next report goes out on its own.
    js.fail = None
    await sender.send("s", started(9))
    assert reports_in(js.published[-1][1]) == [started(9)]


async def test_a_cancelled_flush_leaves_no_sender_waiting() -> None:
    js = HeldJetStream()  # never lets the publish through
    sender = ReportSender(js)  # type: ignore[arg-type]
    sending = asyncio.create_task(sender.send("s", started(0)))
    await asyncio.sleep(0)
    queued = asyncio.create_task(sender.send("s", started(1)))
    await asyncio.sleep(0)
    for task in list(sender._flushing.values()):  # as at the loop's shutdown
        task.cancel()
    results = await asyncio.wait_for(asyncio.gather(sending, queued, return_exceptions=True), 5)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)


class LiveNats:
    """Stands in for the core-NATS connection: records what is published."""

    def __init__(self, js: HeldJetStream) -> None:
        self.js = js
        self.published: list[tuple[str, bytes, dict[str, str] | None, int]] = []

    async def publish(
        self, subject: str, data: bytes, *, headers: dict[str, str] | None = None
    ) -> None:
        # With how many stream publishes had gone out before it.
        self.published.append((subject, data, headers, len(self.js.published)))


async def test_a_report_sent_alone_has_a_live_copy_sent_first() -> None:
    js = HeldJetStream()
    live = LiveNats(js)
    sender = ReportSender(js, live=live)  # type: ignore[arg-type]
    first = asyncio.create_task(sender.send("q", started(0)))
    await asyncio.sleep(0.01)
    rest = [asyncio.create_task(sender.send("q", started(n))) for n in range(1, 3)]
    await asyncio.sleep(0)
    js.gate.set()
    await asyncio.gather(first, *rest)
    [(subject, data, headers, before)] = live.published  # the batch has none
    assert subject == "workron.live.report.q" and before == 0
    assert (data, headers) == (js.published[0][1], js.published[0][2])
    assert js.published[0][0] == "workron.report.q"
    assert len(reports_in(js.published[1][1])) == 2
    await sender.aclose()


def event(n: int, error: str | None = None) -> JobFinished:
    return jobs.finished_event(uuid.UUID(int=n), "q", JobState.FAILED, 1, error)


def decoded(message: Any) -> list[JobFinished]:
    return finished_jobs(msgspec.json.decode(message.payload, type=Finished))


def test_one_job_finished_goes_alone_with_its_own_id() -> None:
    [message] = jobs.finished_messages([event(1)])
    assert msgspec.json.decode(message.payload, type=JobFinished) == event(1)
    assert message.msg_id == jobs.finished_id(uuid.UUID(int=1), 1)


def test_job_finished_events_are_batched_and_split_by_size() -> None:
    big = "x" * 100_000  # two of these fit in a message, not three
    events = [event(n, big) for n in range(7)]
    messages = jobs.finished_messages(events)
    assert [len(decoded(m)) for m in messages] == [2, 2, 2, 1]
    assert [e for m in messages for e in decoded(m)] == events
    assert len({m.msg_id for m in messages}) == 4
    assert all(
        isinstance(msgspec.json.decode(m.payload, type=Finished), JobsFinished)
        for m in messages[:3]
    )


@pytest.mark.parametrize("count", [0, 1, 500])
def test_batching_keeps_every_event_once(count: int) -> None:
    events = [event(n) for n in range(count)]
    assert [e for m in jobs.finished_messages(events) for e in decoded(m)] == events
