"""The resolver service: releases dependents of finished jobs, cascades failures."""

from __future__ import annotations

from workron.resolver.service import Resolver

__all__ = ["Resolver"]
