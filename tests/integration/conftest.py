"""Fixtures shared by the integration tests beyond the bus and the ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from workron import ledger
from workron.admission.app import AppContext, create_app
from workron.telemetry import Metrics


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def http(
    pool: ledger.Pool, js: JetStreamContext, nc: NATS, metrics: Metrics
) -> AsyncIterator[httpx.AsyncClient]:
    """The admission app in this process, over HTTP without a socket."""
    app = create_app(AppContext(pool, js, metrics, nc=nc))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admission") as client:
        yield client
