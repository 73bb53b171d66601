"""The ``workron`` command line."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from workron import errors
from workron.api import Job
from workron.client import Client
from workron.config import ENV_HELP, Settings
from workron.events import Backoff, JobSpec, JobState
from workron.telemetry import configure_logging

__all__ = ["app", "main"]

_ENV_DOC = "\n\n".join(f"{name}: {text}" for name, text in ENV_HELP.items())

app = typer.Typer(
    name="workron",
    help=f"Workron: a distributed job scheduler.\n\nEnvironment:\n\n{_ENV_DOC}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

NatsOpt = Annotated[
    str | None, typer.Option("--nats-url", envvar="WORKRON_NATS_URL", help="NATS server URL")
]
DbOpt = Annotated[
    str | None,
    typer.Option("--database-url", envvar="WORKRON_DATABASE_URL", help="PostgreSQL URL"),
]
ApiOpt = Annotated[
    str | None, typer.Option("--api-url", envvar="WORKRON_API_URL", help="admission API URL")
]
MetricsOpt = Annotated[
    int | None, typer.Option("--metrics-port", help="serve Prometheus metrics on this port")
]

_STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "dispatched": "blue",
}


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(**overrides)


def _run(coro: Any) -> Any:
    """Run a coroutine; turn Workron errors into a clear message and exit code 1."""
    try:
        return asyncio.run(coro)
    except errors.WorkronError as exc:
        where = f" ({exc.field})" if exc.field else ""
        err_console.print(f"[red]error[/red] {exc.code}{where}: {exc.message}")
        raise typer.Exit(1) from None


# --- services ---------------------------------------------------------------


def _service_command(name: str, build: Callable[..., Any], help_text: str) -> None:
    def command(
        nats_url: NatsOpt = None, database_url: DbOpt = None, metrics_port: MetricsOpt = None
    ) -> None:
        from workron._process import run_services

        settings = _settings(nats_url=nats_url, database_url=database_url)
        _run(run_services(settings, [build], metrics_port=metrics_port, name=name))

    command.__doc__ = help_text
    app.command(name)(command)


def _build_relay(ctx: Any) -> Any:
    from workron.relay.service import Relay

    return Relay(ctx.pool, ctx.nc, ctx.metrics)


def _build_dispatcher(ctx: Any) -> Any:
    from workron.dispatcher.service import Dispatcher

    return Dispatcher(ctx.pool, ctx.nc, ctx.metrics)


def _build_resolver(ctx: Any) -> Any:
    from workron.resolver.service import Resolver

    return Resolver(ctx.pool, ctx.nc, ctx.metrics)


def _build_reaper(ctx: Any) -> Any:
    from workron.reaper.service import Reaper

    return Reaper(ctx.pool, ctx.nc, ctx.metrics)


_service_command("relay", _build_relay, "Publish outbox rows to JetStream.")
_service_command(
    "reaper",
    _build_reaper,
    "Take back jobs of dead workers and expired leases; re-dispatch lost work; record dead "
    "letters. Run two or more: one leads, the others stand by.",
)
_service_command("dispatcher", _build_dispatcher, "Dispatch ready jobs and apply worker reports.")
_service_command(
    "resolver", _build_resolver, "Release DAG jobs whose dependencies are met; cascade failures."
)


@app.command()
def admission(
    nats_url: NatsOpt = None,
    database_url: DbOpt = None,
    host: Annotated[str | None, typer.Option(envvar="WORKRON_HTTP_HOST")] = None,
    port: Annotated[int | None, typer.Option(envvar="WORKRON_HTTP_PORT")] = None,
) -> None:
    """Serve the HTTP API and consume workron.submit.* submissions."""
    from workron._process import run_services
    from workron.admission.service import Admission

    settings = _settings(
        nats_url=nats_url, database_url=database_url, http_host=host, http_port=port
    )

    def build(ctx: Any) -> Any:
        return Admission(
            ctx.pool, ctx.nc, ctx.metrics, host=settings.http_host, port=settings.http_port
        )

    _run(run_services(settings, [build], name="admission"))


@app.command()
def migrate(nats_url: NatsOpt = None, database_url: DbOpt = None) -> None:
    """Apply ledger migrations and JetStream contracts (idempotent)."""
    from workron._process import migrate_all

    settings = _settings(nats_url=nats_url, database_url=database_url)
    applied = _run(migrate_all(settings))
    console.print(f"ledger migrations applied: {applied or 'none (up to date)'}")
    console.print("JetStream streams and consumers: up to date")


@app.command()
def worker(
    queue: Annotated[
        list[str] | None, typer.Option("--queue", "-q", help="queue to serve (repeatable)")
    ] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1)] = 4,
    handlers: Annotated[
        list[str] | None,
        typer.Option("--app", "-a", help="module:attribute of a Registry of handlers (repeatable)"),
    ] = None,
    worker_id: Annotated[str | None, typer.Option(envvar="WORKRON_WORKER_ID")] = None,
    grace: Annotated[float, typer.Option(help="seconds running jobs get on SIGTERM")] = 30.0,
    heartbeat: Annotated[
        float, typer.Option(min=0.05, help="seconds between heartbeats; dead after 3 missed")
    ] = 2.0,
    vram_mb: Annotated[int, typer.Option(min=0, help="GPU memory to advertise, MiB")] = 0,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="key=value to advertise (repeatable)")
    ] = None,
    hostname: Annotated[
        str | None, typer.Option(help="name other machines reach this worker by")
    ] = None,
    nats_url: NatsOpt = None,
) -> None:
    """Run a worker: Python handlers and shell commands from one or more queues.

    It advertises this machine's CPUs and memory, --vram-mb and --tag values.
    """
    from workron._heartbeat import machine_resources
    from workron.worker import run_worker

    tags = dict(t.partition("=")[::2] for t in tag or [])
    if any(not key for key in tags) or any("=" not in t for t in tag or []):
        err_console.print("[red]error[/red] --tag takes key=value")
        raise typer.Exit(2)
    settings = _settings(nats_url=nats_url)
    configure_logging(settings.log_level)
    _run(
        run_worker(
            settings.nats_url,
            queues=queue or ["default"],
            concurrency=concurrency,
            apps=handlers or [],
            worker_id=worker_id,
            grace_s=grace,
            heartbeat_s=heartbeat,
            resources=machine_resources(vram_mb),
            tags=tags,
            hostname=hostname,
        )
    )


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=0, help="local worker processes")] = 1,
    concurrency: Annotated[int, typer.Option(help="jobs per local worker")] = 4,
    handlers: Annotated[
        list[str] | None, typer.Option("--app", "-a", help="module:attribute for local workers")
    ] = None,
    host: Annotated[str, typer.Option(envvar="WORKRON_HTTP_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="WORKRON_HTTP_PORT")] = 8080,
    data_dir: Annotated[
        str | None, typer.Option(help="where embedded NATS and PostgreSQL keep data")
    ] = None,
    nats_url: NatsOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Run everything on this machine: NATS, PostgreSQL, every service, local workers."""
    from workron._up import Up

    launcher = Up(
        workers=workers,
        concurrency=concurrency,
        apps=handlers or [],
        host=host,
        port=port,
        data_dir=data_dir,
        nats_url=nats_url,
        database_url=database_url,
        console=console,
    )
    _run(launcher.run())


