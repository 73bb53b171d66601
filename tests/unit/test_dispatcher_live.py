"""Sorting a dispatcher's batch into stream messages, live copies and known originals."""

from __future__ import annotations

import uuid

import msgspec
from nats.aio.msg import Msg

from workron.dispatcher.live import Recent, split
from workron.events import ReportStarted, report_id


def report(n: int) -> ReportStarted:
    return ReportStarted(job_id=uuid.UUID(int=n), attempt=1, delivery=1, worker_id="w", at=1.0)


def message(n: int, *, live: bool = False, data: bytes | None = None) -> Msg:
    subject = "workron.live.report.q" if live else "workron.report.q"
    return Msg(
        _client=None,  # type: ignore[arg-type]
        subject=subject,
        reply="" if live else f"$JS.ACK.REPORTS.dispatcher.1.{n}.{n}.0.0",
        data=msgspec.json.encode(report(n)) if data is None else data,
        headers={"Nats-Msg-Id": report_id(report(n))},
    )


def test_recent_keeps_the_last_ids_only() -> None:
    recent = Recent(size=2)
    recent.add(["a", "b"])
    recent.add(["c"])
    assert ("a" in recent, "b" in recent, "c" in recent) == (False, True, True)


def test_a_batch_is_sorted_by_where_each_message_came_from() -> None:
    recent = Recent()
    recent.add([report_id(report(1))])  # its live copy was applied before
    batch = split(
        [
            message(0),
            message(1),
            message(2, live=True),
            message(3, live=True, data=b"not json"),  # its original will be the dead letter
        ],
        recent,
    )
    assert [m.data for m in batch.stream] == [msgspec.json.encode(report(0))]
    assert [[i.report for i in items] for items in batch.decoded] == [[report(0)]]
    assert [m.data for m in batch.known] == [msgspec.json.encode(report(1))]
    assert [(i.msg_id, i.report) for i in batch.live] == [(report_id(report(2)), report(2))]
