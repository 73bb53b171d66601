"""The chaos checker: classify every acknowledged job from the ledger's own record.

Each job is exactly one of:

- ``succeeded_once`` / ``failed_once``: terminal, with exactly one outcome
  event (succeeded, failed, cancelled) that matches its state, and nothing
  accepted after it;
- ``lost``: not in the ledger, or not terminal by the deadline;
- ``double``: more than one outcome event, or the ledger accepted something
  after the outcome (the state flapped);
- ``overlapping``: two executions with distinct fencing tokens both held a
  valid lease at once in the ledger's view (see ``_overlaps``);
- ``inconsistent``: terminal, but its outcome event is missing or disagrees
  with its state.

Precedence is that order: a lost job is not also judged double, and so on.
The checker reads rows (``jobs``, ``job_events``, ``counters``) and the
execution log the chaos jobs append to; it never writes.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

__all__ = [
    "Event",
    "Execution",
    "JobCheck",
    "JobRow",
    "Summary",
    "Verdict",
    "check",
    "classify",
    "read_executions",
    "read_ledger",
]

#: Event kinds that record a job's outcome.
OUTCOMES = frozenset({"succeeded", "failed", "cancelled"})
#: Event kinds an execution's own report causes (worker_id set on the row).
EXECUTION_KINDS = frozenset(
    {"started", "checkpoint", "succeeded", "failed", "retrying", "cancelled"}
)
#: Kinds that end an execution's claim on the job: its own last word.
ENDING_KINDS = frozenset({"succeeded", "failed", "retrying", "cancelled"})
#: Ledger decisions that take a job away from the execution holding it,
#: recorded with that execution's attempt: the reaper's re-dispatch of a job
#: whose message JetStream lost, and a stopping worker's hand-back. (The
#: reaper's retry of a dead worker's job is a ``retrying`` row, an ending.)
REVOKING_KINDS = frozenset({"redispatched", "handed_back"})


class Verdict(enum.StrEnum):
    SUCCEEDED_ONCE = "succeeded_once"
    FAILED_ONCE = "failed_once"
    LOST = "lost"
    DOUBLE = "double"
    OVERLAPPING = "overlapping"
    INCONSISTENT = "inconsistent"


@dataclass(frozen=True, slots=True)
class JobRow:
    id: UUID
    state: str
    worker_id: str | None = None
    #: Epoch seconds (database clock).
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One ``job_events`` row; ``id`` orders rows, ``at`` is the database clock."""

    id: int
    job_id: UUID
    at: float
    kind: str
    attempt: int
    delivery: int = 0
    worker_id: str | None = None

    @property
    def token(self) -> tuple[int, int]:
        return (self.attempt, self.delivery)

    @property
    def from_execution(self) -> bool:
        return self.kind in EXECUTION_KINDS and self.worker_id is not None


@dataclass(frozen=True, slots=True)
class Execution:
    """One run of a chaos job's command, from the execution log."""

    job_id: UUID
    token: str
    part: str
    start: float
    end: float | None = None


@dataclass(frozen=True, slots=True)
class JobCheck:
    job_id: UUID
    verdict: Verdict
    detail: str = ""


def _token(event: Event) -> str:
    return f"{event.attempt}.{event.delivery}"


def _overlaps(accepted: Sequence[Event], lease_s: float | None, slack_s: float) -> str | None:
    """Why two executions held valid leases at once, or None.

    Executions are the tokens with an accepted ``started`` row. For each
    earlier execution A and later one B:

    1. the ledger accepted a report of A after B's start: it treated A as
       valid while B was (judged by row order, so equal timestamps within
       one transaction cannot hide it);
    2. with ``lease_s``: B started while A's lease was still valid — before
       any row ending or revoking A's attempt (A's own outcome or retry, a
       reaper's requeue), and within ``lease_s`` of A's start (the lease
       granted at delivery; a worker renews it only while it is alive).
       ``slack_s`` absorbs the delay between a report and the batch that
       applied it.
    """
    starts: dict[tuple[int, int], Event] = {}
    for event in accepted:
        if event.kind == "started" and event.worker_id is not None:
            starts.setdefault(event.token, event)
    ordered = sorted(starts.values(), key=lambda e: e.id)
    for i, a in enumerate(ordered):
        own = [e for e in accepted if e.token == a.token and e.from_execution and e.id > a.id]
        for b in ordered[i + 1 :]:
            late = [e for e in own if e.id > b.id]
            if late:
                return (
                    f"{late[0].kind} from {_token(a)} accepted after {_token(b)} started"
                    f" (row {late[0].id} > {b.id})"
                )
            if lease_s is None:
                continue
            # A's own last word, or any ledger decision ending its attempt
            # (a reaper's retry of a dead worker's job, a revocation).
            ends = [a.at + lease_s]
            ends += [
                e.at
                for e in accepted
                if e.kind in ENDING_KINDS | REVOKING_KINDS
                and e.attempt == a.attempt
                and e.id > a.id
            ]
            valid_until = min(ends)
            if b.at < valid_until - slack_s:
                return (
                    f"{_token(b)} started {b.at - a.at:.3f}s after {_token(a)}, whose lease"
                    f" was valid until +{valid_until - a.at:.3f}s and never revoked"
                )
    return None


