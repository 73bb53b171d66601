from __future__ import annotations

import asyncio

from workron import ledger


async def test_migrations_applied_once_under_concurrency(pool: ledger.Pool) -> None:
    # The template is migrated already: every further run is a no-op, even
    # several at once.
    results = await asyncio.gather(*(ledger.migrate(pool) for _ in range(4)))
    assert results == [[], [], [], []]
    versions = [r["version"] for r in await pool.fetch("SELECT version FROM schema_migrations")]
    assert versions == [v for v, _, _ in ledger.migrations()]


async def test_every_named_query_prepares(pool: ledger.Pool) -> None:
    async with pool.acquire() as conn:
        for name, sql in ledger.queries().items():
            try:
                await conn.prepare(sql)
            except Exception as exc:  # pragma: no cover - the message is the point
                raise AssertionError(f"query {name} does not prepare: {exc}") from exc
