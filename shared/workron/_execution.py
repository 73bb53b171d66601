"""The life of one execution on a worker: lease, reports, ack.

Order of effects for one work message:

1. the lease keeper starts renewing it (confirmed ``+WPI``) right away;
2. ``started`` is published once the execution has run for
   ``JobEnv.report_start_s`` (its PubAck is awaited before the outcome, so
   the two keep their order); an execution that ends sooner reports once,
   its outcome carrying ``started_at``, which halves the reports of short
   jobs and takes one ledger write off each DAG hop;
3. the outcome (``succeeded`` / ``failed``) is published and its PubAck
   awaited: the report is stored;
4. only then the work message is acked (``ack_sync``) and leaves WORK.

A crash anywhere before 4 leaves the message to be redelivered: at least
once. An execution that can no longer renew its lease stops itself before
the lease runs out and reports nothing (self-fencing); one stopped by
shutdown hands its message back with a nak.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from uuid import UUID

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, MaxPayloadError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from workron import _parents
from workron._commands import argv_for, run_command
from workron._reports import ReportSender
from workron._tasks import Context, NonRetryable, Registry, Retry, run_in_thread
from workron.events import (
    MAX_RESULT_BYTES,
    Report,
    ReportCancelled,
    ReportFailed,
    ReportStarted,
    ReportSucceeded,
    Work,
)

__all__ = ["Execution", "ExecutionGuard", "JobEnv"]

log = logging.getLogger(__name__)

_work_decoder = msgspec.json.Decoder(Work)
_encoder = msgspec.json.Encoder()

# Longest error text reported; the ledger keeps it and clients show it.
_MAX_ERROR = 4096
# Frames of a handler's traceback kept in the error: where it failed.
_TRACEBACK_FRAMES = 3

R = TypeVar("R", ReportStarted, ReportSucceeded, ReportFailed, ReportCancelled)
# cancelled: the job was cancelled (report it, ack); superseded: the ledger
# gave the job a new attempt or finished it (no report, ack the message).
StopReason = Literal["timeout", "fenced", "shutdown", "cancelled", "superseded"]


class ExecutionGuard(Protocol):
    """What the ledger, through the worker's heartbeats, says before a start."""

    def cancelled(self, job_id: UUID, attempt: int) -> bool: ...

    async def check(self, execution: Execution) -> None: ...


@dataclass(frozen=True, slots=True)
class JobEnv:
    """What every execution of one worker shares."""

    nc: NATS
    js: JetStreamContext
    registry: Registry
    worker_id: str
    kill_grace_s: float
    reports: ReportSender
    guard: ExecutionGuard | None = None
    #: Run time after which ``started`` is reported on its own. Until then a
    #: job is ``dispatched`` in the ledger; a worker dying meanwhile leaves
    #: its message to JetStream's redelivery, as one dying before any report.
    report_start_s: float = 0.05


def _transient(exc: BaseException) -> bool:
    """Worth retrying: timeouts, reconnects, JetStream briefly unavailable."""
    if isinstance(exc, ConnectionClosedError | MaxPayloadError | BadRequestError):
        return False
    return isinstance(exc, NatsError)


def describe(exc: BaseException) -> str:
    """``"Type: message"`` and the last frames of the traceback, bounded."""
    head = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)[-_TRACEBACK_FRAMES:]
    tail = "".join(traceback.format_list(frames)).rstrip()
    text = f"{head}\n{tail}" if tail else head
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


