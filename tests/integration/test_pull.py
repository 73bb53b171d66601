"""The batch puller against a real nats-server: one request open at a time,
opened ahead of the next fetch when asked."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron._pull import Puller

SUBJECT = "workron.report.default"


async def publish(js: JetStreamContext, *bodies: bytes) -> None:
    for body in bodies:
        await js.publish(SUBJECT, body)


async def pending(js: JetStreamContext) -> tuple[int, int]:
    """(delivered and not acked, still waiting in the stream) for the dispatcher's consumer."""
    info = await js.consumer_info("REPORTS", "dispatcher")
    return info.num_ack_pending, info.num_pending


async def until(js: JetStreamContext, expected: tuple[int, int]) -> None:
    for _ in range(100):
        if await pending(js) == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"consumer stayed at {await pending(js)}, not {expected}")


async def test_fetch_waits_for_the_first_message_then_takes_what_is_waiting(
    nc: NATS, js: JetStreamContext
) -> None:
    async with Puller(nc, "REPORTS", "dispatcher") as puller:
        assert await puller.fetch(10, wait=0) == []  # nothing waiting: no wait either
        waiting = asyncio.create_task(puller.fetch(10, wait=5))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await publish(js, b"1")
        first = await asyncio.wait_for(waiting, timeout=5)
        assert [m.data for m in first] == [b"1"]
        await publish(js, b"2", b"3", b"4")
        rest = await puller.fetch(2, wait=5)
        assert [m.data for m in rest] == [b"2", b"3"]  # no more than asked for
        assert [m.data for m in await puller.fetch(10, wait=5)] == [b"4"]


async def test_an_empty_request_ends_with_nothing_after_its_wait(
    nc: NATS, js: JetStreamContext
) -> None:
    async with Puller(nc, "REPORTS", "dispatcher") as puller:
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await puller.fetch(10, wait=0.3) == []
        assert 0.25 <= loop.time() - began < 1.2  # the server's 408, not the local margin
        await publish(js, b"late")
        assert [m.data for m in await puller.fetch(10, wait=5)] == [b"late"]


async def test_asked_ahead_messages_arrive_before_the_fetch(nc: NATS, js: JetStreamContext) -> None:
    async with Puller(nc, "REPORTS", "dispatcher") as puller:
        await puller.ask(10, wait=5)
        await puller.ask(10, wait=5)  # one is open already: no second request
        await publish(js, b"a")
        await until(js, (1, 0))  # delivered to this side with no fetch running
        # A request that delivered is over; the next ask opens another.
        await puller.ask(1, wait=5)
        await publish(js, b"b", b"c")
        await until(js, (2, 1))  # the new request took one: batch 1
        assert [m.data for m in await puller.fetch(10, wait=0)] == [b"a", b"b"]
        assert [m.data for m in await puller.fetch(10, wait=0)] == [b"c"]
