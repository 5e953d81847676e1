"""Issue 9's GPU check: a FLUX.1-dev-size model in the real ComfyUI, one step unsplit vs split.

``python -m comfy_integration.gpu_check --comfy PATH --out DIR [--remote N] [--small --cpu]``:
ComfyUI (imported here, the only place that may) builds FLUX.1-dev (random bf16 weights) through
its own classes; one sampler step (``comfy.sample.sample``, euler, cfg 1) at 1024x1024 runs
unsplit, then through ``MeshSplitFlux`` with the last ``--remote`` blocks on a stage actor in
another process on the same GPU.  Reports ms per step and the ComfyUI process's peak VRAM for
both, the bytes ComfyUI's model management loaded, and the largest difference of the latents.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

FLUX1_DEV = dict(in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                 axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True)
SMALL = dict(FLUX1_DEV, vec_in_dim=32, context_in_dim=48, hidden_size=128, num_heads=4, depth=2,
             depth_single_blocks=4, axes_dim=[4, 14, 14])


def _our_config(p: dict):
    from mesh_ray.models.flux import FluxConfig

    return FluxConfig(arch="flux1", in_channels=p["in_channels"] * p["patch_size"] ** 2, vec_in_dim=p["vec_in_dim"],
                      context_in_dim=p["context_in_dim"], hidden_size=p["hidden_size"], num_heads=p["num_heads"],
                      mlp_ratio=p["mlp_ratio"], depth=p["depth"], depth_single_blocks=p["depth_single_blocks"],
                      axes_dim=p["axes_dim"], theta=p["theta"], qkv_bias=p["qkv_bias"],
                      guidance_embed=p["guidance_embed"])


def run(comfy_path: str, out: Path, remote: int, small: bool, cpu: bool, latent_side: int) -> dict:
    sys.path[:0] = [comfy_path, str(Path(__file__).resolve().parents[1])]
    sys.argv = ["main.py", *(["--cpu"] if cpu else [])]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    import folder_paths

    work = Path(tempfile.mkdtemp(prefix="mesh-gpu-comfy-"))
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_temp_directory(str(work / "temp"))
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    import torch

    from comfy_integration.nodes_mesh import MeshConnect, MeshSplitFlux
    from mesh_ray.models.flux import random_state_dict

    params = SMALL if small else FLUX1_DEV
    dev = mm.get_torch_device()
    dtype = torch.float32 if cpu or os.environ.get("MESH_GPU_FP32") else torch.bfloat16
    cfg = comfy.supported_models.Flux({"image_model": "flux", **params})
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, "")
    sd = random_state_dict(_our_config(params), seed=0, dtype=dtype, device=dev)
    model.load_model_weights({f"diffusion_model.{k}": v.cpu() for k, v in sd.items()}, "diffusion_model.")
    del sd
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=mm.unet_offload_device())
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 512 if not small else 8, params["context_in_dim"], generator=g),
            {"pooled_output": torch.randn(1, params["vec_in_dim"], generator=g), "guidance": 3.5}]]
    neg = [[torch.zeros_like(pos[0][0]), {"pooled_output": torch.zeros_like(pos[0][1]["pooled_output"]), "guidance": 3.5}]]
    latent = torch.zeros(1, 16, latent_side, latent_side)
    noise = comfy.sample.prepare_noise(latent, 3)
    cuda = dev.type == "cuda"

    def step(m) -> tuple[float, int, torch.Tensor]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        x = comfy.sample.sample(m, noise, 1, 1.0, "euler", "simple", pos, neg, latent, disable_pbar=True, seed=3)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000, torch.cuda.max_memory_allocated() if cuda else 0, x

    res: dict = {"model": "FLUX.1-dev size" if not small else "small FLUX.1", "dtype": str(dtype),
                 "image": f"{latent_side * 8}x{latent_side * 8}", "device": str(dev),
                 "weight_bytes": sum(p.numel() * p.element_size() for p in model.diffusion_model.parameters())}
    step(patcher)  # loads the model to the GPU (ComfyUI's model management) and warms up
    res["unsplit_ms"], res["unsplit_peak_vram_bytes"], ref = step(patcher)
    res["unsplit_loaded_bytes"] = patcher.loaded_size()
    mm.unload_all_models()
    mm.soft_empty_cache()
    mesh = MeshConnect().connect("")[0]
    split_model = MeshSplitFlux().split(patcher, mesh, n_blocks_remote=remote, codec_mode="raw")[0]
    t0 = time.perf_counter()
    step(split_model)  # builds the stage (shard written, loaded by the actor), then warms up
    res["split_first_step_s"] = time.perf_counter() - t0
    res["split_ms"], res["split_peak_vram_bytes"], got = step(split_model)
    res["split_loaded_bytes"] = split_model.loaded_size()
    res["n_blocks_remote"] = remote
    res["ratio_split_over_unsplit"] = res["split_ms"] / res["unsplit_ms"]
    res["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
    res["peak_vram_saved_bytes"] = res["unsplit_peak_vram_bytes"] - res["split_peak_vram_bytes"]
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfy", required=True, help="ComfyUI source tree")
    ap.add_argument("--out", default="out/gpu")
    ap.add_argument("--remote", type=int, default=38, help="blocks on the stage (38: every single block)")
    ap.add_argument("--latent", type=int, default=128, help="latent side (128: 1024x1024)")
    ap.add_argument("--small", action="store_true", help="a small FLUX.1 (dry run)")
    ap.add_argument("--cpu", action="store_true", help="ComfyUI on the CPU (dry run)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args.comfy, out, args.remote, args.small, args.cpu, args.latent)
    (out / "gpu_comfy_check.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
