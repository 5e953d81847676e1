"""What a stage actor runs: one block range of some DiT, behind one small interface.

A stage (``actors/stage.py``) owns the generic part of the work: its device and dtype, where the
weights come from (the checkpoint file, the node's shard cache, or shipped once), the
per-generation constants cache, the wire (``actors/wire.py``), offload, metrics and its info.
Everything that depends on the model is a ``BlockHost``, sent to the stage at creation (it must
pickle): mesh-ray's own FLUX (``actors/flux_host.py``) is one; ComfyUI's own blocks of any
architecture (``comfy_integration``) are another.  So both kinds of block range share one
step-submission path, one recovery path and one transport path.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from mesh_ray.actors.records import LinkPlan
from mesh_ray.actors.wire import Streams


class BlockHost(Protocol):
    """One block range of a DiT on a stage: built, loaded and run by code that knows that DiT."""

    index: int  # the stage's index, for messages

    def describe(self) -> str:
        """The block range for people, e.g. ``single:0-5``."""

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        """Make the range's modules (weights on the meta device until ``install``) for ``device``/``dtype``."""

    def read_checkpoint(self, path: str) -> dict[str, torch.Tensor]:
        """Only this range's tensors from ``path`` (the user's checkpoint, or a shard file it wrote)."""

    def save_shard(self, sd: dict[str, torch.Tensor], path: str) -> None:
        """Write a shard it received, so that ``read_checkpoint`` reads it back (the node's cache)."""

    def install(self, sd: dict[str, torch.Tensor]) -> None:
        """Load ``sd`` into the modules (a StageError naming missing or misshapen tensors)."""

    def to_device(self, device: torch.device, blocks: bool) -> None:
        """Put what always lives on the device there, and the blocks too unless they are offloaded."""

    def module(self) -> torch.nn.Module:
        """The module holding the range (what offload streams)."""

    def weight_bytes(self) -> int:
        """Bytes of the range's weights (what the stage holds for it)."""

    def prepare_consts(self, consts: dict[str, Any]) -> dict[str, Any]:
        """Per-generation constants as fetched from the object store, made ready for ``run`` (device, dtype)."""

    def run(self, state: Any, cond: Any, consts: dict[str, Any]) -> Streams:
        """Run the range on ``state`` (Streams, or the host's own first-stage input) with the step's ``cond``."""

    def out_plan(self, out: LinkPlan) -> LinkPlan:
        """The link plan for this stage's result (a host may force it raw, e.g. a final layer's output)."""

    def patch_weights(self, patches: Any, backups: dict[str, torch.Tensor]) -> int:
        """Apply weight patches (LoRAs) for this range, replacing earlier ones; how many weights changed."""


__all__ = ["BlockHost"]
