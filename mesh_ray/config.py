"""Public knobs as pydantic models: from keyword arguments, MESH_RAY_* environment variables or a YAML/JSON file.

Precedence: keyword arguments > environment > file > defaults.  A bad value is one line naming
the field and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mesh_ray.codec import CodecSpec
from mesh_ray.errors import ConfigError
from mesh_ray.memory import OffloadSpec

M = TypeVar("M", bound=BaseModel)
ENV_PREFIX = "MESH_RAY_"


def _one_line(cls: type[BaseModel], err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or cls.__name__
    if first["type"] == "extra_forbidden":
        known = ", ".join(cls.model_fields)
        return ConfigError(f"unknown option {where!r} for {cls.__name__}: use one of {known}")
    return ConfigError(f"invalid {cls.__name__} option {where!r}: {first['msg']} (got {first.get('input')!r}); fix the value")


def validate(cls: type[M], data: Any) -> M:
    """``cls.model_validate(data)`` with a one-line ConfigError instead of pydantic's report."""
    if isinstance(data, cls):
        return data
    try:
        return cls.model_validate(data or {})
    except ValidationError as e:
        raise _one_line(cls, e) from None


def load_settings(cls: type[M], file: str | os.PathLike | None = None, env_prefix: str = ENV_PREFIX, **kwargs: Any) -> M:
    """Build ``cls`` from a YAML/JSON file, then ``{env_prefix}{FIELD}`` variables, then kwargs."""
    data: dict[str, Any] = {}
    if file is not None:
        p = Path(file)
        if not p.is_file():
            raise ConfigError(f"settings file {p} not found: check the path")
        try:
            loaded = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"settings file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'} "
                              f"({str(e).splitlines()[0]}): fix its syntax") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"settings file {p} must hold a mapping of option: value")
        data.update(loaded)
    for name in cls.model_fields:
        raw = os.environ.get(env_prefix + name.upper())
        if raw is not None:
            try:
                data[name] = json.loads(raw)
            except json.JSONDecodeError:
                data[name] = raw
    data.update({k: v for k, v in kwargs.items() if v is not None})
    return validate(cls, data)


class StageSpec(BaseModel):
    """One stage of a split: a block range and where it runs.

    Fields: blocks (str, required) e.g. ``double:0-9`` / ``single:0-23`` / ``double:10-single:5``;
    local (bool, False) runs the range in the calling process; num_gpus (float | None, None = 1 when
    the cluster has GPUs else 0; fractional allowed); num_cpus (float, 1); node (str | None) pins
    the stage to a node IP or node id; checkpoint_path (str | None) where the worker finds the file
    if not at the driver's path; torch_threads (int | None).
    """

    model_config = ConfigDict(extra="forbid")

    blocks: str
    local: bool = False
    num_gpus: float | None = Field(default=None, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    node: str | None = None
    checkpoint_path: str | None = None
    torch_threads: int | None = Field(default=None, ge=1)


class SplitOptions(BaseModel):
    """How a split runs.

    Fields: dtype ("float32" | "bfloat16" | "float16", "float32" on CPU else "bfloat16" when None);
    placement ("none" | "pack" | "spread" | "strict_spread", "none"): placement group strategy for
    the stages; micro_batches (int, 1): a batch is cut into this many pieces that overlap across
    stages; ship ("auto" | "always" | "never", "auto"): send the shard through the object store
    when a worker cannot read the checkpoint; cache_dir (str | None): node-local shard cache
    (default ~/.cache/mesh-ray/shards); start_timeout_s (float, 120); step_timeout_s (float, 600);
    torch_threads (int | None): threads per stage actor (None: on CPU the caller's own count, so
    the split is bit-exact with the local forward; on GPU Ray's default).
    codec (CodecSpec | dict | str, "auto"): how activations are coded on each link, e.g. "raw",
    "quant8", {"mode": "hevc", "qp": 18}; "auto" = raw between processes of one node, hevc/nvenc
    across nodes when an encoder exists, else quant8 (see docs/codec.md). Both directions of a
    link use the caller's spec.
    offload (OffloadSpec | dict | None, None): stream each stage's block weights from host memory
    a window at a time (see docs/offload.md).
    """

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    placement: Literal["none", "pack", "spread", "strict_spread"] = "none"
    micro_batches: int = Field(default=1, ge=1)
    ship: Literal["auto", "always", "never"] = "auto"
    cache_dir: str | None = None
    start_timeout_s: float = Field(default=120.0, gt=0)
    step_timeout_s: float = Field(default=600.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1)
    codec: CodecSpec = CodecSpec(mode="auto")
    offload: OffloadSpec | None = None

    @field_validator("codec", mode="before")
    @classmethod
    def _codec(cls, v: Any) -> Any:
        return {"mode": v} if isinstance(v, str) else v


class ConnectOptions(BaseModel):
    """How ``mesh_ray.connect`` reaches Ray.

    Fields: address (str | None): None = embedded local Ray (or RAY_ADDRESS when set), "auto" = the
    running cluster on this machine, "host:port" or "ray://host:port"; num_cpus / num_gpus (embedded
    only, default: this machine's); namespace (str, "mesh-ray"); timeout_s (float, 30).
    """

    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    namespace: str = "mesh-ray"
    timeout_s: float = Field(default=30.0, gt=0)
