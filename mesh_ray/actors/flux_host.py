"""mesh-ray's own FLUX.1 / FLUX.2 block range as a stage's ``BlockHost``.

Streams are ``img`` and ``txt`` (``txt`` absent once joined; ``meta["txt_len"]`` text tokens); the
step's conditioning is a ``BlockCond``; per-generation constants are the rotary ``pe`` and, when the
first stage starts at block 0, the text tokens.  With the front on the stages (``embed`` /
``final``) the first stage embeds a ``FrontInput`` and the last runs the final layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mesh_ray.actors.front import FrontInput, embed_input, finish_plan, front_keys, front_modules
from mesh_ray.actors.records import LinkPlan
from mesh_ray.actors.wire import Streams
from mesh_ray.errors import StageError
from mesh_ray.models.blocks import BlockRange
from mesh_ray.models.checkpoint import load_blocks, save_checkpoint
from mesh_ray.models.flux import BlockCond, BlockState, FluxConfig, build


def flux_streams(state: BlockState, grid: tuple[int, int] | None = None) -> Streams:
    """A FLUX block state as Streams; the image tokens (after the text once joined) form ``grid``."""
    tensors = {"img": state.img} if state.joined else {"img": state.img, "txt": state.txt}
    return Streams(tensors, {"txt_len": state.txt_len}, {"img": (grid, state.txt_len if state.joined else 0)})


def flux_state(streams: Streams) -> BlockState:
    """Streams made by ``flux_streams`` back as a FLUX block state."""
    return BlockState(streams.tensors["img"], streams.tensors.get("txt"), streams.meta["txt_len"])


def with_cached_text(state: BlockState, txt: torch.Tensor | None) -> BlockState:
    """Put the generation's cached text tokens back where the caller sent an empty placeholder."""
    if txt is not None and state.txt is not None and state.txt.numel() == 0 and state.txt_len:
        return BlockState(state.img, txt, state.txt_len)
    return state


def move_cond(cond: BlockCond, device: torch.device, dtype: torch.dtype | None = None) -> BlockCond:
    """``cond`` on ``device`` (and in ``dtype`` when given: a stage computes in its own dtype)."""
    def mv(x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
        moved = [mv(t) for t in x]
        return type(x)(*moved) if hasattr(x, "_fields") else tuple(moved)  # a Mod record stays one

    return BlockCond(vec=mv(cond.vec), double_img=mv(cond.double_img), double_txt=mv(cond.double_txt),
                     single=mv(cond.single))


@dataclass
class FluxHost:
    """Blocks ``start``..``stop - 1`` of a FLUX model of ``config``; ``embed``/``final``: the front too."""

    index: int
    config: FluxConfig
    start: int
    stop: int
    embed: bool = False  # front on the stages (actors/front.py): this first stage runs the embedders
    final: bool = False  # ... and this last stage runs the final layer

    def __post_init__(self) -> None:
        self.range = BlockRange(self.start, self.stop, self.config.depth, self.config.num_blocks)
        self.model = None

    def __getstate__(self) -> dict:  # only the description travels; the modules are built where it runs
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "device", "dtype")}

    def describe(self) -> str:
        return str(self.range)

    @property
    def has_front(self) -> bool:
        """This stage holds the embedders and final layer too (``SplitOptions.front="stage"``)."""
        return self.embed or self.final

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.model = build(self.config, "meta", dtype)

    def read_checkpoint(self, path: str) -> dict[str, torch.Tensor]:
        return load_blocks(path, [self.range], non_block=self.has_front, dtype=self.dtype, device="cpu")

    def save_shard(self, sd: dict[str, torch.Tensor], path: str) -> None:
        save_checkpoint(sd, path, self.config)

    def install(self, sd: dict[str, torch.Tensor]) -> None:
        expected = {k for k in self.model.state_dict() if k.startswith(tuple(self.range.keys_prefixes()))}
        expected |= front_keys(self.model) if self.has_front else set()
        missing = sorted(expected - set(sd))
        if missing:
            raise StageError(f"stage {self.index} ({self.range}): checkpoint lacks {len(missing)} tensors "
                             f"such as {missing[0]}: the file does not match the model config; re-export it")
        try:
            self.model.load_state_dict({k: v.to(self.dtype) for k, v in sd.items()}, strict=False, assign=True)
        except RuntimeError as e:
            raise StageError(f"stage {self.index} ({self.range}): tensor shapes do not match the model "
                             f"({str(e).splitlines()[-1].strip()}): the checkpoint does not match its config") from None

    def to_device(self, device: torch.device, blocks: bool) -> None:
        for mod in front_modules(self.model) if self.has_front else []:
            mod.to(device)
        if blocks:
            for b in self.range:
                self.model.block(b).to(device)

    def module(self) -> torch.nn.Module:
        return self.model

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for b in self.range for p in self.model.block(b).parameters())

    def prepare_consts(self, consts: dict[str, Any]) -> dict[str, Any]:
        out = dict(consts)
        out["pe"] = consts["pe"].to(self.device)  # rotary pe stays fp32, as in the local model
        txt = consts.get("txt")
        if txt is not None:
            txt = txt.to(self.device, self.dtype)
            out["txt"] = self.model.embed_text(txt) if self.embed else txt  # the caller sent it before its embedder
        return out

    def run(self, state: Streams | FrontInput, cond: BlockCond | None, consts: dict[str, Any]) -> Streams:
        """With the front on the stages ``cond`` is None: the first stage embeds a ``FrontInput`` and
        the conditioning travels with the streams; the last stage returns the final layer's output."""
        front = cond is None
        if isinstance(state, FrontInput):
            block_state, cond = embed_input(self.model, state, consts.get("txt"), self.device, self.dtype)
        else:
            cond = state.meta["cond"] if front else cond
            block_state = with_cached_text(flux_state(state), consts.get("txt"))
        here = move_cond(cond, self.device, self.dtype)
        block_state = self.model.run_blocks(block_state, here, consts["pe"], self.range.start, self.range.stop)
        if front and self.final:
            return Streams({"img": self.model.finish(block_state, here)}, {"txt_len": 0})
        out = flux_streams(block_state, consts.get("grid"))
        if front:
            out.meta["cond"] = move_cond(cond, torch.device("cpu"))
        return out

    def out_plan(self, out: LinkPlan) -> LinkPlan:
        return finish_plan(out) if self.final else out

    def patch_weights(self, patches: Any, backups: dict[str, torch.Tensor]) -> int:
        from mesh_ray.models.lora import apply

        return apply(self.model, patches, backups)


__all__ = ["FluxHost", "flux_state", "flux_streams", "move_cond", "with_cached_text"]
