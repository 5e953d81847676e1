"""The model's front on the stages (``SplitOptions.front="stage"``): the first stage embeds, the last one finishes.

With the front on the stages the caller holds no weights: it sends each step's latent tokens,
timesteps, pooled vector and guidance (``FrontInput``) to the first stage, which runs the
embedders (the text embedder once per generation, when it caches the text) and hands the step's
conditioning on with the activations; the last stage runs the final layer and sends back the
predicted velocity, always raw (it is as small as the latent).  Same arithmetic as the caller's
front, so raw fp32 results are bit for bit the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from mesh_ray.actors.records import Hop, LinkPlan
from mesh_ray.codec import CodecSpec
from mesh_ray.errors import ConfigError
from mesh_ray.models.flux import BlockCond, BlockState, Flux

BLOCK_LISTS = ("double_blocks", "single_blocks")


@dataclass
class FrontInput:
    """One micro-batch's step inputs for a first stage that runs the embedders (host tensors)."""

    img: torch.Tensor  # latent tokens [B, L_img, in_channels]
    timesteps: torch.Tensor
    y: torch.Tensor | None
    guidance: torch.Tensor | None
    hops: list[Hop] = field(default_factory=list)  # the caller -> first stage transfer, for StepStats


def front_input(img: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None, guidance: torch.Tensor | None,
                link: LinkPlan | None) -> FrontInput:
    """The step inputs on the host, with the raw hop they make on ``link`` (the caller's link into stage 0)."""
    ts = [None if t is None else t.cpu() for t in (img, timesteps, y, guidance)]
    size = sum(t.numel() * t.element_size() for t in ts if t is not None)
    hop = Hop(size, size, 0.0, 0.0, link=link.name if link else "", mode="raw", dtype=str(ts[0].dtype).removeprefix("torch."))
    return FrontInput(*ts, hops=[hop])


def front_modules(model: Flux) -> list[nn.Module]:
    """The non-block modules: embedders, shared modulations (FLUX.2) and the final layer."""
    return [m for name, m in model.named_children() if name not in BLOCK_LISTS]


def front_keys(model: Flux) -> set[str]:
    """State-dict keys of ``front_modules`` (what a front stage must find in its checkpoint)."""
    return {k for k in model.state_dict() if not k.startswith(BLOCK_LISTS)}


def embed_input(model: Flux, inp: FrontInput, txt: torch.Tensor, device: torch.device,
                dtype: torch.dtype) -> tuple[BlockState, BlockCond]:
    """The caller's ``submit_step`` embedding, run on the first stage: streams and conditioning.
    ``txt`` is the generation's text tokens already through ``txt_in`` (cached by the stage)."""
    def dev(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    cond = model.conditioning(dev(inp.timesteps), dev(inp.y), dev(inp.guidance), dtype=dtype)
    return BlockState(model.img_in(inp.img.to(device, dtype)), txt, txt.shape[1]), cond


def finish_plan(out: LinkPlan) -> LinkPlan:
    """The link back to the caller for the final layer's output: always raw (same transport)."""
    return replace(out, spec=CodecSpec(mode="raw"))


def check_front(front: str, local: list[int], patches: bool = False) -> bool:
    """True when the split runs its front on the stages; a one-line error where it cannot."""
    if front != "stage":
        return False
    if patches:
        raise ConfigError("block_patches() cannot run with front='stage': the host model (ComfyUI) runs its own "
                          "embedders and final layer; create the split with front='caller'")
    if local:
        raise ConfigError(f"front='stage' needs every block range on a stage, but stage(s) {local} are local: "
                          f"drop local=True / n_blocks_remote, or use front='caller'")
    return True


__all__ = ["FrontInput", "check_front", "front_input", "embed_input", "finish_plan", "front_keys", "front_modules"]
