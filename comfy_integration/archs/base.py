"""What an architecture adapter says about one ComfyUI DiT family, and the parts all adapters share.

ComfyUI's DiTs call ``patches_replace["dit"][(kind, i)](args, {"original_block": block_wrap})``
for block i of each block list.  An adapter (one per family, in this package) says:

* which block lists the model has (``BlockList``: the patch kind, the diffusion model's attribute,
  the name people write in a plan), in the order the forward runs them;
* which entries of ``args`` are the activations that flow from block to block (``streams``), which
  change every step (``STEP``: sent with each call) and which stay for the whole generation
  (``CONSTS``: put in the object store once, cached on the stages by content); which values only
  ``block_wrap``'s closure holds (``CLOSURE``);
* how to call block i with ComfyUI's own convention (``run_block``, the same call ``block_wrap``
  makes) and what the replacement returns (``result``).

The ComfyUI process builds a ``Capture`` from a block call's ``args``; the stage rebuilds each
block's arguments from it and runs its blocks with ComfyUI's own classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from mesh_ray.errors import ConfigError

# transformer_options entries that hold callables or the ComfyUI process's own state: never shipped
_LOCAL_ONLY = ("patches", "patches_replace", "wrappers", "callbacks", "optimized_attention_override",
               "prefetch_dynamic_vbars", "mesh_ray_split")


@dataclass(frozen=True)
class BlockList:
    """One list of blocks of a diffusion model: its ``patches_replace`` kind, attribute and plan name."""

    kind: str  # "double_block"
    attr: str  # "double_blocks"
    label: str  # "double" (plans: double:0-9), or "blocks" for a model with one list


@dataclass
class Capture:
    """A remote range's inputs taken from ComfyUI's block-call ``args``: the streams, the values of
    this step per block kind, and the generation's constants."""

    streams: dict[str, torch.Tensor]
    step: dict[str, dict[str, Any]]  # kind -> name -> value (with "to": the shippable transformer_options)
    consts: dict[str, Any] = field(default_factory=dict)


class Unsliceable(Exception):
    """A value whose batch cannot be cut into micro-batches (the call then goes in one piece)."""


def closure_vars(fn: Any) -> dict[str, Any]:
    """The free variables of ComfyUI's ``block_wrap`` closure (values some models pass only there)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    out = {}
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    return out


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return type(v).__module__ == "uuid"  # ComfyUI's per-cond uuids


class Arch:
    """Base adapter: the generic capture, batch cutting and checks; subclasses fill the class fields."""

    name = ""  # "flux1"
    title = ""  # "FLUX.1", for messages
    image_models: tuple[str, ...] = ()  # model_config.unet_config["image_model"] values
    model_class = ""  # the diffusion model's class, "comfy.ldm.flux.model.Flux": subclasses differ
    lists: tuple[BlockList, ...] = ()
    STEP: tuple[str, ...] = ()
    CONSTS: tuple[str, ...] = ()
    CLOSURE: dict[str, str] = {}  # closure variable -> "step" | "const"
    BLOCK_PATCHES: tuple[str, ...] = ()  # transformer_options["patches"] keys the blocks call
    DRIVER_PATCHES: tuple[str, ...] = ()  # patches the forward calls between blocks

    # -- the ComfyUI process ---------------------------------------------------------------------

    def streams(self, kind: str, args: dict) -> dict[str, torch.Tensor]:
        """The activations flowing into block ``kind`` from ``args``."""
        return {"img": args["img"]}

    def result(self, kind: str, streams: dict[str, torch.Tensor]) -> dict:
        """What the replacement of the range's last block returns to ComfyUI's forward."""
        return dict(streams)

    def passthrough(self, kind: str, args: dict) -> dict:
        """The replacement of a block the stage already ran: the activations unchanged."""
        return self.result(kind, self.streams(kind, args))

    def capture(self, kind: str, args: dict, extra: dict) -> Capture:
        """A ``Capture`` of block call ``args`` (``extra["original_block"]``: ComfyUI's block_wrap)."""
        to = args.get("transformer_options") or {}
        self.check_options(to)
        closure = closure_vars(extra.get("original_block"))
        step = {n: args.get(n) for n in self.STEP}
        consts = {n: args.get(n) for n in self.CONSTS}
        for n, where in self.CLOSURE.items():
            (step if where == "step" else consts)[n] = closure.get(n)
        step["to"] = ship_options(to)
        return Capture(self.streams(kind, args), {kind: step}, consts)

    def check_options(self, to: dict) -> None:
        """A one-line error for what a stage cannot run: callables the blocks (or the forward between
        blocks) would call in the ComfyUI process."""
        patches = to.get("patches") or {}
        taken = [k for k in (*self.BLOCK_PATCHES, *self.DRIVER_PATCHES) if patches.get(k)]
        if taken:
            raise ConfigError(f"a node patches {self.title}'s blocks ({', '.join(taken)}), which runs in this ComfyUI "
                              f"process and cannot reach remote blocks: keep those blocks local (fewer n_blocks_remote) "
                              f"or remove that node")
        if to.get("optimized_attention_override") is not None:
            raise ConfigError("a node overrides the attention function (optimized_attention_override), which cannot "
                              "reach remote blocks: keep those blocks local or remove that node")

    def cut(self, value: Any, sl: slice, batch: int) -> Any:
        """One micro-batch of ``value``: tensors batch-first (size ``batch``; size 1 is shared), records
        and containers through their fields; ``Unsliceable`` when the batch cannot be told."""
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            if value.ndim == 0 or value.shape[0] == 1:
                return value
            if value.shape[0] != batch:
                raise Unsliceable
            return value[sl]
        if isinstance(value, (list, tuple)):
            items = [self.cut(v, sl, batch) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if isinstance(value, dict):
            return {k: (v if k == "to" else self.cut(v, sl, batch)) for k, v in value.items()}
        if dataclasses.is_dataclass(value):
            return dataclasses.replace(value, **{f.name: self.cut(getattr(value, f.name), sl, batch)
                                                 for f in dataclasses.fields(value)})
        raise Unsliceable

    # -- the stage ---------------------------------------------------------------------------------

    def enter(self, kind: str, streams: dict[str, torch.Tensor], values: dict) -> dict[str, torch.Tensor]:
        """The streams made ready for the first block of ``kind`` (FLUX joins text and image here)."""
        return streams

    def run_block(self, block: torch.nn.Module, kind: str, streams: dict[str, torch.Tensor], values: dict,
                  to: dict) -> dict[str, torch.Tensor]:
        """Block ``block`` on ``streams`` exactly as ComfyUI's block_wrap calls it."""
        raise NotImplementedError


def ship_options(to: dict) -> dict:
    """``transformer_options`` without what stays in the ComfyUI process (callables, its own state)."""
    return {k: v for k, v in to.items() if k not in _LOCAL_ONLY and _plain(v)}


def block_options(to: dict, i: int) -> dict:
    """The transformer_options block ``i`` sees: the forward sets ``block_index`` before each block."""
    o = dict(to)
    if "block_index" in o:
        o["block_index"] = i
    return o


__all__ = ["Arch", "BlockList", "Capture", "Unsliceable", "block_options", "closure_vars", "ship_options"]