class _Failure(Exception):
    """A failure the worker itself found (no handler traceback to show)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message[:_MAX_ERROR]
        self.retryable = retryable


class Execution:
    """One delivery of one work message, from receipt to ack."""

    def __init__(self, msg: Msg, env: JobEnv, *, queue: str, lease_s: float) -> None:
        self.msg = msg
        self.queue = queue
        self._env = env
        self._lease_s = lease_s
        self._interval = lease_s / 3
        # Stop a little before the server's AckWait ends, not after it: the
        # server's lease began at delivery, slightly before we saw it.
        self._margin = min(lease_s / 10, 2.0)
        self._renewed_at = asyncio.get_running_loop().time()
        self.stop_reason: StopReason | None = None
        self.work: Work | None = None
        self.ctx: Context | None = None
        self._body: asyncio.Task[Report] | None = None
        self._interrupted = False  # a stop() cancelled the body while it ran
        self._ended = False  # no more lease renewals
        self._thread: asyncio.Future[Any] | None = None
        self._start_reported = False  # ``started`` went out on its own
        #: Given back (nak) at shutdown for another worker to run.
        self.handed_back = False

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        try:
            work = _work_decoder.decode(self.msg.data)
        except msgspec.DecodeError as exc:
            # Poison: no retry can make it decode. Terminate, never redeliver.
            log.error(
                "invalid work message terminated",
                extra={"action": "worker.work.invalid", "queue": self.queue, "error": str(exc)},
            )
            await self._settle(self.msg.term, "term")
            return
        self.work = work
        delivery = self.msg.metadata.num_delivered
        self.ctx = Context(
            job_id=work.job_id,
            attempt=work.attempt,
            delivery=delivery,
            queue=self.queue,
            worker_id=self._env.worker_id,
            payload=None,
            last_checkpoint=work.checkpoint,
            traceparent=work.traceparent,
            renew=self.renew,
            parents={k: msgspec.json.decode(v) for k, v in (work.parents or {}).items()},
            parents_omitted=work.parents_omitted,
        )
        if self._env.guard is not None and await self._skipped(work):
            return
        if log.isEnabledFor(logging.DEBUG):  # the hot path: skip building the extra
            log.debug("job started", extra=self._log_extra("worker.job.start"))
        keeper = asyncio.create_task(self._keep_lease(), name="workron.job.lease")
        start = self._report(ReportStarted)
        started = asyncio.create_task(self._report_start(start), name="workron.job.started")
        self._body = body = asyncio.create_task(self._execute(work), name="workron.job.body")
        if self.stop_reason is not None:  # stopped before it began
            self.stop(self.stop_reason)
        try:
            done, _ = await asyncio.wait({body}, timeout=work.timeout_s)
            if not done:
                self.stop("timeout")
                await asyncio.wait({body})
            outcome = self._outcome(work, body)
            if outcome is None:
                await self._stopped()
            else:
                if self._start_reported:
                    await started
                else:
                    started.cancel()  # still waiting: the outcome says it all
                    outcome = msgspec.structs.replace(outcome, started_at=start.at)
                if await self._publish(outcome):
                    await self._settle(self.msg.ack_sync, "ack")
                self._log_outcome(outcome)
        finally:
            self._ended = True
            for task in (keeper, started, body):
                task.cancel()
            await asyncio.gather(keeper, started, body, return_exceptions=True)
        if not (self._interrupted and self.stop_reason == "shutdown"):
            await self._wait_thread()

    def _outcome(self, work: Work, body: asyncio.Task[Report]) -> Report | None:
        """The report to make; None when the execution was stopped without one.

        A stop that came after the work was done changes nothing; one that
        interrupted it decides the outcome, whatever the body did after.
        """
        if not self._interrupted:
            return body.result()
        if self.stop_reason == "timeout":
            return self._failed(f"timed out after {work.timeout_s:g}s", retryable=True)
        if self.stop_reason == "cancelled":
            return self._report(ReportCancelled, reason="stopped: the job was cancelled")
        return None

    async def _skipped(self, work: Work) -> bool:
        """True when the ledger no longer wants this execution: settled, not run.

        A job cancelled before it started is known from the control messages;
        a redelivery (the previous holder died or lost its lease) is checked
        with one heartbeat, since the reaper may have given the job a new
        attempt meanwhile. First deliveries are not asked: the hot path.
        """
        guard = self._env.guard
        assert guard is not None and self.ctx is not None
        if guard.cancelled(work.job_id, work.attempt):
            self.stop("cancelled")
        elif self.ctx.delivery > 1 and self.stop_reason is None:
            await guard.check(self)  # its reply calls stop() if need be
        reason = self.stop_reason
        if reason not in ("cancelled", "superseded", "fenced"):
            return False
        log.info("job not run", extra={**self._log_extra("worker.job.skip"), "reason": reason})
        if reason == "cancelled":
            cancelled = self._report(ReportCancelled, reason="skipped: cancelled before it started")
            if await self._publish(cancelled):
                await self._settle(self.msg.ack_sync, "ack")
        elif reason == "superseded":
            await self._settle(self.msg.ack_sync, "ack")
        return True

    def stop(self, reason: StopReason) -> None:
        """Stop the execution: timeout, lease lost, shutdown past its grace
        period, or the ledger's word (cancelled, superseded).

        ``ctx.cancelled`` is set before the handler sees its cancellation.
        """
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._body is None or self._body.done():
            return
        if self.ctx is not None:
            self.ctx._set_cancelled()
        self._interrupted = True
        self._body.cancel()

    async def _stopped(self) -> None:
        if self.stop_reason == "shutdown":
            # Hand it back now rather than after AckWait: another worker
            # runs the redelivery at once. No outcome: there is none.
            log.warning("job handed back", extra=self._log_extra("worker.job.handback"))
            self.handed_back = await self._settle(self.msg.nak, "nak")
        elif self.stop_reason == "superseded":
            # The ledger moved the job on: this message can never count again.
            log.warning("job stopped: superseded", extra=self._log_extra("worker.job.superseded"))
            await self._settle(self.msg.ack_sync, "ack")
        else:
            # Lease lost: the server redelivers on its own, and whatever we
            # would report now is the word of a fenced execution.
            log.warning("job stopped: lease lost", extra=self._log_extra("worker.job.fenced"))

    async def _wait_thread(self) -> None:
        # A sync handler that outlived its timeout still holds its slot
        # (memory, GPU) until it returns, so the worker does not overcommit.
        thread = self._thread
        if thread is not None:
            await asyncio.wait({thread})
            if not thread.cancelled():
                thread.exception()  # retrieved: already reported as a failure

    # -- the work itself -----------------------------------------------------

    async def _execute(self, work: Work) -> Report:
        """Run the handler or command; the outcome as a report.

        Cancellation of this task by ``stop()`` propagates; every other way
        the work can end becomes a report.
        """
        try:
            result = await self._run(work)
        except _Failure as exc:
            return self._failed(exc.message, retryable=exc.retryable)
        except NonRetryable as exc:
            return self._failed(describe(exc), retryable=False)
        except Retry as exc:
            return self._failed(describe(exc), retryable=True)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # stopped by ``stop()``: timeout, lost lease, shutdown
            # The handler's own cancellation (something it awaited): a failure.
            return self._failed(describe(exc), retryable=True)
        except Exception as exc:
            return self._failed(describe(exc), retryable=True)
        return self._report(ReportSucceeded, result=msgspec.Raw(result))

    async def _run(self, work: Work) -> bytes:
        """The encoded result of the work, or ``_Failure``."""
        if work.command is not None:
            return await self._run_command(work.command, work.shell)
        if work.task is None:
            raise _Failure("work has neither a task nor a command", retryable=False)
        task = self._env.registry.get(work.task)
        if task is None:
            raise _Failure(
                f"unknown task {work.task!r} (this worker has: {', '.join(self._env.registry)})",
                retryable=False,
            )
        try:
            payload = task.decode(work.payload)
        except NonRetryable as exc:
            raise _Failure(exc.message, retryable=False) from exc
        ctx = self.ctx
        assert ctx is not None
        ctx.payload = payload
        if task.is_async:
            value = await task.fn(ctx, payload)
        else:
            # Shielded: a timeout or stop cannot interrupt a thread, so the
            # thread's own future lives on for ``_wait_thread``.
            self._thread = run_in_thread(task.fn, ctx, payload)
            value = await asyncio.shield(self._thread)
        try:
            data = _encoder.encode(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise _Failure(f"result is not JSON-encodable: {exc}", retryable=False) from exc
        if len(data) > MAX_RESULT_BYTES:
            raise _Failure(
                f"result too large: {len(data)} bytes (max {MAX_RESULT_BYTES})", retryable=False
            )
        return data

    async def _run_command(self, command: list[str] | str, shell: bool) -> bytes:
        parents = self.work.parents if self.work is not None else None
        try:
            argv = argv_for(command, shell)
            env = self._command_env()
            temporary = tempfile.TemporaryDirectory(prefix="workron-parents-") if parents else None
            with temporary or contextlib.nullcontext() as directory:
                if parents and directory:
                    # Files always; the variable only while it is small (see _parents).
                    await asyncio.to_thread(_parents.write_files, Path(directory), parents)
                    env["WORKRON_PARENTS_DIR"] = directory
                    if (value := _parents.env_value(parents)) is not None:
                        env["WORKRON_PARENTS"] = value
                output = await run_command(argv, env=env, kill_grace_s=self._env.kill_grace_s)
        except NonRetryable as exc:
            raise _Failure(exc.message, retryable=False) from exc
        if output.exit_code != 0:
            raise _Failure(output.error, retryable=True)
        return output.encode()

    def _command_env(self) -> dict[str, str]:
        ctx = self.ctx
        assert ctx is not None
        env = dict(os.environ)
        env.update(
            WORKRON_JOB_ID=str(ctx.job_id),
            WORKRON_ATTEMPT=str(ctx.attempt),
            WORKRON_DELIVERY=str(ctx.delivery),
            WORKRON_TOKEN=ctx.token,
            WORKRON_QUEUE=ctx.queue,
        )
        if ctx.traceparent:
            env["TRACEPARENT"] = ctx.traceparent
        return env

    # -- lease ---------------------------------------------------------------

    def _lease_deadline(self) -> float:
        return self._renewed_at + self._lease_s - self._margin

    async def renew(self) -> bool:
        """Renew the lease with a confirmed ``+WPI``; True when the server answered.

        ``Msg.in_progress()`` is a plain publish that "succeeds" into the
        client's buffer while disconnected; a request proves the server got it.
        """
        loop = asyncio.get_running_loop()
        sent = loop.time()
        timeout = max(0.05, min(self._interval, self._lease_deadline() - sent))
        try:
            await self._env.nc.request(self.msg.reply, b"+WPI", timeout=timeout)
        except (NatsError, TimeoutError) as exc:
            log.warning(
                "lease not renewed",
                extra={**self._log_extra("worker.lease.fail"), "error": repr(exc)},
            )
            return False
        self._renewed_at = max(self._renewed_at, sent)
        return True

    async def _keep_lease(self) -> None:
        """Renew every lease/3; stop the execution once the lease is surely lost."""
        loop = asyncio.get_running_loop()
        next_try = self._renewed_at + self._interval
        # The flag as well as cancellation: on Python 3.11, wait_for (inside
        # nc.request) drops a cancel that lands as the reply arrives.
        while not self._ended:
            now = loop.time()
            deadline = self._lease_deadline()
            if now >= deadline:
                self.stop("fenced")
                return
            if now < next_try:
                await asyncio.sleep(min(next_try, deadline) - now)
                continue
            if await self.renew():
                next_try = self._renewed_at + self._interval
            else:
                # Failed fast or timed out: try again soon, not in a hot loop.
                next_try = loop.time() + min(self._interval / 4, 1.0)

    # -- reports and acks ----------------------------------------------------

    def _report(self, kind: type[R], **fields: Any) -> R:
        ctx = self.ctx
        assert ctx is not None
        return kind(
            job_id=ctx.job_id,
            attempt=ctx.attempt,
            delivery=ctx.delivery,
            worker_id=ctx.worker_id,
            at=time.time(),
            **fields,
        )

    async def _report_start(self, report: ReportStarted) -> None:
        await asyncio.sleep(self._env.report_start_s)
        self._start_reported = True  # from here on, the outcome waits for it
        await self._publish(report)

    def _failed(self, error: str, *, retryable: bool) -> ReportFailed:
        return self._report(ReportFailed, error=error, retryable=retryable)

    async def _publish(self, report: Report) -> bool:
        """Publish a report and await its PubAck; False when it could not be stored.

        Sent alone or in a batch (``_reports``); either way the dispatcher
        knows it by ``report_id``, so a retry after a lost PubAck applies once.
        """

        async def publish() -> None:
            await self._env.reports.send(self.queue, report)

        return await self._retrying(publish, f"report.{report.__struct_config__.tag}")

    async def _settle(self, call: Callable[[], Awaitable[object]], what: str) -> bool:
        """ack_sync / nak / term, retried while the failure is transient."""
        return await self._retrying(call, what)

    async def _retrying(self, call: Callable[[], Awaitable[object]], what: str) -> bool:
        # Bounded by one lease: past it the message is redelivered anyway and
        # the next execution reports for itself.
        try:
            await call()
            return True
        except NatsError as exc:
            if not _transient(exc):
                self._log_bus_failure(what, exc)
                return False
        retrying = AsyncRetrying(
            stop=stop_after_delay(self._lease_s),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception(_transient),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await call()
        except NatsError as exc:
            self._log_bus_failure(what, exc)
            return False
        return True

    def _log_bus_failure(self, what: str, exc: BaseException) -> None:
        log.error(
            "bus operation failed",
            extra={**self._log_extra(f"worker.{what}.fail"), "error": repr(exc)},
        )

    # -- logging -------------------------------------------------------------

    def _log_extra(self, action: str) -> dict[str, object]:
        extra: dict[str, object] = {"action": action, "queue": self.queue}
        if self.ctx is not None:
            extra.update(job_id=str(self.ctx.job_id), token=self.ctx.token)
        return extra

    def _log_outcome(self, outcome: Report) -> None:
        if isinstance(outcome, ReportFailed):
            log.info(
                "job failed",
                extra={
                    **self._log_extra("worker.job.failed"),
                    "error": outcome.error.partition("\n")[0],
                    "retryable": outcome.retryable,
                },
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("job succeeded", extra=self._log_extra("worker.job.succeeded"))
