"""Outbox messages too large for their stream are recognised before publishing."""

from __future__ import annotations

from workron import outbox

MiB = 1024 * 1024


def test_subject_matching() -> None:
    assert outbox._matches("workron.evt.>", "workron.evt.job.finished")
    assert not outbox._matches("workron.evt.>", "workron.evt")
    assert outbox._matches("a.*.c", "a.b.c")
    assert not outbox._matches("a.*.c", "a.b.c.d")
    assert not outbox._matches("a.*", "a")


def test_oversized_counts_headers_against_the_stream_limit() -> None:
    headers = len(b"NATS/1.0\r\nNats-Msg-Id: m\r\n\r\n")
    fits = outbox.Message("workron.evt.x", b"x" * (MiB - headers), "m")
    assert outbox.oversized(fits) is None
    over = outbox.Message("workron.evt.x", b"x" * (MiB - headers + 1), "m")
    assert outbox.oversized(over) == f"{MiB + 1} bytes exceed the {MiB}-byte limit of stream EVENTS"
    # CONTROL has a smaller limit; subjects no stream takes have none.
    assert outbox.oversized(outbox.Message("workron.control.w1", b"x" * 70000, "m"))
    assert outbox.oversized(outbox.Message("elsewhere", b"x" * 2 * MiB, "m")) is None
