"""`workron migrate` against external servers given by the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import nats

from workron import bus
from workron._embedded import NatsServer


async def test_migrate_twice_on_external_servers(
    nats_server: NatsServer, pg_server_url: str
) -> None:
    conn = await asyncpg.connect(pg_server_url)
    name = f"workron_migrate_{os.getpid()}"
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        base, _, query = pg_server_url.partition("?")
        url = base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
        env = dict(os.environ, WORKRON_NATS_URL=nats_server.url, WORKRON_DATABASE_URL=url)
        for expected in ("applied: [1", "none (up to date)"):
            done = subprocess.run(
                [sys.executable, "-m", "workron.cli", "migrate"],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert expected in done.stdout
        target = await asyncpg.connect(url)
        try:
            assert await target.fetchval("SELECT count(*) FROM schema_migrations") >= 1
        finally:
            await target.close()
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            assert {s.name for s in bus.STREAMS} <= {s.config.name for s in await js.streams_info()}
        finally:
            await nc.close()
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
