"""Settings, built once at the edge from flags and the environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import msgspec

__all__ = ["ENV_HELP", "Settings"]

#: Environment variables honoured, for ``--help``.
ENV_HELP: dict[str, str] = {
    "WORKRON_NATS_URL": "NATS server URL (default nats://127.0.0.1:4222)",
    "WORKRON_DATABASE_URL": "PostgreSQL URL (default: PG* variables, else local)",
    "WORKRON_API_URL": "admission HTTP API used by clients (default http://127.0.0.1:8080)",
    "WORKRON_HTTP_HOST": "admission bind host (default 127.0.0.1)",
    "WORKRON_HTTP_PORT": "admission bind port (default 8080)",
    "WORKRON_WORKER_ID": "worker id (default hostname-pid)",
    "WORKRON_LOG_LEVEL": "log level (default INFO)",
}


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "postgresql://127.0.0.1:5432/postgres"
    api_url: str = "http://127.0.0.1:8080"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``WORKRON_*`` (and ``PG*`` for the database); ``overrides`` win when not None."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if url := env.get("WORKRON_NATS_URL"):
            values["nats_url"] = url
        if url := env.get("WORKRON_DATABASE_URL"):
            values["database_url"] = url
        elif env.get("PGHOST") or env.get("PGDATABASE"):
            # asyncpg fills host, port, user, password and database from PG*.
            values["database_url"] = "postgresql://"
        if url := env.get("WORKRON_API_URL"):
            values["api_url"] = url
        if host := env.get("WORKRON_HTTP_HOST"):
            values["http_host"] = host
        if port := env.get("WORKRON_HTTP_PORT"):
            values["http_port"] = int(port)
        if level := env.get("WORKRON_LOG_LEVEL"):
            values["log_level"] = level.upper()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return msgspec.convert(values, cls)


def default_worker_id() -> str:
    return os.environ.get("WORKRON_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}"
