"""A service process leaves its start-up heap out of garbage collection."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from workron._service import GC_YOUNG_THRESHOLD, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_heap_freezes_what_exists_and_collects_the_young_less_often(
    restored_gc: None,
) -> None:
    older = gc.get_threshold()[1:]
    survivor = [object() for _ in range(1000)]
    settle_heap()
    assert gc.get_freeze_count() >= len(survivor)
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *older)
    # Cycles made afterwards are still collected.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