def classify(
    job_id: UUID,
    job: JobRow | None,
    events: Iterable[Event],
    *,
    lease_s: float | None = None,
    slack_s: float = 0.5,
) -> JobCheck:
    """The verdict on one acknowledged job from its row and history."""
    if job is None:
        return JobCheck(job_id, Verdict.LOST, "not in the ledger")
    if job.state not in OUTCOMES:
        return JobCheck(job.id, Verdict.LOST, f"still {job.state} at the deadline")
    accepted = sorted((e for e in events if e.kind != "fenced"), key=lambda e: e.id)
    outcomes = [e for e in accepted if e.kind in OUTCOMES]
    if len(outcomes) > 1:
        kinds = ", ".join(f"{e.kind}@{_token(e)}" for e in outcomes)
        return JobCheck(job.id, Verdict.DOUBLE, f"{len(outcomes)} outcomes: {kinds}")
    if outcomes and (after := [e for e in accepted if e.id > outcomes[0].id]):
        return JobCheck(
            job.id,
            Verdict.DOUBLE,
            f"state flapped: {after[0].kind}@{_token(after[0])} accepted after "
            f"{outcomes[0].kind}@{_token(outcomes[0])}",
        )
    if (why := _overlaps(accepted, lease_s, slack_s)) is not None:
        return JobCheck(job.id, Verdict.OVERLAPPING, why)
    if not outcomes:
        return JobCheck(job.id, Verdict.INCONSISTENT, f"{job.state} without an outcome event")
    if outcomes[0].kind != job.state:
        return JobCheck(
            job.id, Verdict.INCONSISTENT, f"state {job.state} but outcome {outcomes[0].kind}"
        )
    verdict = Verdict.SUCCEEDED_ONCE if job.state == "succeeded" else Verdict.FAILED_ONCE
    return JobCheck(job.id, verdict)


@dataclass
class Summary:
    checks: list[JobCheck]
    fenced_counter: int
    fenced_events: int
    executions: int
    reexecuted: int
    recover_s: float | None
    drain_s: float | None = None
    counts: Counter[Verdict] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.counts = Counter(c.verdict for c in self.checks)

    def __getitem__(self, verdict: Verdict) -> int:
        return self.counts[verdict]

    @property
    def problems(self) -> list[JobCheck]:
        fine = {Verdict.SUCCEEDED_ONCE, Verdict.FAILED_ONCE}
        return [c for c in self.checks if c.verdict not in fine]

    def line(self) -> str:
        c = self.counts
        recover = "n/a" if self.recover_s is None else f"{self.recover_s:.1f}"
        drain = "n/a" if self.drain_s is None else f"{self.drain_s:.1f}"
        return (
            f"jobs={len(self.checks)} succeeded_once={c[Verdict.SUCCEEDED_ONCE]}"
            f" lost={c[Verdict.LOST]} double={c[Verdict.DOUBLE]}"
            f" overlapping={c[Verdict.OVERLAPPING]} fenced={self.fenced_counter}"
            f" recover_s={recover} drain_s={drain} failed_once={c[Verdict.FAILED_ONCE]}"
            f" inconsistent={c[Verdict.INCONSISTENT]} fenced_events={self.fenced_events}"
            f" executions={self.executions} reexecuted={self.reexecuted}"
        )

    def explain(self, limit: int = 20) -> str:
        return "\n".join(f"  {c.job_id} {c.verdict}: {c.detail}" for c in self.problems[:limit])


