"""Ledger access: the asyncpg pool, named queries, and migrations.

SQL lives in ``schemas/``: ordered migrations in ``schemas/migrations`` and
named queries (``-- name: <query>`` headers) in ``schemas/queries``. Driver
exceptions are translated here, at one boundary, into Workron's own.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from asyncpg import Connection, Pool, Record

from workron.errors import LedgerUnavailableError, ValidationError

__all__ = [
    "Connection",
    "KeyedTransactions",
    "Pool",
    "Record",
    "connect",
    "ledger_errors",
    "migrate",
    "migrations",
    "queries",
    "schemas_dir",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Any client id; PostgreSQL keys advisory locks by 64-bit integers.
_MIGRATION_LOCK = 0x776F726B726F6E  # "workron"
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def schemas_dir() -> Path:
    """``schemas/`` beside the sources in a checkout, or inside the installed wheel."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "schemas", here.parent / "_schemas"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise FileNotFoundError("workron schemas/ directory not found")


@cache
def queries() -> dict[str, str]:
    """Every named query in ``schemas/queries/*.sql``."""
    found: dict[str, str] = {}
    for path in sorted((schemas_dir() / "queries").glob("*.sql")):
        parts = _NAME.split(path.read_text())
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise ValueError(f"query {name!r} is defined twice ({path.name})")
            found[name] = body.strip()
    return found


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` for each migration file, in order."""
    result = []
    for path in sorted((schemas_dir() / "migrations").glob("*.sql")):
        version, _, name = path.stem.partition("_")
        result.append((int(version), name, path.read_text()))
    return result


async def _init_connection(conn: Connection) -> None:
    # jsonb travels as text both ways: payloads and results are already JSON
    # bytes on the wire, so they are never decoded on the way through.
    await conn.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog")


async def _keep_session(conn: Connection) -> None:
    """Nothing to reset when a connection goes back to the pool.

    asyncpg's default reset (UNLISTEN, RESET ALL, advisory unlock, …) is one
    more round trip after every transaction. The pool still rolls back a
    transaction left open; the rest it would reset is never left behind:
    the listener removes its listeners and ``migrate`` releases its lock.
    """


async def connect(url: str, *, min_size: int = 2, max_size: int = 10) -> Pool:
    async with ledger_errors():
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            # JIT compiles large statements (a 10,000-node DAG's inserts, a
            # cascade's recursive walk) for hundreds of ms each, far more
            # than it saves on statements that run in milliseconds.
            server_settings={"jit": "off"},
            # The hot path runs a handful of fixed statements; keep them prepared.
            statement_cache_size=256,
        )
    assert pool is not None
    return pool


async def migrate(pool: Pool) -> list[int]:
    """Apply pending migrations; safe when several processes start at once."""
    applied: list[int] = []
    async with ledger_errors(), pool.acquire() as conn:
        # A session lock serialises concurrent migrators; the loser finds the
        # work done when it gets the lock.
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                applied.append(version)
                log.info(
                    "migration applied", extra={"action": "ledger.migrate", "version": version}
                )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


# Connection-level failures: the server is down, restarting or unreachable.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    # SQLSTATE class 08: every connection exception, including "cannot
    # connect" and "commit outcome unknown" (retried with the same ids).
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)


# The server refused the data itself (a NUL character in text or jsonb, a
# value out of range, a violated CHECK): the same write fails every time, so
# callers must not retry it. Unique violations are left alone: callers that
# expect them use ON CONFLICT.
_REJECTED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.CheckViolationError,
    asyncpg.exceptions.NotNullViolationError,
)


@contextlib.asynccontextmanager
async def ledger_errors() -> AsyncIterator[None]:
    """Translate driver failures at one boundary.

    "The ledger is away" becomes LedgerUnavailableError (retry later); "the
    ledger refuses this data" becomes ValidationError (never retry).
    """
    try:
        yield
    except _UNAVAILABLE as exc:
        raise LedgerUnavailableError(f"ledger unavailable: {exc}") from exc
    except _REJECTED as exc:
        raise ValidationError(f"the ledger rejected the data: {exc}") from exc


async def in_transaction(pool: Pool, work: Callable[[Connection], Awaitable[T]]) -> T:
    """Run ``work`` in one transaction, with driver failures translated."""
    async with ledger_errors(), pool.acquire() as conn, conn.transaction():
        return await work(conn)


_KEYED = (
    "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off;"
    " SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
)


class KeyedTransactions:
    """Transactions of statements that find their rows by key, planned once,
    back to back on one connection.

    For a hot path of fixed statements driven by arrays of ids (the
    dispatcher's): their right plan at any size is index lookups in nested
    loops. Generic plans save planning each execution again for its
    parameters (a quarter of a millisecond for the dispatcher's first
    statement); with sequential scans, hash and merge joins off, neither a
    small table nor statistics lagging a bulk insert can give a plan that
    reads a whole table.

    Each COMMIT begins the next transaction in the same round trip, so the
    next one starts without waiting for a BEGIN. A transaction begun and
    not used holds no snapshot and no lock. Its statements may run long
    after it began, so they must take the time from
    ``statement_timestamp()``, as every ledger query does (migration 0007):
    ``now()`` would be when it began. One transaction at a time; ``close``
    gives the connection back.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        #: The connection, when a transaction is begun on it and waiting.
        self._begun: Connection | None = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """The begun transaction, or a new one: committed at the end of the
        block and the next one begun, or rolled back if the block raises."""
        conn, self._begun = self._begun, None
        if conn is not None and _gone(conn):  # the server went away meanwhile
            await self._release(conn)
            conn = None
        if conn is None:
            conn = await self._pool.acquire()
            try:
                await conn.execute(_KEYED)
            except BaseException:
                await self._release(conn)
                raise
        try:
            yield conn
            await conn.execute("COMMIT; " + _KEYED)
        except BaseException:
            await self._release(conn)
            raise
        self._begun = conn

    async def close(self) -> None:
        """Roll back the transaction begun, if any, and give the connection back."""
        conn, self._begun = self._begun, None
        if conn is not None:
            await self._release(conn)

    async def _release(self, conn: Connection) -> None:
        if not _gone(conn):
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute("ROLLBACK")  # a lost connection is rolled back anyway
        await self._pool.release(conn)  # a no-op for a connection that died


def _gone(conn: Connection) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # the pool's handle of a connection that died
        return True


def as_dict(record: Record) -> dict[str, Any]:
    return dict(record.items())


async def prune_inbox(
    pool: Pool, consumer: str, *, keep_s: float, batch: int, stop: Callable[[], bool]
) -> int:
    """Delete ``consumer``'s inbox rows older than ``keep_s``, in bounded batches.

    The inbox only has to outlive redeliveries and duplicates (AckWait times
    MaxDeliver, plus nak delays: minutes), so it stays small.
    """
    total = 0
    while True:
        async with ledger_errors():
            gone: int = await pool.fetchval(
                queries()["dispatcher_inbox_prune"], consumer, keep_s, batch
            )
        total += gone
        if gone < batch or stop():
            return total
