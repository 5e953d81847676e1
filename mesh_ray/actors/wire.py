"""Activations on the wire: ``Streams`` (what any DiT's blocks hand each other) packed for one link.

A stage runs some DiT's blocks (``actors/host.py``); between stages the activations are
``Streams``: named batch-first tensors (FLUX: ``img``, ``txt``; LTX: video and audio) and a few
plain values.  Every hop sends a ``WireState``: the tensors as host arrays (raw link over the
object store: Ray moves numpy buffers without a second copy), as device tensors (a Ray Direct
Transport link: Ray moves them out of band), as CUDA IPC handles (the caller's links on one node,
``actors/cuda_ipc.py``), or as codec payloads (coded link), plus the metrics of every hop the
activation has made so far in its chain, so the caller sees the cost of each transfer.
"""

from __future__ import annotations

import pickle
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mesh_ray.cluster import metrics
from mesh_ray.actors.cuda_ipc import IpcTensor
from mesh_ray.actors.device import DTYPES
from mesh_ray.actors.records import Hop, LinkPlan
from mesh_ray.codec import decode, encode_with_metrics

# A borrowed read-only buffer (RawTensor.tensor(borrow=True)): torch warns that it is not writable; the
# receiver never writes into its input.  Filtered once here: catch_warnings per call is process-global
# and not thread-safe.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


@dataclass
class RawTensor:
    """A tensor on a raw link, held as a numpy array: Ray moves numpy buffers out of band (one copy
    into the object store, none out of it), where a pickled torch tensor is copied on each side."""

    array: np.ndarray
    dtype: str  # the torch dtype's name; bfloat16 travels as its int16 bits (numpy has no bfloat16)

    @classmethod
    def of(cls, t: torch.Tensor) -> "RawTensor":
        t = t.detach().cpu().contiguous()
        bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return cls(bits.numpy(), str(t.dtype).removeprefix("torch."))

    def tensor(self, borrow: bool = False) -> torch.Tensor:
        """The tensor; a buffer Ray handed out read-only is copied unless ``borrow`` (the receiver
        never writes into its input, as a stage does not)."""
        arr = self.array if borrow or self.array.flags.writeable else self.array.copy()
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t


@dataclass
class Streams:
    """Activations between blocks: named batch-first tensors and small plain values (``meta``).
    ``layout`` gives, per tensor, the token grid (rows, cols) and the count of leading tokens outside
    it, for codecs that code tokens as an image (HEVC); tensors without one are coded flat."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, tuple[tuple[int, int] | None, int]] = field(default_factory=dict)

    def map(self, fn: Any) -> "Streams":
        """The same streams with ``fn`` applied to every tensor."""
        return Streams({k: fn(v) for k, v in self.tensors.items()}, self.meta, self.layout)


@dataclass
class WireState:
    """``Streams`` for one link: each tensor as a ``RawTensor``, a device tensor (RDT link), an
    ``IpcTensor`` or a payload.  On an RDT link ``meta`` travels pickled (``bytes``): Ray would move
    every tensor in the value out of band, the small ones in it too, and all on one device type."""

    tensors: dict[str, RawTensor | torch.Tensor | IpcTensor | bytes]
    meta: dict[str, Any] | bytes = field(default_factory=dict)
    hops: list[Hop] = field(default_factory=list)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def pack(streams: Streams, plan: LinkPlan, hops: list[Hop] | None = None) -> WireState:
    """Cast ``streams`` to the link's wire dtype, code them with the link's spec (raw: the tensors
    themselves, as host arrays over the object store or on their device for a direct transport) and
    record the hop."""
    spec, dtype = plan.spec, DTYPES[plan.dtype]
    tensors = {k: _cast(v, dtype) for k, v in streams.tensors.items()}
    if spec.mode == "raw":
        size = sum(_nbytes(t) for t in tensors.values())
        hop = Hop(size, size, 0.0, 0.0, link=plan.name, mode="raw", dtype=plan.dtype, transport=plan.transport,
                  sent_at=time.time())
        out = {k: _raw(t, plan) for k, t in tensors.items()}
        meta = pickle.dumps(streams.meta, protocol=5) if plan.rdt else streams.meta
        return WireState(out, meta, [*(hops or []), hop])
    t0 = time.perf_counter()
    out, ms = {}, {}
    for k, t in tensors.items():
        if t.numel() == 0:  # e.g. text tokens cached on the stage: nothing to code
            out[k] = RawTensor.of(t)
            continue
        grid, prefix = streams.layout.get(k, (None, 0))
        out[k], ms[k] = encode_with_metrics(t, spec, grid, prefix)
    hop = Hop(sum(m.raw_bytes for m in ms.values()), sum(m.wire_bytes for m in ms.values()),
              round((time.perf_counter() - t0) * 1e3, 3), link=plan.name, mode=spec.mode, dtype=plan.dtype,
              transport=plan.transport, sent_at=time.time())
    if spec.debug_metrics and ms:  # the largest tensor's error stands for the hop
        largest = max(ms, key=lambda k: ms[k].raw_bytes)
        hop.cosine, hop.max_abs = ms[largest].cosine, max(m.max_abs for m in ms.values())
    return WireState(out, streams.meta, [*(hops or []), hop])


def _raw(t: torch.Tensor, plan: LinkPlan) -> RawTensor | torch.Tensor | IpcTensor:
    """One tensor of a raw link as the link's transport moves it (empty ones always as host arrays)."""
    if t.numel() and plan.rdt:  # Ray Direct Transport moves torch tensors where they are
        return t.contiguous()
    if t.numel() and plan.transport == "cuda_ipc" and t.is_cuda:  # GPU-only: the caller's links on one node
        return IpcTensor.share(t, plan.gpu)
    return RawTensor.of(t)


def unpack(obj: WireState, device: torch.device, dtype: torch.dtype, borrow: bool = False) -> tuple[Streams, list[Hop]]:
    """Decode a WireState onto ``device`` in the receiver's compute ``dtype`` (floating tensors),
    recording the transfer time and the decode time on its last hop.  ``borrow``: raw tensors may
    stay in Ray's read-only buffers (see RawTensor) and CUDA IPC tensors in the sender's memory;
    without it the receiver owns what it gets."""
    t0, now = time.perf_counter(), time.time()
    coded = False
    tensors = {}
    for k, v in obj.tensors.items():
        if isinstance(v, RawTensor):
            t = v.tensor(borrow)
        elif isinstance(v, torch.Tensor):
            t = v
        elif isinstance(v, IpcTensor):
            t = v.open()
            t = t if borrow or t.device != device else t.clone()
        else:
            t, coded = decode(v, device), True
        tensors[k] = _cast(t.to(device), dtype)
    hops = obj.hops
    if hops:
        hops = [replace(h) for h in hops]
        if hops[-1].sent_at:
            hops[-1].transfer_ms = round((now - hops[-1].sent_at) * 1e3, 3)
        if coded:
            hops[-1].decode_ms = round((time.perf_counter() - t0) * 1e3, 3)
        metrics.wire_hop(hops[-1])  # each hop is counted once, where it is received
    meta = pickle.loads(obj.meta) if isinstance(obj.meta, bytes) else obj.meta
    return Streams(tensors, meta), hops
