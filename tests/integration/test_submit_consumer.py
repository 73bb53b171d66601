"""The workron.submit.* consumer and the admission service, on real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import httpx
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import ledger
from workron._embedded import free_port
from workron._ids import uuid7
from workron.admission.consumer import SubmitConsumer
from workron.admission.service import Admission
from workron.events import JobSpec, Submission, Work
from workron.telemetry import Metrics

_encode = msgspec.json.Encoder()


async def _publish(
    js: JetStreamContext, body: bytes | Submission, msg_id: str | None = None
) -> None:
    data = body if isinstance(body, bytes) else _encode.encode(body)
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await js.publish("workron.submit.default", data, headers=headers)


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def _count(pool: ledger.Pool, table: str) -> int:
    value: int = await pool.fetchval(f"SELECT count(*) FROM {table}")  # test-only SQL
    return value


async def _submit_stream_empty(js: JetStreamContext) -> bool:
    info = await js.consumer_info("SUBMIT", "admission")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_submissions_become_dispatched_jobs_in_one_batch(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    metrics = Metrics()
    subs = [Submission(id=uuid7(), job=JobSpec(task="t.add", payload={"i": i})) for i in range(40)]
    for sub in subs:
        await _publish(js, sub, msg_id=f"sub:{sub.id}")
    consumer = SubmitConsumer(pool, nc, metrics)
    assert await consumer.run_until_idle() == 40
    await consumer.close()

    rows = await pool.fetch("SELECT id, state, traceparent FROM jobs ORDER BY id")
    assert [r["id"] for r in rows] == sorted(s.id for s in subs)
    assert {r["state"] for r in rows} == {"dispatched"}
    assert all(r["traceparent"] for r in rows)  # a trace was started for each
    # Work messages went out with the commit, one per job.
    work = await js.pull_subscribe("workron.work.default", durable="probe", stream="WORK")
    messages = await work.fetch(40, timeout=5)
    assert {msgspec.json.decode(m.data, type=Work).job_id for m in messages} == {s.id for s in subs}
    # Their PubAcks came, so their outbox rows are gone: the relay has nothing to do.
    assert await _count(pool, "outbox") == 0
    assert await _submit_stream_empty(js)
    sample = metrics.registry.get_sample_value
    assert sample("workron_jobs_submitted_total", {"queue": "default"}) == 40
    # What was waiting was taken together, not one transaction per message.
    batches = sample("workron_batch_size_count", {"stage": "admission.submit"})
    assert batches is not None and batches <= 3


async def test_redelivery_never_creates_a_second_job(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    sub = Submission(id=uuid7(), job=JobSpec(command=["echo", "once"]))
    # Two copies that broker dedupe cannot catch (different Nats-Msg-Id), as
    # when a sender retries after its dedupe window, or JetStream redelivers.
    await _publish(js, sub, msg_id="first")
    await _publish(js, sub, msg_id="second")
    consumer = SubmitConsumer(pool, nc, Metrics())
    assert await consumer.run_until_idle() == 2
    # And once more, after the first was written and acked.
    await _publish(js, sub, msg_id="third")
    assert await consumer.run_until_idle() == 1
    await consumer.close()
    assert await _count(pool, "jobs") == 1
    assert await _count(pool, "job_events") == 1
    assert (await js.stream_info("WORK")).state.messages == 1
    assert await _submit_stream_empty(js)


async def test_poison_is_terminated_and_recorded(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    metrics = Metrics()
    good = Submission(id=uuid7(), job=JobSpec(command=["true"]))
    both = Submission(id=uuid7(), job=JobSpec(command=["true"], task="t.x"))
    # Valid for msgspec and plan(), refused by PostgreSQL (NUL in jsonb):
    # it must not take the rest of its batch down with it.
    nul = Submission(id=uuid7(), job=JobSpec(task="t.x", payload={"s": "\u0000"}))
    huge = Submission(id=uuid7(), job=JobSpec(task="t.x", payload="x" * (600 * 1024)))
    await _publish(js, b"{not json", msg_id="garbage")
    await _publish(js, b'{"type": "submit", "id": "nope", "job": {}}', msg_id="bad-id")
    for sub in (both, good, nul, huge):
        await _publish(js, sub, msg_id=str(sub.id))

    consumer = SubmitConsumer(pool, nc, metrics)
    assert await consumer.run_until_idle() == 6
    await consumer.close()

    assert [r["id"] for r in await pool.fetch("SELECT id FROM jobs")] == [good.id]
    dead = {
        r["msg_id"]: r
        for r in await pool.fetch("SELECT source, subject, msg_id, reason, body FROM dead_letters")
    }
    assert set(dead) == {"garbage", "bad-id", str(both.id), str(nul.id), str(huge.id)}
    assert all(r["source"] == "admission" for r in dead.values())
    assert all(r["subject"] == "workron.submit.default" for r in dead.values())
    assert dead["garbage"]["body"] == b"{not json"
    assert "$.id" in dead["bad-id"]["reason"]
    assert "$.command" in dead[str(both.id)]["reason"]
    assert dead[str(huge.id)]["reason"].startswith("too_large")
    assert dead[str(nul.id)]["reason"].startswith("invalid")
    # Terminated, so never redelivered.
    assert await _submit_stream_empty(js)
    assert (
        metrics.registry.get_sample_value("workron_dead_letters_total", {"source": "admission"})
        == 5
    )


async def test_ledger_outage_holds_submissions_and_never_terminates(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    down = await ledger.connect(
        f"postgresql://127.0.0.1:{free_port()}/workron", min_size=0, max_size=1
    )
    sub = Submission(id=uuid7(), job=JobSpec(command=["true"]))
    await _publish(js, sub, msg_id="during-outage")
    stalled = SubmitConsumer(down, nc, Metrics())
    task = asyncio.create_task(stalled.run())

    async def held() -> bool:
        info = await js.consumer_info("SUBMIT", "admission")
        return info.num_ack_pending == 1 and info.num_pending == 0

    try:
        await _eventually(held)
    finally:
        stalled.stop()
        await asyncio.wait_for(task, timeout=10)
        await down.close()
    assert await _count(pool, "dead_letters") == 0

    # Handed back with a delayed nak: a healthy instance writes it.
    healthy = SubmitConsumer(pool, nc, Metrics())

    async def written() -> bool:
        await healthy.run_until_idle()
        return await _count(pool, "jobs") == 1

    await _eventually(written)
    await healthy.close()
    assert await _submit_stream_empty(js)


async def test_admission_service_serves_http_and_consumes(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    admission = Admission(pool, nc, Metrics(), host="127.0.0.1", port=0)
    task = asyncio.create_task(admission.run())
    try:
        await asyncio.wait_for(admission.started.wait(), timeout=10)
        base = f"http://127.0.0.1:{admission.bound_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).status_code == 200
            created = await client.post("/v1/jobs", json={"command": ["echo", "hi"]})
            assert created.status_code == 201, created.text
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text

        sub = Submission(id=uuid7(), job=JobSpec(task="t.x"))
        await _publish(js, sub, msg_id=str(sub.id))

        async def consumed() -> bool:
            return await pool.fetchval("SELECT count(*) FROM jobs WHERE id = $1", sub.id) == 1

        await _eventually(consumed)
    finally:
        admission.stop()
        await asyncio.wait_for(task, timeout=15)
    assert task.exception() is None
    # The caller's connections are left open for the caller to close.
    assert nc.is_connected and await pool.fetchval("SELECT 1") == 1


async def test_admission_stop_before_start_returns(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    admission = Admission(pool, nc, Metrics(), host="127.0.0.1", port=0)
    admission.stop()
    await asyncio.wait_for(admission.run(), timeout=10)


async def test_admission_port_in_use_is_an_error(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        admission = Admission(pool, nc, Metrics(), host="127.0.0.1", port=port)
        with pytest.raises(OSError):
            await asyncio.wait_for(admission.run(), timeout=10)
