"""Task handlers: the registry they are declared in, the context they run with,
and the exceptions that steer retries. Re-exported by ``workron.worker``."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import re
import threading
import typing
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from uuid import UUID

import msgspec

from workron.errors import WorkronError

__all__ = ["Context", "Handler", "NonRetryable", "Registry", "Retry", "TaskDef", "run_in_thread"]

#: A task handler: ``(ctx, payload) -> result``, a coroutine function or a
#: plain function (run in a thread).
Handler = Callable[["Context", Any], Any]
H = TypeVar("H", bound=Handler)

# Same rule as ``events.TaskName``: what a job may name.
_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$")


class Retry(WorkronError):
    """The job failed and should be tried again (if attempts remain)."""

    code = "retry"


class NonRetryable(WorkronError):
    """The job failed in a way no retry can fix."""

    code = "non_retryable"


class Context:
    """What a handler knows about the execution it is running.

    ``token`` (``"<attempt>.<delivery>"``) is the fencing token of this
    execution: at most one execution of a job holds a valid lease at a time,
    and a newer one always has a greater token. Use it to make side effects
    idempotent, e.g. a conditional write that refuses a smaller token.
    """

    __slots__ = (
        "_cancel",
        "_renew",
        "attempt",
        "delivery",
        "job_id",
        "last_checkpoint",
        "parents",
        "parents_omitted",
        "payload",
        "queue",
        "traceparent",
        "worker_id",
    )

    def __init__(
        self,
        *,
        job_id: UUID,
        attempt: int,
        delivery: int,
        queue: str,
        worker_id: str,
        payload: Any,
        last_checkpoint: bytes | None,
        traceparent: str | None,
        renew: Callable[[], Awaitable[bool]],
        parents: dict[str, Any] | None = None,
        parents_omitted: list[str] | None = None,
    ) -> None:
        #: The job being run.
        self.job_id = job_id
        #: Attempt number, from 1; a retry after a failure is a new attempt.
        self.attempt = attempt
        #: JetStream delivery of this attempt, from 1; a redelivery after a
        #: lost lease runs the same attempt again with a greater delivery.
        self.delivery = delivery
        #: Queue the job came from.
        self.queue = queue
        #: This worker's id.
        self.worker_id = worker_id
        #: The decoded payload (also passed to the handler).
        self.payload = payload
        #: The latest checkpoint a previous execution of this job saved, if any.
        self.last_checkpoint = last_checkpoint
        #: W3C trace context of the job, when it has one.
        self.traceparent = traceparent
        self._renew = renew
        #: Results of the jobs this one depended on (decoded JSON): keyed by
        #: the parent's ref in the same DAG, else by its job id.
        self.parents: dict[str, Any] = parents or {}
        #: Parents whose results did not fit in the work message (see README).
        self.parents_omitted: list[str] = parents_omitted or []
        self._cancel = threading.Event()

    @property
    def token(self) -> str:
        """The fencing token of this execution, ``"<attempt>.<delivery>"``."""
        return f"{self.attempt}.{self.delivery}"

    @property
    def cancelled(self) -> bool:
        """True once the execution is being stopped (timeout, lost lease, shutdown).

        Async handlers are cancelled outright; sync handlers run in a thread
        that cannot be interrupted and should check this (or wait on
        ``cancel_event``) in their long loops.
        """
        return self._cancel.is_set()

    @property
    def cancel_event(self) -> threading.Event:
        """Set when the execution is being stopped; ``wait()`` on it from a
        sync handler is a sleep that ends early on cancellation."""
        return self._cancel

    async def heartbeat(self) -> bool:
        """Renew this execution's lease now; True when the server confirmed it.

        The worker renews leases on its own while a handler runs; call this
        to renew right away (e.g. before a long step). A False return is not
        fatal by itself: the worker keeps trying and stops the execution
        only when the lease runs out.
        """
        return await self._renew()

    # ``checkpoint(data: bytes)`` belongs here once the checkpoint report
    # exists on the wire (events.Report has no checkpoint variant yet): it
    # will publish the bytes as a report fenced by ``token`` and await the
    # PubAck, so ``last_checkpoint`` of a later execution sees them.

    def _set_cancelled(self) -> None:
        self._cancel.set()


class TaskDef:
    """One registered handler and how its payload is decoded."""

    def __init__(self, name: str, fn: Handler) -> None:
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2:
            raise TypeError(f"task {name!r}: a handler takes (ctx, payload)")
        self.name = name
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        self._payload_param = params[1].name
        self._decoder: msgspec.json.Decoder[Any] | None = None

    def decode(self, raw: bytes | msgspec.Raw) -> Any:
        """The payload as the handler wants it: plain JSON values, or the type
        its ``payload`` parameter is annotated with (a Struct, a dict…).

        Raises ``NonRetryable`` when the payload does not fit that type.
        """
        if self._decoder is None:
            payload_type = self._payload_type()
            try:
                self._decoder = msgspec.json.Decoder(payload_type)
            except TypeError as exc:
                raise NonRetryable(
                    f"task {self.name!r}: cannot decode into {payload_type}"
                ) from exc
        try:
            return self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise NonRetryable(f"invalid payload for task {self.name!r}: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise NonRetryable(f"payload of task {self.name!r} is not JSON: {exc}") from exc

    def _payload_type(self) -> Any:
        # Resolved on first use, not at decoration: with postponed
        # annotations the type may be defined further down the module.
        try:
            hints = typing.get_type_hints(self.fn)
        except (NameError, TypeError) as exc:
            raise NonRetryable(f"task {self.name!r}: cannot resolve annotations: {exc}") from exc
        hint = hints.get(self._payload_param, Any)
        return Any if hint is object else hint


def run_in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run ``fn(*args)`` in a new daemon thread; its result as a future.

    Not a thread pool: a handler that ignores cancellation keeps running
    after its job timed out or the worker stopped, and a daemon thread does
    not hold the process open at exit the way pool threads would.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled (timeout, shutdown) while the thread ran
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = context.run(fn, *args)
        except BaseException as exc:  # handed to the awaiting side, never lost
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    threading.Thread(target=target, name="workron-task", daemon=True).start()
    return future


class Registry:
    """Named task handlers, declared without a running worker.

    A module exposes one and the worker loads it by import path
    (``workron worker --app mypkg.tasks:registry``)::

        registry = Registry()

        @registry.task("math.add")
        async def add(ctx: Context, payload: Pair) -> int:
            return payload.a + payload.b

    Handlers take ``(ctx, payload)``. A coroutine function runs on the
    worker's event loop; a plain function runs in a thread. The payload is
    decoded into the type ``payload`` is annotated with, if any.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDef] = {}

    def task(self, name: str | None = None) -> Callable[[H], H]:
        """Register the decorated function under ``name`` (default: ``module.function``)."""

        def register(fn: H) -> H:
            self.add(name or f"{fn.__module__}.{fn.__name__}", fn)
            return fn

        return register

    def add(self, name: str, fn: Handler) -> TaskDef:
        """Register ``fn`` under ``name``; a name can only be taken once."""
        if not _TASK_NAME.match(name):
            raise ValueError(f"invalid task name {name!r}")
        existing = self._tasks.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"task {name!r} is registered already (by {existing.fn!r})")
        if not callable(fn):
            raise TypeError(f"task {name!r}: handler {fn!r} is not callable")
        task = existing or TaskDef(name, fn)
        self._tasks[name] = task
        return task

    def include(self, other: Registry) -> None:
        """Add every task of ``other`` to this registry."""
        for task in other._tasks.values():
            self.add(task.name, task.fn)

    def get(self, name: str) -> TaskDef | None:
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"Registry({', '.join(self)})"
