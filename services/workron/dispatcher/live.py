"""Live copies of reports (``bus.LIVE_REPORTS``) beside the REPORTS stream.

A quiet worker publishes each report twice: on core NATS, which reaches a
dispatcher at once, and to the stream, which stores (and fsyncs) it first.
The dispatcher applies a live copy with the batch it arrives in, on that
batch's first try only: if the batch fails, the copies are dropped and
their originals, which follow, do the work. A committed batch records each
copy's report id in the inbox, so an original arriving later applies
nothing; those of the last ``size`` copies applied are recognised here and
acked without a transaction at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from workron.dispatcher.reports import Incoming, decode

__all__ = ["Recent", "Split", "split"]


class Recent:
    """Report ids of the last ``size`` live copies applied."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._ids: dict[str, None] = {}  # insertion-ordered: the oldest first

    def add(self, ids: Iterable[str]) -> None:
        for report_id in ids:
            self._ids[report_id] = None
        while len(self._ids) > self._size:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, report_id: object) -> bool:
        return report_id in self._ids


@dataclass(slots=True)
class Split:
    #: Messages from the stream to apply, with the reports of each.
    stream: list[Msg] = field(default_factory=list)
    decoded: list[list[Incoming]] = field(default_factory=list)
    #: Reports from live copies, to apply with them on a first try.
    live: list[Incoming] = field(default_factory=list)
    #: Stream messages whose report a live copy applied: to ack.
    known: list[Msg] = field(default_factory=list)


def split(msgs: Sequence[Msg], recent: Recent) -> Split:
    """Sort a batch of messages into stream messages, live reports and known ones.

    A live copy that does not decode is dropped: its original, which will not
    decode either, is the one recorded as a dead letter.
    """
    out = Split()
    for msg in msgs:
        if not msg.reply:  # core NATS: a live copy, nothing to ack
            out.live += [
                item
                for item in decode(msg.subject, msg.data, msg.headers)
                if item.report is not None and item.msg_id is not None
            ]
        elif msg.headers and msg.headers.get("Nats-Msg-Id") in recent:
            out.known.append(msg)
        else:
            out.stream.append(msg)
            out.decoded.append(decode(msg.subject, msg.data, msg.headers))
    return out
