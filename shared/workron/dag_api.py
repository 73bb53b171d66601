"""DAG types of the HTTP API, shared by the admission service and the client SDK.

A DAG is submitted whole (``POST /v1/dags``): its jobs are ``JobSpec`` s with
a local ``ref``; ``depends_on`` names other jobs of the DAG by ref, or
existing jobs by id (a string that is no ref of the DAG is taken as a job id).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import msgspec
from msgspec import Meta, Struct

from workron.events import JobSpec, JobState

__all__ = [
    "MAX_DAG_BODY_BYTES",
    "MAX_EDGES",
    "MAX_NODES",
    "Dag",
    "DagEdge",
    "DagJob",
    "DagNode",
    "DagProgress",
    "DagSpec",
    "DagState",
    "DagSubmitted",
]

#: Most jobs in one DAG.
MAX_NODES = 10_000
#: Most dependency edges in one DAG (a 10,000-wide fan-out and fan-in has 20,000).
MAX_EDGES = 100_000
#: Largest ``POST /v1/dags`` body: 10,000 jobs do not fit in a plain job's 1 MiB.
MAX_DAG_BODY_BYTES = 16 * 1024 * 1024

#: A job's name inside its DAG; also the key of its result for its dependents
#: and a file name for commands, hence no ``/`` and no leading dot.
Ref = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$",
        description="Letters, digits, _ . and -; not starting with a dot; at most 64",
    ),
]


class DagJob(JobSpec, frozen=True, kw_only=True):
    """A job of a DAG: a JobSpec with its local ``ref``."""

    ref: Ref


class DagSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    jobs: Annotated[list[DagJob], Meta(min_length=1, max_length=MAX_NODES)]
    name: Annotated[str, Meta(max_length=256)] | None = None
    #: A second submission with the same key returns the first DAG (200).
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


class DagSubmitted(Struct, kw_only=True):
    id: UUID
    #: False when an earlier DAG with the same idempotency key won.
    created: bool
    #: Job id of each ref.
    jobs: dict[str, UUID]


class DagNode(Struct, kw_only=True):
    ref: str
    job_id: UUID
    state: JobState
    attempt: int
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: Seconds from start to end of the last execution, once finished.
    run_s: float | None = None


class DagEdge(Struct, kw_only=True):
    #: The parent: a ref of this DAG, or the id of a job outside it.
    parent: str
    #: The dependent: a ref of this DAG.
    child: str
    allow_failure: bool = False


#: A DAG's state: ``running`` until every job is terminal; then ``succeeded``
#: (all succeeded), ``failed`` (any failed) or ``cancelled``.
DagState = Literal["running", "succeeded", "failed", "cancelled"]


class DagProgress(Struct, kw_only=True):
    """How far a DAG has got, without its jobs and edges: what a follower polls."""

    id: UUID
    name: str | None = None
    created_at: datetime
    state: DagState
    counts: dict[str, int]
    #: Jobs in the DAG, and how many of them are terminal.
    total: int
    finished: int
    #: When its first job started; when its last job finished, once the DAG
    #: is no longer running.
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: Seconds from submission to ``finished_at`` (to now while running), by
    #: the ledger's clock.
    elapsed_s: float


class Dag(Struct, kw_only=True):
    id: UUID
    name: str | None = None
    created_at: datetime
    #: ``running`` until every job is terminal; then ``succeeded`` (all
    #: succeeded), ``failed`` (any failed) or ``cancelled``.
    state: DagState
    counts: dict[str, int]
    nodes: list[DagNode]
    edges: list[DagEdge]
    #: Refs along the critical path, first to last.
    critical_path: list[str] = msgspec.field(default_factory=list)
    #: What the critical path is longest in: ``run_time`` (summed run seconds
    #: of its jobs, once every job is terminal) or ``nodes`` (while running).
    critical_path_by: Literal["run_time", "nodes"] = "nodes"
    #: Summed run seconds along the critical path (``run_time`` only).
    critical_path_s: float | None = None
