"""The chaos load generator: submits jobs over HTTP and over NATS and records
which submissions were acknowledged.

Only acknowledged submissions must never be lost: an HTTP 2xx, or a
JetStream PubAck on ``workron.submit.<queue>``. An HTTP error or timeout is
not an acknowledgement, but it is retried safely: every HTTP submission
carries an idempotency key and every NATS submission a job id chosen here
(the ledger's primary key, and the stream's ``Nats-Msg-Id``), so a retry of
a submission that did land returns or dedupes the same job. Every answer is
counted, so a test can also assert what clients saw during an outage (503
with ``Retry-After``, never 500).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
import msgspec
from nats.errors import Error as NatsError

from workron import bus
from workron._ids import uuid7
from workron.client import Publisher
from workron.events import Backoff, JobSpec

__all__ = ["Load", "marker_spec", "submit_http", "submit_nats"]

#: Retries of a refused or failed submission: quick, bounded by the caller's deadline.
_RETRY_S = 0.2
#: Longest a client honours ``Retry-After`` in a test (the server says 2 s).
_RETRY_AFTER_CAP_S = 2.0


def marker_spec(command: str, key: str, *, max_attempts: int = 5) -> JobSpec:
    # A short backoff: a job failed by a crash is retried within the test.
    return JobSpec(
        command=command,
        shell=True,
        idempotency_key=key,
        max_attempts=max_attempts,
        backoff=Backoff(base_s=0.2, max_s=1.0),
    )


@dataclass
class Load:
    """What the clients sent and what they were told."""

    #: Acknowledged job ids and how each was submitted ("http" or "nats").
    acked: dict[UUID, str] = field(default_factory=dict)
    #: Submissions given up on at the deadline, never acknowledged.
    unacked: list[str] = field(default_factory=list)
    #: HTTP status codes of every answer to a submission.
    statuses: Counter[int] = field(default_factory=Counter)
    #: 503 answers without a Retry-After header.
    missing_retry_after: int = 0
    #: Transport errors and timeouts, by exception name (HTTP and NATS).
    errors: Counter[str] = field(default_factory=Counter)
    #: Submissions sent more than once.
    retried: int = 0
    #: Wall-clock time of the last acknowledgement.
    last_ack_at: float | None = None

    def ack(self, job_id: UUID, via: str) -> None:
        self.acked[job_id] = via
        self.last_ack_at = time.time()

    @property
    def ids(self) -> list[UUID]:
        return list(self.acked)

    def line(self) -> str:
        codes = ",".join(f"{k}:{v}" for k, v in sorted(self.statuses.items())) or "-"
        errs = ",".join(f"{k}:{v}" for k, v in sorted(self.errors.items())) or "-"
        return (
            f"acked={len(self.acked)} unacked={len(self.unacked)} retried={self.retried}"
            f" http={codes} errors={errs}"
        )


async def _paced(count: int, rate: float, send: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """Call ``send(i)`` for i in range(count) at ``rate`` per second, concurrently."""
    tasks = []
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i)))
    await asyncio.gather(*tasks)


async def submit_http(
    load: Load,
    api_url: str,
    specs: list[JobSpec],
    *,
    rate: float,
    give_up_s: float = 60.0,
    timeout_s: float = 5.0,
) -> None:
    """POST each spec (each must carry an ``idempotency_key``) until acknowledged."""
    async with httpx.AsyncClient(base_url=api_url, timeout=timeout_s) as http:

        async def send(i: int) -> None:
            spec = specs[i]
            body = msgspec.json.encode(spec)
            deadline = time.monotonic() + give_up_s
            tries = 0
            while time.monotonic() < deadline:
                tries += 1
                if tries == 2:
                    load.retried += 1
                pause = _RETRY_S
                try:
                    answer = await http.post(
                        "/v1/jobs", content=body, headers={"content-type": "application/json"}
                    )
                except httpx.HTTPError as exc:
                    load.errors[type(exc).__name__] += 1
                    await asyncio.sleep(pause)
                    continue
                load.statuses[answer.status_code] += 1
                if answer.status_code in (200, 201):
                    load.ack(UUID(answer.json()["id"]), "http")
                    return
                if answer.status_code == 503:
                    after = answer.headers.get("retry-after")
                    if after is None:
                        load.missing_retry_after += 1
                    else:
                        pause = min(float(after), _RETRY_AFTER_CAP_S)
                await asyncio.sleep(pause)
            load.unacked.append(spec.idempotency_key or f"#{i}")

        await _paced(len(specs), rate, send)


async def submit_nats(
    load: Load,
    nats_url: str,
    specs: list[JobSpec],
    *,
    rate: float,
    give_up_s: float = 60.0,
    timeout_s: float = 2.0,
) -> None:
    """Publish each spec on ``workron.submit.<queue>`` until its PubAck arrives."""
    nc = await bus.connect(nats_url, name="chaos-load")
    try:
        js = nc.jetstream(timeout=timeout_s)
        publisher = Publisher(js)

        async def send(i: int) -> None:
            job_id = uuid7()
            deadline = time.monotonic() + give_up_s
            tries = 0
            while time.monotonic() < deadline:
                tries += 1
                if tries == 2:
                    load.retried += 1
                try:
                    await publisher.publish(specs[i], job_id=job_id)
                except (NatsError, TimeoutError) as exc:
                    load.errors[type(exc).__name__] += 1
                    await asyncio.sleep(_RETRY_S)
                    continue
                load.ack(job_id, "nats")
                return
            load.unacked.append(str(job_id))

        await _paced(len(specs), rate, send)
    finally:
        await nc.close()
