"""The worker SDK against a real nats-server: handlers, commands, reports,
leases, concurrency and shutdown.

Work messages are published here directly onto ``workron.work.<queue>``
(the dispatcher's job), and reports are read back through the
``dispatcher`` consumer of REPORTS (a work-queue stream admits no second,
overlapping consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from workron import bus
from workron._embedded import NatsServer
from workron._ids import uuid7
from workron.dispatcher.reports import decode
from workron.events import (
    Report,
    ReportFailed,
    ReportStarted,
    ReportSucceeded,
    Work,
)
from workron.worker import Context, NonRetryable, Registry, Retry, Worker, builtin, run_worker

Q = "default"


# -- helpers ---------------------------------------------------------------------


async def submit(
    js: JetStreamContext,
    *,
    queue: str = Q,
    task: str | None = None,
    payload: Any = None,
    command: list[str] | str | None = None,
    shell: bool = False,
    timeout_s: float | None = None,
    data: bytes | None = None,
) -> UUID:
    """Publish one work message, as the dispatcher would."""
    work = Work(
        job_id=uuid7(),
        attempt=1,
        max_attempts=3,
        queue=queue,
        task=task,
        payload=msgspec.Raw(msgspec.json.encode(payload)),
        command=command,
        shell=shell,
        timeout_s=timeout_s,
    )
    await js.publish(bus.work_subject(queue), data or msgspec.json.encode(work))
    return work.job_id


class Reports:
    """Every report the workers stored, read through the dispatcher consumer."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.seen: list[tuple[Report, str]] = []  # (report, Nats-Msg-Id)
        self._sub: JetStreamContext.PullSubscription | None = None

    async def _poll(self) -> None:
        if self._sub is None:
            self._sub = await self._js.pull_subscribe_bind("dispatcher", stream="REPORTS")
        try:
            msgs = await self._sub.fetch(1, timeout=0.2)
        except TimeoutError:
            return
        for msg in msgs:
            # As the dispatcher reads them: one report, or a worker's batch.
            for item in decode(msg.subject, msg.data, msg.headers):
                assert item.report is not None and item.msg_id is not None, item.error
                self.seen.append((item.report, item.msg_id))
            await msg.ack()

    async def wait_for(self, done: Callable[[], bool], timeout: float = 8.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; reports: {self.seen}"
            await self._poll()

    def of(self, job_id: UUID) -> list[Report]:
        return [r for r, _ in self.seen if r.job_id == job_id]

    def outcome_of(self, job_id: UUID) -> Report | None:
        outcomes = [r for r in self.of(job_id) if not isinstance(r, ReportStarted)]
        assert len(outcomes) <= 1, outcomes
        return outcomes[0] if outcomes else None

    async def outcome(self, job_id: UUID, timeout: float = 8.0) -> Report:
        await self.wait_for(lambda: self.outcome_of(job_id) is not None, timeout)
        outcome = self.outcome_of(job_id)
        assert outcome is not None
        return outcome

    async def drain(self) -> None:
        """Read whatever else is stored (after the workers are done)."""
        before = -1
        while before != len(self.seen):
            before = len(self.seen)
            await self._poll()


@pytest.fixture
def reports(js: JetStreamContext) -> Reports:
    return Reports(js)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)


async def until(condition: Callable[[], bool], timeout: float = 8.0) -> None:
    """Wait for ``condition`` by polling, bounded (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def pulling(js: JetStreamContext, queue: str = Q) -> None:
    """Wait until a worker has a pull request open on the queue's consumer."""
    deadline = time.monotonic() + 5
    while True:
        with contextlib.suppress(NotFoundError):  # not created yet
            if (await js.consumer_info("WORK", f"work-{queue}")).num_waiting:
                return
        assert time.monotonic() < deadline, "no worker is pulling"
        await asyncio.sleep(0.01)


