"""Checking a DAG before anything is written: refs, limits, cycles, critical path."""

from __future__ import annotations

import itertools
from typing import Any
from uuid import UUID

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workron._dag_graph import critical_path, find_cycle, validate
from workron.dag_api import MAX_EDGES, MAX_NODES, DagSpec
from workron.dags import plan
from workron.errors import PayloadTooLargeError, ValidationError
from workron.events import MAX_PAYLOAD_BYTES

EXISTING = "0190d1c0-0000-7000-8000-000000000001"


def dag(*jobs: dict[str, Any]) -> DagSpec:
    return msgspec.convert({"jobs": list(jobs)}, DagSpec)


def job(ref: str, *deps: Any, **fields: Any) -> dict[str, Any]:
    return {"ref": ref, "task": "t", "depends_on": list(deps), **fields}


def invalid(spec: DagSpec) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        validate(spec)
    return caught.value


def test_refs_and_ids_resolve_with_their_failure_policy() -> None:
    graph = validate(
        dag(
            job("a"),
            job("b", "a", EXISTING, allow_failure=True),
            job("c", {"job": "b", "allow_failure": False}, {"job": "a"}),
        )
    )
    assert graph.refs == ["a", "b", "c"]
    assert [(e.child, e.parent, e.allow_failure) for e in graph.edges] == [
        (1, 0, True),
        (1, UUID(EXISTING), True),
        (2, 1, False),
        (2, 0, False),
    ]
    assert graph.edges[1].field == "$.jobs[1].depends_on[1]"


def test_a_cycle_is_refused_with_its_path() -> None:
    error = invalid(dag(job("a", "c"), job("b", "a"), job("c", "b"), job("d")))
    assert error.message == "dependency cycle: a -> c -> b -> a"
    assert error.field == "$.jobs[0].depends_on[0]"


def test_a_two_cycle_behind_a_valid_part() -> None:
    error = invalid(dag(job("x"), job("a", "x", "b"), job("b", "a")))
    assert error.message in ("dependency cycle: a -> b -> a", "dependency cycle: b -> a -> b")


def test_self_dependency() -> None:
    error = invalid(dag(job("a"), job("b", "a", "b")))
    assert error.field == "$.jobs[1].depends_on[1]" and "itself" in error.message


def test_unknown_ref() -> None:
    error = invalid(dag(job("a"), job("b", "nope")))
    assert error.field == "$.jobs[1].depends_on[0]" and "'nope'" in error.message


def test_duplicate_ref_and_duplicate_dependency() -> None:
    error = invalid(dag(job("a"), job("b"), job("a")))
    assert error.field == "$.jobs[2].ref" and "$.jobs[0]" in error.message
    error = invalid(dag(job("a"), job("b", "a", {"job": "a"})))
    assert error.field == "$.jobs[1].depends_on[1]"


def test_jobs_of_a_dag_take_no_idempotency_key() -> None:
    error = invalid(dag(job("a", idempotency_key="k")))
    assert error.field == "$.jobs[0].idempotency_key"


def test_size_limits() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.jobs"):
        dag(*(job(f"n{i}") for i in range(MAX_NODES + 1)))
    # Each job waits for every earlier one: just over the edge limit.
    count = next(n for n in range(1000) if n * (n - 1) // 2 > MAX_EDGES)
    refs = [f"n{i}" for i in range(count)]
    error = invalid(dag(*(job(ref, *refs[:i]) for i, ref in enumerate(refs))))
    assert error.field == "$.jobs" and str(MAX_EDGES) in error.message


def test_bad_refs_are_refused_by_type() -> None:
    for ref in ("", "../x", ".hidden", "a/b", "x" * 65):
        with pytest.raises(msgspec.ValidationError, match=r"\$\.jobs\[0\]\.ref"):
            dag(job(ref))


def test_job_errors_carry_the_jobs_path() -> None:
    with pytest.raises(ValidationError) as caught:
        plan(dag(job("a"), {"ref": "b"}), dag_id=UUID(EXISTING))
    assert caught.value.field == "$.jobs[1].command"
    big = {"ref": "a", "task": "t", "payload": "x" * MAX_PAYLOAD_BYTES}
    with pytest.raises(PayloadTooLargeError) as too_large:
        plan(dag(big), dag_id=UUID(EXISTING))
    assert too_large.value.field == "$.jobs[0].payload"


def test_plan_blocks_only_jobs_with_dependencies() -> None:
    _, planned = plan(dag(job("a"), job("b", "a"), job("c", EXISTING)), dag_id=UUID(EXISTING))
    assert [p.state for p in planned] == ["dispatched", "blocked", "blocked"]
    assert planned[1].deps[0].parent == planned[0].id
    assert {p.dag_ref for p in planned} == {"a", "b", "c"}


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 12).flatmap(lambda n: st.tuples(st.just(n), st.data())))
def test_find_cycle_agrees_with_acyclicity(case: tuple[int, st.DataObject]) -> None:
    n, data = case
    pairs = data.draw(
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n)
    )
    depends = [(c, p) for c, p in set(pairs) if c != p]
    cycle = find_cycle(list(range(n)), depends)
    edges = set(depends)
    # Acyclic exactly when ordering by a DFS finish time respects every edge.
    order: list[int] = []
    state: dict[int, int] = {}

    def visit(node: int) -> bool:
        state[node] = 1
        for child, parent in edges:
            if child == node:
                if state.get(parent) == 1 or (parent not in state and not visit(parent)):
                    return False
        state[node] = 2
        order.append(node)
        return True

    acyclic = all(state.get(v) == 2 or visit(v) for v in range(n))
    assert (cycle is None) == acyclic
    if cycle is not None:
        assert cycle[0] == cycle[-1] and len(cycle) >= 3
        assert all((a, b) in edges for a, b in itertools.pairwise(cycle))


def test_critical_path_by_weight_and_by_count() -> None:
    depends = [("b", "a"), ("c", "a"), ("d", "b"), ("d", "c")]
    nodes = ["a", "b", "c", "d"]
    path, total = critical_path(nodes, depends, {"a": 1, "b": 5, "c": 2, "d": 1})
    assert path == ["a", "b", "d"] and total == 7
    path, total = critical_path(nodes, depends, dict.fromkeys(nodes, 1.0))
    assert len(path) == 3 and total == 3
    assert critical_path([], [], {}) == ([], 0.0)
