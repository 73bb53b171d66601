"""Start `workron up` in a scratch data directory for a benchmark run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from workron._embedded import free_port


def start_up(
    data_dir: Path, workers: int, concurrency: int
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    port = free_port()
    argv = [sys.executable, "-m", "workron.cli", "up", "--workers", str(workers)]
    argv += ["--concurrency", str(concurrency), "--port", str(port), "--data-dir", str(data_dir)]
    env = dict(os.environ, WORKRON_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    urls: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        for key in ("API", "NATS", "PostgreSQL"):
            if line.strip().startswith(key + " "):
                urls[key] = line.split(None, 1)[1].strip()
        if "Try:" in line:
            break
    return proc, urls
