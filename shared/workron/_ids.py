"""Time-ordered UUIDs (version 7): ids sort by creation time, so cursors are cheap.

Within one process ids are strictly increasing: the 12-bit ``rand_a`` field
counts up inside a millisecond (RFC 9562, method 1).
"""

from __future__ import annotations

import os
import threading
import time
from uuid import UUID

_lock = threading.Lock()
_last = [0, 0]  # [milliseconds, sequence] of the previous id in this process


def uuid7() -> UUID:
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms <= _last[0]:
            ms, seq = _last[0], _last[1] + 1
            if seq > 0xFFF:  # sequence exhausted: borrow the next millisecond
                ms, seq = ms + 1, 0
        else:
            seq = int.from_bytes(os.urandom(2), "big") & 0x7FF  # leave room to count up
        _last[0], _last[1] = ms, seq
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand_b
    return UUID(int=value)
