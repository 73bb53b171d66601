"""A worker's heartbeats: registration, proof of life, ledger lease renewal,
and what the replies say about the executions it holds.

Every ``interval_s`` the worker sends a ``Heartbeat`` request naming every
execution it runs (``bus.HEARTBEAT_S``). The leading reaper records it, which
renews those executions' ledger leases, and replies with the executions the
ledger no longer wants (cancelled, given a new attempt, taken over); they are
stopped here.

Self-fencing: the reaper declares a worker dead ``HEARTBEAT_MISSES`` periods
after the last heartbeat it recorded, and gives its jobs to others. A worker
whose heartbeats go unanswered (disconnected, partitioned) stops its
executions a margin before that moment, so a job never runs on two workers
because one of them was cut off. "No responders" is not such a failure:
with no reaper running nobody can declare the worker dead, and a reaper that
takes over first listens for a full dead-after period before judging.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from uuid import UUID

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js import JetStreamContext

from workron import bus
from workron._control import ControlListener
from workron._execution import Execution
from workron.events import Resources
from workron.liveness import CancelJob, ExecutionRef, Heartbeat, HeartbeatReply, WorkerState

__all__ = ["Heartbeats", "machine_resources"]

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder()
_decode_reply = msgspec.json.Decoder(HeartbeatReply)
# The wait for a redelivery's check: short, since the message waits meanwhile.
_CHECK_TIMEOUT_S = 1.0


def machine_resources(vram_mb: int = 0) -> Resources:
    """This machine's CPUs and total memory (``/proc/meminfo``); VRAM as given."""
    memory_mb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_mb = int(line.split()[1]) // 1024  # reported in kB
                break
    except (OSError, ValueError, IndexError):
        pass  # not Linux: unknown, advertised as 0
    return Resources(cpu=float(os.cpu_count() or 0), memory_mb=memory_mb, vram_mb=vram_mb)


def _version() -> str:
    try:
        return importlib.metadata.version("workron")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def ref_of(execution: Execution) -> ExecutionRef | None:
    ctx = execution.ctx
    if ctx is None:
        return None  # not decoded yet: it names no job
    return ExecutionRef(
        job_id=ctx.job_id, attempt=ctx.attempt, delivery=ctx.delivery, ack=execution.msg.reply
    )


