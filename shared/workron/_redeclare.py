"""Declaring JetStream contracts again after a reconnect.

nats-server may come back with its store wiped: the connection then leads to
a server without our streams and consumers, and nothing else tells the pull
loops why they get no work. ``bus.connect(on_reconnect=...)`` installs a
``Redeclarer``: nats-py awaits ``reconnected_cb`` before it resumes, so the
callback only starts a task, and that task retries with backoff (a server
just restarted may not serve JetStream yet) until it succeeds or the
connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential

__all__ = ["Redeclare", "Redeclarer"]

log = logging.getLogger(__name__)

#: Declares again what a connection relies on (streams, consumers).
Redeclare = Callable[[JetStreamContext], Awaitable[object]]
Callback = Callable[[], Awaitable[None]]


class Redeclarer:
    """Runs ``redeclare(js)`` in a task of its own after every reconnect of ``nc``."""

    def __init__(self, nc: NATS, redeclare: Redeclare, name: str) -> None:
        self._nc = nc
        self._redeclare = redeclare
        self._name = name
        self._task: asyncio.Task[None] | None = None

    def callbacks(self, reconnected: object, closed: object) -> dict[str, Callback]:
        """nats-py's ``reconnected_cb`` and ``closed_cb``, each followed by the
        caller's own (given as options to connect), if any."""
        return {
            "reconnected_cb": _chain(self._reconnected, reconnected),
            "closed_cb": _chain(self._closed, closed),
        }

    async def _reconnected(self) -> None:
        # A task from an earlier reconnect may have declared part of its set
        # on a server that went away since: start over.
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.create_task(self._run(), name=f"workron.bus.redeclare {self._name}")

    async def _closed(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        retrying = AsyncRetrying(
            # Exceptions only: a cancel is never taken for a failure.
            retry=retry_if_exception(lambda e: isinstance(e, Exception) and not self._nc.is_closed),
            wait=wait_exponential(multiplier=0.2, max=5),
            before_sleep=self._failed,
            reraise=True,
        )
        try:
            await retrying(self._redeclare, self._nc.jetstream())
        except Exception:  # a task nobody awaits: log, never raise
            if not self._nc.is_closed:
                log.exception("redeclare failed", extra={"action": "bus.redeclare"})
            return
        log.info("declared again after a reconnect", extra={"action": "bus.redeclare"})

    def _failed(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "redeclare failed; retrying",
            extra={
                "action": "bus.redeclare",
                "attempt": state.attempt_number,
                "error": repr(error),
            },
        )


def _chain(first: Callback, then: object) -> Callback:
    async def both() -> None:
        await first()
        if callable(then):
            await then()

    return both
