"""The reaper service: dead workers, expired leases, lost messages, dead letters."""

from __future__ import annotations

from workron.reaper.service import Reaper

__all__ = ["Reaper"]
