"""Retrying inside a DAG (``_reopen.plan``), with the resolver's rule (``_resolve.decide``).

A random DAG runs to the end in a model of the ledger (states, edges with
their ``resolved`` flag, ``unmet_deps``); then failed jobs are retried with
a new outcome, some more than once, and the DAG runs on. Every job must end
as if each retried job had had its last outcome from the start, every edge
is resolved once the DAG has finished, and a blocked job's ``unmet_deps``
always counts its open edges. tests/integration/test_dag_retry.py runs the
SQL path.
"""

from __future__ import annotations

import random
import uuid
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from workron._reopen import InEdge, blocker, plan, upstream_of
from workron._resolve import INBOX, OpenEdge, decide
from workron.resolver.service import CONSUMER

from .test_dag_resolution import dags, expected

_TERMINAL = {"succeeded", "failed", "cancelled"}


class Ledger:
    """The jobs and edges of one DAG, run one finished job at a time."""

    def __init__(self, n: int, edges: list[tuple[int, int, bool]], rng: random.Random) -> None:
        self.ids = [uuid.UUID(int=i + 1) for i in range(n)]
        self.num = {job: i for i, job in enumerate(self.ids)}
        self.edges = {(self.ids[c], self.ids[p]): allow for c, p, allow in edges}
        self.resolved = dict.fromkeys(self.edges, False)
        self.unmet = {job: sum(1 for c, _ in self.edges if c == job) for job in self.ids}
        self.state = {job: "blocked" if self.unmet[job] else "pending" for job in self.ids}
        self.error: dict[UUID, str | None] = dict.fromkeys(self.ids)
        self.rng = rng

    def run(self, outcome: list[bool]) -> None:
        """Run ready jobs one at a time, applying each outcome like the resolver."""
        while ready := [j for j in self.ids if self.state[j] == "pending"]:
            job = self.rng.choice(ready)
            ok = outcome[self.num[job]]
            self.state[job] = "succeeded" if ok else "failed"
            open_edges = [
                OpenEdge(c, p, allow)
                for (c, p), allow in self.edges.items()
                if not self.resolved[(c, p)]
            ]
            resolution = decide({job: ok}, open_edges, self.state)
            for pair in resolution.resolved:
                assert not self.resolved[pair], "an edge resolved twice"
                self.resolved[pair] = True
            for child, count in resolution.satisfied.items():
                if self.state[child] == "blocked":
                    self.unmet[child] -= count
                    if self.unmet[child] == 0:
                        self.state[child] = "pending"
            for child, culprit in resolution.cancel.items():
                self.state[child] = "cancelled"
                self.error[child] = f"upstream_failed: {culprit}"
            self.check()

    def retry(self, job: UUID) -> None:
        """``recovery.retry``: the walk of recovery_reopen_lock, then the plan."""
        assert self.state[job] in ("failed", "cancelled")
        found: set[UUID] = set()
        todo = [job]
        while todo:
            parent = todo.pop()
            for (child, p), allow in self.edges.items():
                if p == parent and not allow and child not in found and self.cascaded(child):
                    found.add(child)
                    todo.append(child)
        edges = [
            InEdge(c, p, allow, self.resolved[(c, p)], self.state[p], self.error[p])
            for (c, p), allow in self.edges.items()
            if c in found or c == job
        ]
        assert not [e for e in edges if e.child == job and blocker(e)]
        result = plan(job, found, edges)
        assert set(result.reopened) | set(result.kept) == found
        for pair in result.unresolve:
            self.resolved[pair] = False
        for child, unmet in result.reopened.items():
            self.state[child], self.unmet[child], self.error[child] = "blocked", unmet, None
        for child, culprit in result.kept.items():
            assert self.state[culprit] == "failed"
            self.error[child] = f"upstream_failed: {culprit}"
        self.state[job] = "blocked" if result.unmet else "pending"
        self.unmet[job], self.error[job] = result.unmet, None
        self.check()

    def cascaded(self, job: UUID) -> bool:
        return self.state[job] == "cancelled" and upstream_of(self.error[job]) is not None

    def check(self) -> None:
        for job in self.ids:
            if self.state[job] == "blocked":
                open_in = sum(1 for c, p in self.edges if c == job and not self.resolved[(c, p)])
                assert self.unmet[job] == open_in


