"""``workron dag``: submit a DAG from a YAML or JSON file, follow it, show it, cancel it.

The file holds a ``DagSpec``: ``jobs`` (a list of jobs with ``ref``, or a
mapping ref → job), optional ``name`` and ``idempotency_key``::

    name: nightly
    jobs:
      extract: {command: [./extract.sh]}
      transform: {task: etl.transform, depends_on: [extract]}
      report: {command: "./report.sh", shell: true, depends_on: [transform]}
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from workron import errors
from workron.client import Client
from workron.config import Settings
from workron.dag_api import Dag, DagProgress, DagSpec, DagSubmitted

__all__ = ["app", "load_spec"]

app = typer.Typer(name="dag", help="Submit, follow, show and cancel DAGs.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

ApiOpt = Annotated[
    str | None, typer.Option("--api-url", envvar="WORKRON_API_URL", help="admission API URL")
]
_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "dispatched": "blue",
    "blocked": "dim",
}
_ORDER = ["blocked", "pending", "dispatched", "running", "succeeded", "failed", "cancelled"]


def load_spec(path: Path) -> DagSpec:
    """Read a DAG file (JSON, or YAML, which JSON also is). Raises ValueError."""
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if isinstance(raw, dict) and isinstance(raw.get("jobs"), dict):
        # The mapping form: each key is the job's ref.
        raw["jobs"] = [{"ref": ref, **(job or {})} for ref, job in raw["jobs"].items()]
    try:
        return msgspec.convert(raw, DagSpec)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except errors.WorkronError as exc:
        where = f" ({exc.field})" if exc.field else ""
        err_console.print(f"[red]error[/red] {exc.code}{where}: {exc.message}")
        raise typer.Exit(1) from None


def _counts(dag: Dag | DagProgress) -> str:
    parts = []
    for state in sorted(dag.counts, key=lambda s: _ORDER.index(s) if s in _ORDER else 99):
        style = _STYLE.get(state, "")
        text = f"{state} {dag.counts[state]}"
        parts.append(f"[{style}]{text}[/{style}]" if style else text)
    return " · ".join(parts)


def _styled(state: str) -> str:
    style = _STYLE.get(state, "")
    return f"[{style}]{state}[/{style}]" if style else state


async def _follow(client: Client, dag_id: str, timeout: float | None) -> Dag:
    """Counts by state, live, until every job is terminal; then the whole DAG.

    Each tick polls the DAG's progress (counts and timings: small whatever
    the DAG's size); its jobs and edges are fetched once, at the end.
    """
    started = time.monotonic()
    delay = 0.1
    with Live(console=err_console, transient=True, refresh_per_second=8) as live:
        while True:
            progress = await client.dag_progress(dag_id)
            live.update(
                Group(
                    f"[bold]{progress.name or progress.id}[/bold] "
                    f"{progress.finished}/{progress.total} finished · {progress.elapsed_s:.1f}s",
                    _counts(progress),
                )
            )
            if progress.state != "running":
                return await client.get_dag(dag_id)
            if timeout is not None and time.monotonic() - started > timeout:
                raise errors.WorkronError(f"DAG {dag_id} still running after {timeout}s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)


@app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(help="DAG file, YAML or JSON")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="follow the DAG to the end")] = False,
    wait_timeout: Annotated[float | None, typer.Option(help="give up waiting after s")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    api_url: ApiOpt = None,
) -> None:
    """Submit a DAG; with --wait, show progress and exit 1 unless every job succeeded."""
    try:
        spec = load_spec(file)
    except ValueError as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    settings = Settings.from_env(api_url=api_url)

    async def go() -> tuple[DagSubmitted, Dag | None]:
        async with Client(settings.api_url) as client:
            submitted = await client.submit_dag(spec)
            if not wait:
                return submitted, None
            return submitted, await _follow(client, str(submitted.id), wait_timeout)

    submitted, dag = _run(go())
    if as_json:
        body = dag if dag is not None else submitted
        sys.stdout.write(msgspec.json.encode(body).decode() + "\n")
    elif dag is None:
        console.print(str(submitted.id))
    else:
        console.print(f"{dag.id} {_styled(dag.state)} · {_counts(dag)}")
        for node in dag.nodes:
            if node.error and node.state == "failed":
                err_console.print(f"[red]{node.ref}[/red]: {node.error.splitlines()[0]}")
    if dag is not None and dag.state != "succeeded":
        raise typer.Exit(1)


@app.command("show")
def show(
    dag_id: Annotated[str, typer.Argument(help="DAG id")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    api_url: ApiOpt = None,
) -> None:
    """Show a DAG: its jobs, counts by state and critical path."""
    settings = Settings.from_env(api_url=api_url)

    async def go() -> Dag:
        async with Client(settings.api_url) as client:
            return await client.get_dag(dag_id)

    dag = _run(go())
    if as_json:
        sys.stdout.write(msgspec.json.encode(dag).decode() + "\n")
        return
    console.print(f"[bold]{dag.name or ''}[/bold] {dag.id} {_styled(dag.state)}")
    console.print(_counts(dag))
    parents: dict[str, list[str]] = {}
    for edge in dag.edges:
        parents.setdefault(edge.child, []).append(edge.parent + ("?" if edge.allow_failure else ""))
    table = Table("ref", "state", "job", "after", "run s", "error", box=None, header_style="bold")
    for node in dag.nodes:
        table.add_row(
            node.ref,
            _styled(node.state),
            str(node.job_id),
            ", ".join(parents.get(node.ref, []))[:40],
            f"{node.run_s:.3f}" if node.run_s is not None else "",
            (node.error or "").split("\n")[0][:60],
        )
    console.print(table)
    path = " → ".join(dag.critical_path)
    length = f" ({dag.critical_path_s:.3f}s)" if dag.critical_path_s is not None else ""
    console.print(f"critical path by {dag.critical_path_by}{length}: {path}")


@app.command("cancel")
def cancel(dag_id: Annotated[str, typer.Argument()], api_url: ApiOpt = None) -> None:
    """Cancel every unfinished job of a DAG."""
    settings = Settings.from_env(api_url=api_url)

    async def go() -> Dag:
        async with Client(settings.api_url) as client:
            return await client.cancel_dag(dag_id)

    dag = _run(go())
    console.print(f"{dag.id} {_styled(dag.state)} · {_counts(dag)}")