# --- client commands ----------------------------------------------------------


def _job_table(jobs: Sequence[Job]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("id", "queue", "state", "what", "attempt", "created", "error"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        command = job.command or ""
        what = job.task or (command if isinstance(command, str) else " ".join(command))
        style = _STATE_STYLE.get(job.state, "")
        table.add_row(
            str(job.id),
            job.queue,
            f"[{style}]{job.state}[/{style}]" if style else job.state,
            (what or "")[:60],
            f"{job.attempt}/{job.max_attempts}",
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            (job.error or "")[:60],
        )
    return table


@app.command()
def submit(
    command: Annotated[
        list[str] | None, typer.Argument(help="command and arguments (after --)")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Python handler name")] = None,
    payload: Annotated[str | None, typer.Option(help="JSON payload for the handler")] = None,
    queue: Annotated[str, typer.Option("--queue", "-q")] = "default",
    shell: Annotated[bool, typer.Option(help="run COMMAND as one /bin/sh -c string")] = False,
    priority: int = 0,
    max_attempts: Annotated[int, typer.Option(min=1)] = 3,
    backoff: Annotated[float, typer.Option(help="first retry delay cap, seconds")] = 1.0,
    timeout: Annotated[float | None, typer.Option(help="per-attempt timeout, seconds")] = None,
    delay: Annotated[float | None, typer.Option(help="start no sooner than this many s")] = None,
    idempotency_key: Annotated[str | None, typer.Option("--key")] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="follow the job to the end")] = False,
    wait_timeout: Annotated[float | None, typer.Option(help="give up waiting after s")] = None,
    api_url: ApiOpt = None,
) -> None:
    """Submit a job: `workron submit -- echo hello` or `workron submit --task name`."""
    fields: dict[str, Any] = {
        "queue": queue,
        "priority": priority,
        "max_attempts": max_attempts,
        "backoff": Backoff(base_s=backoff),
        "timeout_s": timeout,
        "delay_s": delay,
        "idempotency_key": idempotency_key,
    }
    if task:
        fields["task"] = task
        if payload is not None:
            try:
                fields["payload"] = msgspec.json.decode(payload)
            except msgspec.DecodeError as exc:
                err_console.print(f"[red]error[/red] --payload is not JSON: {exc}")
                raise typer.Exit(2) from None
    elif command:
        fields["command"] = " ".join(command) if shell else list(command)
        fields["shell"] = shell
    else:
        err_console.print("[red]error[/red] give a command (after --) or --task")
        raise typer.Exit(2)
    try:
        spec = msgspec.convert({k: v for k, v in fields.items() if v is not None}, JobSpec)
    except msgspec.ValidationError as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    settings = _settings(api_url=api_url)

    async def go() -> Job:
        async with Client(settings.api_url) as client:
            job = await client.submit(spec)
            if not wait:
                return job
            return await _follow(client, job, wait_timeout)

    job = _run(go())
    if not wait:
        console.print(str(job.id))
        return
    _print_outcome(job)
    if job.state != JobState.SUCCEEDED:
        raise typer.Exit(1)


async def _follow(client: Client, job: Job, timeout: float | None) -> Job:
    """Show the job's state live until it finishes."""
    started = time.monotonic()
    with Live(console=err_console, transient=True, refresh_per_second=10) as live:
        while not job.state.terminal:
            elapsed = time.monotonic() - started
            if timeout is not None and elapsed > timeout:
                raise errors.WorkronError(f"job {job.id} still {job.state} after {timeout}s")
            live.update(
                f"[bold]{job.id}[/bold] {job.state} · attempt {job.attempt}/{job.max_attempts}"
                f" · {elapsed:.1f}s"
            )
            await asyncio.sleep(0.1 if elapsed < 5 else 0.5)
            job = await client.get(job.id)
    return job


def _print_outcome(job: Job) -> None:
    style = _STATE_STYLE.get(job.state, "")
    console.print(f"{job.id} [{style}]{job.state}[/{style}] after {job.attempt} attempt(s)")
    if job.result is not None:
        console.print_json(msgspec.json.encode(job.result).decode())
    if job.error:
        err_console.print(f"[red]{job.error}[/red]")


@app.command()
def jobs(
    state: Annotated[str | None, typer.Option(help="filter by state")] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q")] = None,
    task: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    api_url: ApiOpt = None,
) -> None:
    """List jobs, newest first."""
    settings = _settings(api_url=api_url)

    async def go() -> list[Job]:
        async with Client(settings.api_url) as client:
            page = await client.list_jobs(state=state, queue=queue, task=task, limit=limit)
            return page.items

    items = _run(go())
    if as_json:
        sys.stdout.write(msgspec.json.encode(items).decode() + "\n")
    else:
        console.print(_job_table(items))


@app.command()
def job(
    job_id: Annotated[str, typer.Argument(help="job id")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    api_url: ApiOpt = None,
) -> None:
    """Show one job and its history."""
    settings = _settings(api_url=api_url)

    async def go() -> tuple[Job, list[Any]]:
        async with Client(settings.api_url) as client:
            return await client.get(job_id), await client.events(job_id)

    found, history = _run(go())
    if as_json:
        sys.stdout.write(msgspec.json.encode({"job": found, "events": history}).decode() + "\n")
        return
    console.print(_job_table([found]))
    events = Table("at", "event", "attempt", "worker", "detail", box=None, header_style="bold")
    for event in history:
        events.add_row(
            event.at.strftime("%H:%M:%S.%f")[:-3],
            event.kind,
            f"{event.attempt}.{event.delivery}",
            event.worker_id or "",
            (event.detail or "")[:80],
        )
    console.print(events)
    if found.result is not None:
        console.print_json(msgspec.json.encode(found.result).decode())


@app.command()
def cancel(job_id: Annotated[str, typer.Argument()], api_url: ApiOpt = None) -> None:
    """Cancel a job that has not finished."""
    settings = _settings(api_url=api_url)

    async def go() -> Job:
        async with Client(settings.api_url) as client:
            return await client.cancel(job_id)

    console.print(f"{_run(go()).id} cancelled")


@app.command()
def retry(job_id: Annotated[str, typer.Argument()], api_url: ApiOpt = None) -> None:
    """Run a failed or cancelled job again: next attempt, its attempts budget anew."""
    settings = _settings(api_url=api_url)

    async def go() -> Job:
        async with Client(settings.api_url) as client:
            return await client.retry(job_id)

    found = _run(go())
    console.print(f"{found.id} {found.state}: attempt {found.attempt}/{found.max_attempts}")


@app.command()
def workers(
    state: Annotated[str | None, typer.Option(help="alive, draining, dead or stopped")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    api_url: ApiOpt = None,
) -> None:
    """List workers: queues, resources, last heartbeat, state, running jobs."""
    from workron._cli_tables import workers_table

    settings = _settings(api_url=api_url)

    async def go() -> Any:
        async with Client(settings.api_url) as client:
            return await client.workers(state=state)

    items = _run(go())
    if as_json:
        sys.stdout.write(msgspec.json.encode(items).decode() + "\n")
    else:
        console.print(workers_table(items))


@app.command("dead-letters")
def dead_letters(
    source: Annotated[str | None, typer.Option(help="who gave up on them")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    api_url: ApiOpt = None,
) -> None:
    """List bus messages given up on (terminated, past MaxDeliver), newest first."""
    from workron._cli_tables import dead_letters_table

    settings = _settings(api_url=api_url)

    async def go() -> Any:
        async with Client(settings.api_url) as client:
            return (await client.dead_letters(source=source, limit=limit)).items

    items = _run(go())
    if as_json:
        sys.stdout.write(msgspec.json.encode(items).decode() + "\n")
    else:
        console.print(dead_letters_table(items))


from workron._dag_cli import app as _dag_app  # noqa: E402  (after the commands above)

app.add_typer(_dag_app, name="dag")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
