"""The two forms in which a FLUX forward hands its modulation to a ``patches_replace["dit"]`` block.

* **Tensor form** (ComfyUI 0.3.64's FLUX.1, and mesh-ray's own forward, which adds ``cond``):
  ``args["vec"]`` is the conditioning vector; each block computes its own modulation from it.
* **Tuple form** (newer ComfyUI's FLUX.2, "global modulation"): the modulation is computed once
  outside the blocks.  A double block gets ``vec = ((img_attn, img_mlp), (txt_attn, txt_mlp))``,
  a single block ``vec = mod``, where each entry is a record with ``shift``, ``scale`` and
  ``gate`` tensors (ComfyUI's ``ModulationOut``).  The single blocks' modulation is computed only
  after the double blocks, so a remote range that crosses from double into single blocks runs at
  its first single block: ``across_boundary`` holds the double-block call until then.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from mesh_ray.errors import ConfigError
from mesh_ray.models.flux import BlockCond, Mod

Patch = Callable[[dict, dict], dict]


def _mod(m: Any, dtype: torch.dtype) -> Mod:
    """A (shift, scale, gate) record of any kind (ComfyUI's ModulationOut, our Mod) as our ``Mod``."""
    try:
        return Mod(*(getattr(m, f).to(dtype) for f in Mod._fields))
    except AttributeError:
        raise ConfigError(f"a block patch got a modulation of type {type(m).__name__}, not a (shift, scale, gate) "
                          f"record: this ComfyUI's FLUX block convention is not supported; keep these blocks local") from None


def is_tuple_form(args: dict) -> bool:
    """Whether ``args`` carry precomputed modulation (FLUX.2 in newer ComfyUI) instead of a vector."""
    return args.get("cond") is None and not isinstance(args.get("vec"), torch.Tensor)


def patch_cond(args: dict, dtype: torch.dtype, arch: str | None = None, single: Any = None) -> BlockCond:
    """The blocks' conditioning from patch ``args`` in either form (``single``: the single blocks'
    modulation when ``args`` are a double block's, see ``across_boundary``); with ``arch``, a form
    that model cannot use is a one-line ConfigError."""
    if args.get("cond") is not None:
        return args["cond"]
    vec = args["vec"]
    tensor_form = isinstance(vec, torch.Tensor)
    if arch is not None and tensor_form != (arch == "flux1"):
        got = "a conditioning vector (FLUX.1 style)" if tensor_form else "precomputed modulation (FLUX.2 style)"
        raise ConfigError(f"the forward passes {got} to a remote block of a {arch.upper()} split: split the model "
                          f"that this forward runs (a FLUX.1 checkpoint for FLUX.1, FLUX.2 for FLUX.2)")
    if tensor_form:
        return BlockCond(vec=vec.to(dtype))
    if isinstance(vec, (tuple, list)) and len(vec) == 2 and all(isinstance(v, (tuple, list)) for v in vec):
        (i1, i2), (t1, t2) = vec
        return BlockCond(vec=None, double_img=(_mod(i1, dtype), _mod(i2, dtype)),
                         double_txt=(_mod(t1, dtype), _mod(t2, dtype)),
                         single=None if single is None else _mod(single, dtype))
    return BlockCond(vec=None, single=_mod(vec, dtype))


def across_boundary(run: Patch, arch: str) -> tuple[Patch, Patch]:
    """(patch for the range's first double block, patch for the first single block) of a remote
    range that crosses the boundary.  Tensor form: ``run`` at the double block, as before.  Tuple
    form: the double block passes its streams through unchanged and the single block runs the whole
    range with the double call's streams and both modulations, then joins the streams (text first)."""
    held: list[tuple[dict, BlockCond]] = []  # the double call's args and conditioning, built once

    def at_double(args: dict, extra: dict) -> dict:
        if not is_tuple_form(args):
            return run(args, extra)
        cond = patch_cond(args, args["img"].dtype, arch)  # a malformed call fails here, not one block later
        held[:] = [(args, cond)]
        return {"img": args["img"], "txt": args["txt"]}

    def at_single(args: dict, extra: dict) -> dict:
        if not held:  # tensor form: the range already ran at its double block
            return {"img": args["img"]}
        first, cond = held.pop()
        out = run({**first, "cond": replace(cond, single=_mod(args["vec"], first["img"].dtype))}, extra)
        return {"img": torch.cat((out["txt"], out["img"]), dim=1)}

    return at_double, at_single
