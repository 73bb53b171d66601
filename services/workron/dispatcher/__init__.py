"""The dispatcher service: applies worker reports and dispatches due jobs."""

from __future__ import annotations

from workron.dispatcher.service import Dispatcher

__all__ = ["Dispatcher"]
