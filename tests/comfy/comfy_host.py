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


class ComfyHost:
    """One ComfyUI process (``--cpu``) with its own temporary custom_nodes/models/output folders."""

    def __init__(self, repo: str, comfy_path: str, stubs: str | None, workdir: str, threads: int = 2):
        import torch

        torch.set_num_threads(threads)
        self.workdir = Path(workdir)
        sys.pycache_prefix = str(self.workdir / "pycache")  # never write __pycache__ into the shared tree
        os.environ["MESH_RAY_CACHE_DIR"] = str(self.workdir / "cache" / "shards")  # not ~/.cache
        for p in (comfy_path, *([stubs] if stubs else []), repo):
            if p not in sys.path:
                sys.path.insert(0, p)
        sys.argv = ["main.py", "--cpu"]
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401 - parses --cpu before model management picks a device
        import folder_paths

        dirs = {name: self.workdir / name for name in ("custom_nodes", "diffusion_models", "loras", "vae",
                                                         "output", "input", "temp", "user")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for name in ("custom_nodes", "diffusion_models", "loras", "vae"):
            folder_paths.add_model_folder_path(name, str(dirs[name]), is_default=True)
        folder_paths.set_output_directory(str(dirs["output"]))
        folder_paths.set_input_directory(str(dirs["input"]))
        folder_paths.set_temp_directory(str(dirs["temp"]))
        folder_paths.set_user_directory(str(dirs["user"]))
        import comfy.model_management
        import nodes  # noqa: F401 - ComfyUI's core nodes, as main.py imports them

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

def our_config(params: dict | None = None):
    """The mesh-ray FluxConfig of a ComfyUI Flux parameter dict."""
    from mesh_ray.models.flux import FluxConfig

    p = dict(params or SMALL_FLUX)
    return FluxConfig(arch="flux1", in_channels=p["in_channels"] * p["patch_size"] ** 2,
                      vec_in_dim=p["vec_in_dim"], context_in_dim=p["context_in_dim"], hidden_size=p["hidden_size"],
                      num_heads=p["num_heads"], mlp_ratio=p["mlp_ratio"], depth=p["depth"],
                      depth_single_blocks=p["depth_single_blocks"], axes_dim=p["axes_dim"], theta=p["theta"],
                      qkv_bias=p["qkv_bias"], guidance_embed=p["guidance_embed"])


def flux_state_dict(params: dict | None = None, seed: int = 0) -> dict:
    """Seeded random weights in the BFL/ComfyUI key layout for a small FLUX.1 model."""
    import torch

    from mesh_ray.models.flux import random_state_dict

    return random_state_dict(our_config(params), seed, torch.float32)


def flux_patcher(params: dict | None = None, seed: int = 0, sd: dict | None = None):
    """A ComfyUI MODEL (ModelPatcher) of a small FLUX.1, built through ComfyUI's own classes."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    p = dict(params or SMALL_FLUX)
    cfg = comfy.supported_models.Flux({"image_model": "flux", **p})
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "")
    sd = dict(sd if sd is not None else flux_state_dict(p, seed))
    n_keys = len(sd)
    model.load_model_weights({f"diffusion_model.{k}": v for k, v in sd.items()}, "diffusion_model.")
    own = model.diffusion_model.state_dict()
    if len(own) != n_keys:
        raise AssertionError(f"ComfyUI's Flux has {len(own)} tensors, the test weights {n_keys}")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


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
    """The RemoteBlocks behind a MODEL that MeshSplitFlux returned."""
    import sys

    mark = split_model.model_options["transformer_options"]["mesh_ray_split"]
    nodes_mesh = sys.modules[node_class("MeshSplitFlux").__module__]
    return nodes_mesh._live[mark["key"]]


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
