"""DAGs in the ledger: atomic submission, reading with the critical path, cancelling.

A DAG is written in one transaction with multi-row statements: the ``dags``
row, every job (through ``jobs._insert``, the same path as plain jobs), every
edge, and the work messages of the jobs that are ready at once. Jobs with
dependencies are written ``blocked``; the resolver service releases them.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal
from uuid import UUID

from nats.js import JetStreamContext

from workron import _dag_graph, jobs, outbox
from workron._ids import uuid7
from workron.dag_api import Dag, DagEdge, DagNode, DagProgress, DagSpec, DagState, DagSubmitted
from workron.errors import ConflictError, NotFoundError, WorkronError
from workron.events import JobState
from workron.ledger import Connection, Pool, Record, ledger_errors, queries
from workron.states import CANCELLABLE

__all__ = ["cancel", "get", "plan", "progress", "submit"]

_CANCELLABLE = sorted(CANCELLABLE)


def plan(
    spec: DagSpec, *, dag_id: UUID, traceparent: str | None = None
) -> tuple[_dag_graph.Graph, list[jobs.NewJob]]:
    """Check the DAG and plan each job. Raises ValidationError, PayloadTooLargeError.

    Errors about one job carry its path (``$.jobs[3].payload``).
    """
    graph = _dag_graph.validate(spec)
    ids = [uuid7() for _ in spec.jobs]
    deps: list[list[jobs.Dep]] = [[] for _ in spec.jobs]
    for edge in graph.edges:
        parent = ids[edge.parent] if isinstance(edge.parent, int) else edge.parent
        deps[edge.child].append(jobs.Dep(parent, edge.allow_failure, edge.field))
    planned = []
    for i, job in enumerate(spec.jobs):
        try:
            planned.append(
                jobs.plan(
                    ids[i],
                    job,
                    traceparent=traceparent,
                    deps=deps[i],
                    dag_id=dag_id,
                    dag_ref=job.ref,
                )
            )
        except WorkronError as exc:
            if exc.field and exc.field.startswith("$"):
                exc.field = f"$.jobs[{i}]{exc.field[1:]}"
            raise
    return graph, planned


async def submit(
    pool: Pool, js: JetStreamContext | None, spec: DagSpec, *, traceparent: str | None = None
) -> DagSubmitted:
    """Write a whole DAG in one transaction, or nothing; publish the ready jobs' work.

    Raises ValidationError (nothing written) for an unknown job id among the
    dependencies; ``created`` is False when the idempotency key matched.
    """
    dag_id = uuid7()
    graph, planned = plan(spec, dag_id=dag_id, traceparent=traceparent)
    async with ledger_errors(), pool.acquire() as conn, conn.transaction():
        fresh = await conn.fetchval(
            queries()["dag_insert"],
            dag_id, spec.name, spec.idempotency_key, len(planned), len(graph.edges),
        )  # fmt: skip
        if fresh is None:
            return await _existing(conn, spec.idempotency_key)
        # The same insert as plain jobs: blocked rows, edges and the
        # resolution of parents that have finished already included.
        _, rows = await jobs._insert(conn, planned)
    if js is not None and rows:
        await outbox.publish_own(pool, js, rows)
    return DagSubmitted(id=dag_id, created=True, jobs={j.dag_ref or "": j.id for j in planned})


async def _existing(conn: Connection, key: str | None) -> DagSubmitted:
    dag_id = await conn.fetchval(queries()["dag_by_key"], key)
    if dag_id is None:  # the conflict was on a row that has since gone
        raise ConflictError("DAG submission conflicted with a vanished DAG")
    nodes = await conn.fetch(queries()["dag_nodes"], dag_id)
    return DagSubmitted(id=dag_id, created=False, jobs={r["dag_ref"]: r["id"] for r in nodes})


def _node(row: Record) -> DagNode:
    started, finished = row["started_at"], row["finished_at"]
    run_s = (finished - started).total_seconds() if started and finished else None
    return DagNode(
        ref=row["dag_ref"],
        job_id=row["id"],
        state=JobState(row["state"]),
        attempt=row["attempt"],
        error=row["error"],
        created_at=row["created_at"],
        started_at=started,
        finished_at=finished,
        run_s=run_s,
    )


def _summary(states: set[JobState]) -> DagState:
    if not all(s.terminal for s in states):
        return "running"
    if states <= {JobState.SUCCEEDED}:
        return "succeeded"
    return "failed" if JobState.FAILED in states else "cancelled"


async def get(pool: Pool, dag_id: UUID) -> Dag:
    """The DAG with its nodes, edges, counts by state and critical path."""
    async with ledger_errors(), pool.acquire() as conn:
        dag = await conn.fetchrow(queries()["dag_get"], dag_id)
        if dag is None:
            raise NotFoundError(f"DAG {dag_id} not found", field="id")
        node_rows = await conn.fetch(queries()["dag_nodes"], dag_id)
        edge_rows = await conn.fetch(queries()["dag_edges"], dag_id)
    nodes = [_node(r) for r in node_rows]
    ref_of = {n.job_id: n.ref for n in nodes}
    edges = [
        DagEdge(
            parent=ref_of.get(r["depends_on"]) or str(r["depends_on"]),
            child=ref_of[r["job_id"]],
            allow_failure=r["allow_failure"],
        )
        for r in edge_rows
    ]
    state = _summary({n.state for n in nodes})
    # Finished: the chain that took longest to run. Running: run times are
    # partial, so the longest chain of jobs stands in for it.
    by: Literal["run_time", "nodes"] = "nodes" if state == "running" else "run_time"
    weight = {n.ref: (n.run_s or 0.0) if by == "run_time" else 1.0 for n in nodes}
    internal = [(e.child, e.parent) for e in edges if e.parent in weight]
    path, total = _dag_graph.critical_path([n.ref for n in nodes], internal, weight)
    return Dag(
        id=dag["id"],
        name=dag["name"],
        created_at=dag["created_at"],
        state=state,
        counts=dict(Counter(n.state.value for n in nodes)),
        nodes=nodes,
        edges=edges,
        critical_path=path,
        critical_path_by=by,
        critical_path_s=total if by == "run_time" else None,
    )


async def progress(pool: Pool, dag_id: UUID) -> DagProgress:
    """The DAG's counts by state and timings, without nodes or edges (one
    aggregate query, however large the DAG). Raises NotFoundError."""
    async with ledger_errors():
        rows = await pool.fetch(queries()["dag_progress"], dag_id)
    if not rows:
        raise NotFoundError(f"DAG {dag_id} not found", field="id")
    counts = {r["state"]: r["n"] for r in rows if r["state"] is not None}
    states = {JobState(s) for s in counts}
    terminal = {s for s in states if s.terminal}
    state = _summary(states)
    started = [r["started_at"] for r in rows if r["started_at"] is not None]
    finished = [r["finished_at"] for r in rows if r["finished_at"] is not None]
    first = rows[0]
    end = max(finished) if state != "running" and finished else None
    return DagProgress(
        id=first["id"],
        name=first["name"],
        created_at=first["created_at"],
        state=state,
        counts=counts,
        total=sum(counts.values()),
        finished=sum(counts[s.value] for s in terminal),
        started_at=min(started) if started else None,
        finished_at=end,
        elapsed_s=max(0.0, ((end or first["now"]) - first["created_at"]).total_seconds()),
    )


async def cancel(
    pool: Pool, js: JetStreamContext | None, dag_id: UUID, reason: str = "DAG cancelled by request"
) -> Dag:
    """Cancel every unfinished job of the DAG. Raises NotFoundError, or ConflictError
    when all of them have finished already."""
    async with ledger_errors(), pool.acquire() as conn, conn.transaction():
        if await conn.fetchrow(queries()["dag_get"], dag_id) is None:
            raise NotFoundError(f"DAG {dag_id} not found", field="id")
        ids = [r["id"] for r in await conn.fetch(queries()["dag_lock_open"], dag_id, _CANCELLABLE)]
        if not ids:
            raise ConflictError(f"every job of DAG {dag_id} has finished", field="state")
        rows = await conn.fetch(queries()["dag_cancel_jobs"], ids, reason, _CANCELLABLE)
        await conn.execute(
            queries()["job_events_insert"],
            *jobs.event_rows(
                [(r["id"], "cancelled", r["attempt"], r["delivery"], None, reason) for r in rows]
            ),
        )
        messages = [
            jobs.finished_message(r["id"], r["queue"], JobState.CANCELLED, r["attempt"], reason)
            for r in rows
        ]
        ids_out = await outbox.insert(conn, messages, own=js is not None)
    if js is not None:
        await outbox.publish_own(pool, js, list(zip(ids_out, messages, strict=True)))
    return await get(pool, dag_id)
