"""Retrying inside a DAG: what a retried job does to the jobs below it.

When a job failed or was cancelled, the resolver cancelled its dependents
with ``upstream_failed: <id>``, and theirs, transitively (``_resolve``).
Retrying the job reopens them, in the retry's transaction:

- the candidates are the descendants reached from the retried job through
  edges that do not allow failure and through jobs cancelled with
  ``upstream_failed:`` only;
- a candidate that has another parent, outside the candidates, that failed
  or was cancelled (on an edge that does not allow failure) stays cancelled,
  and so does every candidate below it; its error then names that parent
  (or the job behind it, for a parent the cascade cancelled);
- every other candidate is reopened: back to ``blocked``, a new attempt,
  its edges from the reopened jobs and the retried one unresolved again,
  and its ``unmet_deps`` counted again: an edge counts while it is
  unresolved. An edge out of a job that has not finished (a parent retried
  earlier) is unresolved again too: its next outcome resolves it.

So when the retried job finishes again, the resolver (or the dispatcher's
inline resolution) finds open edges and applies that outcome once, like any
other. The ``job.finished`` of the outcomes the retry supersedes (the
retried job's, the reopened jobs' cancels) is recorded in the resolver's
inbox, so that event, should it arrive late, is never applied.

``plan`` is the rule as a pure function; ``reopen`` runs it in the caller's
transaction.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from uuid import UUID

from workron import jobs
from workron._resolve import INBOX
from workron.events import JobState
from workron.ledger import Connection, queries

__all__ = ["InEdge", "Reopening", "blocker", "plan", "reopen", "upstream_of"]

_PREFIX = "upstream_failed: "
_TERMINAL = frozenset(s.value for s in JobState if s.terminal)
_UNSUCCESSFUL = frozenset({JobState.FAILED.value, JobState.CANCELLED.value})


@dataclass(frozen=True, slots=True)
class InEdge:
    """An edge into a job, with its parent as it is now."""

    child: UUID
    parent: UUID
    allow_failure: bool
    resolved: bool
    #: The parent's state; None when there is no such job.
    parent_state: str | None
    parent_error: str | None = None


@dataclass(slots=True)
class Reopening:
    #: Jobs back to ``blocked``, with their unmet dependencies.
    reopened: dict[UUID, int] = field(default_factory=dict)
    #: Candidates that stay cancelled, with the upstream job to blame.
    kept: dict[UUID, UUID] = field(default_factory=dict)
    #: (child, parent) of the edges to mark unresolved.
    unresolve: list[tuple[UUID, UUID]] = field(default_factory=list)
    #: Unmet dependencies of the retried job itself (0: it is ready).
    unmet: int = 0


def upstream_of(error: str | None) -> UUID | None:
    """The job named by an ``upstream_failed: <id>`` error, if it is one."""
    if error is None or not error.startswith(_PREFIX):
        return None
    try:
        return UUID(error[len(_PREFIX) :].strip())
    except ValueError:
        return None


def blocker(edge: InEdge) -> UUID | None:
    """The job to retry before ``edge.child`` may run, if the edge dooms it.

    A parent that failed or was cancelled, on an edge that does not allow
    failure; for a parent the cascade cancelled, the job behind it (the one
    to retry, as the resolver names it).
    """
    if edge.allow_failure or edge.parent_state not in _UNSUCCESSFUL:
        return None
    if edge.parent_state == JobState.CANCELLED:
        return upstream_of(edge.parent_error) or edge.parent
    return edge.parent


def plan(retried: UUID, candidates: Iterable[UUID], edges: Iterable[InEdge]) -> Reopening:
    """What retrying ``retried`` does to ``candidates`` (the descendants the
    cascade cancelled below it), given every edge into them and into it."""
    pool = set(candidates)
    into: dict[UUID, list[InEdge]] = defaultdict(list)
    for edge in edges:
        into[edge.child].append(edge)
    result = Reopening(kept=_kept(retried, pool, into))
    rerun = (pool - result.kept.keys()) | {retried}
    for job in [*sorted(pool - result.kept.keys()), retried]:
        unmet = 0
        for edge in into[job]:
            # Out of a job that runs again, or has not finished: open until
            # its next outcome. Any other edge counts while it is open.
            again = edge.parent in rerun or edge.parent_state not in _TERMINAL
            if again and edge.resolved:
                result.unresolve.append((job, edge.parent))
            if again or not edge.resolved:
                unmet += 1
        if job == retried:
            result.unmet = unmet
        else:
            result.reopened[job] = unmet
    return result


def _kept(retried: UUID, pool: set[UUID], into: dict[UUID, list[InEdge]]) -> dict[UUID, UUID]:
    """The candidates that stay cancelled, each with the upstream job to blame."""
    kept: dict[UUID, UUID] = {}
    below: dict[UUID, list[UUID]] = defaultdict(list)
    for job in sorted(pool):
        for edge in sorted(into[job], key=lambda e: e.parent):
            if edge.parent in pool:
                if not edge.allow_failure:
                    below[edge.parent].append(job)
            elif edge.parent != retried and job not in kept:
                if (culprit := blocker(edge)) is not None:
                    kept[job] = culprit
    # Below a job that stays cancelled, everything it dooms stays cancelled.
    todo = deque(sorted(kept))
    while todo:
        parent = todo.popleft()
        for child in below[parent]:
            if child not in kept:
                kept[child] = kept[parent]
                todo.append(child)
    return kept


async def edges_into(conn: Connection, job_ids: list[UUID]) -> list[InEdge]:
    return [
        InEdge(
            r["job_id"], r["depends_on"], r["allow_failure"], r["resolved"], r["state"], r["error"]
        )
        for r in await conn.fetch(queries()["recovery_edges_into"], job_ids)
    ]


async def reopen(conn: Connection, retried: UUID, attempt: int) -> Reopening:
    """Reopen what the cascade cancelled below ``retried`` (locked by the
    caller, finished at ``attempt``), in the caller's transaction.

    The caller then updates the retried job itself: blocked with ``unmet``
    of the result, or pending at 0 (its own edges are settled here).
    """
    q = queries()
    # First: a resolver applying that outcome right now finishes before this
    # goes on (the inbox row is unique), and what it cancelled is reopened.
    await conn.execute(q["resolver_inbox_insert"], INBOX, [jobs.finished_id(retried, attempt)])
    locked = {r["id"]: r["attempt"] for r in await conn.fetch(q["recovery_reopen_lock"], retried)}
    ids = sorted(locked)
    result = plan(retried, ids, await edges_into(conn, [*ids, retried]))
    if result.unresolve:
        pairs = list(zip(*result.unresolve, strict=True))
        await conn.execute(q["recovery_unresolve"], list(pairs[0]), list(pairs[1]))
    events: list[tuple[UUID, str, int, int, str | None, str | None]] = []
    if result.reopened:
        reopened = sorted(result.reopened)
        rows = await conn.fetch(
            q["recovery_new_attempt"],
            reopened,
            [JobState.BLOCKED.value] * len(reopened),
            [result.reopened[i] for i in reopened],
            [JobState.CANCELLED.value],
        )
        detail = f"upstream job {retried} retried"
        events += [(r["id"], "reopened", r["attempt"], 0, None, detail) for r in rows]
    if result.kept:
        kept = sorted(result.kept)
        await conn.execute(
            q["recovery_keep_cancelled"], kept, [f"{_PREFIX}{result.kept[i]}" for i in kept]
        )
    if events:
        await conn.execute(q["job_events_insert"], *jobs.event_rows(events))
    if result.reopened:
        superseded = sorted(jobs.finished_id(i, locked[i]) for i in result.reopened)
        await conn.execute(q["resolver_inbox_insert"], INBOX, superseded)
    return result
