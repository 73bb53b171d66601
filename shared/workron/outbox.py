"""The transactional outbox: messages written with the state change that
decided them, published after commit.

A process that commits outbox rows publishes them itself right away
(``publish_own``) and deletes them on PubAck; the relay is the backstop for
rows whose writer died before that. Rows the writer means to publish itself
are written with ``available_at`` a few seconds ahead, so the relay leaves
them alone unless the writer has gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from workron._wake import sleep
from workron.bus import STREAMS
from workron.errors import LedgerUnavailableError
from workron.ledger import Connection, Pool, ledger_errors, queries

__all__ = [
    "Message",
    "PublishOutcome",
    "Sweeper",
    "columns",
    "delete",
    "insert",
    "publish",
    "publish_own",
]

log = logging.getLogger(__name__)

#: How long the writer keeps its own rows before the relay may take them.
OWN_GRACE_S = 5.0

# API error codes meaning the message itself can never be accepted.
_POISON_ERR_CODES = {10054}  # message size exceeds maximum allowed


class Message(msgspec.Struct, frozen=True):
    subject: str
    payload: bytes
    msg_id: str
    traceparent: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Nats-Msg-Id": self.msg_id}
        if self.traceparent:
            headers["traceparent"] = self.traceparent
        return headers


class PublishOutcome(msgspec.Struct):
    acked: list[int]
    #: (row id, reason) of rows that can never be published.
    poison: list[tuple[int, str]]
    #: rows that failed for a passing reason; try again later.
    failed: list[int]


_json = msgspec.json.Encoder()


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching with ``*`` and ``>`` wildcards."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(have) == len(want)


@functools.lru_cache(maxsize=4096)
def _limit(subject: str) -> tuple[str, int] | None:
    """(stream, max message size) of the declared stream that takes ``subject``."""
    for stream in STREAMS:
        if any(_matches(p, subject) for p in stream.subjects or ()):
            size = stream.max_msg_size
            return None if size is None or size < 0 else (stream.name or "", size)
    return None


def oversized(message: Message) -> str | None:
    """Why ``message`` can never be stored by its stream, if it is too large.

    Checked before publishing because nats-py (2.16) never resolves the
    ``publish_async`` future of a message the stream rejects (its reply
    handler raises instead), so the refusal would look like a timeout and be
    retried forever. The server counts header bytes plus payload.
    """
    limit = _limit(message.subject)
    if limit is None:
        return None
    stream, max_size = limit
    size = len(message.payload) + 12  # "NATS/1.0\r\n" … "\r\n"
    size += sum(len(k.encode()) + len(v.encode()) + 4 for k, v in message.headers().items())
    if size > max_size:
        return f"{size} bytes exceed the {max_size}-byte limit of stream {stream}"
    return None


async def insert(conn: Connection, messages: Sequence[Message], *, own: bool = False) -> list[int]:
    """Write outbox rows in the caller's transaction; returns their ids.

    With ``own``, the caller promises to publish them after commit.
    """
    if not messages:
        return []
    rows = await conn.fetch(queries()["outbox_insert"], *columns(messages, own=own))
    return [r["id"] for r in rows]


def columns(messages: Sequence[Message], *, own: bool = False) -> tuple[Any, ...]:
    """The parameters of ``outbox_insert`` for ``messages`` (for statements
    that insert outbox rows along with something else)."""
    return (
        [m.subject for m in messages],
        [m.payload for m in messages],
        [_json.encode(m.headers()).decode() for m in messages],
        OWN_GRACE_S if own else 0.0,
    )


@dataclass(slots=True)
class Sending:
    """Rows published and not yet confirmed (``start``, then ``confirm``)."""

    outcome: PublishOutcome
    futures: list[tuple[int, asyncio.Future[Any]]]


async def start(js: JetStreamContext, rows: Sequence[tuple[int, Message]]) -> Sending:
    """Publish rows pipelined (no round trip per message), without waiting
    for their PubAcks; those that cannot go are classified at once."""
    sending = Sending(PublishOutcome([], [], []), [])
    for row_id, message in rows:
        if (reason := oversized(message)) is not None:
            sending.outcome.poison.append((row_id, reason))
            continue
        try:
            future = await js.publish_async(
                message.subject, message.payload, headers=message.headers()
            )
        except MaxPayloadError as exc:
            sending.outcome.poison.append((row_id, f"larger than the server's max payload: {exc}"))
            continue
        except NatsError as exc:
            log.warning("publish failed", extra={"action": "outbox.publish", "error": str(exc)})
            sending.outcome.failed.append(row_id)
            continue
        sending.futures.append((row_id, future))
    return sending


async def confirm(sending: Sending, *, timeout: float = 5.0) -> PublishOutcome:
    """Wait for the PubAcks of ``sending``; classify each outcome."""
    outcome, futures = sending.outcome, sending.futures
    if not futures:
        return outcome
    done, pending = await asyncio.wait([f for _, f in futures], timeout=timeout)
    for future in pending:
        future.cancel()
    for row_id, future in futures:
        if future not in done or future.cancelled():
            outcome.failed.append(row_id)
        elif (error := future.exception()) is None:
            outcome.acked.append(row_id)
        elif isinstance(error, APIError) and error.err_code in _POISON_ERR_CODES:
            outcome.poison.append((row_id, str(error)))
        else:
            outcome.failed.append(row_id)
    return outcome


async def publish(
    js: JetStreamContext,
    rows: Sequence[tuple[int, Message]],
    *,
    timeout: float = 5.0,
) -> PublishOutcome:
    """Publish rows pipelined (no round trip per message); classify each outcome."""
    return await confirm(await start(js, rows), timeout=timeout)


async def delete(pool: Pool, ids: Sequence[int]) -> None:
    if ids:
        async with ledger_errors():
            await pool.execute(queries()["outbox_delete"], list(ids))


async def publish_own(
    pool: Pool, js: JetStreamContext, rows: Sequence[tuple[int, Message]]
) -> PublishOutcome:
    """Publish rows this process just committed, and delete the ones acked.

    Anything not acked stays in the outbox for the relay: never lost, at
    worst published twice and deduplicated by Nats-Msg-Id.
    """
    outcome = await publish(js, rows)
    try:
        await delete(pool, outcome.acked)
    except LedgerUnavailableError:
        # The relay will publish them again; JetStream drops the duplicates.
        log.warning("outbox delete failed", extra={"action": "outbox.delete"}, exc_info=True)
    return outcome


class Sweeper:
    """Deletes published rows in batches, off the path that published them.

    For a service whose loop publishes after every transaction: the next
    batch need not wait for a delete round trip. A row whose delete is late
    or lost is published again by the relay after ``OWN_GRACE_S``, and the
    stream drops the copy by its ``Nats-Msg-Id``.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._ids: list[int] = []
        self._ready = asyncio.Event()

    def add(self, ids: Sequence[int]) -> None:
        if ids:
            self._ids.extend(ids)
            self._ready.set()

    async def sweep(self) -> int:
        """Delete every row added so far; how many."""
        ids, self._ids = self._ids, []
        self._ready.clear()
        try:
            await delete(self._pool, ids)
        except LedgerUnavailableError:
            log.warning("outbox delete failed", extra={"action": "outbox.delete"}, exc_info=True)
        return len(ids)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await sleep(3600.0, self._ready, stop)
            await self.sweep()
        await self.sweep()
