"""The relay: publishes outbox rows that nobody else published.

Writers publish their own rows right after commit; the relay is the
backstop for rows written without a bus at hand and for rows whose writer
died before publishing (those become visible after ``outbox.OWN_GRACE_S``).

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` and nothing is remembered
between claims, so several relays can run at once and a row committed after
a later id is still found. A claimed batch is published pipelined inside the
claiming transaction; acked rows are deleted, poison rows set aside and
recorded, the rest retried later, all in that one commit. A crash before
commit means the batch is published again, and JetStream drops the
duplicates by ``Nats-Msg-Id``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import msgspec
from nats.aio.client import Client as NATS

from workron import outbox
from workron._service import supervise
from workron._wake import Listener, sleep
from workron.errors import LedgerUnavailableError
from workron.ledger import Connection, Pool, Record, ledger_errors, queries
from workron.telemetry import Metrics

__all__ = ["Relay"]

log = logging.getLogger(__name__)

#: Channel the outbox insert trigger notifies when a due row is written.
CHANNEL = "workron_outbox"

_decode_headers = msgspec.json.Decoder(dict[str, str])


def to_message(row: Record) -> outbox.Message:
    """Rebuild the message of an outbox row (headers are stored as a JSON object)."""
    headers = _decode_headers.decode(row["headers"]) if row["headers"] is not None else {}
    return outbox.Message(
        subject=row["subject"],
        payload=bytes(row["payload"]),
        # Rows always carry their id; the fallback keeps even a hand-written
        # row deduplicated on the broker.
        msg_id=headers.get("Nats-Msg-Id") or f"outbox:{row['id']}",
        traceparent=headers.get("traceparent"),
    )


class Relay:
    """Publish due outbox rows to JetStream, woken by NOTIFY, polling as a backstop."""

    name = "relay"

    def __init__(
        self,
        pool: Pool,
        nc: NATS,
        metrics: Metrics,
        *,
        batch: int = 1000,
        poll_s: float = 1.0,
        publish_timeout_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._js = nc.jetstream()
        self._metrics = metrics
        self._batch = batch
        self._poll_s = poll_s
        self._publish_timeout_s = publish_timeout_s
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self.listener = Listener(pool, [CHANNEL], self._wake.set)

    async def run(self) -> None:
        await supervise(
            self.name,
            {"listen": self.listener.run(self._stop), "relay": self._relay_loop()},
            self._stop,
        )

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run_until_idle(self) -> int:
        """Publish every row due now; returns how many rows were claimed."""
        return await self._drain()

    async def _relay_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            # Cleared before the claim: a NOTIFY during the claim wakes the
            # next round instead of being lost.
            self._wake.clear()
            try:
                await self._drain()
                delay = await self._next_due()
                failures = 0
            except LedgerUnavailableError as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2**failures)
                log.warning(
                    "ledger unavailable", extra={"action": "relay.unavailable", "error": str(exc)}
                )
            await sleep(delay, self._wake, self._stop)

    async def _drain(self) -> int:
        total = 0
        while True:
            claimed = await self._relay_batch()
            total += claimed
            # A full batch means more may be waiting; a short one means not.
            if claimed < self._batch or self._stop.is_set():
                return total

    async def _next_due(self) -> float:
        """Seconds to sleep: until the next row falls due, at most ``poll_s``."""
        async with ledger_errors():
            due_in: timedelta | None = await self._pool.fetchval(queries()["outbox_next_due"])
        if due_in is None:
            self._metrics.outbox_lag.set(0)
            return self._poll_s
        seconds = due_in.total_seconds()
        self._metrics.outbox_lag.set(max(0.0, -seconds))
        # Due already: held by another relay, or committed after our claim.
        # Look again soon rather than spin on rows someone else holds.
        return min(self._poll_s, max(seconds, 0.05))

    async def _relay_batch(self) -> int:
        async with ledger_errors(), self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(queries()["outbox_claim"], self._batch)
            if not rows:
                return 0
            messages = {row["id"]: to_message(row) for row in rows}
            outcome = await outbox.publish(
                self._js, list(messages.items()), timeout=self._publish_timeout_s
            )
            await self._settle(conn, messages, outcome)
        self._metrics.outbox_published.labels(by="relay").inc(len(outcome.acked))
        self._metrics.batch_size.labels(stage="relay").observe(len(rows))
        if outcome.poison:
            self._metrics.outbox_poison.inc(len(outcome.poison))
            self._metrics.dead_letters.labels(source="outbox").inc(len(outcome.poison))
        return len(rows)

    async def _settle(
        self, conn: Connection, messages: dict[int, outbox.Message], outcome: outbox.PublishOutcome
    ) -> None:
        if outcome.acked:
            await conn.execute(queries()["outbox_delete"], outcome.acked)
        if outcome.poison:
            ids, reasons = zip(*outcome.poison, strict=True)
            await conn.execute(queries()["outbox_set_aside"], list(ids), list(reasons))
            poison = [messages[i] for i in ids]
            await conn.execute(
                queries()["dead_letter_insert"],
                ["outbox"] * len(poison),
                [m.subject for m in poison],
                [m.msg_id for m in poison],
                [f"outbox row {i}: {reason}" for i, reason in outcome.poison],
                [m.payload for m in poison],
            )
            for row_id, reason in outcome.poison:
                log.error(
                    "outbox row set aside",
                    extra={"action": "relay.poison", "outbox_id": row_id, "error": reason},
                )
        if outcome.failed:
            await conn.execute(queries()["outbox_retry_later"], outcome.failed)
            log.warning(
                "publish failed; retrying later",
                extra={"action": "relay.retry", "rows": len(outcome.failed)},
            )