async def create_work_consumer(js: JetStreamContext, queue: str = Q, **kw: Any) -> None:
    """The queue's consumer, made before any worker with test settings."""
    config = bus.work_consumer(queue)
    for key, value in kw.items():
        setattr(config, key, value)
    await js.add_consumer("WORK", config)


async def work_left(js: JetStreamContext, queue: str = Q) -> tuple[int, int]:
    """(messages in WORK, ack-pending on the queue's consumer)."""
    stream = await js.stream_info("WORK")
    consumer = await js.consumer_info("WORK", f"work-{queue}")
    return stream.state.messages, consumer.num_ack_pending


def result_of(report: Report) -> Any:
    assert isinstance(report, ReportSucceeded), report
    return msgspec.json.decode(report.result)


def failure_of(report: Report) -> ReportFailed:
    assert isinstance(report, ReportFailed), report
    return report


def make_worker(nc: NATS, registry: Registry | None = None, **kw: Any) -> Worker:
    kw.setdefault("worker_id", "w1")
    return Worker(nc=nc, registry=[builtin, registry or Registry()], **kw)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie waiting for a reaper is dead too.
    with contextlib.suppress(FileNotFoundError):
        return " Z " in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    return True


# -- handlers ------------------------------------------------------------------------


class Pair(msgspec.Struct):
    a: int
    b: int


