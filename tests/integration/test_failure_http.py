"""The failure-handling API: retry, the worker registry, dead letters, and
the control message a cancel sends to a running job's worker."""

from __future__ import annotations

import base64
import time
from uuid import UUID

import httpx
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import bus, ledger
from workron.events import ReportFailed, Resources, report_id
from workron.liveness import CancelJob, ExecutionRef, Heartbeat
from workron.reaper.heartbeats import record

from ._reaper_support import dispatcher, submit

Client = httpx.AsyncClient


@pytest.fixture
def client(http: Client) -> Client:
    return http


async def fail(js: JetStreamContext, job_id: UUID, attempt: int) -> None:
    report = ReportFailed(
        job_id=job_id, attempt=attempt, delivery=1, worker_id="w1", at=time.time(),
        error=f"boom {attempt}",
    )  # fmt: skip
    await js.publish(
        "workron.report.default",
        msgspec.json.encode(report),
        headers={"Nats-Msg-Id": report_id(report)},
    )


async def test_retry_runs_a_failed_job_again_with_its_budget(
    client: Client, pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job_id = await submit(pool, js, max_attempts=2, backoff={"base_s": 0})
    for attempt in (1, 2):
        await fail(js, job_id, attempt)
        await dispatcher(pool, nc).run_until_idle()
    failed = (await client.get("/v1/jobs", params={"state": "failed"})).json()["items"]
    assert [(j["id"], j["error"], j["attempt"]) for j in failed] == [(str(job_id), "boom 2", 2)]

    response = await client.post(f"/v1/jobs/{job_id}/retry")
    assert response.status_code == 200, response.text
    job = response.json()
    # The next attempt, and the two attempts it was submitted with, again.
    assert (job["state"], job["attempt"], job["max_attempts"]) == ("pending", 3, 4)
    assert job["error"] is None and job["token"] == "3.0"
    history = (await client.get(f"/v1/jobs/{job_id}/events")).json()
    errors = [(e["kind"], e["attempt"], e["detail"]) for e in history]
    # Every attempt's error is in the history.
    assert ("retrying", 1, "boom 1 (attempt 2 in 0.000s)") in errors
    assert ("failed", 2, "boom 2") in errors
    assert errors[-1][0] == "retried"

    await dispatcher(pool, nc).run_until_idle()
    stored = await js.get_last_msg("WORK", "workron.work.default")
    assert (stored.headers or {})["Nats-Msg-Id"] == f"work:{job_id}:3"
    # Not finished: no second retry.
    again = await client.post(f"/v1/jobs/{job_id}/retry")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


async def test_retry_refuses_what_cannot_be_retried(
    client: Client, pool: ledger.Pool, js: JetStreamContext
) -> None:
    unknown = await client.post("/v1/jobs/0190a0a0-0000-7000-8000-000000000000/retry")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    running = await submit(pool, js)
    response = await client.post(f"/v1/jobs/{running}/retry")
    assert response.status_code == 409 and "dispatched" in response.json()["error"]["message"]
    await pool.execute("UPDATE jobs SET state = 'succeeded' WHERE id = $1", running)
    assert (await client.post(f"/v1/jobs/{running}/retry")).status_code == 409
    cancelled = await submit(pool, js)
    assert (await client.post(f"/v1/jobs/{cancelled}/cancel")).status_code == 200
    response = await client.post(f"/v1/jobs/{cancelled}/retry")
    assert response.status_code == 200 and response.json()["attempt"] == 2


async def test_workers_lists_the_registry(client: Client, pool: ledger.Pool) -> None:
    beat = Heartbeat(
        worker_id="w-http",
        instance="i",
        interval_s=2.0,
        queues=["default", "gpu"],
        hostname="box-7",
        resources=Resources(cpu=4, memory_mb=2048, vram_mb=0),
        tags={"zone": "a"},
        started_at=time.time() - 60,
        executions=[ExecutionRef(job_id=UUID(int=1), attempt=1, delivery=2, ack="x")],
    )
    await record(pool, [beat], bus.LEASE_S)
    await record(pool, [msgspec.structs.replace(beat, worker_id="w-old", executions=[])], 30)
    await pool.execute("UPDATE workers SET state = 'dead' WHERE id = 'w-old'")
    response = await client.get("/v1/workers")
    assert response.status_code == 200, response.text
    workers = {w["id"]: w for w in response.json()}
    assert set(workers) == {"w-http", "w-old"}
    w = workers["w-http"]
    assert (w["state"], w["queues"], w["hostname"], w["tags"]) == (
        "alive", ["default", "gpu"], "box-7", {"zone": "a"}
    )  # fmt: skip
    assert w["running"] == 1 and w["jobs"] == [
        {"job_id": str(UUID(int=1)), "attempt": 1, "delivery": 2}
    ]
    assert w["resources"] == {"cpu": 4.0, "memory_mb": 2048, "vram_mb": 0}
    assert w["seen_s_ago"] < 5 and w["heartbeat_s"] == 2.0
    dead = (await client.get("/v1/workers", params={"state": "dead"})).json()
    assert [x["id"] for x in dead] == ["w-old"]
    bad = await client.get("/v1/workers", params={"state": "zombie"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "state"


async def test_dead_letters_are_listed_newest_first(client: Client, pool: ledger.Pool) -> None:
    for i in range(3):
        await pool.execute(
            "INSERT INTO dead_letters (source, subject, msg_id, reason, body)"
            " VALUES ($1, 'workron.work.q', $2, 'poison', $3)",
            "WORK/work-q" if i else "reports",
            f"m{i}",
            f"body {i}".encode(),
        )
    first = (await client.get("/v1/dead-letters", params={"limit": 2})).json()
    assert [d["msg_id"] for d in first["items"]] == ["m2", "m1"]
    assert base64.b64decode(first["items"][0]["body"]) == b"body 2"
    rest = (await client.get("/v1/dead-letters", params={"cursor": first["next_cursor"]})).json()
    assert [d["msg_id"] for d in rest["items"]] == ["m0"] and rest["next_cursor"] is None
    only = (await client.get("/v1/dead-letters", params={"source": "reports"})).json()
    assert [(d["source"], d["reason"]) for d in only["items"]] == [("reports", "poison")]


async def test_cancel_tells_the_worker_that_runs_the_job(
    client: Client, pool: ledger.Pool, js: JetStreamContext
) -> None:
    running = await submit(pool, js)
    await pool.execute(
        "UPDATE jobs SET state = 'running', worker_id = 'w.host-9', delivery = 1 WHERE id = $1",
        running,
    )
    waiting = await submit(pool, js)
    delayed = await submit(pool, js, delay_s=3600)
    for job_id in (running, waiting, delayed):
        response = await client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 200 and response.json()["state"] == "cancelled"
    # The running job's worker, by its own subject (dots cannot be in a token).
    stored = await js.get_last_msg("CONTROL", "workron.control.w_host-9")
    cancel = msgspec.json.decode(stored.data or b"", type=CancelJob)
    assert (cancel.job_id, cancel.attempt) == (running, 1)
    # A job no worker has started yet: every worker hears of it.
    stored = await js.get_last_msg("CONTROL", bus.CONTROL_BROADCAST)
    assert msgspec.json.decode(stored.data or b"", type=CancelJob).job_id == waiting
    # Nothing for a job that was not dispatched.
    assert (await js.stream_info("CONTROL")).state.messages == 2
