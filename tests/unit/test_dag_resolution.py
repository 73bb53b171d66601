"""The resolver's rule (``_resolve.decide``) against the definition of a DAG's outcome.

A random DAG runs to the end, its ``job.finished`` events applied in random
batches (some twice, as a redelivery would): every job must end as the
definition says. A job runs exactly when each parent succeeded, or ended
otherwise through an edge that allows failure; it is cancelled exactly when
a parent failed or was cancelled through an edge that does not. The SQL path
(``_resolve.apply``) runs this same function; tests/integration/test_dags.py
runs random DAGs through the real resolver.
"""

from __future__ import annotations

import uuid
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from workron._resolve import OpenEdge, decide


def expected(n: int, edges: list[tuple[int, int, bool]], outcome: list[bool]) -> list[str]:
    """Each job's final state, by the definition (parents come first: lower numbers)."""
    fate: list[str] = []
    for child in range(n):
        doomed = any(
            c == child and not allow and fate[parent] != "succeeded" for c, parent, allow in edges
        )
        fate.append("cancelled" if doomed else "succeeded" if outcome[child] else "failed")
    return fate


def ancestors(job: int, edges: list[tuple[int, int, bool]]) -> set[int]:
    found: set[int] = set()
    todo = [job]
    while todo:
        node = todo.pop()
        for c, parent, _ in edges:
            if c == node and parent not in found:
                found.add(parent)
                todo.append(parent)
    return found


@st.composite
def dags(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, bool]], list[bool]]:
    n = draw(st.integers(1, 10))
    edges = []
    for child in range(1, n):
        parents = draw(st.sets(st.integers(0, child - 1), max_size=3))
        edges += [(child, p, draw(st.booleans())) for p in sorted(parents)]
    outcome = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return n, edges, outcome


@settings(max_examples=400, deadline=None)
@given(dags(), st.data())
def test_random_dags_end_as_defined(
    case: tuple[int, list[tuple[int, int, bool]], list[bool]], data: st.DataObject
) -> None:
    n, edges, outcome = case
    ids = [uuid.UUID(int=i + 1) for i in range(n)]
    index = {job: i for i, job in enumerate(ids)}
    unmet = [sum(1 for c, _, _ in edges if c == i) for i in range(n)]
    state = ["blocked" if unmet[i] else "ready" for i in range(n)]
    released = [0] * n
    cause: dict[int, int] = {}
    open_edges = {(ids[c], ids[p]): allow for c, p, allow in edges}
    events: list[UUID] = []  # job.finished waiting to be applied
    applied: list[UUID] = []
    while True:
        ready = [i for i in range(n) if state[i] == "ready"]
        if not ready and not events:
            break
        if ready and (not events or data.draw(st.booleans())):
            job = data.draw(st.sampled_from(ready))
            state[job] = "succeeded" if outcome[job] else "failed"
            events.append(ids[job])
            continue
        # A batch of waiting events, perhaps with one already applied (a redelivery).
        batch = data.draw(st.lists(st.sampled_from(events), min_size=1, unique=True))
        if applied and data.draw(st.booleans()):
            batch.append(data.draw(st.sampled_from(applied)))
        outcomes = {job: state[index[job]] == "succeeded" for job in batch}
        result = decide(
            outcomes,
            [OpenEdge(c, p, allow) for (c, p), allow in open_edges.items()],
            {job: state[i] for i, job in enumerate(ids)},
        )
        for child, parent in result.resolved:
            assert open_edges.pop((child, parent), None) is not None, "an edge resolved twice"
        for job, failed in result.cancel.items():
            i = index[job]
            assert state[i] == "blocked"
            state[i] = "cancelled"
            cause[i] = index[failed]
            events.append(job)
        for job, count in result.satisfied.items():
            i = index[job]
            unmet[i] -= count
            assert unmet[i] >= 0
            if unmet[i] == 0 and state[i] == "blocked":
                state[i] = "ready"
                released[i] += 1
        for job in batch:
            if job in events:
                events.remove(job)
                applied.append(job)
    assert not open_edges
    check_end(edges, outcome, state, released, cause)


def check_end(
    edges: list[tuple[int, int, bool]],
    outcome: list[bool],
    state: list[str],
    released: list[int],
    cause: dict[int, int],
) -> None:
    fate = expected(len(state), edges, outcome)
    assert state == fate
    for i, final in enumerate(fate):
        has_parents = any(c == i for c, _, _ in edges)
        assert released[i] == (1 if has_parents and final != "cancelled" else 0)
        if final == "cancelled":
            # The reason names a job that failed (not one merely cancelled)
            # upstream of this one.
            assert fate[cause[i]] == "failed" and cause[i] in ancestors(i, edges)


def test_a_doomed_job_cancelled_by_hand_still_dooms_its_dependents() -> None:
    a, b, c, d = (uuid.UUID(int=i) for i in range(1, 5))
    result = decide(
        {a: False},
        [OpenEdge(b, a, False), OpenEdge(c, b, False), OpenEdge(d, b, True)],
        {b: "cancelled", c: "blocked", d: "blocked"},
    )
    assert result.cancel == {c: a}
    assert result.satisfied == {d: 1}
    assert sorted(result.resolved) == sorted([(b, a), (c, b), (d, b)])