async def test_async_handler_result_is_reported_then_message_acked(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    registry = Registry()

    @registry.task("math.add")
    async def add(ctx: Context, payload: dict[str, int]) -> dict[str, int]:
        return {"sum": payload["a"] + payload["b"]}

    worker = make_worker(nc, registry)
    async with running(worker):
        job = await submit(js, task="math.add", payload={"a": 1, "b": 2})
        outcome = await reports.outcome(job)
        assert result_of(outcome) == {"sum": 3}
        # The outcome is stored before the ack; the ack follows right after.
        await until(lambda: worker.running == 0)
        assert await work_left(js) == (0, 0)
    # A job this short is reported once: its start comes with its outcome.
    (succeeded,) = reports.of(job)
    assert isinstance(succeeded, ReportSucceeded)
    assert (succeeded.attempt, succeeded.delivery, succeeded.worker_id) == (1, 1, "w1")
    assert succeeded.started_at is not None
    assert succeeded.started_at <= succeeded.at <= time.time()
    ids = [msg_id for r, msg_id in reports.seen if r.job_id == job]
    assert ids == [f"succeeded:{job}:1:1"]


async def test_a_job_that_outlasts_the_moment_is_reported_started_first(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    registry = Registry()
    release = asyncio.Event()

    @registry.task("wait")
    async def wait(ctx: Context, payload: None) -> str:
        await release.wait()
        return "done"

    worker = make_worker(nc, registry, report_start_s=0.05)
    async with running(worker):
        job = await submit(js, task="wait")
        await reports.wait_for(lambda: bool(reports.of(job)))
        release.set()
        await reports.outcome(job)
    started, succeeded = reports.of(job)
    assert isinstance(started, ReportStarted)
    assert (started.attempt, started.delivery, started.worker_id) == (1, 1, "w1")
    assert isinstance(succeeded, ReportSucceeded) and succeeded.started_at is None
    assert started.at <= succeeded.at <= time.time()
    ids = [msg_id for r, msg_id in reports.seen if r.job_id == job]
    assert ids == [f"started:{job}:1:1", f"succeeded:{job}:1:1"]


async def test_struct_payload_is_decoded_and_a_bad_one_fails_for_good(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    registry = Registry()

    @registry.task("pair.add")
    async def add(ctx: Context, payload: Pair) -> int:
        assert ctx.payload is payload
        return payload.a + payload.b

    async with running(make_worker(nc, registry)):
        good = await submit(js, task="pair.add", payload={"a": 2, "b": 5})
        bad = await submit(js, task="pair.add", payload={"a": "x"})
        assert result_of(await reports.outcome(good)) == 7
        failed = failure_of(await reports.outcome(bad))
    assert failed.retryable is False
    assert failed.error.startswith("invalid payload for task 'pair.add'")
    assert "$.a" in failed.error


async def test_sync_handler_runs_off_the_event_loop(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    registry = Registry()
    release = threading.Event()

    @registry.task("io.block")
    def block(ctx: Context, payload: None) -> str:
        assert release.wait(10)
        return threading.current_thread().name

    async with running(make_worker(nc, registry, concurrency=2)):
        try:
            blocked = await submit(js, task="io.block")
            await reports.wait_for(lambda: bool(reports.of(blocked)))
            # The loop is free while the thread blocks: another job completes.
            quick = await submit(js, task="workron.echo", payload=[1, "two"])
            assert result_of(await reports.outcome(quick)) == [1, "two"]
            assert reports.outcome_of(blocked) is None
        finally:
            release.set()
        assert result_of(await reports.outcome(blocked)) == "workron-task"


async def test_exceptions_become_failures(nc: NATS, js: JetStreamContext, reports: Reports) -> None:
    registry = Registry()

    @registry.task("fail.boom")
    async def boom(ctx: Context, payload: None) -> None:
        raise ValueError("boom")

    @registry.task("fail.final")
    def final(ctx: Context, payload: None) -> None:
        raise NonRetryable("account closed")

    @registry.task("fail.again")
    async def again(ctx: Context, payload: None) -> None:
        raise Retry("busy")

    @registry.task("fail.unencodable")
    async def unencodable(ctx: Context, payload: None) -> object:
        return object()

    async with running(make_worker(nc, registry)):
        jobs = {
            name: await submit(js, task=name)
            for name in ("fail.boom", "fail.final", "fail.again", "fail.unencodable", "nope")
        }
        failures = {name: failure_of(await reports.outcome(job)) for name, job in jobs.items()}
    boom_error = failures["fail.boom"]
    assert boom_error.retryable is True
    assert boom_error.error.startswith("ValueError: boom\n")
    assert "in boom" in boom_error.error  # the traceback tail names the handler
    assert failures["fail.final"].retryable is False
    assert failures["fail.final"].error.startswith("NonRetryable: account closed")
    assert failures["fail.again"].retryable is True
    assert failures["fail.again"].error.startswith("Retry: busy")
    assert failures["fail.unencodable"].retryable is False
    assert failures["fail.unencodable"].error.startswith("result is not JSON-encodable")
    unknown = failures["nope"]
    assert unknown.retryable is False
    assert unknown.error.startswith("unknown task 'nope'")


async def test_handler_timeout(nc: NATS, js: JetStreamContext, reports: Reports) -> None:
    registry = Registry()
    cancelled = asyncio.Event()

    @registry.task("slow")
    async def slow(ctx: Context, payload: None) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            assert ctx.cancelled
            cancelled.set()
            raise

    async with running(make_worker(nc, registry)):
        started = time.monotonic()
        job = await submit(js, task="slow", timeout_s=0.3)
        failed = failure_of(await reports.outcome(job))
        assert time.monotonic() - started < 5
    assert failed.error == "timed out after 0.3s"
    assert failed.retryable is True
    assert cancelled.is_set()


async def test_context_token_and_identity(nc: NATS, js: JetStreamContext, reports: Reports) -> None:
    registry = Registry()

    @registry.task("whoami")
    async def whoami(ctx: Context, payload: None) -> dict[str, Any]:
        renewed = await ctx.heartbeat()
        return {
            "job_id": str(ctx.job_id),
            "token": ctx.token,
            "queue": ctx.queue,
            "worker_id": ctx.worker_id,
            "checkpoint": ctx.last_checkpoint,
            "renewed": renewed,
        }

    async with running(make_worker(nc, registry)):
        job = await submit(js, task="whoami")
        result = result_of(await reports.outcome(job))
    assert result == {
        "job_id": str(job),
        "token": "1.1",
        "queue": Q,
        "worker_id": "w1",
        "checkpoint": None,
        "renewed": True,
    }


# -- commands ------------------------------------------------------------------------


async def test_commands(nc: NATS, js: JetStreamContext, reports: Reports) -> None:
    async with running(make_worker(nc)):
        argv = await submit(js, command=["echo", "hello", "$HOME"])
        failing = await submit(js, command=["sh", "-c", "echo oops >&2; exit 3"])
        shell = await submit(js, command="echo $((1 + 2)) | tr 3 x", shell=True)
        split = await submit(js, command="printf '%s|' 'a b' $HOME")
        env = await submit(
            js,
            command=[
                "sh",
                "-c",
                "echo $WORKRON_JOB_ID $WORKRON_ATTEMPT $WORKRON_TOKEN $WORKRON_QUEUE",
            ],
        )
        missing = await submit(js, command=["/nonexistent/program"])
        outcomes = {
            job: await reports.outcome(job) for job in (argv, failing, shell, split, env, missing)
        }
    # argv: exec'd as is, no shell expansion.
    assert result_of(outcomes[argv]) == {"exit_code": 0, "stdout": "hello $HOME\n", "stderr": ""}
    failed = failure_of(outcomes[failing])
    assert failed.retryable is True
    assert failed.error == "exit code 3: oops"
    assert result_of(outcomes[shell])["stdout"] == "x\n"
    # A string without shell=True is split like a shell would, not run by one.
    assert result_of(outcomes[split])["stdout"] == "a b|$HOME|"
    assert result_of(outcomes[env])["stdout"] == f"{env} 1 1.1 {Q}\n"
    not_found = failure_of(outcomes[missing])
    assert not_found.retryable is False
    assert not_found.error.startswith("cannot run command")


async def test_command_output_keeps_the_last_64_kib(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    async with running(make_worker(nc)):
        job = await submit(
            js, command="head -c 200000 /dev/zero | tr '\\0' a; echo END", shell=True
        )
        stdout = result_of(await reports.outcome(job))["stdout"]
    assert len(stdout) == 64 * 1024
    assert stdout.endswith("aEND\n")


async def test_command_timeout_kills_the_process_tree(
    nc: NATS, js: JetStreamContext, reports: Reports, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    # The grandchild ignores SIGTERM: only the SIGKILL after kill_grace_s stops it.
    script = f"sh -c 'trap \"\" TERM; sleep 30' & echo $! > {pid_file}; wait"
    async with running(make_worker(nc, kill_grace_s=0.3)):
        started = time.monotonic()
        job = await submit(js, command=script, shell=True, timeout_s=0.5)
        failed = failure_of(await reports.outcome(job))
        assert time.monotonic() - started < 5
    assert failed.error == "timed out after 0.5s"
    assert failed.retryable is True
    assert process_gone(int(pid_file.read_text()))


# -- delivery, lease and concurrency ------------------------------------------------------


async def test_lease_is_renewed_while_a_job_runs(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    await create_work_consumer(js, ack_wait=1.0)
    registry = Registry()

    @registry.task("long")
    async def long(ctx: Context, payload: None) -> str:
        await asyncio.sleep(3)  # three leases long
        return ctx.token

    async with running(make_worker(nc, registry)):
        job = await submit(js, task="long")
        assert result_of(await reports.outcome(job)) == "1.1"
        info = await js.consumer_info("WORK", f"work-{Q}")
    assert info.num_redelivered == 0
    assert len(reports.of(job)) == 2


async def test_lost_lease_stops_the_execution_without_an_outcome(
    nats_server: NatsServer, nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    await create_work_consumer(js, ack_wait=1.0)
    registry = Registry()
    first_started = asyncio.Event()
    first_cancelled = asyncio.Event()

    @registry.task("fenced")
    async def fenced(ctx: Context, payload: None) -> str:
        if ctx.delivery == 1:
            first_started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                first_cancelled.set()
                raise
        return ctx.token

    process = nats_server.process
    assert process is not None
    async with running(make_worker(nc, registry)):
        job = await submit(js, task="fenced")
        await asyncio.wait_for(first_started.wait(), 5)
        await reports.wait_for(lambda: bool(reports.of(job)))  # started is stored
        # nats-server freezes: renewals go unanswered, and the worker stops the
        # execution itself before the lease can run out.
        process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.wait_for(first_cancelled.wait(), 5)
        finally:
            process.send_signal(signal.SIGCONT)
        # The redelivery (same attempt, next delivery) runs and reports.
        outcome = await reports.outcome(job, timeout=10)
    assert outcome.delivery == 2
    assert result_of(outcome) == "1.2"
    assert [type(r) for r in reports.of(job) if r.delivery == 1] == [ReportStarted]


async def test_outcome_not_stored_means_no_ack(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    await create_work_consumer(js, ack_wait=1.0)
    registry = Registry()
    deliveries: list[int] = []

    @registry.task("once")
    async def once(ctx: Context, payload: None) -> int:
        deliveries.append(ctx.delivery)
        return ctx.delivery

    async with running(make_worker(nc, registry)):
        await pulling(js)
        # No REPORTS stream: no report can be stored, so the work is not acked
        # and comes back once its lease runs out.
        await js.delete_stream("REPORTS")
        job = await submit(js, task="once")
        await until(lambda: len(deliveries) >= 2, timeout=10)
        assert (await work_left(js))[0] == 1
        await bus.apply(js)  # REPORTS and the dispatcher consumer are back
        outcome = await reports.outcome(job, timeout=10)
        await until_work_left(js)
    assert outcome.delivery >= 2
    assert result_of(outcome) == outcome.delivery


async def test_worker_recreates_a_deleted_work_stream_and_goes_on(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    async with running(make_worker(nc)):
        await pulling(js)
        # Stream and consumer gone under an open pull request, as when
        # nats-server loses its store: the refused pull declares both again.
        await js.delete_stream("WORK")
        await pulling(js)
        job = await submit(js, task="workron.echo", payload="again")
        assert result_of(await reports.outcome(job)) == "again"
    assert (await js.consumer_info("WORK", f"work-{Q}")).config.ack_wait == bus.LEASE_S


async def until_work_left(js: JetStreamContext, expected: tuple[int, int] = (0, 0)) -> None:
    """Wait for ``work_left`` to be ``expected``: acks and naks are applied
    by the server after they are sent (only ``ack_sync`` waits for it)."""
    deadline = time.monotonic() + 5
    while (left := await work_left(js)) != expected:
        assert time.monotonic() < deadline, left
        await asyncio.sleep(0.02)


async def test_concurrency_limit(nc: NATS, js: JetStreamContext, reports: Reports) -> None:
    registry = Registry()
    now = 0
    peak = 0

    @registry.task("busy")
    async def busy(ctx: Context, payload: None) -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        try:
            await asyncio.sleep(0.2)
        finally:
            now -= 1

    jobs = [await submit(js, task="busy") for _ in range(7)]
    worker = make_worker(nc, registry, concurrency=3)
    await worker.run(burst=True)
    await reports.drain()
    assert all(isinstance(reports.outcome_of(job), ReportSucceeded) for job in jobs)
    assert peak == 3
    assert await work_left(js) == (0, 0)


async def test_several_queues_share_the_slots(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    jobs = [await submit(js, queue=q, task="workron.noop") for q in ("a", "b", "a", "b")]
    await make_worker(nc, queues=["a", "b"], concurrency=2).run(burst=True)
    await reports.drain()
    assert [result_of(o) for o in map(reports.outcome_of, jobs) if o] == [None] * 4


async def test_invalid_work_message_is_terminated(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    await submit(js, data=b'{"type": "work", "job_id": "not a uuid"}')
    await make_worker(nc).run(burst=True)
    await reports.drain()
    assert reports.seen == []
    await until_work_left(js)  # terminated: gone, never redelivered


# -- shutdown ------------------------------------------------------------------------


async def test_stop_lets_running_jobs_finish_within_grace(
    nc: NATS, js: JetStreamContext, reports: Reports
) -> None:
    registry = Registry()
    started = asyncio.Event()
    finish = asyncio.Event()

    @registry.task("finishing")
    async def finishing(ctx: Context, payload: None) -> str:
        started.set()
        await finish.wait()
        return "done"

    worker = make_worker(nc, registry, grace_s=10)
    run = asyncio.create_task(worker.run())
    job = await submit(js, task="finishing")
    await asyncio.wait_for(started.wait(), 5)
    worker.stop()
    # Fetching stopped at once: new work stays in the queue.
    later = await submit(js, task="workron.noop")
    finish.set()
    await asyncio.wait_for(run, 10)
    assert result_of(await reports.outcome(job)) == "done"
    await reports.drain()
    assert reports.of(later) == []
    # If it reached the worker at all, it was handed back (a nak), not held
    # until its 30 s AckWait: it can be taken again right away.
    sub = await js.pull_subscribe_bind(f"work-{Q}", stream="WORK")
    (msg,) = await sub.fetch(1, timeout=5)
    assert msgspec.json.decode(msg.data, type=Work).job_id == later


async def test_past_grace_jobs_are_handed_back(
    nc: NATS, js: JetStreamContext, reports: Reports, tmp_path: Path
) -> None:
    registry = Registry()
    started = asyncio.Event()

    @registry.task("stuck")
    async def stuck(ctx: Context, payload: None) -> None:
        started.set()
        await asyncio.sleep(30)

    pid_file = tmp_path / "pid"
    worker = make_worker(nc, registry, grace_s=0.3, kill_grace_s=0.3)
    run = asyncio.create_task(worker.run())
    handler_job = await submit(js, task="stuck")
    command_job = await submit(js, command=f"echo $$ > {pid_file}; exec sleep 30", shell=True)
    await asyncio.wait_for(started.wait(), 5)
    await until(pid_file.exists)
    await until(lambda: pid_file.read_text().strip() != "")
    worker.stop()
    await asyncio.wait_for(run, 10)
    assert process_gone(int(pid_file.read_text()))
    await reports.drain()
    # No outcome from the stopped executions, and both messages are back.
    for job in (handler_job, command_job):
        assert reports.outcome_of(job) is None
    sub = await js.pull_subscribe_bind(f"work-{Q}", stream="WORK")
    msgs = await sub.fetch(2, timeout=5)
    assert sorted(m.metadata.num_delivered for m in msgs) == [2, 2]
    assert {msgspec.json.decode(m.data, type=Work).job_id for m in msgs} == {
        handler_job,
        command_job,
    }


async def test_run_worker_loads_apps_and_stops_on_sigterm(
    nats_server: NatsServer,
    js: JetStreamContext,
    reports: Reports,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "my_tasks.py").write_text(
        "from workron.worker import Registry\n"
        "registry = Registry()\n"
        "@registry.task('app.double')\n"
        "async def double(ctx, payload: int) -> int:\n"
        "    return 2 * payload\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = asyncio.create_task(
        run_worker(nats_server.url, [Q], 2, ["my_tasks:registry"], worker_id="cli")
    )
    try:
        await pulling(js)  # signal handlers are in place once it pulls
        doubled = await submit(js, task="app.double", payload=21)
        echoed = await submit(js, task="workron.echo", payload={"k": "v"})
        assert result_of(await reports.outcome(doubled)) == 42
        assert result_of(await reports.outcome(echoed)) == {"k": "v"}
        assert reports.of(doubled)[0].worker_id == "cli"
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(run, 10)
    finally:
        run.cancel()
