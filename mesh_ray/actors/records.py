"""Typed records between the driver and its stages: generation constants, link plan, hop record.

What goes over Ray between ``SplitModel`` and ``StageActor`` is one of these, not a loose dict,
so both ends (and the pipelining / fault-recovery layers built on them) agree on the fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh_ray.codec import CodecSpec
from mesh_ray.codec.metrics import TransferMetrics


@dataclass(frozen=True)
class GenConsts:
    """Per-generation constants a stage fetches once and caches by ``id``.

    ``refs`` maps a name to a one-element list holding an ObjectRef (FLUX: ``pe``, and ``txt`` unless
    the text tokens travel with the state), so Ray passes the ref and the stage fetches it only on a
    cache miss; which names there are is up to the block host that reads them.  ``grid`` is the
    image-token grid, for codecs that code tokens as an image.
    """

    id: str
    refs: dict[str, list[Any]]
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class LinkPlan:
    """One link of the chain: its codec spec, its name (``stage0->stage1``) and the dtype it carries."""

    spec: CodecSpec
    name: str
    dtype: str  # the wire dtype: the narrower of the two ends' compute dtypes
    transport: str = "object"  # how Ray moves it: the object store, or a Ray Direct Transport (gloo, nccl, ...)


@dataclass
class Hop(TransferMetrics):
    """One transfer of an activation: the codec metrics plus which link, codec mode and wire dtype."""

    link: str = ""
    mode: str = "raw"
    dtype: str = ""
    transport: str = "object"
