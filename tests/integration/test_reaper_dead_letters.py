"""JetStream's max-delivery and termination advisories become dead letters."""

from __future__ import annotations

import contextlib

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from workron import ledger
from workron.dispatcher import Dispatcher
from workron.telemetry import Metrics
from workron.worker import Worker, builtin

from ._reaper_support import fast_reaper, leading, running, until


async def letters(pool: ledger.Pool) -> list[ledger.Record]:
    rows: list[ledger.Record] = await pool.fetch("SELECT * FROM dead_letters ORDER BY id")
    return rows


async def test_a_message_past_max_deliveries_is_recorded_with_its_body(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    await js.add_consumer(
        "WORK",
        ConsumerConfig(
            durable_name="work-dl",
            filter_subject="workron.work.dl",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_deliver=2,
        ),
    )
    ack = await js.publish("workron.work.dl", b"never works", headers={"Nats-Msg-Id": "poison-1"})
    metrics = Metrics()
    reaper = fast_reaper(pool, nc, metrics)
    async with running(reaper):
        await leading(reaper)  # listening to advisories since before that
        consumer = await js.pull_subscribe_bind("work-dl", stream="WORK")
        for _ in range(2):
            [msg] = await consumer.fetch(1, timeout=5)
            await msg.nak()
        # The server gives up when it would deliver a third time.
        with contextlib.suppress(TimeoutError):
            await consumer.fetch(1, timeout=0.5)
        [letter] = await until(lambda: letters(pool))
    assert letter["source"] == "WORK/work-dl"
    assert (letter["subject"], letter["msg_id"]) == ("workron.work.dl", "poison-1")
    assert bytes(letter["body"]) == b"never works"
    assert "after 2 deliveries (MaxDeliver)" in letter["reason"]
    # Recorded, so out of the work queue, which would keep it forever.
    try:
        await js.get_msg("WORK", ack.seq)
        raise AssertionError("the dead message is still in WORK")
    except NotFoundError:
        pass
    assert (
        metrics.registry.get_sample_value("workron_dead_letters_total", {"source": "advisory"}) == 1
    )


async def test_a_terminated_work_message_is_recorded(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    """A worker terminates a work message it cannot decode: the work queue
    drops it at once, so the advisory is all that is left to record."""
    reaper = fast_reaper(pool, nc)
    async with running(reaper):
        await leading(reaper)
        await js.publish("workron.work.default", b'{"type": "work", "job_id": "not a uuid"}')
        await Worker(nc=nc, registry=builtin, worker_id="w-dl").run(burst=True)
        [letter] = await until(lambda: letters(pool))
    assert letter["source"] == "WORK/work-default"
    assert letter["reason"].startswith("terminated by the consumer after 1 deliveries")


async def test_consumers_that_record_their_own_are_not_recorded_twice(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    reaper = fast_reaper(pool, nc)
    async with running(reaper):
        await leading(reaper)
        await js.publish(
            "workron.report.default", b"not a report", headers={"Nats-Msg-Id": "bad-report"}
        )
        await Dispatcher(pool, nc, Metrics()).run_until_idle()
        [letter] = await until(lambda: letters(pool))

        async def handled() -> bool:  # the termination advisory came, and went
            return reaper.advisories_handled == 1

        await until(handled)
        assert len(await letters(pool)) == 1
    assert (letter["source"], letter["msg_id"]) == ("reports", "bad-report")
