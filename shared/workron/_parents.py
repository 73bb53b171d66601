"""Parents' results: carried in a dependent's work message, handed to its code.

A job released by the resolver gets the results of the jobs it depended on
in ``Work.parents``, keyed by the parent's ref when it is in the same DAG
and by its job id otherwise. Each result is at most ``MAX_RESULT_BYTES``;
together they are capped at ``MAX_PARENTS_BYTES`` and by the room the work
message has left under the stream's message limit. Parents whose results do
not fit are listed in ``Work.parents_omitted`` instead (keys in order; the
first ones fit).

Commands receive them as files ``$WORKRON_PARENTS_DIR/<key>.json`` and,
when the whole object is at most ``MAX_ENV_BYTES``, also as the JSON object
``$WORKRON_PARENTS``: one environment string may not exceed 128 KiB on
Linux, and the environment shares a few MiB with the arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec

from workron.events import Work

__all__ = ["MAX_ENV_BYTES", "MAX_PARENTS_BYTES", "attach", "env_value", "write_files"]

#: Most bytes of parents' results one work message carries.
MAX_PARENTS_BYTES = 512 * 1024
#: Largest ``WORKRON_PARENTS`` value; beyond it commands read the files only.
MAX_ENV_BYTES = 64 * 1024
# The WORK stream takes messages up to 1 MiB, headers included; leave room
# for headers and the JSON punctuation around each entry.
_MESSAGE_ROOM = 1024 * 1024 - 8 * 1024

_json = msgspec.json.Encoder()


def attach(work: Work, parents: Mapping[str, str]) -> Work:
    """``work`` with as many of ``parents`` (key → result JSON) as fit."""
    room = min(MAX_PARENTS_BYTES, _MESSAGE_ROOM - len(_json.encode(work)))
    fitted: dict[str, msgspec.Raw] = {}
    omitted: list[str] = []
    for key in sorted(parents):
        result = parents[key] or "null"
        cost = len(key) + len(result) + 6  # quotes, colon, comma, escapes of a plain key
        if cost <= room:
            fitted[key] = msgspec.Raw(result.encode())
            room -= cost
        else:
            omitted.append(key)
    return msgspec.structs.replace(work, parents=fitted, parents_omitted=omitted or None)


def env_value(parents: Mapping[str, msgspec.Raw]) -> str | None:
    """The ``WORKRON_PARENTS`` value, or None when it would be too large."""
    text = _json.encode(parents)
    return text.decode() if len(text) <= MAX_ENV_BYTES else None


def write_files(directory: Path, parents: Mapping[str, msgspec.Raw]) -> None:
    """One ``<key>.json`` per parent (keys are refs or ids: safe file names)."""
    for key, result in parents.items():
        (directory / f"{key}.json").write_bytes(bytes(result))
