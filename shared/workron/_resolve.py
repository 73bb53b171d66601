"""Resolving dependencies: what finished jobs do to the jobs waiting on them.

``decide`` is the rule, as a pure function; ``apply`` runs it against the
ledger inside the caller's transaction. Three callers follow this one rule:
the dispatcher, in the transaction that records outcomes (the fast path: a
DAG hop is one commit); the resolver service, for each batch of
``job.finished`` events (outcomes recorded elsewhere: cancels, the reaper;
and the backstop for everything); admission, for new edges towards jobs
that have finished already:

- an edge out of a succeeded job, or out of a failed/cancelled one when the
  edge allows failure, is *satisfied*: the dependent's ``unmet_deps`` drops,
  and at 0 the dependent is released (``dispatched`` with its work message,
  or ``pending`` until its ``run_at``);
- otherwise the dependent is *doomed*: cancelled with ``upstream_failed:
  <id of the job that failed>``, and so, transitively, is everything that
  depends on it without allowing failure; edges out of doomed jobs that do
  allow failure are satisfied.

Each edge is resolved once (``job_deps.resolved``): a replayed event, or the
``job.finished`` of a job this module cancelled itself, finds its edges
resolved and changes nothing. A retry (``_reopen``) opens the edges out of
the retried job and the jobs it reopens again, for their next outcome.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import msgspec

from workron import outbox
from workron.errors import ConflictError, ValidationError
from workron.events import JobFinished, JobState
from workron.jobs import (
    EventRow,
    NewJob,
    event_rows,
    finished_event,
    finished_messages,
    work_message,
)
from workron.ledger import Connection, Record, queries

__all__ = [
    "INBOX",
    "Applied",
    "OpenEdge",
    "Resolution",
    "Written",
    "apply",
    "decide",
    "link",
    "parents_of",
    "release_succeeded",
    "released_of",
    "work",
    "write_release",
]

_decode_command = msgspec.json.Decoder(list[str] | str)
_TERMINAL = {s.value: s for s in JobState if s.terminal}
#: The resolver's inbox name (and durable consumer): a retry records there the
#: ``job.finished`` of the outcome it supersedes, so that event is never applied.
INBOX = "resolver"


@dataclass(frozen=True, slots=True)
class OpenEdge:
    """An unresolved edge: ``child`` waits for ``parent``."""

    child: UUID
    parent: UUID
    allow_failure: bool


@dataclass(slots=True)
class Resolution:
    #: (child, parent) of every edge this resolution settles.
    resolved: list[tuple[UUID, UUID]] = field(default_factory=list)
    #: Satisfied edges per dependent that is not doomed.
    satisfied: dict[UUID, int] = field(default_factory=dict)
    #: Blocked jobs to cancel, with the job whose failure doomed them.
    cancel: dict[UUID, UUID] = field(default_factory=dict)


def decide(
    outcomes: Mapping[UUID, bool], edges: Iterable[OpenEdge], states: Mapping[UUID, str]
) -> Resolution:
    """What finished jobs (``outcomes``: id → succeeded) do to the ``edges`` out of them.

    ``edges`` are the open edges out of the finished jobs and out of the jobs
    they doom (more are ignored); ``states`` the dependents' current states.
    A doomed job that is no longer blocked (cancelled by hand meanwhile) is
    not cancelled again, but still dooms what depends on it.
    """
    out: dict[UUID, list[OpenEdge]] = defaultdict(list)
    for edge in edges:
        out[edge.parent].append(edge)
    # The job whose failure is behind each failed, cancelled or doomed job.
    culprit = {job: job for job, ok in outcomes.items() if not ok}
    result = Resolution()
    satisfied: dict[UUID, int] = defaultdict(int)
    todo = deque(outcomes)
    seen = set(outcomes)
    while todo:
        parent = todo.popleft()
        failed = culprit.get(parent)
        for edge in out.get(parent, ()):
            child = edge.child
            result.resolved.append((child, parent))
            if failed is None or edge.allow_failure:
                satisfied[child] += 1
                continue
            if states.get(child) == JobState.SUCCEEDED:
                continue  # cannot happen while the edge is open; never undo a success
            culprit.setdefault(child, failed)
            if child not in seen:
                seen.add(child)
                todo.append(child)
    for job, failed in culprit.items():
        if job not in outcomes and states.get(job) == JobState.BLOCKED:
            result.cancel[job] = failed
    result.satisfied = {job: n for job, n in satisfied.items() if job not in culprit}
    return result


@dataclass(slots=True)
class Applied:
    #: Work messages of released jobs, then ``job.finished`` of cancelled ones,
    #: for the caller's outbox.
    messages: list[outbox.Message] = field(default_factory=list)
    #: (job id, queue) of jobs released and of jobs cancelled.
    released: list[tuple[UUID, str]] = field(default_factory=list)
    cancelled: list[tuple[UUID, str]] = field(default_factory=list)
    #: History rows of the jobs cancelled, when the caller writes them (the
    #: "released" rows are written with the release).
    events: list[EventRow] = field(default_factory=list)


async def apply(
    conn: Connection,
    outcomes: Mapping[UUID, bool],
    *,
    only: Sequence[UUID] = (),
    defer_events: bool = False,
) -> Applied:
    """Apply ``outcomes`` (finished job → succeeded) in the caller's transaction.

    ``only`` limits it to edges into those jobs (admission: its own new rows).
    With ``defer_events`` the cancels' history rows are left in ``Applied.events`` for
    the caller to write with its own.
    Dependents are locked in id order before anything is written, so
    resolvers working on overlapping jobs wait for each other, never deadlock.
    """
    finished = list(outcomes)
    failed = [job for job, ok in outcomes.items() if not ok]
    q = queries()
    locked = await conn.fetch(q["resolver_lock_reached"], finished, failed, list(only))
    if not locked:
        return Applied()  # the common case: nothing waits for these jobs
    states = {r["id"]: r["state"] for r in locked}
    children = list(states)
    # Read again under the locks: edges another resolver settled meanwhile
    # are gone now, and no one else can settle these until we commit.
    edges = [
        OpenEdge(r["job_id"], r["depends_on"], r["allow_failure"])
        for r in await conn.fetch(q["resolver_open_edges"], finished, failed, children)
    ]
    resolution = decide(outcomes, edges, states)
    if resolution.resolved:
        pairs = list(zip(*resolution.resolved, strict=True))
        await conn.execute(q["resolver_mark_resolved"], list(pairs[0]), list(pairs[1]))
    applied = Applied()
    if resolution.satisfied:
        applied = await _released(conn, resolution.satisfied)
    events = applied.events
    if resolution.cancel:
        ids = list(resolution.cancel)
        reasons = [f"upstream_failed: {resolution.cancel[i]}" for i in ids]
        announced: list[JobFinished] = []
        for row in await conn.fetch(q["resolver_cancel"], ids, reasons):
            reason = f"upstream_failed: {resolution.cancel[row['id']]}"
            applied.cancelled.append((row["id"], row["queue"]))
            events.append((row["id"], "cancelled", row["attempt"], 0, None, reason))
            announced.append(
                finished_event(row["id"], row["queue"], JobState.CANCELLED, row["attempt"], reason)
            )
        applied.messages += finished_messages(announced)
    if events and not defer_events:
        await conn.execute(q["job_events_insert"], *event_rows(events))
    return applied


async def release_succeeded(conn: Connection, succeeded: Sequence[UUID]) -> Applied:
    """``apply`` for jobs that all succeeded: successes doom nothing, so
    there is no closure to walk and no rule to run; every open edge out of
    them is satisfied.
    """
    q = queries()
    rows = await conn.fetch(q["resolver_satisfy_succeeded"], list(succeeded))
    if not rows:
        return Applied()
    satisfied = {r["job_id"]: r["n"] for r in rows}
    if len(satisfied) > 1:  # one row needs no order to be locked in
        await conn.fetch(q["resolver_lock_jobs"], sorted(satisfied))
    return await _released(conn, satisfied)


#: write_release's job columns when it writes no job.
NO_WRITE: tuple[list[Any], ...] = ([],) * 13


@dataclass(frozen=True, slots=True)
class Written:
    """What ``write_release`` wrote."""

    #: Ids of the job rows written (all those given, unless one moved).
    ids: list[UUID]
    #: Rows of the jobs released (dispatched or pending).
    released: list[Record]
    #: Outbox ids of the messages given, in their order.
    outbox_ids: list[int]
    #: Outbox id of the foreseen work message, if its job was dispatched.
    work_id: int | None


async def write_release(
    conn: Connection,
    write: Sequence[Sequence[Any]] = NO_WRITE,
    *,
    lease_s: float = 0.0,
    succeeded: Sequence[UUID] = (),
    satisfied: Mapping[UUID, int] | None = None,
    events: Sequence[EventRow] = (),
    messages: Sequence[outbox.Message] = (),
    work: tuple[UUID, outbox.Message] | None = None,
) -> Written:
    """Write job rows, release their dependents and record it all, in one statement.

    ``write``: the 13 job columns of ``write_release``. ``satisfied``
    (dependent → edges satisfied) are taken off the dependents;
    ``succeeded`` are jobs whose rows the caller has locked and whose open
    edges it counted into ``satisfied``: they are marked resolved here.
    ``events`` and ``messages`` are history and outbox rows (the caller
    publishes the messages after commit); jobs released get their
    "released" history row here. ``work`` is the work message foreseen for
    a job, written only if that job is dispatched here.
    Raises ConflictError when the edges marked are not the edges counted.
    """
    ids = list(satisfied or ())
    counts = [satisfied[i] for i in ids] if satisfied else []
    subjects, payloads, headers, grace = outbox.columns(messages, own=True)
    # The foreseen work message as scalars ($28-$31), all NULL without one.
    work_row: list[Any] = [None] * 4
    if work is not None:
        job, message = work
        [subject], [payload], [header], _ = outbox.columns([message], own=True)
        work_row = [subject, payload, header, job]
    rows = await conn.fetch(
        queries()["write_release"],
        *write,
        lease_s,
        list(succeeded),
        ids,
        counts,
        *event_rows(events),
        subjects,
        payloads,
        headers,
        grace,
        *work_row,
    )
    first = rows[0]
    if succeeded and first["marked"] != sum(counts):
        # The edges were read under the parents' locks; a difference is a bug.
        raise ConflictError(f"marked {first['marked']} edges, counted {sum(counts)}")
    released = [r for r in rows if r["id"] is not None]
    return Written(list(first["written"]), released, list(first["outbox_ids"]), first["work_id"])


def released_of(released: Sequence[Record]) -> Applied:
    """``Applied`` for jobs released (rows from ``write_release``), without
    their work messages (``work``)."""
    applied = Applied()
    applied.released = [(row["id"], row["queue"]) for row in released]
    return applied


async def work(conn: Connection, released: Sequence[Record]) -> list[outbox.Message]:
    """Work messages of the jobs released straight to ``dispatched``, best first."""
    dispatched = [r for r in released if r["state"] == JobState.DISPATCHED]
    if not dispatched:
        return []
    parents = await parents_of(conn, [r["id"] for r in dispatched])
    dispatched.sort(key=lambda r: (-r["priority"], r["run_at"], r["id"]))
    return [work_of(r, parents.get(r["id"])) for r in dispatched]


async def _released(conn: Connection, satisfied: Mapping[UUID, int]) -> Applied:
    """Take the edges ``satisfied`` (already resolved) off their dependents."""
    written = await write_release(conn, satisfied=satisfied)
    applied = released_of(written.released)
    applied.messages += await work(conn, written.released)
    return applied


def work_of(row: Mapping[str, Any], parents: Mapping[str, str] | None) -> outbox.Message:
    command = row["command"]
    return work_message(
        row["id"],
        queue=row["queue"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        task=row["task"],
        payload_json=row["payload"],
        command=None if command is None else _decode_command.decode(command),
        shell=row["shell"],
        timeout_s=row["timeout_s"],
        checkpoint=row["checkpoint"],
        traceparent=row["traceparent"],
        parents=parents,
    )


async def parents_of(conn: Connection, job_ids: Sequence[UUID]) -> dict[UUID, dict[str, str]]:
    """Each job's parents' results (JSON text, None as ``null``) by parent key."""
    found: dict[UUID, dict[str, str]] = defaultdict(dict)
    for row in await conn.fetch(queries()["resolver_parents"], list(job_ids)):
        found[row["job_id"]][row["key"]] = row["result"] or "null"
    return dict(found)


async def link(conn: Connection, fresh: Sequence[NewJob]) -> list[outbox.Message]:
    """Write the edges of newly inserted jobs; apply parents already finished.

    Parents outside ``fresh`` must exist: they are locked ``FOR SHARE`` (in
    id order) so none can finish between reading its state here and the
    commit; one that finished before is applied to the new edges at once.
    Raises ValidationError (rolling the caller's transaction back) naming the
    first dependency on a job that does not exist.
    """
    new = {job.id for job in fresh}
    linked = [job for job in fresh if job.deps]
    external = sorted({d.parent for job in linked for d in job.deps if d.parent not in new})
    states: dict[UUID, str] = {}
    if external:
        rows = await conn.fetch(queries()["deps_lock_parents"], external)
        states = {r["id"]: r["state"] for r in rows}
    for job in linked:
        for dep in job.deps:
            if dep.parent not in new and dep.parent not in states:
                raise ValidationError(f"job {dep.parent} does not exist", field=dep.field)
    await conn.execute(
        queries()["deps_insert"],
        [job.id for job in linked for _ in job.deps],
        [dep.parent for job in linked for dep in job.deps],
        [dep.allow_failure for job in linked for dep in job.deps],
    )
    done = {job: s == JobState.SUCCEEDED for job, s in states.items() if s in _TERMINAL}
    if not done:
        return []
    applied = await apply(conn, done, only=[job.id for job in linked])
    return applied.messages
