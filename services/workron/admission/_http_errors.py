"""Every HTTP error as ``{"error": {"code", "message", "field"}}``.

Litestar raises its own exceptions for routing, body size, JSON syntax and
validation; Workron code raises ``WorkronError``. All of them are mapped here,
in one place, so no route handler ever formats an error itself.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.types import ExceptionHandlersMap

from workron.api import ErrorBody, ErrorDetail
from workron.errors import (
    ConflictError,
    DuplicateSubmissionError,
    LedgerUnavailableError,
    NotFoundError,
    PayloadTooLargeError,
    ValidationError,
    WorkronError,
)
from workron.telemetry import Metrics

__all__ = ["MAX_BODY_BYTES", "PARAM_ALIASES", "RETRY_AFTER_S", "exception_handlers"]

log = logging.getLogger(__name__)

#: Largest request body accepted: a job's payload may take 512 KiB of it.
MAX_BODY_BYTES = 1024 * 1024
#: Seconds a client should wait before retrying while the ledger is away.
RETRY_AFTER_S = 2

#: Handler parameters whose Python name differs from the name on the wire
#: (Litestar reserves ``state``; ``id`` would shadow the builtin).
PARAM_ALIASES: dict[str, str] = {
    "job_state": "state",
    "job_id": "id",
    "dag_id": "id",
    "worker_state": "state",
}

_STATUS: dict[type[WorkronError], int] = {
    ValidationError: 422,
    PayloadTooLargeError: 413,
    NotFoundError: 404,
    ConflictError: 409,
    DuplicateSubmissionError: 409,
    LedgerUnavailableError: 503,
}
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}

# msgspec ends its messages with the JSON path of the bad value.
_AT = re.compile(r" - at `(\$[^`]*)`$")
_PATH = re.compile(r"^\$\.(\w+)(.*)$")
_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]+)`")


def _error(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[ErrorBody]:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, field=field))
    return Response(body, status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _code_of(status: int) -> str:
    return _CODES.get(status) or _phrase(status).lower().replace(" ", "_").replace("-", "_")


def _locate(exc: ValidationException) -> tuple[str | None, str]:
    """The wire name or JSON path of the bad input, and what is wrong with it.

    The field is None when there is no body at all.
    """
    cause = exc.__cause__
    if not isinstance(cause, msgspec.ValidationError):
        # Litestar's own summary: [{"key": ..., "message": ..., "source": ...}].
        extra = exc.extra if isinstance(exc.extra, list) else []
        first: dict[str, Any] = extra[0] if extra and isinstance(extra[0], dict) else {}
        key = first.get("key")
        if key and first.get("source") == "body":
            key = f"$.{key}"
        elif key:
            key = PARAM_ALIASES.get(key, key)
        return key, str(first.get("message") or exc.detail)
    text = str(cause)
    at = _AT.search(text)
    message = text[: at.start()] if at else text
    path = _PATH.match(at.group(1)) if at else None
    named = _NAMED_FIELD.search(message)
    if path is None:
        # The error is about the handler's inputs as a whole: only a missing
        # body gets here (``data`` is the body's name in Litestar). It has no
        # field: the body is not JSON at all.
        return None, "the request body is empty; a JSON object is required"
    # Litestar validates all of a handler's inputs as one object: `$.data`
    # is the body, `$.<name>` a query or path parameter.
    name, rest = path.groups()
    field = "$" + rest if name == "data" else PARAM_ALIASES.get(name, name) + rest
    if named:
        field = f"{field}.{named.group(1)}"
    return field, message


def _from_litestar(
    request: Request[Any, Any, Any], exc: HTTPException
) -> tuple[int, str, str, str | None]:
    """(status, code, message, field) for one of Litestar's own exceptions."""
    status = exc.status_code
    if isinstance(exc, ValidationException):
        field, message = _locate(exc)
        if field is None:
            return 400, "bad_json", message, None
        return 422, "invalid", message, field
    if isinstance(exc.__cause__, SerializationException):
        return 400, "bad_json", f"the body is not valid JSON: {exc.__cause__}", None
    if status == 404:
        return 404, "not_found", f"no route for {request.method} {request.url.path}", None
    if status == 413:
        return 413, "too_large", f"the request body is larger than {MAX_BODY_BYTES} bytes", None
    return status, _code_of(status), str(exc.detail or _phrase(status)), None


def exception_handlers(metrics: Metrics) -> ExceptionHandlersMap:
    """Litestar exception handlers that render every error in one shape and count it."""

    def respond(
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response[ErrorBody]:
        metrics.http_errors.labels(str(status)).inc()
        return _error(status, code, message, field, headers)

    def on_workron_error(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
        assert isinstance(exc, WorkronError)
        status = next((s for t, s in _STATUS.items() if isinstance(exc, t)), 500)
        if status == 503:
            log.warning(
                "ledger unavailable", extra={"action": "admission.http.unavailable", "error": exc}
            )
            # The driver's text names hosts and ports: it stays in the log.
            message = LedgerUnavailableError().message
            return respond(503, exc.code, message, None, {"Retry-After": str(RETRY_AFTER_S)})
        if status == 500:
            log.error("unmapped error", extra={"action": "admission.http.error"}, exc_info=exc)
        return respond(status, exc.code, exc.message, exc.field)

    def on_http_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
        assert isinstance(exc, HTTPException)
        status, code, message, field = _from_litestar(request, exc)
        if status >= 500:
            log.error("server error", extra={"action": "admission.http.error"}, exc_info=exc)
        return respond(status, code, message, field)

    def on_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
        # Details stay in the log: they may hold internals a client must not see.
        log.error("unexpected error", extra={"action": "admission.http.error"}, exc_info=exc)
        return respond(500, "internal", "internal error; see the admission service's log")

    return {
        WorkronError: on_workron_error,
        HTTPException: on_http_exception,
        Exception: on_unexpected,
    }
