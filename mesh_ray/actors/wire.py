"""Block states on the wire: coded with the link's codec spec before they enter the object store.

Every hop sends a ``WireState``: the streams as tensors (raw link: Ray moves them, nothing is
copied twice) or as codec payloads (coded link), plus the metrics of every hop the activation
has made so far in its chain, so the caller sees the cost of each transfer.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mesh_ray.cluster import metrics
from mesh_ray.actors.device import DTYPES
from mesh_ray.actors.records import Hop, LinkPlan
from mesh_ray.codec import decode, encode_with_metrics
from mesh_ray.models.flux import BlockState

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
class WireState:
    """A BlockState for one link: ``img`` (and ``txt`` unless joined) as raw tensors or codec payloads."""

    img: RawTensor | bytes
    txt: RawTensor | torch.Tensor | bytes | None
    txt_len: int
    hops: list[Hop] = field(default_factory=list)
    cond: Any = None  # the step's BlockCond (on the host) when the front runs on the stages


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def with_cached_text(state: BlockState, txt: torch.Tensor | None) -> BlockState:
    """Put the generation's cached text tokens back where the caller sent an empty placeholder."""
    if txt is not None and state.txt is not None and state.txt.numel() == 0 and state.txt_len:
        return BlockState(state.img, txt, state.txt_len)
    return state


def pack_state(state: BlockState, plan: LinkPlan, grid: tuple[int, int] | None,
               hops: list[Hop] | None = None) -> WireState:
    """Cast ``state`` to the link's wire dtype, code it with the link's spec (raw: the host tensors
    themselves) and record the hop."""
    spec, dtype = plan.spec, DTYPES[plan.dtype]
    state = BlockState(state.img.to(dtype), state.txt.to(dtype) if state.txt is not None else None, state.txt_len)
    if spec.mode == "raw":
        size = _nbytes(state.img) + _nbytes(state.txt)
        hop = Hop(size, size, 0.0, 0.0, link=plan.name, mode="raw", dtype=plan.dtype)
        txt = RawTensor.of(state.txt) if state.txt is not None else None
        return WireState(RawTensor.of(state.img), txt, state.txt_len, [*(hops or []), hop])
    t0 = time.perf_counter()
    if state.joined:
        img, m_img = encode_with_metrics(state.img, spec, grid, state.txt_len)
        txt, m_txt = None, None
    elif state.txt.numel() == 0:  # text tokens cached on the stage: nothing to code
        img, m_img = encode_with_metrics(state.img, spec, grid, 0)
        txt, m_txt = state.txt.cpu(), None
    else:
        img, m_img = encode_with_metrics(state.img, spec, grid, 0)
        txt, m_txt = encode_with_metrics(state.txt, spec, None, 0)
    ms = [m for m in (m_img, m_txt) if m is not None]
    hop = Hop(sum(m.raw_bytes for m in ms), sum(m.wire_bytes for m in ms), round((time.perf_counter() - t0) * 1e3, 3),
              link=plan.name, mode=spec.mode, dtype=plan.dtype)
    if spec.debug_metrics:  # the image stream dominates; its error stands for the hop
        hop.cosine, hop.max_abs = m_img.cosine, max(m.max_abs for m in ms)
    return WireState(img, txt, state.txt_len, [*(hops or []), hop])


def unpack_state(obj: WireState, device: torch.device, dtype: torch.dtype,
                 borrow: bool = False) -> tuple[BlockState, list[Hop]]:
    """Decode a WireState onto ``device`` in the receiver's compute ``dtype``, recording the decode
    time on its last hop.  ``borrow``: raw tensors may stay in Ray's read-only buffers (see RawTensor)."""
    if isinstance(obj.img, RawTensor):
        txt = obj.txt.tensor(borrow).to(device, dtype) if obj.txt is not None else None
        if obj.hops:
            metrics.wire_hop(obj.hops[-1])  # each hop is counted once, where it is received
        return BlockState(obj.img.tensor(borrow).to(device, dtype), txt, obj.txt_len), obj.hops
    t0 = time.perf_counter()
    img = decode(obj.img, device).to(dtype)
    txt = obj.txt if obj.txt is None or isinstance(obj.txt, torch.Tensor) else decode(obj.txt, device)
    txt = txt.to(device, dtype) if txt is not None else None
    hops = [replace(h) for h in obj.hops]
    if hops:
        hops[-1].decode_ms = round((time.perf_counter() - t0) * 1e3, 3)
        metrics.wire_hop(hops[-1])
    return BlockState(img, txt, obj.txt_len), hops
