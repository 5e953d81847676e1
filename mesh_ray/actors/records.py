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

    ``pe`` / ``txt`` are one-element lists holding an ObjectRef, so Ray passes the ref and the stage
    fetches it only on a cache miss; ``txt`` is None when the text tokens travel with the state.
    """

    id: str
    pe: list[Any]
    txt: list[Any] | None = None
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class LinkPlan:
    """One link of the chain: its codec spec, its name (``stage0->stage1``) and the dtype it carries."""

    spec: CodecSpec
    name: str
    dtype: str  # the wire dtype: the narrower of the two ends' compute dtypes


@dataclass
class Hop(TransferMetrics):
    """One transfer of an activation: the codec metrics plus which link, codec mode and wire dtype."""

    link: str = ""
    mode: str = "raw"
    dtype: str = ""
