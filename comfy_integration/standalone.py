"""ComfyUI without its server, for tests and ``mesh-ray bench comfy``: boot it from a source tree
(0.20 or 0.3.64) with temporary folders, and build small FLUX.1 models through ComfyUI's own classes.

ComfyUI's checkpoint detection fixes FLUX's widths at the released model's, so small models are
built from a parameter dict (``comfy.supported_models.Flux``) with seeded random weights in the
BFL layout (``mesh_ray.models.flux.random_state_dict``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

FOLDERS = ("custom_nodes", "diffusion_models", "loras", "vae", "output", "input", "temp", "user")


def boot(comfy_path: str | os.PathLike, workdir: str | os.PathLike, stubs: str | os.PathLike | None = None,
         cpu: bool = True) -> dict[str, Path]:
    """Import ComfyUI from ``comfy_path`` in this process (``--cpu`` unless told), with every folder it
    writes to under ``workdir``; returns those folders.  Call once per process, before other ComfyUI imports."""
    workdir = Path(workdir)
    sys.pycache_prefix = str(workdir / "pycache")  # never write __pycache__ into the ComfyUI tree
    for p in (str(comfy_path), *([str(stubs)] if stubs else [])):
        if p not in sys.path:
            sys.path.insert(0, p)
    # ComfyUI's arguments are parsed from sys.argv once, at the first import of comfy.cli_args and
    # before model management picks a device; a Ray worker's own argv is Ray's, so ours stands in for
    # that import only.
    argv, sys.argv = sys.argv, ["main.py", *(["--cpu"] if cpu else [])]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = argv
    # Before nodes: nodes.py puts comfy/ first on sys.path, after which ``utils`` would be
    # comfy/utils.py and ComfyUI's ``server`` (imported by 0.20's node loading) could not import.
    import utils.extra_config  # noqa: F401
    import folder_paths

    dirs = {name: workdir / name for name in FOLDERS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name in ("custom_nodes", "diffusion_models", "loras", "vae"):
        folder_paths.add_model_folder_path(name, str(dirs[name]), is_default=True)
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.set_user_directory(str(dirs["user"]))
    import comfy.model_management  # noqa: F401
    import nodes  # noqa: F401 - ComfyUI's core nodes, as main.py imports them

    return dirs


def our_config(params: dict):
    """The mesh-ray FluxConfig of a ComfyUI Flux parameter dict."""
    from mesh_ray.models.flux import FluxConfig

    p = params
    return FluxConfig(arch="flux1", in_channels=p["in_channels"] * p["patch_size"] ** 2,
                      vec_in_dim=p["vec_in_dim"], context_in_dim=p["context_in_dim"], hidden_size=p["hidden_size"],
                      num_heads=p["num_heads"], mlp_ratio=p["mlp_ratio"], depth=p["depth"],
                      depth_single_blocks=p["depth_single_blocks"], axes_dim=p["axes_dim"], theta=p["theta"],
                      qkv_bias=p["qkv_bias"], guidance_embed=p["guidance_embed"])


def flux_state_dict(params: dict, seed: int = 0) -> dict:
    """Seeded random weights in the BFL/ComfyUI key layout for a FLUX.1 model of ``params``."""
    import torch

    from mesh_ray.models.flux import random_state_dict

    return random_state_dict(our_config(params), seed, torch.float32)


def flux1_extra_params() -> dict:
    """Parameters this ComfyUI's Flux class needs for FLUX.1 beyond 0.3.64's (0.20 added
    ``txt_ids_dims``, empty for FLUX.1 as its checkpoint detection sets it)."""
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    fields = {f.name for f in dataclasses.fields(FluxParams)}
    return {"txt_ids_dims": []} if "txt_ids_dims" in fields else {}


def flux_patcher(params: dict, seed: int = 0, sd: dict | None = None, dtype: Any = None) -> Any:
    """A ComfyUI MODEL (ModelPatcher) of a FLUX.1 with ``params``, built through ComfyUI's own classes."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    cfg = comfy.supported_models.Flux({"image_model": "flux", **flux1_extra_params(), **params})
    cfg.set_inference_dtype(dtype or torch.float32, None)
    model = cfg.get_model({}, "")
    sd = dict(sd if sd is not None else flux_state_dict(params, seed))
    n_keys = len(sd)
    model.load_model_weights({f"diffusion_model.{k}": v for k, v in sd.items()}, "diffusion_model.")
    own = model.diffusion_model.state_dict()
    if len(own) != n_keys:
        raise AssertionError(f"ComfyUI's Flux has {len(own)} tensors, the weights {n_keys}")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())
