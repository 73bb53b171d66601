"""Metrics, logs and trace context, created in one place.

Each process builds one ``Metrics`` on its own registry and passes it to its
services; nothing here is a global singleton.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "configure_logging", "new_traceparent"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip


class Metrics:
    """Every ``workron_*`` metric, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.submitted = Counter(
            "workron_jobs_submitted", "Jobs accepted into the ledger", ["queue"], registry=r
        )
        self.dispatched = Counter(
            "workron_jobs_dispatched", "Work messages issued", ["queue"], registry=r
        )
        self.completed = Counter(
            "workron_jobs_completed", "Jobs finished, by outcome", ["queue", "outcome"], registry=r
        )
        self.retried = Counter("workron_jobs_retried", "Retries scheduled", ["queue"], registry=r)
        self.fenced = Counter(
            "workron_reports_fenced",
            "Worker reports rejected by the fencing check",
            ["reason"],
            registry=r,
        )
        self.reaped = Counter("workron_jobs_reaped", "Executions taken back", ["why"], registry=r)
        self.leader = Gauge(
            "workron_leader",
            "1 while this process holds the service's leader lease",
            ["service"],
            registry=r,
        )
        self.workers = Gauge(
            "workron_workers", "Registered workers, by state", ["state"], registry=r
        )
        self.outbox_published = Counter(
            "workron_outbox_published", "Outbox rows published", ["by"], registry=r
        )
        self.outbox_poison = Counter(
            "workron_outbox_poison", "Outbox rows set aside as unpublishable", registry=r
        )
        self.outbox_lag = Gauge(
            "workron_outbox_lag_seconds", "Age of the oldest due outbox row", registry=r
        )
        self.dead_letters = Counter(
            "workron_dead_letters", "Bus messages terminated as poison", ["source"], registry=r
        )
        self.queue_wait = Histogram(
            "workron_queue_wait_seconds",
            "Submission to start of execution",
            ["queue"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "workron_run_seconds",
            "Start to end of an execution",
            ["queue", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "workron_batch_size",
            "Messages handled per batch",
            ["stage"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.http_errors = Counter(
            "workron_http_errors", "HTTP error responses", ["code"], registry=r
        )
        self.resolver_released = Counter(
            "workron_resolver_released",
            "Blocked jobs released once their dependencies were met",
            ["queue"],
            registry=r,
        )
        self.resolver_cancelled = Counter(
            "workron_resolver_cancelled",
            "Jobs cancelled because a dependency failed (upstream_failed)",
            ["queue"],
            registry=r,
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra`` fields (action, job_id, trace_id…) included."""

    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._skip:
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def new_traceparent() -> str:
    """A W3C traceparent for a new trace (sampled)."""
    trace_id = os.urandom(16).hex()
    span_id = os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01"


def monotonic_ms() -> float:
    return time.monotonic() * 1000
