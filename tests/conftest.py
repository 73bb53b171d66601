"""Shared fixtures: a real nats-server per test and a fresh database per test.

PostgreSQL: ``WORKRON_TEST_DATABASE_URL`` when set, else a private server
from ``pgserver``. Each test gets ``CREATE DATABASE … TEMPLATE`` of a
migrated template, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import bus, ledger
from workron._embedded import NatsServer, start_postgres


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run long chaos variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak variant: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    context = nc.jetstream()
    await bus.apply(context)
    return context


def _with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` (works for host= socket URLs too)."""
    base, _, query = url.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("WORKRON_TEST_DATABASE_URL")
    if url:
        yield url
        return
    server, url = start_postgres(tmp_path_factory.mktemp("pg") / "data")
    yield url
    server.cleanup()


@pytest.fixture(scope="session")
def template_db(pg_server_url: str) -> Iterator[str]:
    import asyncio

    name = f"workron_tpl_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        pool = await ledger.connect(_with_database(pg_server_url, name), min_size=1, max_size=1)
        try:
            await ledger.migrate(pool)
        finally:
            await pool.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(drop())


@pytest.fixture
async def database_url(pg_server_url: str, template_db: str) -> AsyncIterator[str]:
    name = f"workron_t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await conn.close()
    yield _with_database(pg_server_url, name)
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[ledger.Pool]:
    p = await ledger.connect(database_url)
    yield p
    await p.close()
