"""One exception family for mesh-ray: every message names the problem and the fix, on one line."""

from __future__ import annotations

from typing import Any


class MeshError(Exception):
    """Base class of every error mesh-ray raises on purpose."""

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line cause would hide the fix in a log.
        super().__init__(" ".join(str(message).split()))


class CheckpointError(MeshError):
    """A checkpoint file is missing, corrupt, truncated or not of a supported architecture."""


class ConfigError(MeshError):
    """An option, preset, block range or tensor shape given by the caller is invalid."""


class ClusterError(MeshError):
    """The Ray cluster cannot be reached, lacks resources, or lost an actor."""


class StageError(MeshError):
    """A stage actor failed while loading or running its blocks."""


def validation_line(err: Any, what: str, known: Any = (), noun: str = "option") -> str:
    """The first problem of a pydantic ``ValidationError`` as one line naming the field and the fix.

    ``what`` names the thing validated (``SplitOptions``, ``node '3'``); ``known`` lists the valid
    field names, shown when the problem is an unknown field.
    """
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or what
    if first.get("type") == "extra_forbidden":
        return f"unknown {noun} {where!r} for {what}: use one of {', '.join(known)}"
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
    return f"invalid {what} {noun} {where!r}: {msg}{got}; fix the value"
