"""Shell-command jobs: run one in its own process group, keep the tail of its
output, and take the whole process tree down on timeout or cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import Mapping

import msgspec

from workron._tasks import NonRetryable
from workron.events import MAX_RESULT_BYTES

__all__ = ["TAIL_BYTES", "CommandOutput", "argv_for", "run_command"]

#: Bytes of stdout and of stderr kept from a command (the last ones).
TAIL_BYTES = 64 * 1024
_CHUNK = 64 * 1024
# Once the command has exited, how long its output pipes may stay open
# before whatever still holds them (a process that left the group) is
# abandoned.
_PIPE_CLOSE_S = 1.0


class CommandOutput(msgspec.Struct, frozen=True, kw_only=True):
    """What a command job reports: the ``result`` of a success."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The error text of a failure: how it ended, then the stderr tail."""
        if self.exit_code < 0:
            try:
                how = f"killed by signal {signal.Signals(-self.exit_code).name}"
            except ValueError:
                how = f"killed by signal {-self.exit_code}"
        else:
            how = f"exit code {self.exit_code}"
        tail = self.stderr[-2048:].strip()
        return f"{how}: {tail}" if tail else how

    def encode(self) -> bytes:
        """JSON, with the output tails shortened until it fits a result."""
        data = msgspec.json.encode(self)
        keep = TAIL_BYTES
        while len(data) > MAX_RESULT_BYTES and keep > 0:
            # Escaping can grow text up to 6x, so one cut may not be enough.
            keep //= 2
            data = msgspec.json.encode(
                CommandOutput(
                    exit_code=self.exit_code, stdout=self.stdout[-keep:], stderr=self.stderr[-keep:]
                )
            )
        return data


def argv_for(command: list[str] | str, shell: bool) -> list[str]:
    """The argv to exec: a list as is; a string through ``/bin/sh -c`` only
    when ``shell`` is set, otherwise split like a shell would, without one."""
    if isinstance(command, list):
        argv = command
    elif shell:
        argv = ["/bin/sh", "-c", command]
    else:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise NonRetryable(f"cannot split command: {exc}") from exc
    if not argv or not argv[0]:
        raise NonRetryable("empty command")
    return argv


class _Tail:
    """The last ``TAIL_BYTES`` of a stream."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    async def read_from(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(_CHUNK):
            self.buffer += chunk
            if len(self.buffer) > 2 * TAIL_BYTES:  # trim in bulk, not per chunk
                del self.buffer[:-TAIL_BYTES]

    def text(self) -> str:
        return bytes(self.buffer[-TAIL_BYTES:]).decode("utf-8", errors="replace")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _terminate(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM to the group, SIGKILL after ``grace_s``; returns once the leader is reaped."""
    try:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    finally:
        # Whatever happened above (even a second cancellation), nothing of
        # this job may outlive it.
        _signal_group(proc.pid, signal.SIGKILL)


async def run_command(
    argv: list[str], *, env: Mapping[str, str], kill_grace_s: float
) -> CommandOutput:
    """Run ``argv`` to completion in a new session (its own process group).

    Cancellation (a timeout, a lost lease, shutdown) terminates the whole
    group: SIGTERM, then SIGKILL after ``kill_grace_s``. Processes left in
    the group after the leader exits are killed too: nothing of a finished
    job keeps running on the worker.

    Raises ``NonRetryable`` when ``argv[0]`` cannot be executed.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as exc:  # not found, not executable: the same on every retry
        raise NonRetryable(f"cannot run command: {exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Tail(), _Tail()
    readers = [
        asyncio.create_task(out.read_from(proc.stdout), name="workron.command.stdout"),
        asyncio.create_task(err.read_from(proc.stderr), name="workron.command.stderr"),
    ]
    try:
        try:
            await proc.wait()
        except asyncio.CancelledError:
            await _terminate(proc, kill_grace_s)
            raise
        _signal_group(proc.pid, signal.SIGKILL)
        # The pipes close once every process holding them is gone; one that
        # escaped the group (setsid) must not hold the job open.
        await asyncio.wait(readers, timeout=_PIPE_CLOSE_S)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    returncode = proc.returncode
    assert returncode is not None
    return CommandOutput(exit_code=returncode, stdout=out.text(), stderr=err.text())
