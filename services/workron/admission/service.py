"""The admission service: the HTTP API and the submit consumer in one process.

Both loops run under ``workron._service.supervise``: if either fails, the
service stops and its error reaches the process runner, which owns signals
and the connections (the pool and NATS are closed by the caller, not here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from litestar import Litestar
from nats.aio.client import Client as NATS

from workron._service import supervise
from workron.admission.app import AppContext, create_app
from workron.admission.consumer import SubmitConsumer
from workron.ledger import Pool
from workron.telemetry import Metrics

__all__ = ["Admission"]

log = logging.getLogger(__name__)

#: Seconds in-flight requests get to finish once the service stops.
HTTP_GRACE_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers, telling us when it listens."""

    def __init__(self, config: uvicorn.Config, started: asyncio.Event) -> None:
        super().__init__(config)
        self._started = started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process runner owns SIGINT/SIGTERM and calls Admission.stop().
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._started.set()


class Admission:
    """HTTP API on ``host:port`` plus the ``workron.submit.*`` consumer."""

    name = "admission"

    def __init__(self, pool: Pool, nc: NATS, metrics: Metrics, *, host: str, port: int) -> None:
        self._pool = pool
        self._nc = nc
        self._metrics = metrics
        self._host = host
        self._port = port
        self._stop = asyncio.Event()
        #: Set once the API accepts connections and the consumer is bound.
        self.started = asyncio.Event()
        self._port_bound: int | None = None
        self._server: _Server | None = None

    @property
    def bound_port(self) -> int:
        """The port the API listens on (the real one when constructed with port 0)."""
        if self._port_bound is None:
            raise RuntimeError("admission is not listening yet: wait for `started`")
        return self._port_bound

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True

    async def run(self) -> None:
        js = self._nc.jetstream()
        consumer = SubmitConsumer(self._pool, self._nc, self._metrics, stop=self._stop)
        await consumer.open()
        sock: socket.socket | None = None
        try:
            # Bind here rather than in uvicorn: a busy port raises OSError
            # instead of uvicorn's sys.exit, and port 0 resolves before serving.
            sock = _listen(self._host, self._port)
            self._port_bound = sock.getsockname()[1]
            app = create_app(AppContext(self._pool, js, self._metrics, nc=self._nc))
            self._server = _Server(_config(app), self.started)
            log.info(
                "admission listening",
                extra={"action": "admission.start", "host": self._host, "port": self._port_bound},
            )
            await supervise(
                self.name,
                {
                    "http": self._serve_http(self._server, sock),
                    "submit": consumer.run(),
                    "outbox": consumer.sweeper.run(self._stop),
                },
                self._stop,
            )
        finally:
            if self._server is not None:
                self._server.should_exit = True
            await consumer.close()
            if sock is not None:
                sock.close()
        log.info("admission stopped", extra={"action": "admission.stop"})

    async def _serve_http(self, server: _Server, sock: socket.socket) -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="admission.http.serve")
        stopping = asyncio.create_task(self._stop.wait(), name="admission.http.stop")
        try:
            await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Stop accepting, let requests in flight finish (bounded by
            # timeout_graceful_shutdown), also when this loop is cancelled.
            server.should_exit = True
            stopping.cancel()
            await asyncio.gather(serving, stopping, return_exceptions=True)
        if serving.done() and not serving.cancelled() and (error := serving.exception()):
            raise error
        if not self._stop.is_set():
            raise RuntimeError("the HTTP server stopped by itself")


def _config(app: Litestar) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="off",
        # The process configures logging (JSON lines); access logs would cost
        # more than the requests themselves on the hot path.
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(HTTP_GRACE_S),
    )


def _listen(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=2048)
