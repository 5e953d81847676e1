"""The ComfyUI side of the tests: a Ray actor that is a ComfyUI process, and helpers that run in it.

Everything here runs inside the ``ComfyHost`` actor (this module travels to it by value), so
ComfyUI's argument parsing, its ``sys.path`` (with the torchvision stand-in) and its model
management stay out of the pytest process.  Test bodies are plain functions handed to the host
with the ``comfy`` fixture; inside them, ``import comfy``, ``nodes`` etc. work as in ComfyUI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import ray

# A FLUX.1-architecture model small enough for many KSampler runs on two CPU cores, in the
# parameters ComfyUI's own Flux class takes (ComfyUI's checkpoint detection would fix the widths
# at FLUX.1's, so tests build the model through ComfyUI's classes instead of a file).
SMALL_FLUX = dict(in_channels=16, out_channels=16, patch_size=2, vec_in_dim=32, context_in_dim=48,
                  hidden_size=128, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=4,
                  axes_dim=[4, 14, 14], theta=10000, qkv_bias=True, guidance_embed=True)
TXT_LEN = 8  # text tokens of the test conditioning
REPO = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 600


def stubs_of(tree: Path) -> str | None:
    """``comfyui-stubs`` beside a ComfyUI tree (the torchvision/torchaudio stand-ins), if there."""
    stubs = Path(tree).parent / "comfyui-stubs"
    return str(stubs) if stubs.is_dir() else None


class ComfyHost:
    """One ComfyUI process (``--cpu``) with its own temporary custom_nodes/models/output folders."""

    def __init__(self, repo: str, comfy_path: str, stubs: str | None, workdir: str, threads: int = 2):
        import torch

        torch.set_num_threads(threads)
        self.workdir = Path(workdir)
        os.environ["MESH_RAY_CACHE_DIR"] = str(self.workdir / "cache" / "shards")  # not ~/.cache
        if repo not in sys.path:
            sys.path.insert(0, repo)
        from comfy_integration.standalone import boot

        dirs = boot(comfy_path, self.workdir, stubs, cpu=True)
        import comfy.model_management

        # The repository as a user installs it: cloned (here: symlinked) into custom_nodes/.
        link = dirs["custom_nodes"] / "mesh-ray"
        if not link.exists():
            link.symlink_to(repo, target_is_directory=True)
        os.environ["MESH_RAY_TEST_CUSTOM_NODE"] = str(link)

        assert comfy.model_management.get_torch_device().type == "cpu"

    def dirs(self) -> dict[str, str]:
        import folder_paths

        return {"output": folder_paths.get_output_directory(), "workdir": str(self.workdir),
                **{n: folder_paths.get_folder_paths(n)[0] for n in ("custom_nodes", "diffusion_models", "loras", "vae")}}

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run a test body in this ComfyUI process."""
        return fn(*args, **kwargs)


ComfyHostActor = ray.remote(num_cpus=1, max_restarts=0)(ComfyHost)


# -- helpers for test bodies (they run inside the host) ----------------------------------------

def flux_patcher(params: dict | None = None, seed: int = 0, sd: dict | None = None):
    """A ComfyUI MODEL of a small FLUX.1 (``SMALL_FLUX`` unless given), through ComfyUI's classes."""
    from comfy_integration.standalone import flux_patcher as build

    return build(dict(params or SMALL_FLUX), seed, sd)


def our_config(params: dict | None = None):
    from comfy_integration.standalone import our_config as convert

    return convert(dict(params or SMALL_FLUX))


def conditioning(params: dict | None = None, seed: int = 1, guidance: float = 3.5) -> tuple[list, list]:
    """(positive, negative) CONDITIONING as CLIPTextEncode/FluxGuidance would give them."""
    import torch

    p = dict(params or SMALL_FLUX)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        cond = torch.randn(1, TXT_LEN, p["context_in_dim"], generator=g)
        pooled = torch.randn(1, p["vec_in_dim"], generator=g)
        out.append([[cond, {"pooled_output": pooled, "guidance": guidance}]])
    return out[0], out[1]


def ksample(model, seed: int = 3, steps: int = 3, cfg: float = 2.0, size: int = 16,
            sampler: str = "euler", scheduler: str = "simple", params: dict | None = None):
    """Latent from ComfyUI's real KSampler path (``nodes.common_ksampler`` -> ``comfy.sample.sample``)."""
    import nodes
    import torch

    pos, neg = conditioning(params)
    latent = {"samples": torch.zeros(1, 16, size, size)}
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent)
    return out["samples"]


def load_custom_nodes(*paths: str) -> dict:
    """Load packages from ``custom_nodes/`` with ComfyUI's own loader; returns what it registered."""
    import asyncio

    import nodes

    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = {p: asyncio.run(nodes.load_custom_node(p, set(), module_parent="custom_nodes")) for p in paths}
    return {"ok": ok, "new": sorted(set(nodes.NODE_CLASS_MAPPINGS) - before),
            "web": dict(nodes.EXTENSION_WEB_DIRS)}


def node_class(name: str):
    """A node class as ComfyUI sees it (after our package is loaded from custom_nodes)."""
    import nodes

    if name not in nodes.NODE_CLASS_MAPPINGS:
        load_custom_nodes(os.environ["MESH_RAY_TEST_CUSTOM_NODE"])
    return nodes.NODE_CLASS_MAPPINGS[name]


def run_node(name: str, **inputs: Any) -> tuple:
    """Call a node the way ComfyUI's executor does: instantiate the class, call FUNCTION."""
    cls = node_class(name)
    return getattr(cls(), cls.FUNCTION)(**inputs)


def remote_of(split_model):
    """The RemoteBlocks behind a MODEL that a split node returned."""
    import sys

    return sys.modules[node_class("MeshSplitModel").__module__].remote_of(split_model)


def write_test_lora(path: str, params: dict | None = None, seed: int = 5, rank: int = 4) -> str:
    """A LoRA safetensors file in the BFL/ComfyUI key layout touching local and remote blocks:
    ``lora`` (with alpha) on attention/MLP weights, ``loha`` on one single block, ``lokr`` on another."""
    import torch
    from safetensors.torch import save_file

    from mesh_ray.models.flux import build

    cfg = our_config(params)
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in build(cfg, "meta").state_dict().items()}
    sd = {}

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.08

    for k, shape in shapes.items():
        if not k.endswith(".weight") or len(shape) != 2:
            continue
        base = "diffusion_model." + k[: -len(".weight")]
        if k.startswith("single_blocks.1.linear1"):
            sd[f"{base}.hada_w1_a"], sd[f"{base}.hada_w1_b"] = rnd(shape[0], rank), rnd(rank, shape[1])
            sd[f"{base}.hada_w2_a"], sd[f"{base}.hada_w2_b"] = rnd(shape[0], rank), rnd(rank, shape[1])
            sd[f"{base}.alpha"] = torch.tensor(2.0)
        elif k.startswith("single_blocks.2.linear2"):
            sd[f"{base}.lokr_w1"] = rnd(4, 4) * 5
            sd[f"{base}.lokr_w2_a"], sd[f"{base}.lokr_w2_b"] = rnd(shape[0] // 4, rank), rnd(rank, shape[1] // 4)
            sd[f"{base}.alpha"] = torch.tensor(float(rank))
        elif ".img_attn." in k or ".txt_attn." in k or "_mlp." in k or k.startswith("single_blocks"):
            sd[f"{base}.lora_up.weight"], sd[f"{base}.lora_down.weight"] = rnd(shape[0], rank), rnd(rank, shape[1])
            sd[f"{base}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(sd, path)
    return path
