"""Dead letters from JetStream's own advisories.

``MAX_DELIVERIES``: a consumer gave up on a message after MaxDeliver tries.
The message stays in its stream (a work queue keeps it forever, never
delivered again); it is recorded with its body, then deleted from work-queue
streams so it cannot fill them. ``MSG_TERMINATED``: a consumer terminated a
message as poison (a worker that cannot decode a work message). Work queues
drop such a message at once, so it is recorded with what the advisory says.
Consumers that record their own dead letters before terminating
(``bus.SELF_RECORDING``) are not recorded twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy
from nats.js.errors import NotFoundError

from workron import bus
from workron.ledger import Pool, ledger_errors, queries

__all__ = ["Advisory", "parse", "record"]

log = logging.getLogger(__name__)

_WORK_QUEUES = frozenset(
    s.name for s in bus.STREAMS if s.retention == RetentionPolicy.WORK_QUEUE and s.name
)


class _Body(msgspec.Struct, kw_only=True):
    stream: str
    consumer: str
    stream_seq: int
    deliveries: int = 0
    #: Given by the terminating client (``+TERM <reason>``), when it gave one.
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Advisory:
    kind: Literal["max_deliveries", "terminated"]
    stream: str
    consumer: str
    stream_seq: int
    deliveries: int
    reason: str | None = None

    @property
    def source(self) -> str:
        return f"{self.stream}/{self.consumer}"

    def describe(self) -> str:
        if self.kind == "max_deliveries":
            what = f"not acknowledged after {self.deliveries} deliveries (MaxDeliver)"
        else:
            what = f"terminated by the consumer after {self.deliveries} deliveries"
            if self.reason:
                what += f": {self.reason}"
        return f"{what}; stream {self.stream} sequence {self.stream_seq}"


_decode = msgspec.json.Decoder(_Body)


def _text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; a dead letter must be recorded anyway."""
    return None if value is None else value.replace("\x00", "")


def parse(subject: str, data: bytes) -> Advisory | None:
    """The advisory on ``subject``, or None for anything else."""
    if ".MAX_DELIVERIES." in subject:
        kind: Literal["max_deliveries", "terminated"] = "max_deliveries"
    elif ".MSG_TERMINATED." in subject:
        kind = "terminated"
    else:
        return None
    try:
        body = _decode.decode(data)
    except msgspec.DecodeError:
        log.warning("advisory not understood", extra={"action": "reaper.advisory"})
        return None
    return Advisory(kind, body.stream, body.consumer, body.stream_seq, body.deliveries, body.reason)


async def record(pool: Pool, js: JetStreamContext, advisories: Sequence[Advisory]) -> int:
    """Record dead letters for ``advisories``; how many. Raises LedgerUnavailableError."""
    letters: list[tuple[Advisory, str | None, str | None, bytes | None]] = []
    for advisory in advisories:
        if (
            advisory.kind == "terminated"
            and (advisory.stream, advisory.consumer) in bus.SELF_RECORDING
        ):
            continue
        subject = msg_id = None
        body: bytes | None = None
        try:
            stored = await js.get_msg(advisory.stream, advisory.stream_seq)
            subject, body = stored.subject, stored.data
            msg_id = (stored.headers or {}).get("Nats-Msg-Id")
        except NotFoundError:
            pass  # gone already (a work queue drops terminated messages)
        except (NatsError, TimeoutError) as exc:
            log.warning(
                "dead message not fetched",
                extra={"action": "reaper.advisory.fetch", "error": repr(exc)},
            )
        letters.append((advisory, subject, msg_id, body))
    if not letters:
        return 0
    async with ledger_errors():
        await pool.execute(
            queries()["dead_letter_insert"],
            [_text(a.source) for a, *_ in letters],
            [_text(subject) for _, subject, _, _ in letters],
            [_text(msg_id) for _, _, msg_id, _ in letters],
            [_text(a.describe()) for a, *_ in letters],
            [body for *_, body in letters],
        )
    for advisory, subject, msg_id, _ in letters:
        log.warning(
            "dead letter recorded",
            extra={
                "action": "reaper.dead_letter",
                "source": advisory.source,
                "subject": subject,
                "msg_id": msg_id,
                "error": advisory.describe(),
            },
        )
        if advisory.kind == "max_deliveries" and advisory.stream in _WORK_QUEUES:
            # Recorded with its body: out of the work queue it goes.
            try:
                await js.delete_msg(advisory.stream, advisory.stream_seq)
            except (NatsError, TimeoutError):  # gone, or the server is away
                log.debug("dead message not deleted", extra={"action": "reaper.advisory"})
    return len(letters)
