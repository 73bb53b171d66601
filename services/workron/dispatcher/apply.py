"""Applying a batch of reports to the ledger in one transaction.

Inbox rows first: only reports never applied before go on; the jobs the
batch touches are locked in that same round trip, with their waiting
dependents. The reports are folded over them (``reports.plan_batch``), and
everything written with multi-row statements. When the jobs finished all
succeeded (a DAG hop), one statement writes the jobs, releases their
dependents and records the history and outbox rows (``job.finished``, and
the work message of a single dependent, built beforehand and handed to the
caller to publish at once: its release is certain once the batch commits).
Otherwise, and for releases not foreseen, the resolution and its rows
follow in further statements. The caller publishes the other outbox rows
after commit.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import msgspec

from workron import _resolve, bus, outbox
from workron.dispatcher.reports import Incoming, Locked, Observed, locked, plan_batch
from workron.errors import ConflictError
from workron.events import JobState, ReportSucceeded
from workron.jobs import EventRow, event_rows, finished_messages
from workron.ledger import Connection, KeyedTransactions, Pool, ledger_errors, queries

__all__ = ["CONSUMER", "FENCED_COUNTER", "BatchResult", "Early", "apply_batch", "dead_letter"]

#: Durable consumer of the REPORTS stream, and the inbox's name for it.
CONSUMER = "dispatcher"
#: Row of ``counters`` counting reports the ledger refused.
FENCED_COUNTER = "fenced_reports"

#: Publishes a foreseen work message before the commit, the only message
#: that may go out that soon (see ``_foreseen``).
Early = Callable[[outbox.Message], Awaitable[None]]


@dataclass(slots=True)
class BatchResult:
    #: Reports that changed a job or were fenced (not duplicates, not poison).
    applied: int = 0
    #: Messages whose id the inbox had seen: applied before, acked now.
    duplicates: int = 0
    #: (position in the batch, reason) of messages recorded as dead letters.
    poison: list[tuple[int, str]] = field(default_factory=list)
    #: Outbox rows to publish after commit: the work of dependents released
    #: (and job.finished of those cancelled), then the batch's job.finished.
    finished: list[tuple[int, outbox.Message]] = field(default_factory=list)
    #: What the jobs finished in this batch did to their dependents.
    dependents: _resolve.Applied = field(default_factory=_resolve.Applied)
    observed: Observed = field(default_factory=Observed)


async def apply_batch(
    keyed: KeyedTransactions,
    items: Sequence[Incoming],
    rng: random.Random | None = None,
    *,
    resolve: bool = True,
    early: Early | None = None,
) -> BatchResult:
    """Apply ``items`` in one transaction. Raises LedgerUnavailableError.

    With ``resolve``, the dependents of the jobs finished here are resolved
    in this transaction too. A caller whose batch fails for any other reason
    tries once more without: the outcomes are then recorded, and the
    resolver applies them from their job.finished events. ``early`` is
    given the work message of a dependent whose release is certain once
    this transaction commits, as soon as it is known.
    """
    async with ledger_errors(), keyed.transaction() as conn:
        return await _apply(conn, items, rng, resolve, early)


async def dead_letter(pool: Pool, item: Incoming, reason: str) -> None:
    """Record one message as a dead letter, on its own."""
    async with ledger_errors(), pool.acquire() as conn:
        await _dead_letters(conn, [(item, reason)])


async def _take(
    conn: Connection, items: Sequence[Incoming]
) -> tuple[list[int], dict[UUID, Locked]]:
    """Record the batch in the inbox and lock the jobs it touches: the
    positions of the reports not seen before (the first of equal ids), and
    the jobs, locked."""
    # Sorted: two dispatchers inserting overlapping ids take the index
    # entries in one order and cannot deadlock on them.
    ids = sorted({item.msg_id for item in items if item.msg_id is not None})
    job_ids = sorted({item.report.job_id for item in items if item.report is not None})
    # Only a success can release a waiter: the others' are not read.
    succeeded = list(
        {item.report.job_id for item in items if isinstance(item.report, ReportSucceeded)}
    )
    rows = await conn.fetch(queries()["dispatcher_take_batch"], CONSUMER, ids, job_ids, succeeded)
    new = set(rows[0]["new_ids"])
    jobs = {row["id"]: locked(row) for row in rows if row["id"] is not None}
    fresh = []
    for position, item in enumerate(items):
        if item.msg_id is None:
            fresh.append(position)  # undecodable and nameless: nothing to dedupe by
        elif item.msg_id in new:
            new.discard(item.msg_id)
            fresh.append(position)
    return fresh, jobs


async def _apply(
    conn: Connection,
    items: Sequence[Incoming],
    rng: random.Random | None,
    resolve: bool,
    early: Early | None,
) -> BatchResult:
    fresh, jobs = await _take(conn, items)
    result = BatchResult(duplicates=len(items) - len(fresh))
    result.poison = [(p, items[p].error or "") for p in fresh if items[p].report is None]
    positions = [p for p in fresh if items[p].report is not None]
    reports = [report for p in positions if (report := items[p].report) is not None]
    plan = plan_batch(jobs, reports, rng)
    for unknown in plan.unknown:
        job_id = reports[unknown].job_id
        result.poison.append((positions[unknown], f"job {job_id} does not exist"))
    result.applied = len(reports) - len(plan.unknown)
    result.observed = plan.observed

    # Dependents of the jobs finished here are resolved in this transaction:
    # a DAG hop then costs one commit and one publish, not a round through
    # job.finished and the resolver.
    touched = [job for job in jobs.values() if job.touched]
    waited = [job for job in touched if job.row.state.terminal and job.waiters]
    outcomes = {job.id: job.row.state is JobState.SUCCEEDED for job in waited} if resolve else {}
    finished = plan.finished
    if resolve:  # nothing is left for the resolver to do with these
        finished = [msgspec.structs.replace(event, resolved=True) for event in finished]
    announced = finished_messages(finished)
    written, dependents, foreseen = await _write(
        conn, touched, waited, outcomes, plan.events, announced, early
    )
    result.dependents = dependents
    if plan.fenced:
        await conn.execute(queries()["dispatcher_count"], FENCED_COUNTER, plan.fenced)
    if result.poison:
        await _dead_letters(conn, [(items[p], reason) for p, reason in result.poison])
    # Rows for what was not foreseen: the work of dependents released other
    # than as expected, a cascade's cancels.
    more: list[tuple[int, outbox.Message]] = []
    if dependents.messages or dependents.events:
        rows = await conn.fetch(
            queries()["dispatcher_record"],
            *event_rows(dependents.events),
            *outbox.columns(dependents.messages, own=True),
        )
        more = list(zip([r["id"] for r in rows], dependents.messages, strict=True))
    # The work of released dependents first: it is the next hop of a DAG.
    result.finished = foreseen + more + list(zip(written.outbox_ids, announced, strict=True))
    return result


async def _write(
    conn: Connection,
    touched: Sequence[Locked],
    waited: Sequence[Locked],
    outcomes: Mapping[UUID, bool],
    events: Sequence[EventRow],
    announced: Sequence[outbox.Message],
    early: Early | None = None,
) -> tuple[_resolve.Written, _resolve.Applied, list[tuple[int, outbox.Message]]]:
    """Write the batch's jobs, history and ``announced`` rows, and resolve
    the dependents of the jobs finished (``outcomes``): what was written,
    what the dependents need, and the foreseen work message's outbox row.

    Successes only (a DAG hop): one statement writes it all and releases
    the dependents, with the work message of a single one built beforehand.
    Otherwise the resolution follows the write.
    """
    # A dependent written in this batch too (no report can move a blocked
    # job, so it would be a bug) must not be updated twice in one statement.
    touched_ids = {job.id for job in touched}
    fast = bool(outcomes) and all(outcomes.values())
    fast = fast and not any(child in touched_ids for job in waited for child in job.waiters)
    satisfied = Counter(child for job in waited for child in job.waiters) if fast else Counter()
    if len(satisfied) > 1:  # their dependents, read under our locks, locked in id order
        await conn.fetch(queries()["resolver_lock_jobs"], sorted(satisfied))
    work = _foreseen(waited, satisfied) if len(satisfied) == 1 else None
    if work is not None and early is not None:
        await early(work[1])  # its worker can start while this transaction ends
    written = _resolve.Written([], [], [], None)
    if touched or events or announced:
        written = await _resolve.write_release(
            conn,
            _columns(touched),
            lease_s=bus.LEASE_S,
            succeeded=[job.id for job in waited] if fast else [],
            satisfied=satisfied,
            events=events,
            messages=announced,
            work=work,
        )
    _check_written(touched, written.ids)
    if outcomes and not fast:
        return written, await _resolve.apply(conn, outcomes, defer_events=True), []
    dependents = _resolve.released_of(written.released)
    foreseen: list[tuple[int, outbox.Message]] = []
    unforeseen = written.released
    if work is not None and written.work_id is not None:
        foreseen = [(written.work_id, work[1])]
        unforeseen = [row for row in unforeseen if row["id"] != work[0]]
    if unforeseen:
        dependents.messages += await _resolve.work(conn, unforeseen)
    return written, dependents, foreseen


def _foreseen(
    waited: Sequence[Locked], satisfied: Mapping[UUID, int]
) -> tuple[UUID, outbox.Message] | None:
    """The work message of the batch's single dependent, if it will dispatch it,
    built from what was read with its parents' locks and its own; None if
    there is no such dependent or it cannot be foreseen.

    The batch's jobs, this dependent and its unmet edges are all locked,
    so it is dispatched if this transaction commits: the message may be
    published before the commit. A worker may then start it first, but no
    outcome of it is recorded before the commit (recording one takes the
    dependent's lock), and a transaction that fails after all leaves an
    execution whose reports are fenced; the attempt's message, published
    again when the job is released, is the same message, which JetStream
    drops as a duplicate, and the lease brings the job back if nobody runs
    it. ``write_release`` writes the message only if the job is dispatched
    as foreseen; any job it releases otherwise gets its message built
    afterwards.
    """
    [(child, count)] = satisfied.items()
    row = next((job.next for job in waited if job.next and job.next["id"] == child), None)
    if row is None or (row["state"], row["unmet"], row["due"]) != ("blocked", count, True):
        return None
    # Results written in this batch are newer than those read.
    results = {job.id: job.result for job in waited if job.result is not None}
    parents = {
        key: results.get(parent, stored)
        for parent, key, stored in zip(
            row["parent_ids"], row["parent_keys"], row["parent_results"], strict=True
        )
    }
    return child, _resolve.work_of(row, parents)


def _columns(jobs: Sequence[Locked]) -> tuple[list[Any], ...]:
    """The job columns of ``write_release``."""
    return (
        [j.id for j in jobs],
        [j.old.state.value for j in jobs],
        [j.old.attempt for j in jobs],
        [j.old.delivery for j in jobs],
        [j.row.state.value for j in jobs],
        [j.row.attempt for j in jobs],
        [j.row.delivery for j in jobs],
        [j.worker_id for j in jobs],
        [j.started_at for j in jobs],
        [j.finished_at for j in jobs],
        [j.result for j in jobs],
        [j.error for j in jobs],
        [j.retry_in for j in jobs],
    )


def _check_written(jobs: Sequence[Locked], written: Sequence[UUID]) -> None:
    if len(written) != len(jobs):
        # The rows are locked since they were read, so this means a bug;
        # refusing the batch (rollback) beats writing a decision on a row
        # that is not the one decided on.
        missed = {j.id for j in jobs} - set(written)
        raise ConflictError(f"guarded update missed jobs {sorted(missed)}")


async def _dead_letters(conn: Connection, letters: Sequence[tuple[Incoming, str]]) -> None:
    await conn.execute(
        queries()["dead_letter_insert"],
        ["reports"] * len(letters),
        [item.subject for item, _ in letters],
        [item.msg_id for item, _ in letters],
        [reason for _, reason in letters],
        [item.data for item, _ in letters],
    )
