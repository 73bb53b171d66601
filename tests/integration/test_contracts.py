"""The live JetStream configuration matches the declarations, and applying
them twice changes nothing."""

from __future__ import annotations

from nats.js import JetStreamContext

from workron import bus


async def test_live_streams_match_declarations(js: JetStreamContext) -> None:
    for declared in bus.STREAMS:
        live = (await js.stream_info(declared.name or "")).config
        assert not bus._differs(live, declared), declared.name
        assert live.subjects == declared.subjects


async def test_live_consumers_match_declarations(js: JetStreamContext) -> None:
    for stream, declared in bus.CONSUMERS:
        live = (await js.consumer_info(stream, declared.durable_name or "")).config
        for field in ("ack_wait", "max_deliver", "backoff", "max_ack_pending", "filter_subject"):
            assert getattr(live, field) == getattr(declared, field), (declared.durable_name, field)


async def test_apply_is_idempotent(js: JetStreamContext) -> None:
    before = {s.name: (await js.stream_info(s.name or "")).state.first_seq for s in bus.STREAMS}
    await bus.apply(js, queues=["default", "gpu"])
    await bus.apply(js, queues=["default", "gpu"])
    after = {s.name: (await js.stream_info(s.name or "")).state.first_seq for s in bus.STREAMS}
    assert before == after
    live = (await js.consumer_info("WORK", "work-gpu")).config
    assert live.filter_subject == "workron.work.gpu"
    assert live.ack_wait == bus.LEASE_S
