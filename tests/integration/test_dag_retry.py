"""Retrying inside a DAG over HTTP: the descendants the cascade cancelled are
reopened, run when the retried job succeeds, and are cancelled again when it
fails again; a job an upstream failure keeps from running is refused."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import httpx
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import dags, ledger

from ._dag_support import Finished, System, echo, spec


async def _history(pool: ledger.Pool, job_id: UUID) -> list[tuple[str, str | None]]:
    rows = await pool.fetch(
        "SELECT kind, detail FROM job_events WHERE job_id = $1 ORDER BY id", job_id
    )
    return [(r["kind"], r["detail"]) for r in rows]


async def _without_resolver(system: System, ids: list[UUID]) -> None:
    """Run until ``ids`` are terminal with the resolver service stopped: the
    dispatcher's inline resolution does the cascade, and every job.finished
    waits in the resolver's consumer."""
    for _ in range(100):
        await system.relay.run_until_idle()
        await system.worker.run(burst=True)
        await system.dispatcher.run_until_idle()
        if await system.open(ids) == 0:
            return
    raise AssertionError("jobs still open")


async def test_retrying_a_failed_job_reopens_and_runs_its_descendants(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, http: httpx.AsyncClient
) -> None:
    system = System(pool, nc)
    seen = Finished()
    sub = await nc.subscribe("workron.evt.job.finished", cb=seen.on_msg)
    dag = await system.submit(
        spec(
            [
                {"ref": "a", "task": "t.fail_once"},
                {"ref": "b", "task": "t.parents", "depends_on": ["a"]},
                echo("c", "b"),
            ]
        )
    )
    a, b, c = (dag.jobs[r] for r in "abc")
    await _without_resolver(system, [a, b, c])
    assert await system.states(dag) == {"a": "failed", "b": "cancelled", "c": "cancelled"}

    response = await http.post(f"/v1/jobs/{a}/retry")
    assert response.status_code == 200, response.text
    assert (response.json()["state"], response.json()["attempt"]) == ("pending", 2)
    for job_id in (b, c):
        job = await system.job(job_id)
        assert (job["state"], job["unmet_deps"], job["error"], job["finished_at"]) == (
            "blocked", 1, None, None,
        )  # fmt: skip
        assert job["attempt"] == 2  # the cancelled attempt's job.finished is on the bus
        assert (await _history(pool, job_id))[-1] == ("reopened", f"upstream job {a} retried")
    retried = (await _history(pool, a))[-1]
    assert retried[0] == "retried" and "2 downstream job(s) reopened" in (retried[1] or "")
    assert await pool.fetchval("SELECT count(*) FROM job_deps WHERE NOT resolved") == 2

    # The superseded job.finished events (a failed, b and c cancelled) reach
    # the resolver only now: they must change nothing.
    handled = 0
    async with asyncio.timeout(10):  # a stored message may reach the consumer a moment later
        while True:
            handled += await system.resolvers[0].run_until_idle()
            info = await js.consumer_info("EVENTS", "resolver")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
    assert handled > 0
    assert await system.states(dag) == {"a": "pending", "b": "blocked", "c": "blocked"}

    await system.settle([a, b, c])
    assert set((await system.states(dag)).values()) == {"succeeded"}
    assert (await system.job(b))["result"]["parents"] == {"a": {"attempt": 2}}
    assert await pool.fetchval("SELECT count(*) FROM job_deps WHERE NOT resolved") == 0
    for job_id in (b, c):
        kinds = [kind for kind, _ in await _history(pool, job_id)]
        assert kinds.count("released") == 1 and kinds.count("cancelled") == 1
    shown = await dags.get(pool, dag.id)
    assert shown.state == "succeeded" and shown.counts == {"succeeded": 3}
    await nc.flush()
    await sub.unsubscribe()
    assert seen.states[b] == ["cancelled", "succeeded"]


async def test_a_second_failure_cancels_the_reopened_jobs_again(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, http: httpx.AsyncClient
) -> None:
    system = System(pool, nc)
    dag = await system.submit(
        spec([{"ref": "a", "task": "t.fail"}, echo("b", "a"), echo("c", "b")])
    )
    ids = list(dag.jobs.values())
    await system.settle(ids)
    assert (await http.post(f"/v1/jobs/{dag.jobs['a']}/retry")).status_code == 200
    await system.settle(ids)
    assert await system.states(dag) == {"a": "failed", "b": "cancelled", "c": "cancelled"}
    for ref in "bc":
        job = await system.job(dag.jobs[ref])
        assert job["error"] == f"upstream_failed: {dag.jobs['a']}"
        kinds = [kind for kind, _ in await _history(pool, dag.jobs[ref])]
        assert kinds == ["submitted", "cancelled", "reopened", "cancelled"]
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE unmet_deps < 0") == 0


