"""Tables for ``workron workers`` and ``workron dead-letters``."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from workron.recovery_api import DeadLetter, WorkerInfo

__all__ = ["dead_letters_table", "workers_table"]

_STATE_STYLE = {"alive": "green", "draining": "yellow", "dead": "red", "stopped": "dim"}


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def workers_table(workers: Sequence[WorkerInfo]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("id", "state", "queues", "cpu", "memory", "vram", "last seen", "running"):
        table.add_column(column, overflow="fold")
    for worker in workers:
        style = _STATE_STYLE.get(worker.state, "")
        resources = worker.resources
        jobs = ", ".join(f"{j.job_id}@{j.attempt}.{j.delivery}" for j in worker.jobs[:3])
        if len(worker.jobs) > 3:
            jobs += f" +{len(worker.jobs) - 3}"
        table.add_row(
            worker.id,
            f"[{style}]{worker.state}[/{style}]" if style else worker.state,
            ",".join(worker.queues),
            f"{resources.cpu:g}",
            f"{resources.memory_mb} MiB",
            f"{resources.vram_mb} MiB",
            _ago(worker.seen_s_ago),
            f"{worker.running}" + (f" ({jobs})" if jobs else ""),
        )
    return table


def dead_letters_table(letters: Sequence[DeadLetter]) -> Table:
    table = Table(
        "id", "at", "source", "subject", "msg id", "reason", box=None, header_style="bold"
    )
    for letter in letters:
        table.add_row(
            str(letter.id),
            letter.at.strftime("%Y-%m-%d %H:%M:%S"),
            letter.source,
            letter.subject or "",
            letter.msg_id or "",
            letter.reason[:100],
        )
    return table
