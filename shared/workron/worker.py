"""The worker SDK: run Python handlers and shell commands from Workron queues.

Declare handlers in a ``Registry`` (no worker needed at import time) or
directly on a ``Worker``::

    from workron.worker import Context, NonRetryable, Registry, Worker

    registry = Registry()

    @registry.task("math.add")
    async def add(ctx: Context, payload: dict) -> int:
        return payload["a"] + payload["b"]

    @registry.task("io.sleep")          # plain functions run in a thread
    def slow(ctx: Context, payload: float) -> None:
        ctx.cancel_event.wait(payload)

    worker = Worker("nats://127.0.0.1:4222", queues=["default"], registry=registry)
    await worker.run()                  # until worker.stop()

``workron worker --app mypkg.tasks:registry`` does the same from the CLI
(``run_worker``). The worker talks to NATS only: work arrives on
``workron.work.<queue>`` through the queue's shared durable consumer, and
reports go to ``workron.report.<queue>``; the dispatcher applies them to
the ledger. Execution is at least once: a handler may run again after a
crash or a lost lease, and ``ctx.token`` tells executions apart.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import operator
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from workron import bus
from workron._execution import Execution, JobEnv
from workron._heartbeat import Heartbeats
from workron._reports import ReportSender
from workron._runner import Slots, WorkPuller
from workron._service import run_until_signal
from workron._tasks import Context, Handler, NonRetryable, Registry, Retry
from workron.config import default_worker_id
from workron.errors import WorkronError
from workron.events import Resources

__all__ = [
    "Context",
    "NonRetryable",
    "Registry",
    "RegistryNotFoundError",
    "Retry",
    "Worker",
    "builtin",
    "load_registry",
    "run_worker",
]

log = logging.getLogger(__name__)

H = TypeVar("H", bound=Handler)

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Streams a worker uses, created if missing so a worker can start first.
_STREAMS = ("WORK", "REPORTS", "CONTROL")
# After a stop past the grace period: time for executions to kill their
# commands and hand messages back before they are cancelled outright.
_HAND_BACK_S = 2.0


class RegistryNotFoundError(WorkronError):
    """No task registry at this import path."""

    code = "registry_not_found"


class Worker:
    """Pulls jobs from ``queues`` and runs up to ``concurrency`` of them at once.

    ``nats_url`` or an already connected ``nc``: a worker that connects
    itself also drains and closes its connection when it ends; one given
    ``nc`` leaves it open. ``grace_s`` is how long running jobs may finish
    after ``stop()``; past it they are stopped and their messages handed
    back for another worker. ``kill_grace_s`` is the time between SIGTERM
    and SIGKILL when a command is stopped. ``report_start_s``: an execution
    still running after it is reported ``running`` on its own; a shorter
    one is reported once, with its outcome.

    The lease of an execution is the AckWait of the queue's consumer; the
    worker renews it every third of that while the job runs.

    ``pull_expires_s`` is how long one pull request waits at the server for
    work; it also bounds how long a worker stays idle after nats-server
    restarts (the server forgets open requests, and nothing tells us).
    A server may also come back with its store lost: a worker declares its
    streams and consumers again after each reconnect of a connection of its
    own, and whenever a pull is refused for a missing consumer.

    The worker registers with the reaper and heartbeats every
    ``heartbeat_s`` (see ``workron._heartbeat``), advertising ``resources``
    (default: this machine's CPUs and memory, no VRAM), ``tags`` and
    ``hostname``; cancels and the reaper's verdicts stop its executions.
    """

    name = "worker"

    def __init__(
        self,
        nats_url: str | None = None,
        queues: Sequence[str] = ("default",),
        concurrency: int = 4,
        worker_id: str | None = None,
        grace_s: float = 30.0,
        *,
        nc: NATS | None = None,
        registry: Registry | Iterable[Registry] | None = None,
        kill_grace_s: float = 5.0,
        report_start_s: float = 0.05,
        pull_expires_s: float = 2.0,
        heartbeat_s: float = bus.HEARTBEAT_S,
        resources: Resources | None = None,
        tags: Mapping[str, str] | None = None,
        hostname: str | None = None,
    ) -> None:
        if nats_url is None and nc is None:
            raise ValueError("Worker needs nats_url or nc")
        if isinstance(queues, str):
            raise TypeError("queues is a list of queue names")
        if not queues:
            raise ValueError("Worker needs at least one queue")
        for queue in queues:
            if not _QUEUE_NAME.match(queue):
                raise ValueError(f"invalid queue name {queue!r}")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.queues = list(dict.fromkeys(queues))
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.grace_s = grace_s
        self.kill_grace_s = kill_grace_s
        self.report_start_s = report_start_s
        self.registry = Registry()
        registries = [registry] if isinstance(registry, Registry) else list(registry or ())
        for item in registries:
            self.registry.include(item)
        self._nats_url = nats_url
        self._nc = nc
        self._pull_expires_s = pull_expires_s
        self._stop = asyncio.Event()
        self._jobs: dict[asyncio.Task[None], Execution] = {}
        self._slots = Slots(concurrency, len(self.queues))
        self._pullers: list[WorkPuller] = []
        self._running = False
        self._heartbeat_s = heartbeat_s
        self._resources = resources
        self._tags = dict(tags or {})
        self._hostname = hostname
        self._heartbeats: Heartbeats | None = None

    def task(self, name: str | None = None) -> Callable[[H], H]:
        """Decorator: register a handler on this worker (see ``Registry.task``)."""
        return self.registry.task(name)

    def include(self, registry: Registry) -> None:
        """Add every task of ``registry``."""
        self.registry.include(registry)

    @property
    def running(self) -> int:
        """Executions in progress now."""
        return len(self._jobs)

    def stop(self) -> None:
        """Stop taking work now; running jobs get ``grace_s`` to finish."""
        self._stop.set()
        # Synchronously: a message already on its way is handed back, not run.
        for puller in self._pullers:
            puller.stop_taking()

    async def run(self, *, burst: bool = False) -> None:
        """Run until ``stop()``; with ``burst``, until no work is waiting and
        every job taken has finished (tests, one-shot drains)."""
        if self._running:
            raise RuntimeError("this worker is running already")
        self._running = True
        self._slots = Slots(self.concurrency, len(self.queues))
        nc = self._nc
        env: JobEnv | None = None
        try:
            if nc is None:
                nc = await bus.connect(
                    self._nats_url or "",
                    name=f"workron-worker {self.worker_id}",
                    on_reconnect=self._redeclare,
                )
            js = nc.jetstream()
            self._heartbeats = heartbeats = Heartbeats(
                nc,
                js,
                worker_id=self.worker_id,
                queues=self.queues,
                executions=self._jobs.values,
                draining=self._stop.is_set,
                on_crash=self.stop,
                interval_s=self._heartbeat_s,
                resources=self._resources,
                tags=self._tags,
                hostname=self._hostname,
            )
            env = JobEnv(
                nc=nc,
                js=js,
                registry=self.registry,
                worker_id=self.worker_id,
                kill_grace_s=self.kill_grace_s,
                report_start_s=self.report_start_s,
                reports=ReportSender(js, live=nc),
                guard=heartbeats,
            )
            await _ensure_streams(js)
            await heartbeats.start()
            self._pullers = pullers = []
            try:
                for queue in self.queues:
                    pullers.append(await self._puller(nc, js, env, queue))
                log.info(
                    "worker started",
                    extra={
                        "action": "worker.start",
                        "worker_id": self.worker_id,
                        "queues": ",".join(self.queues),
                        "tasks": ",".join(self.registry),
                    },
                )
                await self._pull(pullers, burst=burst)
            finally:
                for puller in pullers:
                    await puller.close()
            await self._finish_jobs(None if burst else self.grace_s)
        finally:
            await self._cancel_jobs()
            if env is not None:
                await env.reports.aclose()
            if self._heartbeats is not None:  # the last one says "stopped"
                await self._heartbeats.close()
                self._heartbeats = None
            self._pullers = []
            if nc is not None and self._nc is None:  # ours to close
                await _close(nc)
            self._stop.clear()
            self._running = False
            log.info("worker stopped", extra={"action": "worker.stop", "worker_id": self.worker_id})

    # -- set-up ----------------------------------------------------------------

    async def _redeclare(self, js: JetStreamContext) -> None:
        """After a reconnect: the server may have lost its store, streams and all."""
        await _ensure_streams(js)
        for queue in self.queues:
            await _ensure_work_consumer(js, queue)

    async def _puller(self, nc: NATS, js: JetStreamContext, env: JobEnv, queue: str) -> WorkPuller:
        lease_s = await _ensure_work_consumer(js, queue)
        puller = WorkPuller(
            nc,
            queue,
            _durable(queue),
            slots=self._slots,
            start=functools.partial(self._start_job, env=env, queue=queue, lease_s=lease_s),
            ensure_consumer=functools.partial(_ensure_work_consumer, js, queue),
            expires_s=self._pull_expires_s,
        )
        await puller.open()
        return puller

    # -- pulling -----------------------------------------------------------------

    async def _pull(self, pullers: list[WorkPuller], *, burst: bool) -> None:
        """Run the pull loops until stop (or, in burst mode, until all are idle)."""
        tasks = {
            asyncio.create_task(p.run(burst=burst), name=f"workron.worker.pull.{p.queue}")
            for p in pullers
        }
        stopper = asyncio.create_task(self._stop.wait(), name="workron.worker.stop")
        try:
            pending: set[asyncio.Task[Any]] = set(tasks)
            while pending - {stopper}:
                done, pending = await asyncio.wait(
                    pending | {stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done - {stopper}:
                    if (exc := task.exception()) is not None:
                        log.error(
                            "pull loop crashed",
                            extra={"action": "worker.pull.crash"},
                            exc_info=exc,
                        )
                        raise exc
                if stopper in done:
                    return
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(stopper, *tasks, return_exceptions=True)

    def _start_job(self, msg: Msg, *, env: JobEnv, queue: str, lease_s: float) -> None:
        execution = Execution(msg, env, queue=queue, lease_s=lease_s)
        task = asyncio.create_task(execution.run(), name=f"workron.job.{queue}")
        self._jobs[task] = execution
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        execution = self._jobs.pop(task, None)
        self._slots.finish()
        if execution is not None and execution.handed_back and self._heartbeats is not None:
            self._heartbeats.note_handed_back(execution)
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            # A bug in the worker, not in a handler (those become reports).
            # The message is redelivered after its lease.
            job_id = execution.ctx.job_id if execution and execution.ctx else None
            log.error(
                "execution crashed",
                extra={"action": "worker.job.crash", "job_id": str(job_id)},
                exc_info=exc,
            )

    # -- shutdown ------------------------------------------------------------------

    async def _finish_jobs(self, grace_s: float | None) -> None:
        if not self._jobs:
            return
        log.info(
            "waiting for running jobs",
            extra={"action": "worker.drain", "running": len(self._jobs), "grace_s": grace_s},
        )
        _, pending = await asyncio.wait(set(self._jobs), timeout=grace_s)
        if not pending:
            return
        log.warning(
            "grace period over: handing jobs back",
            extra={"action": "worker.handback", "running": len(pending)},
        )
        for task in pending:
            execution = self._jobs.get(task)
            if execution is not None:
                execution.stop("shutdown")
        await asyncio.wait(pending, timeout=self.kill_grace_s + _HAND_BACK_S)

    async def _cancel_jobs(self) -> None:
        tasks = list(self._jobs)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _durable(queue: str) -> str:
    return bus.work_consumer(queue).durable_name or f"work-{queue}"


async def _ensure_streams(js: JetStreamContext) -> None:
    for stream in bus.STREAMS:
        if stream.name in _STREAMS:
            await bus.ensure_stream(js, stream)


async def _ensure_work_consumer(js: JetStreamContext, queue: str) -> float:
    """Create the queue's consumer if missing; its AckWait (the lease) in seconds.

    An existing consumer is used as it is: its MaxAckPending is the queue's
    concurrency cap and its AckWait the lease, both set by whoever manages
    the queue (``workron migrate``, the dispatcher), not by each worker.
    A missing consumer may mean missing streams (nats-server lost its
    store), so the worker's streams are ensured first.
    """
    wanted = bus.work_consumer(queue)
    try:
        info = await js.consumer_info("WORK", _durable(queue))
    except NotFoundError:
        await _ensure_streams(js)
        info = await js.add_consumer("WORK", wanted)
    return float(info.config.ack_wait or bus.LEASE_S)


async def _close(nc: NATS) -> None:
    try:
        await nc.drain()
    except Exception:  # closing on the way out: nothing left to do about it
        log.debug("connection not drained", extra={"action": "worker.close"}, exc_info=True)


# -- loading registries --------------------------------------------------------------


def load_registry(path: str) -> Registry:
    """The registry at ``"module:attribute"`` (a ``Registry`` or a ``Worker``).

    Without ``:attribute``, the module's ``registry`` attribute, or else the
    only ``Registry``/``Worker`` the module defines.
    """
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryNotFoundError(f"cannot import {module_name!r}: {exc}") from exc
    if attribute:
        try:
            found = operator.attrgetter(attribute)(module)
        except AttributeError as exc:
            raise RegistryNotFoundError(f"{module_name!r} has no {attribute!r}") from exc
    elif isinstance(getattr(module, "registry", None), Registry | Worker):
        found = module.registry
    else:
        candidates = [v for v in vars(module).values() if isinstance(v, Registry | Worker)]
        if len(candidates) != 1:
            raise RegistryNotFoundError(
                f"{module_name!r} defines {len(candidates)} registries: name one as "
                f"{module_name}:<attribute>"
            )
        found = candidates[0]
    if isinstance(found, Worker):
        return found.registry
    if not isinstance(found, Registry):
        raise RegistryNotFoundError(f"{path!r} is a {type(found).__name__}, not a Registry")
    return found


async def run_worker(
    nats_url: str,
    queues: Sequence[str] = ("default",),
    concurrency: int = 4,
    apps: Sequence[str] = (),
    *,
    worker_id: str | None = None,
    grace_s: float = 30.0,
    heartbeat_s: float = bus.HEARTBEAT_S,
    resources: Resources | None = None,
    tags: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> None:
    """What ``workron worker`` runs: the built-in tasks plus the registries at
    ``apps`` (``"module"`` or ``"module:attribute"``), until SIGINT/SIGTERM.

    As with celery and uvicorn, modules in the current directory can be
    loaded (it is put on ``sys.path``). Raises ``RegistryNotFoundError``
    before connecting when an app cannot be loaded.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    registry = Registry()
    registry.include(builtin)
    for path in apps:
        registry.include(load_registry(path))
    worker = Worker(
        nats_url,
        queues,
        concurrency,
        worker_id,
        grace_s,
        registry=registry,
        heartbeat_s=heartbeat_s,
        resources=resources,
        tags=tags,
        hostname=hostname,
    )
    await run_until_signal([worker])


# -- built-in tasks -------------------------------------------------------------------

#: Tasks every ``workron worker`` has: ``workron.noop`` (returns null) and
#: ``workron.echo`` (returns its payload). Benchmarks and smoke tests use them.
builtin = Registry()


@builtin.task("workron.noop")
async def _noop(ctx: Context, payload: msgspec.Raw) -> None:
    """Do nothing: what is left is the scheduler's own cost."""


@builtin.task("workron.echo")
async def _echo(ctx: Context, payload: msgspec.Raw) -> msgspec.Raw:
    """Return the payload as it came (never decoded)."""
    return payload
