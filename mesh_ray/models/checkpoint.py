"""FLUX checkpoints on disk: inspect the safetensors header, slim-load block shards, write files.

Safetensors only.  ``inspect`` reads nothing but the header; ``load_blocks`` reads only the
tensors of the blocks asked for, so a stage's memory follows its shard, not the checkpoint.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from pydantic import BaseModel

from mesh_ray.errors import CheckpointError
from mesh_ray.models.blocks import KINDS, BlockRange, global_index, parse_range
from mesh_ray.models.flux import PRESETS, FluxConfig, default_axes_dim, preset, random_state_dict
from mesh_ray.models.safetensors_io import load_tensors, read_header, tensor_bytes, write_atomic

PREFIXES = ("model.diffusion_model.",)
CONFIG_METADATA_KEY = "mesh_ray.config"
_BLOCK_KEY = re.compile(rf"^({'|'.join(KINDS)})_blocks\.(\d+)\.")  # the shard unit's state-dict keys


class CheckpointInfo(BaseModel):
    """What the header of a FLUX checkpoint says (no tensor data read)."""

    path: str
    arch: str
    preset: str | None
    config: FluxConfig
    prefix: str
    dtype: str
    file_bytes: int
    num_double: int
    num_single: int
    block_bytes: list[int]
    non_block_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.block_bytes) + self.non_block_bytes

    def range(self, text: str, where: str = "block range") -> BlockRange:
        return parse_range(text, self.num_double, self.num_single, where)

    def summary(self) -> dict:
        """JSON-ready dict for ``mesh-ray inspect --json``."""
        return {"path": self.path, "arch": self.arch, "preset": self.preset, "prefix": self.prefix,
                "dtype": self.dtype, "file_bytes": self.file_bytes, "double_blocks": self.num_double,
                "single_blocks": self.num_single, "bytes_per_double_block": self.block_bytes[0] if self.num_double else 0,
                "bytes_per_single_block": self.block_bytes[-1] if self.num_single else 0,
                "non_block_bytes": self.non_block_bytes, "config": self.config.model_dump()}


def _strip_prefix(keys: Iterable[str]) -> str:
    """The ComfyUI-style prefix the block keys carry, or ''."""
    keys = list(keys)
    return next((pre for pre in PREFIXES if any(k.startswith(pre) for k in keys)), "")


def _infer_config(shapes: dict[str, tuple], meta: dict, path: str) -> FluxConfig:
    def need(key: str) -> tuple:
        if key not in shapes:
            raise CheckpointError(f"{path} is not a FLUX transformer checkpoint (missing {key}; "
                                  f"keys look like {', '.join(sorted(shapes)[:3]) or 'nothing'}): pass a FLUX.1 or FLUX.2 "
                                  f"diffusion-model file in BFL/ComfyUI layout")
        return shapes[key]

    if CONFIG_METADATA_KEY in meta:
        try:
            return FluxConfig.model_validate_json(meta[CONFIG_METADATA_KEY])
        except Exception as e:
            raise CheckpointError(f"{path} has an invalid {CONFIG_METADATA_KEY} metadata entry ({e}): re-export it") from None
    hidden, in_ch = need("img_in.weight")
    ctx = need("txt_in.weight")[1]
    arch = "flux2" if "double_stream_modulation_img.lin.weight" in shapes else "flux1"
    depth = len({int(m.group(2)) for k in shapes if (m := _BLOCK_KEY.match(k)) and m.group(1) == "double"})
    single = len({int(m.group(2)) for k in shapes if (m := _BLOCK_KEY.match(k)) and m.group(1) == "single"})
    if depth + single == 0:
        need("double_blocks.0.img_attn.qkv.weight")
    if depth:
        head_dim = need("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        mlp_hidden = need("double_blocks.0.img_mlp.2.weight")[1]
    else:
        head_dim = need("single_blocks.0.norm.query_norm.scale")[0]
        mlp_hidden = need("single_blocks.0.linear2.weight")[1] - hidden
    try:
        return FluxConfig(
            arch=arch, in_channels=in_ch, context_in_dim=ctx, hidden_size=hidden, num_heads=hidden // head_dim,
            vec_in_dim=need("vector_in.in_layer.weight")[1] if arch == "flux1" else None,
            mlp_ratio=mlp_hidden / hidden, depth=depth, depth_single_blocks=single,
            axes_dim=default_axes_dim(arch, head_dim), theta=10000 if arch == "flux1" else 2000,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes or "single_blocks.0.linear1.bias" in shapes
            if arch == "flux1" else False,
            guidance_embed="guidance_in.in_layer.weight" in shapes)
    except ValueError as e:
        raise CheckpointError(f"{path}: the tensor shapes do not form a FLUX model ({e}): the file is not a "
                              f"supported FLUX checkpoint") from None


def inspect(path: str | os.PathLike) -> CheckpointInfo:
    """Read only the safetensors header: architecture, preset or inferred config, sizes."""
    entries, meta = read_header(path)
    prefix = _strip_prefix(entries)
    entries = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)} if prefix else entries
    cfg = _infer_config({k: v[1] for k, v in entries.items()}, meta, str(path))
    name = next((n for n, c in PRESETS.items() if c == cfg), None)
    block_bytes = [0] * cfg.num_blocks
    non_block = 0
    dtypes: Counter = Counter()
    for k, (dt, shape) in entries.items():
        nbytes = tensor_bytes(dt, shape)
        dtypes[dt] += nbytes
        m = _BLOCK_KEY.match(k)
        if m:
            i = global_index(m.group(1), int(m.group(2)), cfg.depth)
            if i >= cfg.num_blocks:
                raise CheckpointError(f"{path}: block key {k} is beyond the {cfg.num_blocks} blocks its config "
                                      f"declares: the file is inconsistent; re-export it")
            block_bytes[i] += nbytes
        else:
            non_block += nbytes
    return CheckpointInfo(path=str(path), arch=cfg.arch, preset=name, config=cfg, prefix=prefix,
                          dtype=dtypes.most_common(1)[0][0].lower() if dtypes else "none",
                          file_bytes=os.path.getsize(path), num_double=cfg.depth,
                          num_single=cfg.depth_single_blocks, block_bytes=block_bytes, non_block_bytes=non_block)


def load_blocks(path: str | os.PathLike, ranges: Iterable[BlockRange | str] = (), *, non_block: bool = False,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                info: CheckpointInfo | None = None) -> dict[str, torch.Tensor]:
    """Slim-load the tensors of the given block ranges (and the non-block tensors if asked).

    Keys come back without the ``model.diffusion_model.`` prefix.  Only the requested tensors are
    read from the file.
    """
    info = info or inspect(path)
    parsed = [info.range(r) if isinstance(r, str) else r for r in ranges]
    prefixes = tuple(p for r in parsed for p in r.keys_prefixes())

    def select(full: str) -> str | None:
        if not full.startswith(info.prefix):
            return None
        key = full[len(info.prefix):]
        is_block = _BLOCK_KEY.match(key) is not None
        return key if (is_block and key.startswith(prefixes)) or (non_block and not is_block) else None

    return load_tensors(path, select, dtype=dtype, device=device)


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                    config: FluxConfig | None = None, prefix: str = "") -> Path:
    """Write a safetensors file atomically (temp name, then rename): a crash leaves no half file."""
    meta = {CONFIG_METADATA_KEY: config.model_dump_json()} if config is not None else None
    return write_atomic({prefix + k: v for k, v in state_dict.items()}, path, meta)


def write_random_checkpoint(path: str | os.PathLike, config: FluxConfig | str, seed: int = 0,
                            dtype: torch.dtype = torch.float32, prefix: str = "",
                            embed_config: bool | None = None) -> Path:
    """A FLUX-architecture checkpoint with seeded random weights, as a real safetensors file.

    The config is embedded in the file's metadata unless it is a released preset (those are
    recognised from the tensor shapes, as real checkpoints are).
    """
    cfg = preset(config) if isinstance(config, str) else config
    if embed_config is None:
        embed_config = not any(cfg == c for n, c in PRESETS.items() if not n.startswith("tiny"))
    return save_checkpoint(random_state_dict(cfg, seed, dtype), path, cfg if embed_config else None, prefix)


def shard_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of a shard (names, dtypes, shapes and bytes): the cache key on worker nodes."""
    from mesh_ray.digest import tensor_digest

    return tensor_digest((k, state_dict[k]) for k in sorted(state_dict))
