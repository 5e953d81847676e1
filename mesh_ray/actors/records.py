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
    """One link of the chain: its codec spec, its name (``stage0->stage1``), the dtype it carries and
    how it moves (``split/links.py`` chooses; docs/transport.md)."""

    spec: CodecSpec
    name: str
    dtype: str  # the wire dtype: the narrower of the two ends' compute dtypes
    transport: str = "object"  # "object" (the object store), "gloo", "nccl" or "cuda_ipc"
    rdt: bool = False  # Ray Direct Transport moves the tensors (between stages); else they travel in the value
    gpu: str | None = None  # the receiving end's GPU (UUID), where the sender shares tensors by CUDA IPC itself
    reason: str = ""  # why this transport, for people


@dataclass
class Hop(TransferMetrics):
    """One transfer of an activation: the codec metrics plus which link, codec mode, wire dtype and
    transport, and ``transfer_ms``: wall time from the sender's end of packing to the receiver's start
    of unpacking (queueing included; clocks of two machines may differ)."""

    link: str = ""
    mode: str = "raw"
    dtype: str = ""
    transport: str = "object"
    sent_at: float = 0.0  # time.time() when the sender had packed it
    transfer_ms: float | None = None
