"""One exception family for mesh-ray: every message names the problem and the fix, on one line."""

from __future__ import annotations


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
