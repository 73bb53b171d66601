"""The admission HTTP API against a real PostgreSQL and nats-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import pytest
from litestar import Litestar
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import ledger
from workron._embedded import NatsServer, free_port
from workron.admission.app import AppContext, create_app
from workron.telemetry import Metrics

Client = httpx.AsyncClient


def _client(app: Litestar) -> Client:
    # httpx's ASGI transport runs the app on the test's own event loop, where
    # the asyncpg pool lives (Litestar's test client uses another thread).
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admission")


@pytest.fixture
async def client(
    pool: ledger.Pool, js: JetStreamContext, nc: NATS, metrics: Metrics
) -> AsyncIterator[Client]:
    async with _client(create_app(AppContext(pool, js, metrics, nc=nc))) as c:
        yield c


async def _rows(pool: ledger.Pool) -> tuple[int, int, int]:
    """Rows in jobs, job_events and outbox: what a bad request must not change."""
    return (
        await pool.fetchval("SELECT count(*) FROM jobs"),
        await pool.fetchval("SELECT count(*) FROM job_events"),
        await pool.fetchval("SELECT count(*) FROM outbox"),
    )


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code and body["error"]["message"]
    detail: dict[str, Any] = body["error"]
    return detail


async def test_submit_creates_and_dispatches(
    client: Client, js: JetStreamContext, metrics: Metrics
) -> None:
    response = await client.post("/v1/jobs", json={"command": ["echo", "hi"], "queue": "q1"})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["state"] == "dispatched" and job["queue"] == "q1" and job["attempt"] == 1
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    fetched = await client.get(f"/v1/jobs/{job['id']}")
    assert fetched.status_code == 200 and fetched.json() == job
    # The work message went out with the commit.
    assert (await js.stream_info("WORK")).state.messages == 1
    assert metrics.registry.get_sample_value("workron_jobs_submitted_total", {"queue": "q1"}) == 1


async def test_idempotency_key_returns_the_earlier_job(
    client: Client, pool: ledger.Pool, metrics: Metrics
) -> None:
    spec = {"task": "reports.build", "payload": {"day": 1}, "idempotency_key": "day-1"}
    first = await client.post("/v1/jobs", json=spec)
    second = await client.post("/v1/jobs", json={**spec, "payload": {"day": 2}})
    assert first.status_code == 201 and second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["payload"] == {"day": 1}
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 1
    assert (
        metrics.registry.get_sample_value("workron_jobs_submitted_total", {"queue": "default"}) == 1
    )


async def test_unknown_job_is_404(client: Client) -> None:
    missing = "018f0000-0000-7000-8000-000000000000"
    for response in (
        await client.get(f"/v1/jobs/{missing}"),
        await client.post(f"/v1/jobs/{missing}/cancel"),
        await client.get(f"/v1/jobs/{missing}/events"),
    ):
        assert _error(response, 404, "not_found")["field"] == "id"
    # Not a job id at all: no such route.
    _error(await client.get("/v1/jobs/not-a-uuid"), 404, "not_found")


async def test_unknown_route_and_method_keep_the_error_shape(client: Client) -> None:
    _error(await client.get("/v2/nothing"), 404, "not_found")
    _error(await client.delete("/v1/jobs"), 405, "method_not_allowed")


async def test_list_filters_and_pages(client: Client) -> None:
    ids = []
    for _ in range(5):
        ids.append((await client.post("/v1/jobs", json={"command": ["true"], "queue": "a"})).json())
    other = (await client.post("/v1/jobs", json={"task": "t.x", "queue": "b"})).json()
    later = (
        await client.post("/v1/jobs", json={"task": "t.y", "queue": "b", "delay_s": 600})
    ).json()

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"queue": "a", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/jobs", params=params)).json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [j["id"] for j in reversed(ids)] and pages == 3

    pending = (await client.get("/v1/jobs", params={"state": "pending"})).json()
    assert [j["id"] for j in pending["items"]] == [later["id"]]
    by_task = (await client.get("/v1/jobs", params={"task": "t.x"})).json()
    assert [j["id"] for j in by_task["items"]] == [other["id"]]
    everything = (await client.get("/v1/jobs")).json()
    assert len(everything["items"]) == 7 and everything["next_cursor"] is None


async def test_cancel_then_conflict_and_history(client: Client) -> None:
    job = (await client.post("/v1/jobs", json={"command": ["sleep", "9"], "delay_s": 60})).json()
    cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = _error(await client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "conflict")
    assert again["field"] == "state"
    events = (await client.get(f"/v1/jobs/{job['id']}/events")).json()
    assert [e["kind"] for e in events] == ["submitted", "cancelled"]
    assert events[0]["detail"] == "pending"


BAD_BODIES: list[tuple[str, dict[str, Any], str | None]] = [
    ("max_attempts 0", {"command": ["x"], "max_attempts": 0}, "$.max_attempts"),
    ("unknown field", {"command": ["x"], "colour": "red"}, "$.colour"),
    ("command and task", {"command": ["x"], "task": "t.x"}, "$.command"),
    ("neither command nor task", {"queue": "default"}, "$.command"),
    ("empty argv", {"command": []}, "$.command"),
    ("shell without a string", {"command": ["ls"], "shell": True}, "$.shell"),
    (
        "run_at and delay_s",
        {"task": "t", "run_at": "2030-01-01T00:00:00Z", "delay_s": 5},
        "$.delay_s",
    ),
    ("bad queue name", {"command": ["x"], "queue": "no spaces"}, "$.queue"),
    ("negative backoff", {"command": ["x"], "backoff": {"base_s": -1}}, "$.backoff.base_s"),
    ("unknown nested field", {"command": ["x"], "backoff": {"cap": 1}}, "$.backoff.cap"),
    ("argv of numbers", {"command": ["ls", 2]}, "$.command[1]"),
    ("wrong type", {"command": ["x"], "priority": "high"}, "$.priority"),
    ("body not an object", [], "$"),  # type: ignore[list-item]
    # PostgreSQL cannot store NUL in jsonb: refused, not a 500.
    ("NUL in payload", {"task": "t", "payload": {"s": "\u0000"}}, None),
]


@pytest.mark.parametrize(
    ("body", "field"), [(b, f) for _, b, f in BAD_BODIES], ids=[n for n, _, _ in BAD_BODIES]
)
async def test_invalid_body_is_422_and_changes_nothing(
    client: Client, pool: ledger.Pool, body: Any, field: str | None
) -> None:
    before = await _rows(pool)
    error = _error(await client.post("/v1/jobs", json=body), 422, "invalid")
    assert error["field"] == field, error
    assert await _rows(pool) == before


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"state": "bogus"}, "state"),
        ({"cursor": "not-a-uuid"}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
async def test_invalid_query_is_422(client: Client, params: dict[str, Any], field: str) -> None:
    assert _error(await client.get("/v1/jobs", params=params), 422, "invalid")["field"] == field


async def test_malformed_json_is_400(client: Client, pool: ledger.Pool) -> None:
    before = await _rows(pool)
    headers = {"content-type": "application/json"}
    for raw in (b'{"command": ["x"]', b"not json", b""):
        response = await client.post("/v1/jobs", content=raw, headers=headers)
        assert _error(response, 400, "bad_json")["field"] is None
    assert await _rows(pool) == before


async def test_too_large_is_413(client: Client, pool: ledger.Pool) -> None:
    before = await _rows(pool)
    huge = json.dumps({"task": "t", "payload": "x" * (1024 * 1024)})
    response = await client.post(
        "/v1/jobs", content=huge, headers={"content-type": "application/json"}
    )
    _error(response, 413, "too_large")
    # Under the body limit, but over the payload limit.
    big_payload = {"task": "t", "payload": "x" * (600 * 1024)}
    assert _error(await client.post("/v1/jobs", json=big_payload), 413, "too_large")["field"] == (
        "$.payload"
    )
    assert await _rows(pool) == before


async def test_errors_are_counted(client: Client, metrics: Metrics) -> None:
    await client.get("/v1/jobs/018f0000-0000-7000-8000-000000000000")
    await client.post("/v1/jobs", json={"command": ["x"], "max_attempts": 0})
    await client.post("/v1/jobs", json={"command": ["x"], "max_attempts": -1})
    sample = metrics.registry.get_sample_value
    assert sample("workron_http_errors_total", {"code": "404"}) == 1
    assert sample("workron_http_errors_total", {"code": "422"}) == 2


async def test_health_metrics_and_openapi(client: Client) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "ledger": "ok", "nats": "ok"}
    await client.post("/v1/jobs", json={"command": ["true"]})
    metrics_text = (await client.get("/metrics")).text
    assert 'workron_jobs_submitted_total{queue="default"} 1.0' in metrics_text
    document = (await client.get("/openapi.json")).json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/readyz"} <= set(document["paths"])
    assert "JobSpec" in document["components"]["schemas"]


def _client_without_bus(pool: ledger.Pool, nc: NATS | None = None) -> Client:
    return _client(create_app(AppContext(pool, None, Metrics(), nc=nc)))


@pytest.mark.parametrize("how", ["nothing listens", "pool closed"])
async def test_ledger_down_is_503_with_retry_after(database_url: str, how: str) -> None:
    if how == "nothing listens":
        # min_size=0: the pool connects on first use, which is the request.
        down = await ledger.connect(
            f"postgresql://127.0.0.1:{free_port()}/workron", min_size=0, max_size=1
        )
    else:
        down = await ledger.connect(database_url, min_size=1, max_size=1)
        await down.close()
    try:
        async with _client_without_bus(down) as client:
            job_id = "018f0000-0000-7000-8000-000000000000"
            for response in (
                await client.post("/v1/jobs", json={"command": ["true"]}),
                await client.get("/v1/jobs"),
                await client.get(f"/v1/jobs/{job_id}"),
                await client.post(f"/v1/jobs/{job_id}/cancel"),
            ):
                _error(response, 503, "unavailable")
                assert response.headers["retry-after"] == "2"
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["ledger"] == "unavailable"
            # Liveness is not readiness: the process itself is fine.
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await down.close()


async def test_readyz_is_503_when_nats_is_disconnected(
    pool: ledger.Pool, nats_server: NatsServer
) -> None:
    nc = await nats.connect(nats_server.url)
    await nc.close()
    async with _client_without_bus(pool, nc) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "ledger": "ok", "nats": "disconnected"}