class Heartbeats:
    """Heartbeats and control messages of one worker run; the guard every
    execution consults before it starts (``JobEnv.guard``)."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        *,
        worker_id: str,
        queues: Sequence[str],
        executions: Callable[[], Collection[Execution]],
        draining: Callable[[], bool],
        on_crash: Callable[[], None],
        interval_s: float = bus.HEARTBEAT_S,
        resources: Resources | None = None,
        tags: Mapping[str, str] | None = None,
        hostname: str | None = None,
    ) -> None:
        self._nc = nc
        self._subject = bus.heartbeat_subject(worker_id)
        self._executions = executions
        self._draining = draining
        self._on_crash = on_crash
        self.interval_s = interval_s
        # Stop executions this long after the last heartbeat the reaper
        # heard was sent: a margin before it may declare this worker dead.
        self.fence_after_s = interval_s * bus.HEARTBEAT_MISSES - min(interval_s / 2, 1.0)
        self.worker_id = worker_id
        # What every heartbeat repeats: a reaper that missed the first one
        # (or lost its rows) learns everything from the next.
        self._base = Heartbeat(
            worker_id=worker_id,
            instance=uuid.uuid4().hex,
            interval_s=interval_s,
            queues=list(queues),
            resources=resources or machine_resources(),
            tags=dict(tags or {}),
            hostname=hostname or socket.gethostname(),
            version=_version(),
            started_at=time.time(),
        )
        self._handed_back: list[ExecutionRef] = []
        self._heard_at = 0.0
        self._fenced = False
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.control = ControlListener(js, worker_id, self._cancel)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to control messages and start heartbeating (the first one registers)."""
        self._heard_at = asyncio.get_running_loop().time()
        await self.control.open()
        self._task = asyncio.create_task(self._run(), name="workron.worker.heartbeat")
        self._task.add_done_callback(self._ended)

    async def close(self, *, final: bool = True) -> None:
        """Stop heartbeating; with ``final``, tell the reaper this worker stopped."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.control.close()
        if final:
            await self.beat("stopped", timeout=min(self.interval_s, 2.0))

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error(
            "heartbeat loop crashed; stopping the worker",
            extra={"action": "worker.heartbeat.crash", "worker_id": self.worker_id},
            exc_info=task.exception(),
        )
        self._on_crash()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while not self._stop.is_set():
            now = loop.time()
            fence_at = self._heard_at + self.fence_after_s
            if now >= fence_at:
                self._fence_all()
            if now >= next_beat:
                next_beat = now + self.interval_s
                # Never wait past the fencing moment for an answer.
                timeout = min(self.interval_s, max(0.1, fence_at - now))
                await self.beat("draining" if self._draining() else "alive", timeout=timeout)
                continue
            wake = min(next_beat, fence_at) if fence_at > now else next_beat
            try:
                await asyncio.wait_for(self._stop.wait(), wake - now)
            except TimeoutError:
                pass

    # -- one heartbeat -----------------------------------------------------------

    def heartbeat(self, state: WorkerState) -> Heartbeat:
        refs = [ref for e in list(self._executions()) if (ref := ref_of(e)) is not None]
        return msgspec.structs.replace(
            self._base,
            state=state,
            executions=refs,
            handed_back=list(self._handed_back) if state == "stopped" else [],
        )

    async def beat(self, state: WorkerState, *, timeout: float) -> HeartbeatReply | None:
        """Send one heartbeat; apply the reply. None when nobody answered."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        data = _encode.encode(self.heartbeat(state))
        try:
            msg = await self._nc.request(self._subject, data, timeout=timeout)
        except NoRespondersError:
            # No reaper is listening: nobody can declare this worker dead.
            self._heard(sent)
            return None
        except (NatsError, TimeoutError) as exc:
            log.warning(
                "heartbeat not answered",
                extra={"action": "worker.heartbeat.fail", "error": repr(exc)},
            )
            return None
        self._heard(sent)
        try:
            reply = _decode_reply.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("heartbeat reply not understood", extra={"action": "worker.heartbeat"})
            return None
        if reply.error:
            log.warning(
                "heartbeat heard but not recorded",
                extra={"action": "worker.heartbeat.unrecorded", "error": reply.error},
            )
        for order in reply.stop:
            for execution in self._matching(order.job_id, order.attempt, order.delivery):
                log.info(
                    "the ledger stops an execution",
                    extra={
                        "action": "worker.job.stop",
                        "job_id": str(order.job_id),
                        "token": f"{order.attempt}.{order.delivery}",
                        "reason": order.reason,
                    },
                )
                execution.stop(order.reason)
        return reply

    def _heard(self, sent: float) -> None:
        self._heard_at = max(self._heard_at, sent)
        if self._fenced:
            self._fenced = False
            log.info("heartbeats heard again", extra={"action": "worker.heartbeat.back"})

    def _fence_all(self) -> None:
        running = [e for e in list(self._executions()) if e.ctx is not None]
        if not running:
            return
        if not self._fenced:
            self._fenced = True
            log.warning(
                "heartbeats unanswered: stopping executions before the reaper gives them away",
                extra={"action": "worker.heartbeat.fenced", "running": len(running)},
            )
        for execution in running:
            execution.stop("fenced")

    def _matching(self, job_id: UUID, attempt: int, delivery: int | None) -> list[Execution]:
        return [
            e
            for e in list(self._executions())
            if e.ctx is not None
            and e.ctx.job_id == job_id
            and e.ctx.attempt == attempt
            and (delivery is None or e.ctx.delivery == delivery)
        ]

    # -- what executions and the worker ask ------------------------------------------

    def _cancel(self, cancel: CancelJob) -> None:
        for execution in self._matching(cancel.job_id, cancel.attempt, None):
            log.info(
                "job cancelled while running",
                extra={"action": "worker.job.cancel", "job_id": str(cancel.job_id)},
            )
            execution.stop("cancelled")

    def cancelled(self, job_id: UUID, attempt: int) -> bool:
        return self.control.cancelled(job_id, attempt)

    async def check(self, execution: Execution) -> None:
        """Ask the ledger about a redelivered execution before it runs: one
        heartbeat now. Its reply stops the execution if the ledger moved on."""
        del execution  # it is among the executions the heartbeat names
        state: WorkerState = "draining" if self._draining() else "alive"
        await self.beat(state, timeout=min(self.interval_s, _CHECK_TIMEOUT_S))

    def note_handed_back(self, execution: Execution) -> None:
        """An execution given back at shutdown; the final heartbeat names it."""
        if (ref := ref_of(execution)) is not None:
            self._handed_back.append(ref)