async def test_a_join_with_another_failed_parent_stays_cancelled(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, http: httpx.AsyncClient
) -> None:
    system = System(pool, nc)
    dag = await system.submit(
        spec(
            [
                {"ref": "a", "task": "t.fail_once"},
                {"ref": "x", "task": "t.fail"},
                echo("ok"),
                echo("join", "a", "x"),
                echo("below", "join"),
                echo("side", "a", "ok"),
            ]
        )
    )
    a, x = dag.jobs["a"], dag.jobs["x"]
    await system.settle(list(dag.jobs.values()))
    response = await http.post(f"/v1/jobs/{a}/retry")
    assert response.status_code == 200, response.text
    # x failed too: the join, and what it dooms, wait for a retry of x.
    for ref in ("join", "below"):
        job = await system.job(dag.jobs[ref])
        assert (job["state"], job["error"]) == ("cancelled", f"upstream_failed: {x}")
    side = await system.job(dag.jobs["side"])
    assert (side["state"], side["unmet_deps"]) == ("blocked", 1)  # ok has succeeded
    await system.settle(list(dag.jobs.values()))
    assert await system.states(dag) == {
        "a": "succeeded", "x": "failed", "ok": "succeeded",
        "join": "cancelled", "below": "cancelled", "side": "succeeded",
    }  # fmt: skip

    # Retrying the job the cascade cancelled names the one to retry.
    before = await system.job(dag.jobs["below"]), await _history(pool, dag.jobs["below"])
    refused = await http.post(f"/v1/jobs/{dag.jobs['below']}/retry")
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "conflict" and error["field"] == "state"
    assert f"retry {x} instead" in error["message"]
    assert (await system.job(dag.jobs["below"]), await _history(pool, dag.jobs["below"])) == before


async def test_allow_failure_edges_are_left_alone(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, http: httpx.AsyncClient
) -> None:
    system = System(pool, nc)
    dag = await system.submit(
        spec(
            [
                {"ref": "a", "task": "t.fail_once"},
                {"ref": "cleanup", "task": "t.parents", "depends_on": ["a"], "allow_failure": True},
                echo("strict", "a"),
                # Released by strict's cancel: it ran, and is not run again.
                echo("after", {"job": "strict", "allow_failure": True}),
            ]
        )
    )
    ids = list(dag.jobs.values())
    await system.settle(ids)
    assert await system.states(dag) == {
        "a": "failed", "cleanup": "succeeded", "strict": "cancelled", "after": "succeeded",
    }  # fmt: skip
    untouched = {ref: await system.job(dag.jobs[ref]) for ref in ("cleanup", "after")}
    assert (await http.post(f"/v1/jobs/{dag.jobs['a']}/retry")).status_code == 200
    assert (await system.job(dag.jobs["strict"]))["state"] == "blocked"
    await system.settle(ids)
    assert set((await system.states(dag)).values()) == {"succeeded"}
    for ref, job in untouched.items():
        assert await system.job(dag.jobs[ref]) == job
    assert (await system.job(dag.jobs["cleanup"]))["result"]["parents"] == {"a": None}


async def test_a_fan_of_ten_thousand_is_reopened_in_one_retry(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, http: httpx.AsyncClient
) -> None:
    system = System(pool, nc)
    nodes: list[dict[str, Any]] = [{"ref": "root", "task": "t.fail"}]
    nodes += [
        {"ref": f"m{i}", "task": "workron.noop", "depends_on": ["root"]} for i in range(9_999)
    ]
    dag = await system.submit(spec(nodes))
    root = dag.jobs["root"]
    await system.settle([root])
    progress = await dags.progress(pool, dag.id)
    assert progress.counts == {"failed": 1, "cancelled": 9_999}
    assert (await http.post(f"/v1/jobs/{root}/retry")).status_code == 200
    progress = await dags.progress(pool, dag.id)
    assert progress.counts == {"pending": 1, "blocked": 9_999}
    assert await pool.fetchval("SELECT count(*) FROM job_deps WHERE NOT resolved") == 9_999
    await system.settle([root])
    progress = await dags.progress(pool, dag.id)
    assert progress.counts == {"failed": 1, "cancelled": 9_999} and progress.state == "failed"
    assert await pool.fetchval("SELECT count(*) FROM job_deps WHERE NOT resolved") == 0


async def test_concurrent_retries_of_both_parents_reopen_the_join_once(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, http: httpx.AsyncClient
) -> None:
    system = System(pool, nc)
    dag = await system.submit(
        spec(
            [
                {"ref": "a", "task": "t.fail_once"},
                {"ref": "x", "task": "t.fail_once"},
                {"ref": "join", "task": "t.parents", "depends_on": ["a", "x"]},
            ]
        )
    )
    ids = list(dag.jobs.values())
    await system.settle(ids)
    # Each retry locks its job, then the join: whichever comes second finds
    # the other parent running again, and the join waiting for both.
    responses = await asyncio.gather(
        *(http.post(f"/v1/jobs/{dag.jobs[ref]}/retry") for ref in ("a", "x"))
    )
    assert [r.status_code for r in responses] == [200, 200]
    join = await system.job(dag.jobs["join"])
    assert (join["state"], join["unmet_deps"], join["error"]) == ("blocked", 2, None)
    assert [k for k, _ in await _history(pool, dag.jobs["join"])].count("reopened") == 1
    await system.settle(ids)
    assert set((await system.states(dag)).values()) == {"succeeded"}
    result = (await system.job(dag.jobs["join"]))["result"]
    assert result["parents"] == {"a": {"attempt": 2}, "x": {"attempt": 2}}
