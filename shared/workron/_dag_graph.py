"""The shape of a submitted DAG, checked before anything is written.

Pure functions: refs resolved to positions or job ids, limits, self
dependencies, duplicates and cycles (with the cycle's path in the message),
and the critical path of a DAG being shown. Every error is a
``ValidationError`` whose ``field`` is the JSON path of the culprit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

from workron.dag_api import MAX_EDGES, DagSpec
from workron.errors import ValidationError
from workron.events import Dependency

__all__ = ["Edge", "Graph", "critical_path", "find_cycle", "validate"]

N = TypeVar("N", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Edge:
    """``child`` (a position in the DAG's jobs) depends on ``parent``: a
    position, or the id of a job outside the DAG."""

    child: int
    parent: int | UUID
    allow_failure: bool
    #: JSON path of the dependency in the request, for errors about it.
    field: str


@dataclass(frozen=True, slots=True)
class Graph:
    refs: list[str]
    edges: list[Edge]


def _parse_id(name: str) -> UUID | None:
    try:
        return UUID(name)
    except ValueError:
        return None


def validate(spec: DagSpec) -> Graph:
    """Resolve every dependency and check the DAG. Raises ValidationError."""
    positions: dict[str, int] = {}
    for i, job in enumerate(spec.jobs):
        if job.ref in positions:
            raise ValidationError(
                f"ref {job.ref!r} is used twice (also by $.jobs[{positions[job.ref]}])",
                field=f"$.jobs[{i}].ref",
            )
        positions[job.ref] = i
        if job.idempotency_key is not None:
            raise ValidationError(
                "jobs of a DAG take no idempotency_key; give the DAG one",
                field=f"$.jobs[{i}].idempotency_key",
            )
    edges: list[Edge] = []
    for i in range(len(spec.jobs)):
        edges += _edges_of(spec, i, positions)
        if len(edges) > MAX_EDGES:
            raise ValidationError(
                f"the DAG has more than {MAX_EDGES} dependencies (the limit)", field="$.jobs"
            )
    refs = [job.ref for job in spec.jobs]
    internal = [(e.child, e.parent) for e in edges if isinstance(e.parent, int)]
    cycle = find_cycle(range(len(refs)), internal)
    if cycle is not None:
        path = " -> ".join(refs[n] for n in cycle)
        # The edge leaving the cycle's first job names the culprit.
        field = next(e.field for e in edges if e.child == cycle[0] and e.parent == cycle[1])
        raise ValidationError(f"dependency cycle: {path}", field=field)
    return Graph(refs, edges)


def _edges_of(spec: DagSpec, i: int, positions: Mapping[str, int]) -> list[Edge]:
    job = spec.jobs[i]
    edges: list[Edge] = []
    seen: set[int | UUID] = set()
    for k, dep in enumerate(job.depends_on):
        field = f"$.jobs[{i}].depends_on[{k}]"
        name, allow = dep, job.allow_failure
        if isinstance(dep, Dependency):
            name = dep.job
            if dep.allow_failure is not None:
                allow = dep.allow_failure
        assert isinstance(name, str)
        parent: int | UUID | None = positions.get(name)
        if parent == i:
            raise ValidationError(f"job {job.ref!r} depends on itself", field=field)
        if parent is None and (parent := _parse_id(name)) is None:
            raise ValidationError(
                f"{name!r} is neither a ref of this DAG nor a job id", field=field
            )
        if parent in seen:
            raise ValidationError(f"job {job.ref!r} lists dependency {name!r} twice", field=field)
        seen.add(parent)
        edges.append(Edge(i, parent, allow, field))
    return edges


def _topological(
    nodes: Sequence[N], depends: Sequence[tuple[N, N]]
) -> tuple[list[N], dict[N, list[N]]]:
    """Kahn's order (parents first) of what can be ordered, and each node's parents."""
    indegree: dict[N, int] = {n: 0 for n in nodes}
    children: dict[N, list[N]] = {n: [] for n in nodes}
    parents: dict[N, list[N]] = {n: [] for n in nodes}
    for child, parent in depends:
        indegree[child] += 1
        children[parent].append(child)
        parents[child].append(parent)
    ready = deque(n for n, d in indegree.items() if d == 0)
    order: list[N] = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for child in children[node]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return order, parents


def find_cycle(nodes: Sequence[N], depends: Sequence[tuple[N, N]]) -> list[N] | None:
    """A cycle among ``depends`` ((child, parent) pairs) as ``[a, b, …, a]``, or None.

    Every node Kahn's algorithm leaves over has a parent that is left over
    too, so walking parents from any of them must come back to a node seen.
    """
    order, parents = _topological(nodes, depends)
    if len(order) == len(parents):
        return None
    ordered = set(order)
    node = next(n for n in parents if n not in ordered)
    walk: list[N] = []
    index: dict[N, int] = {}
    while node not in index:
        index[node] = len(walk)
        walk.append(node)
        node = next(p for p in parents[node] if p not in ordered)
    return [*walk[index[node] :], node]


def critical_path(
    nodes: Sequence[N], depends: Sequence[tuple[N, N]], weight: Mapping[N, float]
) -> tuple[list[N], float]:
    """The path (parents first) with the largest sum of ``weight``, and that sum.

    Ties go to the path found first in Kahn's order, which keeps the answer
    stable between calls.
    """
    order, parents = _topological(nodes, depends)
    best: dict[N, float] = {}
    via: dict[N, N | None] = {}
    for node in order:
        prior = max(parents[node], key=lambda p: best[p], default=None)
        best[node] = weight.get(node, 0.0) + (best[prior] if prior is not None else 0.0)
        via[node] = prior
    if not best:
        return [], 0.0
    end: N | None = max(order, key=lambda n: best[n])
    total = best[end] if end is not None else 0.0
    path: list[N] = []
    while end is not None:
        path.append(end)
        end = via[end]
    return path[::-1], total
