"""DAGs end to end: admission, resolver, dispatcher and a real worker (burst mode)."""

from __future__ import annotations

import asyncio
import logging
import random

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import dags, jobs, ledger
from workron._ids import uuid7
from workron.events import JobFinished, JobsFinished, JobSpec, JobState, finished_jobs

from ..unit.test_dag_resolution import expected
from ._dag_support import Finished, System, echo, spec


async def test_diamond_runs_in_order_and_passes_results(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    dag = await system.submit(
        spec(
            [
                echo("a"),
                echo("b", "a"),
                echo("c", "a"),
                {"ref": "d", "task": "t.parents", "depends_on": ["b", "c"]},
            ],
            name="diamond",
        )
    )
    assert await system.states(dag) == {
        "a": "dispatched", "b": "blocked", "c": "blocked", "d": "blocked",
    }  # fmt: skip
    await system.settle(list(dag.jobs.values()))
    assert set((await system.states(dag)).values()) == {"succeeded"}
    d = await system.job(dag.jobs["d"])
    assert d["result"] == {"parents": {"b": "b", "c": "c"}, "omitted": []}
    for parent in ("b", "c"):
        assert (await system.job(dag.jobs[parent]))["finished_at"] <= d["started_at"]
    kinds = await pool.fetch(
        "SELECT kind FROM job_events WHERE job_id = $1 ORDER BY id", dag.jobs["d"]
    )
    assert [k["kind"] for k in kinds][:2] == ["submitted", "released"]
    assert system.metrics.resolver_released.labels(queue="default")._value.get() == 3

    shown = await dags.get(pool, dag.id)
    assert shown.state == "succeeded" and shown.counts == {"succeeded": 4}
    assert {(e.parent, e.child) for e in shown.edges} == {
        ("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"),
    }  # fmt: skip
    assert shown.critical_path_by == "run_time"
    assert shown.critical_path[0] == "a" and shown.critical_path[-1] == "d"
    assert len(shown.critical_path) == 3 and shown.critical_path_s is not None


async def test_fan_out_and_in_of_a_thousand(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    middle = [f"m{i}" for i in range(1000)]
    nodes = [
        {"ref": "root", "task": "workron.noop"},
        *({"ref": m, "task": "workron.noop", "depends_on": ["root"]} for m in middle),
        {"ref": "sink", "task": "t.parents", "depends_on": middle},
    ]
    dag = await system.submit(spec(nodes))
    await system.settle(list(dag.jobs.values()))
    assert set((await system.states(dag)).values()) == {"succeeded"}
    sink = await system.job(dag.jobs["sink"])
    assert sink["result"]["parents"] == dict.fromkeys(middle)
    # Released exactly once each: one history row and one work message.
    released = await pool.fetchval(
        "SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id"
        " WHERE j.dag_id = $1 AND e.kind = 'released'",
        dag.id,
    )
    assert released == 1001
    assert await pool.fetchval("SELECT count(*) FROM job_deps WHERE NOT resolved") == 0


async def test_chain_of_a_hundred(pool: ledger.Pool, nc: NATS, js: JetStreamContext) -> None:
    system = System(pool, nc)
    nodes = [echo("n0")] + [echo(f"n{i}", f"n{i - 1}") for i in range(1, 100)]
    async with system.running():
        dag = await system.submit(spec(nodes))
        await system.wait(list(dag.jobs.values()))
    rows = {
        r["dag_ref"]: r
        for r in await pool.fetch(
            "SELECT dag_ref, state, started_at, finished_at, result FROM jobs WHERE dag_id = $1",
            dag.id,
        )
    }
    assert {r["state"] for r in rows.values()} == {"succeeded"}
    for i in range(1, 100):
        assert rows[f"n{i - 1}"]["finished_at"] <= rows[f"n{i}"]["started_at"]
    shown = await dags.get(pool, dag.id)
    assert shown.critical_path == [f"n{i}" for i in range(100)]


async def test_failure_in_the_middle_cancels_descendants(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    seen = Finished()
    sub = await nc.subscribe("workron.evt.job.finished", cb=seen.on_msg)
    dag = await system.submit(
        spec(
            [
                echo("a"),
                {"ref": "b", "task": "t.fail", "depends_on": ["a"]},
                echo("c", "b"),
                echo("d", "c"),
                echo("e", "a"),
                echo("f", "d", "e"),
            ]
        )
    )
    await system.settle(list(dag.jobs.values()))
    assert await system.states(dag) == {
        "a": "succeeded", "b": "failed", "c": "cancelled", "d": "cancelled",
        "e": "succeeded", "f": "cancelled",
    }  # fmt: skip
    b = dag.jobs["b"]
    for ref in ("c", "d", "f"):
        job = await system.job(dag.jobs[ref])
        assert job["error"] == f"upstream_failed: {b}" and job["started_at"] is None
    await nc.flush()
    # Subscribers hear about every cancelled descendant, once.
    for ref in ("c", "d", "f"):
        assert seen.states[dag.jobs[ref]] == ["cancelled"]
    await sub.unsubscribe()
    assert system.metrics.resolver_cancelled.labels(queue="default")._value.get() == 3
    shown = await dags.get(pool, dag.id)
    assert shown.state == "failed" and shown.counts == {"succeeded": 2, "failed": 1, "cancelled": 3}


async def test_allow_failure_per_job_and_per_edge(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    dag = await system.submit(
        spec(
            [
                {"ref": "bad", "task": "t.fail", "payload": 1},
                echo("ok"),
                {
                    "ref": "cleanup",
                    "task": "t.parents",
                    "depends_on": ["bad"],
                    "allow_failure": True,
                },
                {
                    "ref": "edge",
                    "task": "t.parents",
                    "depends_on": [{"job": "bad", "allow_failure": True}, "ok"],
                },
                echo("strict", "bad", "ok"),
                # A doomed job's edge that allows failure is satisfied too.
                echo("after", {"job": "strict", "allow_failure": True}),
            ]
        )
    )
    await system.settle(list(dag.jobs.values()))
    assert await system.states(dag) == {
        "bad": "failed", "ok": "succeeded", "cleanup": "succeeded", "edge": "succeeded",
        "strict": "cancelled", "after": "succeeded",
    }  # fmt: skip
    cleanup = await system.job(dag.jobs["cleanup"])
    assert cleanup["result"]["parents"] == {"bad": None}
    edge = await system.job(dag.jobs["edge"])
    assert edge["result"]["parents"] == {"bad": None, "ok": "ok"}


async def _handled(system: System, count: int) -> None:
    """Run the resolver until it has handled ``count`` events (a message
    just stored may reach the consumer a moment later: bounded polling)."""
    handled = 0
    async with asyncio.timeout(10):
        while handled < count:
            handled += await system.resolvers[0].run_until_idle()
    assert handled == count


async def test_redelivered_finished_events_change_nothing(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    dag = await system.submit(
        spec([echo("a"), echo("later", delay_s=3600), echo("c", "a", "later")])
    )
    await system.settle([dag.jobs["a"]])
    await system.step()
    c = dag.jobs["c"]
    before = await system.job(c)
    assert before["state"] == "blocked" and before["unmet_deps"] == 1
    event = msgspec.json.encode(
        JobFinished(job_id=dag.jobs["a"], queue="default", state="succeeded", attempt=1)
    )
    # Without a Nats-Msg-Id the stream keeps the copy: the inbox must catch it.
    await js.publish("workron.evt.job.finished", event)
    await _handled(system, 1)
    # With the inbox forgotten, the resolved edge still refuses it.
    await pool.execute("DELETE FROM inbox WHERE consumer = 'resolver'")
    await js.publish("workron.evt.job.finished", event)
    await _handled(system, 1)
    after = await system.job(c)
    assert after["state"] == "blocked" and after["unmet_deps"] == 1
    released = await pool.fetchval(
        "SELECT count(*) FROM job_events WHERE job_id = $1 AND kind = 'released'", c
    )
    assert released == 0
    # Garbage on the subject is a dead letter, not a crash or a retry loop.
    await js.publish("workron.evt.job.finished", b"not json")
    await _handled(system, 1)
    assert await pool.fetchval("SELECT count(*) FROM dead_letters WHERE source = 'resolver'") == 1


async def test_events_resolved_where_recorded_cost_the_resolver_nothing(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    dag = await system.submit(spec([echo("a"), echo("b", "a"), echo("x"), echo("y", "x")]))
    await system.relay.run_until_idle()
    await system.worker.run(burst=True)
    await system.dispatcher.run_until_idle()
    # The dispatcher released b in the transaction that recorded a, and says so.
    states = await system.states(dag)
    assert (states["a"], states["b"]) == ("succeeded", "dispatched")
    stored = await js.get_last_msg("EVENTS", "workron.evt.job.finished")
    finished = finished_jobs(
        msgspec.json.decode(stored.data or b"", type=JobFinished | JobsFinished)
    )
    assert {e.job_id for e in finished} == {dag.jobs["a"], dag.jobs["x"]}
    assert all(e.resolved for e in finished)
    # The resolver acks those without a transaction: no inbox row.
    assert await system.resolvers[0].run_until_idle() == 2
    assert await pool.fetchval("SELECT count(*) FROM inbox WHERE consumer = 'resolver'") == 0
    # The flag is what it goes by: an event claiming an open edge resolved
    # is left alone; the same event without the claim is applied.
    edge = await pool.fetchval(
        "UPDATE job_deps SET resolved = false WHERE job_id = $1 RETURNING depends_on",
        dag.jobs["y"],
    )
    await pool.execute(
        "UPDATE jobs SET state = 'blocked', unmet_deps = 1, dispatched_at = NULL WHERE id = $1",
        dag.jobs["y"],
    )
    event = JobFinished(job_id=edge, queue="default", state="succeeded", attempt=1)
    for claim in (True, False):
        await js.publish(
            "workron.evt.job.finished",
            msgspec.json.encode(msgspec.structs.replace(event, resolved=claim)),
            headers={"Nats-Msg-Id": f"claim-{claim}"},
        )
        await _handled(system, 1)
        state = (await system.job(dag.jobs["y"]))["state"]
        assert state == ("blocked" if claim else "dispatched")


async def test_a_batch_of_finished_events_resolves_each_of_them(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    dag = await system.submit(spec([echo("a"), echo("b"), echo("f"), echo("c", "a", "b"),
                                    echo("e", "f")]))  # fmt: skip
    await system.relay.run_until_idle()
    # a, b and f end elsewhere, in one transaction: one JobsFinished for all.
    rows = await pool.fetch(
        "UPDATE jobs SET state = CASE WHEN dag_ref = 'f' THEN 'failed' ELSE 'succeeded' END,"
        " finished_at = now() WHERE dag_id = $1 AND dag_ref IN ('a', 'b', 'f')"
        " RETURNING id, queue, state",
        dag.id,
    )
    events = [jobs.finished_event(r["id"], r["queue"], JobState(r["state"]), 1) for r in rows]
    [message] = jobs.finished_messages(events)
    await js.publish(message.subject, message.payload, headers=message.headers())
    await _handled(system, 4)  # three events in one message, then e's cancel
    states = await system.states(dag)
    assert (states["c"], states["e"]) == ("dispatched", "cancelled")
    assert (await system.job(dag.jobs["e"]))["error"] == f"upstream_failed: {dag.jobs['f']}"


async def _finish_released(
    pool: ledger.Pool, js: JetStreamContext, dag_id: object, fail: set[str]
) -> int:
    """Finish every dispatched job of the DAG in the ledger and announce it,
    as something other than the dispatcher would (a cancel, the reaper)."""
    rows = await pool.fetch(
        "UPDATE jobs SET state = CASE WHEN dag_ref = ANY($2::text[]) THEN 'failed'"
        " ELSE 'succeeded' END, finished_at = now()"
        " WHERE dag_id = $1 AND state = 'dispatched' RETURNING id, state",
        dag_id,
        sorted(fail),
    )
    for row in rows:
        event = JobFinished(job_id=row["id"], queue="default", state=row["state"], attempt=1)
        await js.publish(
            "workron.evt.job.finished",
            msgspec.json.encode(event),
            headers={"Nats-Msg-Id": f"fin:{row['id']}"},
        )
    return len(rows)


@pytest.mark.parametrize("fail", [False, True])
async def test_two_resolvers_at_once(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, caplog: pytest.LogCaptureFixture, fail: bool
) -> None:
    # Dense layers: every job of a layer waits for every job of the one
    # before, so the two resolvers' small batches contend for the same
    # dependents (and, with a failure, the same cascade).
    system = System(pool, nc, resolvers=2, batch=5)
    width = 12
    layers = [[f"l{d}_{i}" for i in range(width)] for d in range(4)]
    nodes = [
        {"ref": ref, "task": "workron.noop", "depends_on": layers[depth - 1] if depth else []}
        for depth, layer in enumerate(layers)
        for ref in layer
    ]
    dag = await system.submit(spec(nodes))
    caplog.set_level(logging.WARNING, logger="workron.resolver")
    failing = {"l1_0"} if fail else set()
    while published := await _finish_released(pool, js, dag.id, failing):
        handled = 0
        async with asyncio.timeout(20):
            while handled < published:
                counts = await asyncio.gather(*(r.run_until_idle() for r in system.resolvers))
                handled += sum(counts)
    states = await system.states(dag)
    if fail:
        assert states.pop("l1_0") == "failed"
        assert {states[r] for r in layers[0] + layers[1][1:]} == {"succeeded"}
        assert {states[r] for r in layers[2] + layers[3]} == {"cancelled"}
    else:
        assert set(states.values()) == {"succeeded"}
    events = await pool.fetch(
        "SELECT e.job_id, e.kind, count(*) AS n FROM job_events e JOIN jobs j ON j.id = e.job_id"
        " WHERE j.dag_id = $1 AND e.kind IN ('released', 'cancelled') GROUP BY 1, 2",
        dag.id,
    )
    assert len(events) == 3 * width and {r["n"] for r in events} == {1}
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE unmet_deps < 0") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_cancelling_a_dag_or_one_of_its_jobs_cascades(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    one = await system.submit(spec([echo("a", delay_s=3600), echo("b", "a"), echo("c", "b")]))
    shown = await dags.cancel(pool, js, one.id)
    assert shown.state == "cancelled" and shown.counts == {"cancelled": 3}
    await system.step()
    assert await pool.fetchval("SELECT count(*) FROM job_deps WHERE NOT resolved") == 0

    two = await system.submit(spec([echo("a", delay_s=3600), echo("b", "a"), echo("c", "b")]))
    await jobs.cancel(pool, js, two.jobs["b"])
    await system.step()
    assert await system.states(two) == {"a": "pending", "b": "cancelled", "c": "cancelled"}
    c = await system.job(two.jobs["c"])
    assert c["error"] == f"upstream_failed: {two.jobs['b']}"


async def test_single_submissions_depend_on_existing_jobs(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    done = jobs.plan(uuid7(), JobSpec(task="workron.echo", payload={"x": 1}))
    bad = jobs.plan(uuid7(), JobSpec(task="t.fail"))
    await jobs.submit(pool, js, [done, bad])
    await system.settle([done.id, bad.id])

    # Parents finished already: ready (with the result) or cancelled at once.
    ready = jobs.plan(uuid7(), JobSpec(task="t.parents", depends_on=[str(done.id)]))
    doomed = jobs.plan(uuid7(), JobSpec(task="workron.noop", depends_on=[str(bad.id)]))
    tolerant = jobs.plan(
        uuid7(), JobSpec(task="workron.noop", depends_on=[str(bad.id)], allow_failure=True)
    )
    await jobs.submit(pool, js, [ready, doomed, tolerant])
    assert (await system.job(ready.id))["state"] == "dispatched"
    assert (await system.job(tolerant.id))["state"] == "dispatched"
    cancelled = await system.job(doomed.id)
    assert cancelled["state"] == "cancelled" and cancelled["error"] == f"upstream_failed: {bad.id}"
    await system.settle([ready.id, tolerant.id])
    result = (await system.job(ready.id))["result"]
    assert result == {"parents": {str(done.id): {"x": 1}}, "omitted": []}

    # A parent still running: blocked until the resolver hears of it.
    slow = jobs.plan(uuid7(), JobSpec(task="workron.noop", delay_s=3600))
    child = jobs.plan(uuid7(), JobSpec(task="workron.noop", depends_on=[str(slow.id)]))
    await jobs.submit(pool, js, [slow])
    await jobs.submit(pool, js, [child])
    assert (await system.job(child.id))["state"] == "blocked"
    await jobs.cancel(pool, js, slow.id)
    await system.step()
    assert (await system.job(child.id))["error"] == f"upstream_failed: {slow.id}"


async def test_commands_read_parents_from_files_and_env(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    script = 'cat "$WORKRON_PARENTS_DIR/b.json"; echo; printf %s "$WORKRON_PARENTS"'
    dag = await system.submit(
        spec(
            [
                {"ref": "b", "task": "workron.echo", "payload": {"rows": [1, 2]}},
                {"ref": "cmd", "command": script, "shell": True, "depends_on": ["b"]},
            ]
        )
    )
    await system.settle(list(dag.jobs.values()))
    result = (await system.job(dag.jobs["cmd"]))["result"]
    file_line, env_line = result["stdout"].split("\n", 1)
    assert msgspec.json.decode(file_line) == {"rows": [1, 2]}
    assert msgspec.json.decode(env_line) == {"b": {"rows": [1, 2]}}


async def test_delayed_and_retried_dag_jobs_still_get_parents(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    system = System(pool, nc)
    dag = await system.submit(
        spec(
            [
                echo("a"),
                {
                    "ref": "b",
                    "task": "t.flaky_parents",
                    "depends_on": ["a"],
                    "delay_s": 3600,
                    "backoff": {"base_s": 0},
                },
            ]
        )
    )
    await system.settle([dag.jobs["a"]])
    # Released into its delay: the dispatcher sends it when due, with parents.
    assert (await system.job(dag.jobs["b"]))["state"] == "pending"
    await pool.execute("UPDATE jobs SET run_at = now() WHERE id = $1", dag.jobs["b"])
    await system.settle([dag.jobs["b"]])
    b = await system.job(dag.jobs["b"])
    assert b["result"] == {"parents": {"a": "a"}, "attempt": 2}


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_dags_through_the_real_resolver(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, seed: int
) -> None:
    rng = random.Random(seed)
    n = 16
    edges = [
        (child, parent, rng.random() < 0.3)
        for child in range(1, n)
        for parent in rng.sample(range(child), k=min(child, rng.randint(0, 3)))
    ]
    outcome = [rng.random() < 0.75 for _ in range(n)]
    nodes = [
        {
            "ref": f"j{i}",
            "task": "workron.noop" if outcome[i] else "t.fail",
            "depends_on": [
                {"job": f"j{p}", "allow_failure": allow} for c, p, allow in edges if c == i
            ],
        }
        for i in range(n)
    ]
    system = System(pool, nc, batch=rng.choice([1, 3, 100]))
    dag = await system.submit(spec(nodes))
    await system.settle(list(dag.jobs.values()))
    states = await system.states(dag)
    assert [states[f"j{i}"] for i in range(n)] == expected(n, edges, outcome)


async def first_hop(pool: ledger.Pool, nc: NATS) -> tuple[System, dags.DagSubmitted]:
    """A DAG a -> b, run up to the dispatcher's recording of a's outcome."""
    system = System(pool, nc)
    dag = await system.submit(spec([echo("a"), echo("b", "a")]))
    await system.relay.run_until_idle()
    await system.worker.run(burst=True)
    await system.dispatcher.run_until_idle()
    return system, dag


async def test_work_sent_before_a_commit_that_fails_runs_again_under_a_new_attempt(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatcher publishes a foreseen dependent's work before its
    transaction commits. When that transaction fails after all, the
    execution it started is fenced and the job runs again: at least once,
    with one outcome recorded."""
    from workron.dispatcher import apply as dispatcher_apply
    from workron.reaper import Reaper

    real = dispatcher_apply._resolve.write_release

    async def failing(*args: object, **kwargs: object) -> object:
        if kwargs.get("work") is not None:
            raise RuntimeError("the hop's statement fails after its work went out")
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatcher_apply._resolve, "write_release", failing)
    system, dag = await first_hop(pool, nc)
    # Recorded without its resolution; b's work is out all the same.
    assert await system.states(dag) == {"a": "succeeded", "b": "blocked"}
    assert (await js.stream_info("WORK")).state.messages == 1
    monkeypatch.undo()
    await system.step()  # b runs, its reports are fenced; the resolver releases it
    b = dag.jobs["b"]
    assert await system.states(dag) == {"a": "succeeded", "b": "dispatched"}
    kinds = [r["kind"] for r in await pool.fetch(EVENTS, b)]
    assert "fenced" in kinds and "succeeded" not in kinds
    # Its message was a duplicate of the one already run: JetStream dropped
    # it, and the reaper finds the job's message lost.
    assert (await js.stream_info("WORK")).state.messages == 0
    await pool.execute(
        "UPDATE jobs SET dispatched_at = now() - interval '2 minutes' WHERE id = $1", b
    )
    assert (await Reaper(pool, nc, system.metrics).run_until_idle()).redispatched == 1
    await system.settle(list(dag.jobs.values()))
    row = await pool.fetchrow("SELECT state, attempt, result FROM jobs WHERE id = $1", b)
    assert (row["state"], row["attempt"], msgspec.json.decode(row["result"])) == (
        "succeeded", 2, "b",
    )  # fmt: skip
    kinds = [r["kind"] for r in await pool.fetch(EVENTS, b)]
    assert kinds.count("succeeded") == 1
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0


EVENTS = "SELECT kind FROM job_events WHERE job_id = $1 ORDER BY id"


async def test_the_resolver_takes_over_when_the_dispatchers_fast_path_fails(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workron.dispatcher import apply as dispatcher_apply

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("fast path broken on purpose")

    def broken_too(*args: object, **kwargs: object) -> None:
        raise RuntimeError("fast path broken on purpose")

    monkeypatch.setattr(dispatcher_apply._resolve, "apply", broken)
    monkeypatch.setattr(dispatcher_apply, "_foreseen", broken_too)
    system, dag = await first_hop(pool, nc)
    # The outcome is recorded all the same; the dependent is still waiting.
    assert await system.states(dag) == {"a": "succeeded", "b": "blocked"}
    monkeypatch.undo()
    await system.settle(list(dag.jobs.values()))
    assert await system.states(dag) == {"a": "succeeded", "b": "succeeded"}
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
