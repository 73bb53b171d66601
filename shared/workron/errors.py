"""Workron's exceptions: one root, default message from the docstring."""

from __future__ import annotations

__all__ = [
    "ConflictError",
    "DuplicateSubmissionError",
    "LedgerUnavailableError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ValidationError",
    "WorkronError",
]


class WorkronError(Exception):
    """Workron error."""

    code = "error"

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        self.field = field
        super().__init__(self.message)


class ValidationError(WorkronError):
    """The request is not valid."""

    code = "invalid"


class PayloadTooLargeError(WorkronError):
    """The request is too large."""

    code = "too_large"


class NotFoundError(WorkronError):
    """No such object."""

    code = "not_found"


class ConflictError(WorkronError):
    """The object is not in a state that allows this."""

    code = "conflict"


class DuplicateSubmissionError(WorkronError):
    """A job with this idempotency key or id exists already."""

    code = "duplicate"


class LedgerUnavailableError(WorkronError):
    """The ledger (PostgreSQL) cannot be reached; try again shortly."""

    code = "unavailable"
