"""The relay service: publishes outbox rows to JetStream."""

from __future__ import annotations

from workron.relay.service import Relay

__all__ = ["Relay"]