@settings(max_examples=300, deadline=None)
@given(dags(), st.data())
def test_retried_dags_end_as_if_the_last_outcome_came_first(
    case: tuple[int, list[tuple[int, int, bool]], list[bool]], data: st.DataObject
) -> None:
    n, edges, outcome = case
    ledger = Ledger(n, edges, random.Random(data.draw(st.integers(0, 2**32))))
    ledger.run(outcome)
    outcome = list(outcome)
    for _ in range(data.draw(st.integers(1, 3))):
        failed = [j for j in ledger.ids if ledger.state[j] == "failed"]
        if not failed:
            break
        job = data.draw(st.sampled_from(failed))
        outcome[ledger.num[job]] = data.draw(st.booleans())
        ledger.retry(job)
        ledger.run(outcome)
    assert [ledger.state[j] for j in ledger.ids] == expected(n, edges, outcome)
    assert all(ledger.resolved.values())
    for job in ledger.ids:
        if ledger.state[job] == "cancelled":
            culprit = upstream_of(ledger.error[job])
            assert culprit is not None and ledger.state[culprit] == "failed"


def _ids(*names: str) -> dict[str, UUID]:
    return {name: uuid.UUID(int=i + 1) for i, name in enumerate(names)}


def test_a_chain_reopens_behind_the_retried_job() -> None:
    j = _ids("a", "b", "c")
    result = plan(
        j["a"],
        [j["b"], j["c"]],
        [
            InEdge(j["b"], j["a"], False, True, "failed"),
            InEdge(j["c"], j["b"], False, True, "cancelled", f"upstream_failed: {j['a']}"),
        ],
    )
    assert result.reopened == {j["b"]: 1, j["c"]: 1} and result.kept == {}
    assert sorted(result.unresolve) == sorted([(j["b"], j["a"]), (j["c"], j["b"])])
    assert result.unmet == 0


def test_another_failed_parent_keeps_a_join_and_what_it_dooms() -> None:
    j = _ids("a", "x", "y", "join", "after", "tolerant")
    cascaded = f"upstream_failed: {j['y']}"
    result = plan(
        j["a"],
        [j["join"], j["after"]],
        [
            InEdge(j["join"], j["a"], False, True, "failed"),
            InEdge(j["join"], j["x"], False, True, "cancelled", cascaded),
            InEdge(j["after"], j["join"], False, True, "cancelled", f"upstream_failed: {j['a']}"),
        ],
    )
    # x was itself cancelled by the cascade from y: y is the job to retry.
    assert result.kept == {j["join"]: j["y"], j["after"]: j["y"]}
    assert result.reopened == {} and result.unresolve == []


def test_edges_from_outside_parents_count_by_their_state() -> None:
    j = _ids("a", "b", "done", "due", "rerun", "bad")
    result = plan(
        j["a"],
        [j["b"]],
        [
            InEdge(j["b"], j["a"], False, True, "failed"),
            InEdge(j["b"], j["done"], False, True, "succeeded"),  # met
            InEdge(j["b"], j["due"], False, False, "succeeded"),  # its outcome is on its way
            InEdge(j["b"], j["rerun"], False, True, "running"),  # retried since: open again
            InEdge(j["b"], j["bad"], True, True, "failed"),  # allowed to fail: met
        ],
    )
    assert result.reopened == {j["b"]: 3}
    assert sorted(result.unresolve) == sorted([(j["b"], j["a"]), (j["b"], j["rerun"])])


def test_the_retried_job_waits_for_a_parent_running_again() -> None:
    j = _ids("p", "r")
    result = plan(j["r"], [], [InEdge(j["r"], j["p"], True, True, "running")])
    assert result.unmet == 1 and result.unresolve == [(j["r"], j["p"])]


def test_blocker_names_the_job_to_retry() -> None:
    j = _ids("p", "c", "root")
    assert blocker(InEdge(j["c"], j["p"], False, True, "failed")) == j["p"]
    assert blocker(InEdge(j["c"], j["p"], True, True, "failed")) is None
    assert blocker(InEdge(j["c"], j["p"], False, True, "succeeded")) is None
    assert blocker(InEdge(j["c"], j["p"], False, True, "running")) is None
    cascaded = InEdge(j["c"], j["p"], False, True, "cancelled", f"upstream_failed: {j['root']}")
    assert blocker(cascaded) == j["root"]
    by_hand = InEdge(j["c"], j["p"], False, True, "cancelled", "cancelled by request")
    assert blocker(by_hand) == j["p"]
    assert upstream_of("upstream_failed: not-a-uuid") is None


def test_retries_record_superseded_events_in_the_resolvers_inbox() -> None:
    assert CONSUMER == INBOX
