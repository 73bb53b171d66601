"""Process plumbing for services: connect, migrate, run until a signal, clean up."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from prometheus_client import start_http_server
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from workron import bus, ledger
from workron._service import Runnable, run_until_signal
from workron.config import Settings
from workron.errors import LedgerUnavailableError
from workron.telemetry import Metrics, configure_logging

__all__ = ["Deps", "connect_ledger", "migrate_all", "run_services"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deps:
    """What a service is built from; the process owns and closes them."""

    settings: Settings
    pool: ledger.Pool
    nc: NATS
    metrics: Metrics


async def connect_ledger(url: str, *, patience_s: float = 60.0) -> ledger.Pool:
    """Connect and migrate, waiting for PostgreSQL to come up (containers start in any order)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(LedgerUnavailableError),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop_after_delay(patience_s),
        reraise=True,
    ):
        with attempt:
            pool = await ledger.connect(url)
    try:
        await ledger.migrate(pool)
    except BaseException:
        await pool.close()
        raise
    return pool


async def migrate_all(settings: Settings) -> list[int]:
    pool = await ledger.connect(settings.database_url, min_size=1, max_size=1)
    try:
        applied = await ledger.migrate(pool)
    finally:
        await pool.close()
    nc = await bus.connect(settings.nats_url, name="workron-migrate")
    try:
        await bus.apply(nc.jetstream())
    finally:
        await nc.close()
    return applied


async def run_services(
    settings: Settings,
    builders: Sequence[Callable[[Deps], Runnable]],
    *,
    name: str,
    metrics_port: int | None = None,
) -> None:
    """Run services built by ``builders`` in this process until SIGINT/SIGTERM."""
    configure_logging(settings.log_level)
    metrics = Metrics()
    if metrics_port is not None:
        start_http_server(metrics_port, registry=metrics.registry)
    pool = await connect_ledger(settings.database_url)
    try:
        # Declared again after each reconnect: a server back with a wiped
        # store has no streams, and the services cannot work without them.
        nc = await bus.connect(settings.nats_url, name=f"workron-{name}", on_reconnect=bus.apply)
        try:
            await bus.apply(nc.jetstream())
            deps = Deps(settings, pool, nc, metrics)
            services = [build(deps) for build in builders]
            log.info("started", extra={"action": f"{name}.start"})
            await run_until_signal(services)
        finally:
            await nc.drain()
    finally:
        await pool.close()
    log.info("stopped", extra={"action": f"{name}.stop"})
