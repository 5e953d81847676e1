"""Small models of every architecture the split runs, built through ComfyUI's own classes, with
seeded random weights, and their sampler inputs: for tests and ``mesh-ray bench comfy``.

``CONFIGS`` holds each architecture's ``comfy.supported_models`` class and a small ``unet_config``
(the layouts of the released models at tiny widths; LTX in its 2.3 form: gated attention, prompt
AdaLN, caption projection before the connector).  ``FILE_CONFIGS`` are the ones ComfyUI's own
checkpoint detection reproduces from a file's keys (for ``UNETLoader``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CONFIGS: dict[str, tuple[str, dict]] = {
    "flux1": ("Flux", dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=32,
                           context_in_dim=48, hidden_size=128, mlp_ratio=4.0, num_heads=4, depth=2,
                           depth_single_blocks=4, axes_dim=[4, 14, 14], theta=10000, qkv_bias=True,
                           guidance_embed=True)),
    "flux2": ("Flux2", dict(image_model="flux2", in_channels=128, out_channels=128, hidden_size=64, num_heads=2, depth=2,
                            depth_single_blocks=3, axes_dim=[8, 8, 8, 8], theta=2000, mlp_ratio=3.0, context_in_dim=32,
                            global_modulation=True, mlp_silu_act=True, qkv_bias=False, ops_bias=False, patch_size=1,
                            txt_ids_dims=[3], guidance_embed=True, vec_in_dim=None)),
    "ltxav": ("LTXAV", dict(image_model="ltxav", num_layers=4, attention_head_dim=8, num_attention_heads=2,
                            cross_attention_dim=16, audio_attention_head_dim=8, audio_num_attention_heads=2,
                            audio_cross_attention_dim=16, caption_channels=32, in_channels=128, audio_in_channels=128,
                            connector_attention_head_dim=8, connector_num_attention_heads=2, connector_num_layers=1,
                            apply_gated_attention=True, cross_attention_adaln=True, caption_proj_before_connector=True)),
    "wan": ("WAN21_T2V", dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=64,
                              ffn_dim=128, freq_dim=256, text_dim=32, out_dim=16, num_heads=2, num_layers=4,
                              window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)),
    "wan_i2v": ("WAN21_I2V", dict(image_model="wan2.1", model_type="i2v", patch_size=(1, 2, 2), in_dim=36, dim=64,
                                  ffn_dim=128, freq_dim=256, text_dim=32, out_dim=16, num_heads=2, num_layers=4,
                                  window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)),
    "qwen": ("QwenImage", dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=4,
                               attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                               axes_dims_rope=(8, 12, 12))),
}
CONTEXT = {"flux1": 48, "flux2": 32, "ltxav": 32, "wan": 32, "wan_i2v": 32, "qwen": 32}


def unet_config(arch: str, **overrides: Any) -> tuple[str, dict]:
    """(config class, unet_config) of ``arch``, adjusted to this ComfyUI (0.20's FLUX.1 needs ``txt_ids_dims``)."""
    import dataclasses

    cls, cfg = CONFIGS[arch]
    cfg = {**cfg, **overrides}
    if arch == "flux1":
        from comfy.ldm.flux.model import FluxParams

        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
            cfg.setdefault("txt_ids_dims", [])
    return cls, cfg


def random_weights(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Seeded random fp32 weights for every entry of ``module.state_dict()`` (norm scales around 1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            sd[k] = v.clone()
            continue
        r = torch.randn(v.shape, generator=g) * scale
        sd[k] = r + 1.0 if ("norm" in k and k.endswith(".weight")) or k.endswith(".scale") else r
    return sd


def tiny_patcher(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> Any:
    """A ComfyUI MODEL (ModelPatcher) of ``arch`` built through ComfyUI's own classes, random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cls, cfg = unet_config(arch, **overrides)
    config = getattr(comfy.supported_models, cls)(cfg)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "")
    sd = random_weights(model.diffusion_model, seed)
    model.load_model_weights({k: v.to(dtype) for k, v in sd.items()}, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def write_tiny(arch: str, path: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0, prefix: str = "",
               quant: str | None = None, **overrides: Any) -> Path:
    """A safetensors file of ``arch`` (``FILE_CONFIGS``) as a user has it, for ``UNETLoader``.  ``quant``:
    the blocks' linear weights as ``"fp8"`` (float8_e4m3fn), or ComfyUI's ``"scaled_fp8"`` files
    (float8 weights, a ``.scale_weight`` per layer and the ``scaled_fp8`` marker); the rest in ``dtype``."""
    import comfy.supported_models
    from safetensors.torch import save_file

    cls, cfg = FILE_CONFIGS[arch]
    model = getattr(comfy.supported_models, cls)({**cfg, **overrides}).get_model({}, "", device=torch.device("meta"))
    dm = model.diffusion_model
    linear = {f"{n}.weight" for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in n}
    sd = random_weights(dm.to_empty(device="cpu"), seed)
    out = {}
    for k, v in sd.items():
        if quant and k in linear:
            scale = (v.abs().amax() / 448.0).clamp(min=1e-12) if quant == "scaled_fp8" else torch.tensor(1.0)
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            if quant == "scaled_fp8":
                out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(()).float()
        else:
            out[k] = v.to(dtype)
    if quant == "scaled_fp8":
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file({prefix + k: v.contiguous() for k, v in out.items()}, str(path))
    return Path(path)


# What model_detection derives from the file write_tiny writes (hidden size from the file; FLUX.2 fixes
# the head size at 128, so two heads of 128).
FILE_CONFIGS: dict[str, tuple[str, dict]] = {
    "flux2": ("Flux2", dict(image_model="flux2", in_channels=128, out_channels=128, hidden_size=256, num_heads=2,
                            depth=2, depth_single_blocks=2, axes_dim=[32, 32, 32, 32], theta=2000, mlp_ratio=3.0,
                            context_in_dim=32, global_modulation=True, mlp_silu_act=True, qkv_bias=False,
                            ops_bias=False, patch_size=1, txt_ids_dims=[3], guidance_embed=True, vec_in_dim=None,
                            default_ref_method="index", ref_index_scale=10.0, yak_mlp=False, txt_norm=False)),
}


def write_lora(model: Any, path: str, remote_prefixes: tuple[str, ...], seed: int = 5, rank: int = 4) -> dict:
    """A LoRA file over every 2-D weight of the blocks: lora (ComfyUI layout ``diffusion_model.X.lora_up``,
    and kohya ``lora_unet_X`` on the first block list's first block), loha on one remote layer, lokr on another."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.08

    sd, kinds = {}, {}
    weights = [(k, v.shape) for k, v in model.model.state_dict().items()
               if k.startswith("diffusion_model.") and "blocks." in k and k.endswith(".weight") and v.ndim == 2]
    remote = [k for k, _ in weights if k[len("diffusion_model."):].startswith(remote_prefixes)]
    loha, lokr = remote[0], next(k for k, s in weights if k in remote[1:] and s[0] % 4 == 0 and s[1] % 4 == 0)
    first_block = weights[0][0].split(".")[:3]
    for k, (out_f, in_f) in weights:
        name = k[: -len(".weight")]
        if k == loha:
            sd[f"{name}.hada_w1_a"], sd[f"{name}.hada_w1_b"] = rnd(out_f, rank), rnd(rank, in_f)
            sd[f"{name}.hada_w2_a"], sd[f"{name}.hada_w2_b"] = rnd(out_f, rank), rnd(rank, in_f)
            sd[f"{name}.alpha"] = torch.tensor(2.0)
            kinds[k] = "loha"
        elif k == lokr:
            sd[f"{name}.lokr_w1"] = rnd(4, 4) * 5
            sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"] = rnd(out_f // 4, rank), rnd(rank, in_f // 4)
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
            kinds[k] = "lokr"
        else:
            kohya = k.split(".")[:3] == first_block
            base = "lora_unet_" + name[len("diffusion_model."):].replace(".", "_") if kohya else name
            up, down = ("lora_up", "lora_down")
            sd[f"{base}.{up}.weight"], sd[f"{base}.{down}.weight"] = rnd(out_f, rank), rnd(rank, in_f)
            sd[f"{base}.alpha"] = torch.tensor(float(rank) / 2)
            kinds[k] = "kohya" if kohya else "lora"
    save_file(sd, path)
    return {"layers": len(weights), "kinds": sorted(set(kinds.values()))}


def inputs(arch: str, seed: int = 1, size: int = 16, batch: int = 1) -> tuple[list, list, dict]:
    """(positive, negative, latent) for ``arch`` as the text encoders and empty-latent nodes give them."""
    g = torch.Generator().manual_seed(seed)
    ctx = CONTEXT[arch]
    conds = []
    for _ in range(2):
        extra: dict[str, Any] = {}
        if arch == "flux1":
            extra = {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}
        elif arch == "flux2":
            extra = {"guidance": 3.5}
        elif arch == "wan_i2v":
            import types

            extra = {"clip_vision_output": types.SimpleNamespace(
                penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g))}
        conds.append([[torch.randn(1, 8, ctx, generator=g), extra]])
    if arch == "ltxav":
        import comfy.nested_tensor  # 0.20 (LTX 2.x); 0.3.64 has none

        latent = comfy.nested_tensor.NestedTensor((torch.zeros(batch, 128, 2, 4, 4), torch.zeros(batch, 8, 10, 16)))
    elif arch in ("wan", "wan_i2v"):
        latent = torch.zeros(batch, 16, 3, size // 2, size // 2)
    elif arch == "qwen":
        latent = torch.zeros(batch, 16, 1, size, size)
    elif arch == "flux2":  # 128 channels at /16: patch size 1
        latent = torch.zeros(batch, 128, size // 2, size // 2)
    else:
        latent = torch.zeros(batch, 16, size, size)
    return conds[0], conds[1], {"samples": latent}


def sample(model: Any, arch: str, seed: int = 3, steps: int = 2, cfg: float = 3.0, size: int = 16) -> Any:
    """The latent from ComfyUI's real KSampler path (``nodes.common_ksampler``), euler/simple."""
    import nodes

    pos, neg, latent = inputs(arch, size=size)
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)
    return out["samples"]


def max_diff(a: Any, b: Any) -> float:
    """Max |a - b| over a latent or a nested (video, audio) latent."""
    if getattr(a, "is_nested", False):
        return max(max_diff(x, y) for x, y in zip(a.unbind(), b.unbind()))
    return float((a.float() - b.float()).abs().max())


__all__ = ["CONFIGS", "FILE_CONFIGS", "inputs", "max_diff", "random_weights", "sample", "tiny_patcher", "unet_config",
           "write_lora", "write_tiny"]
