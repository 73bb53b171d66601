"""The relay publishes outbox rows nobody else published: exactly the due
rows, whatever their commit order, with several relays at once, setting
poison aside, woken by NOTIFY."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import ledger, outbox
from workron.relay import Relay
from workron.telemetry import Metrics

MiB = 1024 * 1024


def message(n: int, subject: str = "workron.evt.test", size: int = 0) -> outbox.Message:
    return outbox.Message(subject=subject, payload=b"x" * size or b"m%d" % n, msg_id=f"test:{n}")


async def put(pool: ledger.Pool, *messages: outbox.Message) -> list[int]:
    async with pool.acquire() as conn, conn.transaction():
        return await outbox.insert(conn, list(messages))


async def events_in_stream(js: JetStreamContext) -> int:
    return (await js.stream_info("EVENTS")).state.messages


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait (bounded) for a condition another task brings about."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.wait_for(relay.listener.ready.wait(), 5)
        yield task
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)


async def test_rows_are_published_with_their_msg_id_and_deleted(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    metrics = Metrics()
    await put(pool, *(message(n) for n in range(3)))
    assert await Relay(pool, nc, metrics).run_until_idle() == 3
    for seq in (1, 2, 3):
        stored = await js.get_msg("EVENTS", seq)
        assert stored.data == b"m%d" % (seq - 1)
        assert stored.headers and stored.headers["Nats-Msg-Id"] == f"test:{seq - 1}"
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    assert metrics.outbox_published.labels(by="relay")._value.get() == 3


async def test_own_rows_wait_for_their_writer(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    async with pool.acquire() as conn:
        await outbox.insert(conn, [message(1)], own=True)
    assert await Relay(pool, nc, Metrics()).run_until_idle() == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1


async def test_row_committed_out_of_id_order_is_not_skipped(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    relay = Relay(pool, nc, Metrics())
    async with pool.acquire() as conn_a:
        tx_a = conn_a.transaction()
        await tx_a.start()
        [early] = await outbox.insert(conn_a, [message(1)])
        [late] = await put(pool, message(2))
        assert early < late
        assert await relay.run_until_idle() == 1  # A's row is not visible yet
        await tx_a.commit()
    assert await relay.run_until_idle() == 1
    assert await events_in_stream(js) == 2
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_concurrent_relays_publish_each_row_once(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    await put(pool, *(message(n) for n in range(1500)))
    relays = [Relay(pool, nc, Metrics(), batch=200) for _ in range(2)]
    claimed = await asyncio.gather(*(r.run_until_idle() for r in relays))
    # SKIP LOCKED: no row is claimed by both, and none is left behind.
    assert sum(claimed) == 1500
    assert await events_in_stream(js) == 1500
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_poison_row_is_set_aside_and_does_not_block_the_rest(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    metrics = Metrics()
    relay = Relay(pool, nc, metrics)
    # Over the stream's 1 MiB max_msg_size, under the server's max_payload.
    [big] = await put(pool, message(1, size=MiB + 1))
    [fine] = await put(pool, message(2))
    assert await relay.run_until_idle() == 2
    assert await events_in_stream(js) == 1
    dead = await pool.fetchrow("SELECT dead, last_error FROM outbox WHERE id = $1", big)
    assert dead is not None and dead["dead"] and dead["last_error"]
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE id = $1", fine) == 0
    letter = await pool.fetchrow("SELECT source, subject, msg_id, reason FROM dead_letters")
    assert letter is not None
    assert (letter["source"], letter["subject"], letter["msg_id"]) == (
        "outbox",
        "workron.evt.test",
        "test:1",
    )
    assert metrics.outbox_poison._value.get() == 1
    # Set aside for good: never claimed again.
    assert await relay.run_until_idle() == 0


async def test_transient_failure_is_retried_later(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    # No stream takes this subject: no responders, a passing failure.
    [row] = await put(pool, message(1, subject="nowhere.at.all"))
    relay = Relay(pool, nc, Metrics(), publish_timeout_s=1.0)
    assert await relay.run_until_idle() == 1
    state = await pool.fetchrow(
        "SELECT dead, attempts, available_at > now() AS later FROM outbox WHERE id = $1", row
    )
    assert state is not None and not state["dead"]
    assert (state["attempts"], state["later"]) == (1, True)
    assert await relay.run_until_idle() == 0


async def test_notify_wakes_a_running_relay(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    # A poll far beyond the test's patience: only NOTIFY can explain a prompt publish.
    relay = Relay(pool, nc, Metrics(), poll_s=60.0)
    sub = await nc.subscribe("workron.evt.wake")
    async with running(relay):
        await put(pool, message(1, subject="workron.evt.wake"))
        await sub.next_msg(timeout=5)  # the first pass may have found this one
        await put(pool, message(2, subject="workron.evt.wake"))
        woken = await sub.next_msg(timeout=5)
        assert woken.data == b"m2"


async def test_listener_is_reestablished_after_its_connection_drops(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    relay = Relay(pool, nc, Metrics(), poll_s=60.0)
    sub = await nc.subscribe("workron.evt.wake")
    async with running(relay):
        old_pid = relay.listener.server_pid
        assert old_pid is not None
        await pool.execute("SELECT pg_terminate_backend($1)", old_pid)

        async def relistening() -> bool:
            pid = relay.listener.server_pid
            return relay.listener.ready.is_set() and pid not in (None, old_pid)

        await eventually(relistening)
        await put(pool, message(1, subject="workron.evt.wake"))
        assert (await sub.next_msg(timeout=5)).data == b"m1"


@pytest.mark.parametrize("headers", [None, "{}"])
async def test_row_without_msg_id_gets_one_from_its_id(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, headers: str | None
) -> None:
    row = await pool.fetchval(
        "INSERT INTO outbox (subject, payload, headers) VALUES ($1, $2, $3) RETURNING id",
        "workron.evt.test",
        b"raw",
        headers,
    )
    assert await Relay(pool, nc, Metrics()).run_until_idle() == 1
    stored = await js.get_msg("EVENTS", 1)
    assert stored.headers and stored.headers["Nats-Msg-Id"] == f"outbox:{row}"
