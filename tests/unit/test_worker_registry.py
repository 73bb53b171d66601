"""The worker SDK's pure parts: registries, payload decoding, loading apps,
command argv and output, error text, slot accounting."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from workron._commands import TAIL_BYTES, CommandOutput, argv_for
from workron._execution import describe
from workron._runner import Slots
from workron.events import MAX_RESULT_BYTES
from workron.worker import (
    Context,
    NonRetryable,
    Registry,
    RegistryNotFoundError,
    Worker,
    builtin,
    load_registry,
)


class Point(msgspec.Struct):
    x: int
    y: int


def test_registry_declares_tasks_by_name() -> None:
    registry = Registry()

    @registry.task("b.second")
    async def second(ctx: Context, payload: Any) -> None: ...

    @registry.task()
    def first(ctx: Context, payload: Any) -> None: ...

    default_name = f"{__name__}.first"
    assert list(registry) == sorted(["b.second", default_name])
    task = registry.get("b.second")
    assert task is not None and task.is_async and task.fn is second
    sync_task = registry.get(default_name)
    assert sync_task is not None and not sync_task.is_async
    registry.add("b.second", second)  # the same handler again is harmless


def test_registry_refuses_clashes_bad_names_and_bad_handlers() -> None:
    registry = Registry()
    registry.add("a", lambda ctx, payload: None)
    with pytest.raises(ValueError, match="registered already"):
        registry.add("a", lambda ctx, payload: 1)
    with pytest.raises(ValueError, match="invalid task name"):
        registry.add("has space", lambda ctx, payload: None)
    with pytest.raises(TypeError, match=r"\(ctx, payload\)"):
        registry.add("one_arg", lambda ctx: None)


def test_include_merges_registries() -> None:
    mine = Registry()
    mine.add("mine.task", lambda ctx, payload: None)
    merged = Registry()
    merged.include(builtin)
    merged.include(mine)
    assert list(merged) == ["mine.task", "workron.echo", "workron.noop"]
    with pytest.raises(ValueError):
        clash = Registry()
        clash.add("workron.noop", lambda ctx, payload: None)
        merged.include(clash)


def test_payload_is_decoded_into_the_annotated_type() -> None:
    registry = Registry()

    @registry.task("untyped")
    async def untyped(ctx: Context, payload): ...  # type: ignore[no-untyped-def]

    @registry.task("point")
    async def point(ctx: Context, payload: Point) -> None: ...

    @registry.task("raw")
    async def raw(ctx: Context, payload: msgspec.Raw) -> None: ...

    def decode(name: str, data: bytes) -> Any:
        task = registry.get(name)
        assert task is not None
        return task.decode(data)

    assert decode("untyped", b'{"a": [1, 2]}') == {"a": [1, 2]}
    assert decode("point", b'{"x": 1, "y": 2}') == Point(1, 2)
    assert bytes(decode("raw", b'{"x" : 1}')) == b'{"x" : 1}'
    with pytest.raises(NonRetryable, match=r"invalid payload for task 'point'.*\$\.y"):
        decode("point", b'{"x": 1, "y": "two"}')
    with pytest.raises(NonRetryable, match="is not JSON"):
        decode("untyped", b"{nope")


def test_string_annotations_are_resolved_when_decoding() -> None:
    registry = Registry()

    @registry.task("later")
    async def later(ctx: Context, payload: DefinedLater) -> None: ...

    task = registry.get("later")
    assert task is not None
    assert task.decode(b'{"n": 3}') == DefinedLater(n=3)


class DefinedLater(msgspec.Struct):
    n: int


# -- loading apps -------------------------------------------------------------------


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    name = f"tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_load_registry_by_module_or_attribute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _module(
        tmp_path,
        monkeypatch,
        "from workron.worker import Registry, Worker\n"
        "registry = Registry()\n"
        "registry.add('one', lambda ctx, payload: 1)\n"
        "other = Registry()\n"
        "other.add('two', lambda ctx, payload: 2)\n"
        "worker = Worker('nats://x', registry=other)\n",
    )
    assert list(load_registry(name)) == ["one"]
    assert list(load_registry(f"{name}:other")) == ["two"]
    assert list(load_registry(f"{name}:worker")) == ["two"]
    assert list(load_registry("workron.worker:builtin")) == ["workron.echo", "workron.noop"]


def test_load_registry_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two = _module(
        tmp_path,
        monkeypatch,
        "from workron.worker import Registry\na = Registry()\nb = Registry()\nnot_one = 1\n",
    )
    with pytest.raises(RegistryNotFoundError, match="defines 2 registries"):
        load_registry(two)
    with pytest.raises(RegistryNotFoundError, match="has no 'c'"):
        load_registry(f"{two}:c")
    with pytest.raises(RegistryNotFoundError, match="is a int, not a Registry"):
        load_registry(f"{two}:not_one")
    with pytest.raises(RegistryNotFoundError, match="cannot import"):
        load_registry("no_such_module_here:registry")


# -- commands, errors, construction ------------------------------------------------------


def test_argv_for() -> None:
    assert argv_for(["echo", "$HOME"], shell=False) == ["echo", "$HOME"]
    assert argv_for(["echo", "x"], shell=True) == ["echo", "x"]  # a list never sees a shell
    assert argv_for("echo 'a b' c", shell=False) == ["echo", "a b", "c"]
    assert argv_for("echo $HOME | wc", shell=True) == ["/bin/sh", "-c", "echo $HOME | wc"]
    with pytest.raises(NonRetryable, match="cannot split"):
        argv_for("echo 'unbalanced", shell=False)
    with pytest.raises(NonRetryable, match="empty command"):
        argv_for("   ", shell=False)
    with pytest.raises(NonRetryable, match="empty command"):
        argv_for([], shell=False)


def test_command_output_error_and_size() -> None:
    assert CommandOutput(exit_code=2, stdout="", stderr="bad\n").error == "exit code 2: bad"
    assert CommandOutput(exit_code=1, stdout="x", stderr="").error == "exit code 1"
    assert CommandOutput(exit_code=-9, stdout="", stderr="").error == "killed by signal SIGKILL"
    # Control characters escape to 6 bytes each in JSON: tails are cut to fit.
    noisy = "\x01" * TAIL_BYTES
    data = CommandOutput(exit_code=0, stdout=noisy, stderr=noisy).encode()
    assert len(data) <= MAX_RESULT_BYTES
    assert msgspec.json.decode(data)["exit_code"] == 0


def test_describe_gives_type_message_and_traceback_tail() -> None:
    def inner() -> None:
        raise KeyError("k")

    try:
        inner()
    except KeyError as exc:
        text = describe(exc)
    assert text.startswith("KeyError: 'k'\n")
    assert "in inner" in text
    assert len(describe(ValueError("x" * 10_000))) == 4096


def test_worker_validates_its_settings() -> None:
    with pytest.raises(ValueError, match="nats_url or nc"):
        Worker()
    with pytest.raises(ValueError, match="invalid queue name"):
        Worker("nats://x", queues=["a.b"])
    with pytest.raises(TypeError):
        Worker("nats://x", queues="default")
    with pytest.raises(ValueError, match="concurrency"):
        Worker("nats://x", concurrency=0)
    worker = Worker("nats://x", queues=["a", "a", "b"], registry=builtin)
    assert worker.queues == ["a", "b"]

    @worker.task("extra")
    async def extra(ctx: Context, payload: Any) -> None: ...

    assert "extra" in worker.registry and "extra" not in builtin


async def test_slots_share_out_among_waiting_queues() -> None:
    slots = Slots(limit=4, queues=2)
    first = await slots.reserve()  # two queues without a request: half each
    second = await slots.reserve()
    assert (first, second) == (2, 2)
    assert slots.free == 0
    slots.take_reserved()
    slots.release(first - 1)  # the first request ended with one message
    assert (slots.running, slots.reserved, slots.free) == (1, 2, 1)
    assert not (slots.take_spare() and slots.take_spare())  # only one spare slot
    assert slots.free == 0
    waiter = asyncio.create_task(slots.reserve())
    await asyncio.sleep(0)
    assert not waiter.done()  # no free slot: the pull loop waits
    slots.finish()
    assert await asyncio.wait_for(waiter, 1) == 1
