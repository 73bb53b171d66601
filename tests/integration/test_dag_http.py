"""The DAG endpoints over HTTP: atomic submission, 422s that write nothing, show, cancel."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import ledger
from workron.client import Client as SDK
from workron.telemetry import Metrics

from ._dag_support import System


async def _rows(pool: ledger.Pool) -> tuple[int, ...]:
    counts = []
    for table in ("dags", "jobs", "job_deps", "job_events", "outbox"):
        counts.append(await pool.fetchval(f"SELECT count(*) FROM {table}"))
    return tuple(counts)


def _job(ref: str, *deps: Any, **fields: Any) -> dict[str, Any]:
    return {"ref": ref, "command": ["true"], "depends_on": list(deps), **fields}


async def _refused(
    http: httpx.AsyncClient, pool: ledger.Pool, body: Any, field: str, text: str, status: int = 422
) -> None:
    before = await _rows(pool)
    response = await http.post("/v1/dags", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    assert text in error["message"], error
    assert await _rows(pool) == before


async def test_submit_returns_refs_and_writes_everything(
    http: httpx.AsyncClient, pool: ledger.Pool
) -> None:
    body = {"name": "etl", "jobs": [_job("extract"), _job("load", "extract")]}
    response = await http.post("/v1/dags", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["created"] is True and set(created["jobs"]) == {"extract", "load"}
    assert response.headers["location"] == f"/v1/dags/{created['id']}"
    assert await _rows(pool) == (1, 2, 1, 2, 0)  # the ready job's work was published

    shown = (await http.get(f"/v1/dags/{created['id']}")).json()
    assert shown["name"] == "etl" and shown["state"] == "running"
    assert shown["counts"] == {"dispatched": 1, "blocked": 1}
    assert shown["edges"] == [{"parent": "extract", "child": "load", "allow_failure": False}]
    assert shown["critical_path"] == ["extract", "load"] and shown["critical_path_by"] == "nodes"


async def test_submitted_jobs_are_counted_by_queue(
    http: httpx.AsyncClient, metrics: Metrics
) -> None:
    body = {"jobs": [_job("a", queue="etl"), _job("b", "a", queue="etl"), _job("c", queue="ml")]}
    for _ in range(2):  # the second is the same DAG again: nothing new to count
        response = await http.post("/v1/dags", json={**body, "idempotency_key": "counted"})
        assert response.status_code in (200, 201), response.text
    submitted = "workron_jobs_submitted_total"
    assert metrics.registry.get_sample_value(submitted, {"queue": "etl"}) == 2
    assert metrics.registry.get_sample_value(submitted, {"queue": "ml"}) == 1


async def test_idempotency_key_returns_the_first_dag(
    http: httpx.AsyncClient, pool: ledger.Pool
) -> None:
    body = {"idempotency_key": "nightly-1", "jobs": [_job("a"), _job("b", "a")]}
    first = await http.post("/v1/dags", json=body)
    again = await http.post("/v1/dags", json=body)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == {**first.json(), "created": False}
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 2


async def test_invalid_dags_are_refused_and_write_nothing(
    http: httpx.AsyncClient, pool: ledger.Pool
) -> None:
    await _refused(
        http, pool, {"jobs": [_job("a", "b"), _job("b", "a")]}, "$.jobs[0].depends_on[0]",
        "dependency cycle: a -> b -> a",
    )  # fmt: skip
    await _refused(
        http, pool, {"jobs": [_job("a", "a")]}, "$.jobs[0].depends_on[0]", "depends on itself"
    )
    await _refused(
        http, pool, {"jobs": [_job("a"), _job("b", "zz")]}, "$.jobs[1].depends_on[0]", "'zz'"
    )
    await _refused(http, pool, {"jobs": [_job("a"), _job("a")]}, "$.jobs[1].ref", "used twice")
    await _refused(http, pool, {"jobs": []}, "$.jobs", "length")
    await _refused(http, pool, {"jobs": [_job(f"n{i}") for i in range(10_001)]}, "$.jobs", "10000")
    await _refused(
        http, pool, {"jobs": [{"ref": "a", "task": "t", "command": ["x"]}]}, "$.jobs[0].command",
        "exactly one",
    )  # fmt: skip
    await _refused(http, pool, {"jobs": [_job("a/b")]}, "$.jobs[0].ref", "match")
    await _refused(http, pool, {"jobs": [_job("a", bogus=1)]}, "$.jobs[0].bogus", "unknown")


async def test_an_unknown_job_id_rolls_the_whole_dag_back(
    http: httpx.AsyncClient, pool: ledger.Pool
) -> None:
    ghost = "0190d1c0-0000-7000-8000-00000000dead"
    body = {"jobs": [_job(f"n{i}") for i in range(50)] + [_job("last", "n0", ghost)]}
    await _refused(http, pool, body, "$.jobs[50].depends_on[1]", f"job {ghost} does not exist")
    single = {"command": ["true"], "depends_on": [ghost]}
    before = await _rows(pool)
    response = await http.post("/v1/jobs", json=single)
    assert response.status_code == 422 and response.json()["error"]["field"] == "$.depends_on[0]"
    assert await _rows(pool) == before


async def test_depending_on_finished_jobs_across_dags(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, http: httpx.AsyncClient
) -> None:
    system = System(pool, nc)
    first = (await http.post("/v1/dags", json={"jobs": [
        {"ref": "ok", "task": "workron.echo", "payload": 7},
        {"ref": "bad", "task": "t.fail"},
    ]})).json()  # fmt: skip
    await system.settle(list(first["jobs"].values()))
    ok, bad = first["jobs"]["ok"], first["jobs"]["bad"]
    second = (await http.post("/v1/dags", json={"jobs": [
        {"ref": "uses", "task": "t.parents", "depends_on": [ok]},
        {"ref": "doomed", "task": "workron.noop", "depends_on": [bad]},
        {"ref": "after", "task": "workron.noop", "depends_on": ["doomed"]},
    ]})).json()  # fmt: skip
    shown = (await http.get(f"/v1/dags/{second['id']}")).json()
    states = {n["ref"]: n["state"] for n in shown["nodes"]}
    assert states == {"uses": "dispatched", "doomed": "cancelled", "after": "cancelled"}
    errors = {n["ref"]: n["error"] for n in shown["nodes"]}
    assert errors["after"] == errors["doomed"] == f"upstream_failed: {bad}"
    assert {e["parent"] for e in shown["edges"]} == {ok, bad, "doomed"}
    await system.settle(list(second["jobs"].values()))
    result = (await http.get(f"/v1/jobs/{second['jobs']['uses']}")).json()["result"]
    assert result == {"parents": {ok: 7}, "omitted": []}


async def test_cancel_and_not_found(
    http: httpx.AsyncClient, pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    body = {"jobs": [_job("a", delay_s=600), _job("b", "a")]}
    created = (await http.post("/v1/dags", json=body)).json()
    cancelled = await http.post(f"/v1/dags/{created['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["counts"] == {"cancelled": 2}
    assert cancelled.json()["state"] == "cancelled"
    again = await http.post(f"/v1/dags/{created['id']}/cancel")
    assert again.status_code == 409
    missing = await http.get("/v1/dags/0190d1c0-0000-7000-8000-000000000000")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "id"
    assert (await http.get("/v1/dags/nope")).status_code in (404, 422)


async def test_sdk_submit_get_and_wait(
    http: httpx.AsyncClient, pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    async with SDK(http=http) as sdk:
        submitted = await sdk.submit_dag(
            jobs=[{"ref": "a", "task": "workron.echo", "payload": 1},
                  {"ref": "b", "task": "workron.echo", "depends_on": ["a"]}],
            name="sdk",
        )  # fmt: skip
        await system.settle(list(submitted.jobs.values()))
        done = await sdk.wait_dag(submitted.id, timeout=5)
        assert done.state == "succeeded" and done.name == "sdk"
        assert [n.ref for n in done.nodes] == ["a", "b"]


async def test_a_dag_body_may_exceed_a_plain_jobs_limit(
    http: httpx.AsyncClient, pool: ledger.Pool
) -> None:
    # 1.5 MiB: over the 1 MiB of POST /v1/jobs, within the 16 MiB of a DAG.
    jobs = [{"ref": f"n{i}", "task": "t", "payload": "x" * 150_000} for i in range(10)]
    response = await http.post("/v1/dags", json={"jobs": jobs})
    assert response.status_code == 201, response.text
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 10


async def test_progress_gives_counts_and_timings_without_nodes(
    http: httpx.AsyncClient, pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    body = {"name": "followed", "jobs": [
        {"ref": "a", "task": "workron.echo", "payload": 1},
        {"ref": "b", "task": "workron.echo", "depends_on": ["a"]},
        {"ref": "c", "task": "t.fail", "depends_on": ["a"]},
        {"ref": "d", "task": "workron.noop", "depends_on": ["c"]},
    ]}  # fmt: skip
    created = (await http.post("/v1/dags", json=body)).json()
    response = await http.get(f"/v1/dags/{created['id']}/progress")
    assert response.status_code == 200, response.text
    running = response.json()
    assert "nodes" not in running and "edges" not in running
    assert (running["name"], running["state"], running["total"], running["finished"]) == (
        "followed", "running", 4, 0,
    )  # fmt: skip
    assert running["counts"] == {"dispatched": 1, "blocked": 3}
    assert running["started_at"] is None and running["finished_at"] is None

    await system.settle(list(created["jobs"].values()))
    async with SDK(http=http) as sdk:
        done = await sdk.dag_progress(created["id"])
        shown = await sdk.get_dag(created["id"])
    assert (done.state, done.total, done.finished) == ("failed", 4, 4)
    assert done.counts == shown.counts == {"succeeded": 2, "failed": 1, "cancelled": 1}
    assert done.started_at == min(n.started_at for n in shown.nodes if n.started_at)
    assert done.finished_at == max(n.finished_at for n in shown.nodes if n.finished_at)
    assert done.elapsed_s == pytest.approx((done.finished_at - done.created_at).total_seconds())

    missing = await http.get("/v1/dags/0190d1c0-0000-7000-8000-000000000000/progress")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "id"
