"""Dispatching pending jobs whose ``run_at`` has passed.

One transaction takes a batch of due jobs (best priority first, skipping
rows another dispatcher is taking), marks them dispatched and writes their
work messages to the outbox; the messages are published right after
commit, in priority order, so workers see the most urgent first.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext

from workron import _resolve, outbox
from workron.jobs import event_rows
from workron.ledger import Pool, Record, ledger_errors, queries
from workron.telemetry import Metrics

__all__ = ["dispatch_due", "next_due"]

log = logging.getLogger(__name__)


def _order(row: Record) -> tuple[int, object, object]:
    return (-row["priority"], row["run_at"], row["id"])


async def dispatch_due(pool: Pool, js: JetStreamContext, metrics: Metrics, limit: int) -> int:
    """Dispatch up to ``limit`` due jobs; returns how many. Raises LedgerUnavailableError."""
    async with ledger_errors(), pool.acquire() as conn, conn.transaction():
        rows = sorted(await conn.fetch(queries()["dispatcher_take_due"], limit), key=_order)
        if not rows:
            return 0
        # A DAG job's later attempts (and delayed DAG jobs) carry their
        # parents' results too.
        parents = await _resolve.parents_of(conn, [r["id"] for r in rows])
        messages = [_resolve.work_of(row, parents.get(row["id"])) for row in rows]
        await conn.execute(
            queries()["job_events_insert"],
            *event_rows([(r["id"], "dispatched", r["attempt"], 0, None, None) for r in rows]),
        )
        ids = await outbox.insert(conn, messages, own=True)
    await outbox.publish_own(pool, js, list(zip(ids, messages, strict=True)))
    for row in rows:
        metrics.dispatched.labels(queue=row["queue"]).inc()
        log.debug(
            "job dispatched",
            extra={
                "action": "dispatcher.dispatch",
                "job_id": str(row["id"]),
                "attempt": row["attempt"],
            },
        )
    metrics.batch_size.labels(stage="dispatch").observe(len(rows))
    return len(rows)


async def next_due(pool: Pool) -> float | None:
    """Seconds until the earliest pending job is due (≤ 0: due now); None when none is pending."""
    async with ledger_errors():
        seconds: float | None = await pool.fetchval(queries()["dispatcher_next_due"])
    return seconds