def check(
    acked: Iterable[UUID],
    jobs: Mapping[UUID, JobRow],
    events: Mapping[UUID, Sequence[Event]],
    *,
    fenced_counter: int = 0,
    executions: Sequence[Execution] = (),
    last_fault_at: float | None = None,
    last_ack_at: float | None = None,
    lease_s: float | None = None,
    slack_s: float = 0.5,
) -> Summary:
    """Classify every acknowledged job.

    ``recover_s`` runs from the last fault to the moment the ledger recorded
    the last outcome (the outcome event's time, database clock; the job
    row's ``finished_at`` is the worker's report time, which can be long
    before the ledger hears of it); it includes whatever load came after
    the fault. ``drain_s`` runs from the later of the last fault and the
    last acknowledged submission: the tail once nothing hits or feeds the
    system any more.
    """
    checks = []
    finished: list[float] = []
    ids = list(dict.fromkeys(acked))
    for job_id in ids:
        history = events.get(job_id, ())
        checks.append(classify(job_id, jobs.get(job_id), history, lease_s=lease_s, slack_s=slack_s))
        recorded = [e.at for e in history if e.kind in OUTCOMES]
        if recorded:
            finished.append(min(recorded))
    wanted = set(ids)
    runs = Counter(e.job_id for e in executions if e.job_id in wanted)
    recover_s = drain_s = None
    if finished and len(finished) == len(ids):
        if last_fault_at is not None:
            recover_s = max(0.0, max(finished) - last_fault_at)
        ended = max((t for t in (last_fault_at, last_ack_at) if t is not None), default=None)
        if ended is not None:
            drain_s = max(0.0, max(finished) - ended)
    return Summary(
        checks=checks,
        fenced_counter=fenced_counter,
        fenced_events=sum(1 for i in ids for e in events.get(i, ()) if e.kind == "fenced"),
        executions=sum(runs.values()),
        reexecuted=sum(1 for n in runs.values() if n > 1),
        recover_s=recover_s,
        drain_s=drain_s,
    )


def read_executions(path: Path) -> list[Execution]:
    """Executions from the log chaos commands append to.

    Lines are ``<job id> <token> start|end <epoch> <part>``; a start without
    an end is an execution that was killed (or is still running).
    """
    if not path.exists():
        return []
    open_runs: dict[tuple[str, str, str], float] = {}
    done: list[Execution] = []
    for line in path.read_text().splitlines():
        words = line.split()
        if len(words) != 5:
            continue  # a line torn by a kill mid-write
        job, token, what, at, part = words
        key = (job, token, part)
        if what == "start":
            open_runs[key] = float(at)
        elif what == "end" and key in open_runs:
            done.append(Execution(UUID(job), token, part, open_runs.pop(key), float(at)))
    done += [Execution(UUID(j), t, p, start) for (j, t, p), start in open_runs.items()]
    return sorted(done, key=lambda e: e.start)


async def read_ledger(
    conn: Any, ids: Sequence[UUID]
) -> tuple[dict[UUID, JobRow], dict[UUID, list[Event]], int]:
    """Jobs, their histories and the fenced-report counter, read in one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        job_rows = await conn.fetch(
            "SELECT id, state, worker_id, extract(epoch FROM finished_at)::float8 AS finished"
            " FROM jobs WHERE id = ANY($1::uuid[])",
            list(ids),
        )
        event_rows = await conn.fetch(
            "SELECT id, job_id, extract(epoch FROM at)::float8 AS at, kind, attempt, delivery,"
            " worker_id FROM job_events WHERE job_id = ANY($1::uuid[]) ORDER BY id",
            list(ids),
        )
        fenced = await conn.fetchval("SELECT value FROM counters WHERE name = 'fenced_reports'")
    jobs = {r["id"]: JobRow(r["id"], r["state"], r["worker_id"], r["finished"]) for r in job_rows}
    events: dict[UUID, list[Event]] = {}
    for r in event_rows:
        event = Event(
            r["id"], r["job_id"], r["at"], r["kind"], r["attempt"], r["delivery"], r["worker_id"]
        )
        events.setdefault(r["job_id"], []).append(event)
    return jobs, events, int(fenced or 0)
