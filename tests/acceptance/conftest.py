"""Acceptance fixtures: `workron up` as a real subprocess, driven by the CLI and HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from workron._embedded import free_port

HANDLERS = textwrap.dedent(
    """
    from workron.worker import Context, NonRetryable, Registry

    registry = Registry()

    @registry.task("acc.add")
    async def add(ctx: Context, payload: dict) -> dict:
        return {"sum": payload["a"] + payload["b"], "token": ctx.token}

    @registry.task("acc.reject")
    def reject(ctx: Context, payload: object) -> None:
        raise NonRetryable("this payload can never work")
    """
)


@dataclass
class System:
    process: subprocess.Popen[str]
    api_url: str
    nats_url: str
    database_url: str
    env: dict[str, str]
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workron.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def start_system(tmp: Path, *, workers: int = 1) -> System:
    (tmp / "handlers").mkdir(parents=True, exist_ok=True)
    (tmp / "handlers" / "acc_handlers.py").write_text(HANDLERS)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tmp / "handlers"), WORKRON_LOG_LEVEL="WARNING")
    for name in ("WORKRON_NATS_URL", "WORKRON_DATABASE_URL", "WORKRON_API_URL"):
        env.pop(name, None)  # embedded defaults: nothing external
    argv = [sys.executable, "-m", "workron.cli", "up", "--workers", str(workers)]
    argv += ["--port", str(port), "--data-dir", str(tmp / "data"), "--app", "acc_handlers:registry"]
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    urls: dict[str, str] = {}
    output: list[str] = []
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line)
        words = line.split(None, 1)
        if len(words) == 2 and words[0] in ("API", "NATS", "PostgreSQL"):
            urls[words[0]] = words[1].strip()
        if "Try:" in line or time.monotonic() > deadline:
            break
    if set(urls) != {"API", "NATS", "PostgreSQL"}:
        process.kill()
        raise AssertionError("workron up did not start:\n" + "".join(output))

    def drain() -> None:  # keep reading so the child never blocks on a full pipe
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = dict(env, WORKRON_API_URL=urls["API"], WORKRON_NATS_URL=urls["NATS"])
    return System(process, urls["API"], urls["NATS"], urls["PostgreSQL"], env, output, reader)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    running = start_system(tmp_path_factory.mktemp("up"))
    yield running
    code = running.stop()
    assert code == 0, "".join(running.output)
