"""The whole path in one process: ledger → outbox → JetStream → worker →
report → ledger, with the services' run-until-idle modes (no sleeps)."""

from __future__ import annotations

from uuid import UUID

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import jobs, ledger
from workron._ids import uuid7
from workron.dispatcher.service import Dispatcher
from workron.events import Finished, JobsFinished, JobSpec, ReportSucceeded
from workron.relay.service import Relay
from workron.telemetry import Metrics
from workron.worker import Worker, builtin


async def finished_events(js: JetStreamContext) -> list[UUID]:
    """The job ids of every job.finished stored in EVENTS, batches unpacked."""
    state = (await js.stream_info("EVENTS")).state
    found: list[UUID] = []
    for seq in range(state.first_seq, state.last_seq + 1):
        decoded = msgspec.json.decode((await js.get_msg("EVENTS", seq)).data or b"", type=Finished)
        found += [
            e.job_id for e in (decoded.jobs if isinstance(decoded, JobsFinished) else [decoded])
        ]
    return found


async def settle(pool: ledger.Pool, nc: NATS, ids: list[object], rounds: int = 50) -> None:
    """Run relay, worker and dispatcher until every job is terminal."""
    metrics = Metrics()
    relay, dispatcher = Relay(pool, nc, metrics), Dispatcher(pool, nc, metrics)
    worker = Worker(nc=nc, registry=builtin, concurrency=8)
    for _ in range(rounds):
        await relay.run_until_idle()
        await worker.run(burst=True)
        await dispatcher.run_until_idle()
        open_jobs = await pool.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[])"
            " AND state NOT IN ('succeeded', 'failed', 'cancelled')",
            ids,
        )
        if open_jobs == 0:
            return
    raise AssertionError(f"{open_jobs} jobs still open")


async def test_acknowledged_jobs_reach_exactly_one_outcome(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    planned = [jobs.plan(uuid7(), JobSpec(task="workron.echo", payload=i)) for i in range(40)]
    # Half were committed by a writer that died before publishing: once its
    # grace has passed, the relay must publish them.
    await jobs.submit(pool, None, planned[:20])
    await pool.execute("UPDATE outbox SET available_at = now()")
    await jobs.submit(pool, js, planned[20:])
    ids = [j.id for j in planned]
    await settle(pool, nc, ids)

    rows = await pool.fetch("SELECT id, state, result FROM jobs WHERE id = ANY($1::uuid[])", ids)
    assert {r["state"] for r in rows} == {"succeeded"}
    assert {r["id"]: msgspec.json.decode(r["result"]) for r in rows} == {
        j.id: j.spec.payload for j in planned
    }
    outcomes = await pool.fetch(
        "SELECT job_id, count(*) AS n FROM job_events WHERE kind = 'succeeded' GROUP BY job_id"
    )
    assert len(outcomes) == 40 and {r["n"] for r in outcomes} == {1}
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    # One job.finished per job, alone or in a dispatcher's batch.
    assert sorted(await finished_events(js)) == sorted(ids)


async def test_a_replayed_outcome_changes_nothing(
    pool: ledger.Pool, nc: NATS, js: JetStreamContext
) -> None:
    job = jobs.plan(uuid7(), JobSpec(task="workron.echo", payload="first"))
    await jobs.submit(pool, js, [job])
    await settle(pool, nc, [job.id])
    # A second execution's success (say, a redelivery after a lost ack)
    # arrives after the first was recorded: it is refused and counted.
    late = ReportSucceeded(
        job_id=job.id, attempt=1, delivery=2, worker_id="late", at=0.0,
        result=msgspec.Raw(b'"second"'),
    )  # fmt: skip
    await js.publish(
        "workron.report.default",
        msgspec.json.encode(late),
        headers={"Nats-Msg-Id": f"succeeded:{job.id}:1:2"},
    )
    await Dispatcher(pool, nc, Metrics()).run_until_idle()
    stored = await jobs.get(pool, job.id)
    assert stored.result == "first" and stored.worker_id != "late"
    assert await pool.fetchval("SELECT value FROM counters WHERE name = 'fenced_reports'") == 1
