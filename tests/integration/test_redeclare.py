"""A connection made with ``bus.connect(on_reconnect=bus.apply)``, as every
service process makes it, declares the JetStream contracts again when
nats-server comes back with its store lost."""

from __future__ import annotations

import asyncio
import shutil
import signal

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError

from workron import bus
from workron._embedded import NatsServer


async def missing_contracts(js: JetStreamContext) -> list[str]:
    missing = []
    for stream in bus.STREAMS:
        try:
            await js.stream_info(stream.name or "")
        except NotFoundError:
            missing.append(stream.name or "")
    for stream_name, consumer in bus.CONSUMERS:
        try:
            await js.consumer_info(stream_name, consumer.durable_name or "")
        except NotFoundError:
            missing.append(f"{stream_name}/{consumer.durable_name}")
    return missing


async def test_contracts_are_declared_again_after_the_store_is_lost(
    nats_server: NatsServer,
) -> None:
    calls = 0
    declared = asyncio.Event()

    async def apply_once_ready(js: JetStreamContext) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            # What a server just back may answer before JetStream serves.
            raise ServiceUnavailableError(code=503, description="JetStream not ready")
        await bus.apply(js)
        declared.set()

    nc = await bus.connect(nats_server.url, name="test-service", on_reconnect=apply_once_ready)
    try:
        js = nc.jetstream()
        await bus.apply(js)
        assert await missing_contracts(js) == []
        assert calls == 0  # start-up is the caller's own apply

        nats_server.kill(signal.SIGKILL)
        shutil.rmtree(nats_server.store_dir / "js")
        await asyncio.to_thread(nats_server.start)

        # Retried after the failure, without a restart of the service.
        await asyncio.wait_for(declared.wait(), timeout=15)
        assert calls == 2
        assert await missing_contracts(js) == []
        for stream in bus.STREAMS:
            live = (await js.stream_info(stream.name or "")).config
            assert not bus._differs(live, stream), stream.name
    finally:
        await nc.close()
