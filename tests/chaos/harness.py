"""The chaos harness: every part of Workron as its own OS process.

nats-server, (optionally) a private PostgreSQL, and each ``workron``
service and worker run as separate processes so that any of them can be
killed (SIGKILL), paused (SIGSTOP/SIGCONT) and restarted on the same port
and store. Each process writes to its own log file under the test's
temporary directory; ``Cluster.logs()`` gathers their tails for a failure
report. Every fault is recorded with its wall-clock time, which the checker
uses to measure recovery.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from workron._embedded import NatsServer, free_port, start_postgres

from .checker import read_executions

__all__ = [
    "Cluster",
    "Fault",
    "Part",
    "PrivatePostgres",
    "marker_command",
    "reaper_missing",
]

#: The log line each kind of process writes once it is serving.
_READY = {
    "admission": '"action": "admission.start", "host"',
    "relay": '"action": "relay.start"',
    "dispatcher": '"action": "dispatcher.start"',
    "reaper": '"action": "reaper.start"',
    "worker": '"action": "worker.start"',
}
_STOP_S = 10.0
_BOX = str.maketrans(dict.fromkeys("─│╭╮╰╯", " "))
# `workron worker` configures no logging (unlike the services, which go
# through run_services), so its INFO lines would go nowhere and readiness
# could not be seen. This is `python -m workron.cli` with JSON logging on;
# the command itself is the same code path.
_CLI_WITH_LOGGING = (
    "import os, sys; from workron.telemetry import configure_logging; "
    "configure_logging(os.environ.get('WORKRON_LOG_LEVEL', 'INFO')); "
    "sys.argv[0] = 'workron'; from workron.cli import main; main()"
)


def reaper_missing() -> str | None:
    """Why the reaper cannot run here (None when ``workron reaper --help`` works)."""
    done = subprocess.run(
        [sys.executable, "-m", "workron.cli", "reaper", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode == 0:
        return None
    # typer frames its errors in a box; keep the words.
    words = " ".join((done.stderr or done.stdout).translate(_BOX).split())
    return f"`workron reaper --help` failed (exit {done.returncode}): {words[-160:]}"


def marker_command(exec_log: Path, sleep_s: float) -> str:
    """A shell job that makes each execution observable: one line when it
    starts and one when it ends, with its job id, fencing token and worker."""
    line = f'"$WORKRON_JOB_ID $WORKRON_TOKEN %s $(date +%%s.%%N) $CHAOS_PART" >> {exec_log}'
    return f"echo {line % 'start'}; sleep {sleep_s}; echo {line % 'end'}"


@dataclass(frozen=True, slots=True)
class Fault:
    at: float  # wall clock, comparable with the database's timestamps
    part: str
    action: str

    @property
    def injected(self) -> bool:
        """A fault proper; SIGCONT and restarts only end one."""
        return self.action not in _ENDINGS


_ENDINGS = frozenset({"SIGCONT", "start"})


class Part:
    """One OS process of the system, restartable with the same arguments."""

    def __init__(self, name: str, kind: str, argv: list[str], env: dict[str, str], log: Path):
        self.name = name
        self.kind = kind
        self.argv = argv
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._offset = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        assert not self.alive, f"{self.name} is running already"
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            out.write(f"=== {time.time():.3f} start {self.name}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.paused = False

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until the process logs that it serves (bounded polling)."""
        marker = _READY[self.kind].encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                if marker in f.read():
                    return
            if not self.alive:
                raise RuntimeError(f"{self.name} exited during start-up:\n{self.tail()}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and reap it (a paused process dies as well)."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=_STOP_S)
        self.paused = False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if not self.alive:
            return
        if self.paused:
            self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        assert self.process is not None
        try:
            self.process.wait(timeout=_STOP_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Cluster:
    """nats-server plus Workron processes against one database."""

    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        self.database_url = database_url
        self.logs_dir = root / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.exec_log = root / "executions.log"
        self.nats = NatsServer(root / "nats")
        self.parts: dict[str, Part] = {}
        self.faults: list[Fault] = []
        self.api_port = free_port()
        #: The private PostgreSQL, for tests that crash it.
        self.pg: PrivatePostgres | None = None

    # -- set-up ------------------------------------------------------------------

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKRON_")}
        env.update(WORKRON_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1", CHAOS_PART=name)
        return env

    def add(self, kind: str, name: str | None = None, *args: str) -> Part:
        """Declare a service (admission, relay, dispatcher, reaper) or a worker."""
        name = name or kind
        cli = ["-c", _CLI_WITH_LOGGING] if kind == "worker" else ["-m", "workron.cli"]
        argv = [sys.executable, *cli, kind, "--nats-url", self.nats_url]
        if kind != "worker":
            argv += ["--database-url", self.database_url]
        if kind == "admission":
            argv += ["--port", str(self.api_port)]
        if kind == "worker":
            argv += ["--worker-id", name]
        part = Part(name, kind, argv + list(args), self.env(name), self.logs_dir / f"{name}.log")
        self.parts[name] = part
        return part

    def add_worker(self, name: str, *, concurrency: int = 4, queue: str = "default") -> Part:
        # A short grace: a worker stopped at the end of a test need not wait
        # for jobs that the test no longer cares about.
        return self.add("worker", name, "--queue", queue, "-c", str(concurrency), "--grace", "2")

    async def start(self, *names: str, timeout: float = 60.0) -> None:
        """Start the named parts (all declared ones by default) and wait until they serve."""
        chosen = [self.parts[n] for n in (names or tuple(self.parts))]
        for part in chosen:
            part.start()
        await asyncio.gather(*(part.ready(timeout) for part in chosen))
        if any(part.kind == "admission" for part in chosen):
            await self.api_ready(timeout)

    async def api_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                try:
                    if (await http.get(f"{self.api_url}/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"admission API not answering:\n{self.parts['admission'].tail()}")

    async def running_on(self, worker: str, timeout: float) -> bool:
        """Wait (bounded) until ``worker`` runs a job: an execution started, not ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = read_executions(self.exec_log)
            if any(e.part == worker and e.end is None for e in runs):
                return True
            await asyncio.sleep(0.02)
        return False

    # -- faults --------------------------------------------------------------------

    def record(self, part: str, action: str) -> Fault:
        fault = Fault(time.time(), part, action)
        self.faults.append(fault)
        return fault

    @property
    def last_fault_at(self) -> float | None:
        """When the last fault was injected (SIGCONT and restarts only end one)."""
        injected = [f.at for f in self.faults if f.injected]
        return injected[-1] if injected else None

    def kill(self, name: str) -> None:
        self.record(name, "kill -9")
        self.parts[name].kill()

    def pause(self, name: str) -> None:
        self.record(name, "SIGSTOP")
        self.parts[name].signal(signal.SIGSTOP)
        self.parts[name].paused = True

    def resume(self, name: str) -> None:
        self.record(name, "SIGCONT")
        self.parts[name].signal(signal.SIGCONT)
        self.parts[name].paused = False

    async def restart(self, name: str, timeout: float = 60.0) -> None:
        """Start a killed part again with the same arguments (same port)."""
        self.record(name, "start")
        await self.start(name, timeout=timeout)

    def kill_nats(self) -> None:
        self.record("nats-server", "kill -9")
        self.nats.kill(signal.SIGKILL)

    def wipe_nats(self) -> None:
        """Delete the JetStream store (the server must be down)."""
        assert not (self.nats.process and self.nats.process.poll() is None)
        self.record("nats-server", "wipe store")
        shutil.rmtree(self.nats.store_dir / "js", ignore_errors=True)

    def stop_postgres(self) -> None:
        assert self.pg is not None, "only a private PostgreSQL may be crashed"
        self.record("postgres", "pg_ctl stop -m immediate")
        self.pg.stop_immediately()

    async def restart_postgres(self) -> None:
        assert self.pg is not None
        self.record("postgres", "start")
        await asyncio.to_thread(self.pg.restart)

    async def restart_nats(self) -> None:
        """Start nats-server again on the same port and store directory."""
        self.record("nats-server", "start")
        await asyncio.to_thread(self.nats.start)

    # -- tear-down -------------------------------------------------------------------

    def close(self) -> None:
        # Workers first (they hand work back), then services, then the bus.
        ordered = sorted(self.parts.values(), key=lambda p: p.kind != "worker")
        for part in ordered:
            if part.alive:
                if part.paused:
                    part.signal(signal.SIGCONT)
                part.signal(signal.SIGTERM)
        for part in ordered:
            part.stop()
        self.nats.stop()

    def logs(self, lines: int = 30) -> str:
        """The tail of every process's log, and the faults injected, for a failure report."""
        out = ["faults:"]
        out += [f"  {f.at:.3f} {f.part}: {f.action}" for f in self.faults]
        for part in self.parts.values():
            out.append(f"--- {part.name} (pid {part.process.pid if part.process else '-'})")
            out.append(part.tail(lines))
        nats_logs = sorted(self.root.glob("nats-*.log"))
        for path in nats_logs:
            out.append(f"--- {path.name}")
            out += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)


class PrivatePostgres:
    """A PostgreSQL of one test's own (pgserver), which the test may crash.

    pgserver runs postgres as the ``pgserver`` system user when we are root,
    so pg_ctl runs as that user too. The server keeps its socket directory
    across restarts, so the URL stays the same.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.handle: Any = None
        self.url = ""

    def start(self) -> str:
        self.handle, self.url = start_postgres(self.data_dir)
        return self.url

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.handle.pgdata), *args],
            check=True,
            capture_output=True,
            timeout=60,
            user=self.handle.system_user,
        )

    def stop_immediately(self) -> None:
        """``pg_ctl stop -m immediate``: no checkpoint, crash recovery at the next start."""
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def restart(self) -> None:
        # pgserver's own start path: same socket directory, waits until ready.
        self.handle.ensure_postgres_running()

    def cleanup(self) -> None:
        if self.handle is not None:
            self.handle.cleanup()
