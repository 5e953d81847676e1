"""The codec's one exception type: a payload that cannot be decoded here, or a bad codec option."""

from __future__ import annotations

from mesh_ray.errors import MeshError


class CodecError(MeshError):
    """A payload is corrupt, truncated, of an unknown version, or needs a backend this machine lacks."""
