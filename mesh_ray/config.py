"""Public knobs as pydantic models: from keyword arguments, MESH_RAY_* environment variables or a YAML/JSON file.

Precedence: keyword arguments > environment > file > defaults.  A bad value is one line naming
the field and the fix.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from mesh_ray.codec import CodecSpec
from mesh_ray.errors import ConfigError, validation_line
from mesh_ray.memory import OffloadSpec

M = TypeVar("M", bound=BaseModel)
ENV_PREFIX = "MESH_RAY_"
_BASE: ContextVar[dict] = ContextVar("mesh_ray_settings_base", default={})


def validate(cls: type[M], data: Any) -> M:
    """``cls.model_validate(data)`` with a one-line ConfigError instead of pydantic's report."""
    if isinstance(data, cls):
        return data
    try:
        return cls.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(validation_line(e, cls.__name__, cls.model_fields)) from None


def read_settings_file(file: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON settings file as a mapping of option: value."""
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
    return loaded


class _Env(EnvSettingsSource):
    """MESH_RAY_* variables; a structured field takes JSON or a bare word (``MESH_RAY_CODEC=quant8``)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


class _Base(PydanticBaseSettingsSource):
    """The lowest layer: the file or object the caller passed (set per call)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _BASE.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_BASE.get())


@lru_cache(maxsize=None)
def _layered(cls: type[BaseModel]) -> type[BaseSettings]:
    """``cls`` as pydantic-settings: keywords > ``MESH_RAY_<FIELD>`` variables > file/object > defaults."""

    def sources(_cls: type, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, **_: Any) -> tuple:
        return init_settings, _Env(settings_cls), _Base(settings_cls)

    config = SettingsConfigDict(**cls.model_config, env_prefix=ENV_PREFIX, case_sensitive=False)
    return type(cls.__name__, (BaseSettings, cls), {"model_config": config,
                                                     "settings_customise_sources": classmethod(sources)})


def load_settings(cls: type[M], source: str | os.PathLike | dict | BaseModel | None = None, **kwargs: Any) -> M:
    """Build ``cls`` from keywords (None = not given) over ``MESH_RAY_*`` variables over ``source``
    (a YAML/JSON file, a dict or a ``cls`` object: only its explicitly set fields count)."""
    if isinstance(source, (str, os.PathLike)):
        base = read_settings_file(source)
    elif isinstance(source, BaseModel):
        base = source.model_dump(exclude_unset=True)
    elif isinstance(source, dict) or source is None:
        base = dict(source or {})
    else:
        raise ConfigError(f"options must be a {cls.__name__}, a dict or a YAML/JSON file path, not "
                          f"{type(source).__name__}")
    token = _BASE.set(base)
    try:
        merged = _layered(cls)(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(validation_line(e, cls.__name__, cls.model_fields)) from None
    except SettingsError as e:
        raise ConfigError(f"a {ENV_PREFIX}* variable for {cls.__name__} is not valid ({e}): fix or unset it") from None
    finally:
        _BASE.reset(token)
    return validate(cls, merged.model_dump(exclude_unset=True))


class StageSpec(BaseModel):
    """One stage of a split: a block range and where it runs.

    Fields: blocks (str, required) e.g. ``double:0-9`` / ``single:0-23`` / ``double:10-single:5``;
    local (bool, False) runs the range in the calling process; num_gpus (float | None, None = 1 when
    the cluster has GPUs else 0; fractional allowed); num_cpus (float, 1); node (str | None) pins
    the stage to a node IP or node id; checkpoint_path (str | None) where the worker finds the file
    if not at the driver's path; torch_threads (int | None); dtype ("float32" | "bfloat16" |
    "float16" | None, None = SplitOptions.dtype, else decided by the stage from its own device).
    """

    model_config = ConfigDict(extra="forbid")

    blocks: str
    local: bool = False
    num_gpus: float | None = Field(default=None, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    node: str | None = None
    checkpoint_path: str | None = None
    torch_threads: int | None = Field(default=None, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class SplitOptions(BaseModel):
    """How a split runs.

    Fields: dtype ("float32" | "bfloat16" | "float16" | None, None): None lets every process decide
    from its own device (bf16 on CUDA, fp32 on CPU): each stage for itself, the caller for its front;
    a link carries the narrower of its two ends' dtypes;
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
    max_restarts (int, 2): times Ray starts a dead stage actor again (it reloads its shard);
    max_step_retries (int, 2): times a step whose stage died is sent again after the stage is back
    (see docs/faults.md).
    front ("caller" | "stage" | "auto", "auto"): where the embedders and the final layer run:
    in the calling process, or on the first and last stages (the caller then holds no weights;
    every block range must be on a stage); "auto" = the plan's choice with ``plan=``, else caller.
    transport ("auto" | "object" | "gloo" | "nccl" | "cuda_ipc", "auto"; env MESH_RAY_TRANSPORT):
    how activations move between stages: "auto" chooses per link from where its two ends run
    (CUDA IPC for stages on one GPU, NCCL between GPUs, gloo between CPU stages on different nodes
    when it measured faster, else the object store); "object" always the object store; a direct
    transport forces it on every link between stages (one-line error at start where it cannot
    work).  The caller's own links use CUDA IPC where it sees the stage's GPU, else the object
    store (see docs/transport.md).  ``split.links`` shows each link's choice and why.
    transfer_timeout_s (float, 60): how long one direct transfer may take before it fails and the
    step is recovered (a gloo op times out at 0.8 of it); keep it below step_timeout_s.
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
    max_restarts: int = Field(default=2, ge=0)
    max_step_retries: int = Field(default=2, ge=0)
    front: Literal["caller", "stage", "auto"] = "auto"
    transport: Literal["auto", "object", "gloo", "nccl", "cuda_ipc"] = "auto"
    transfer_timeout_s: float = Field(default=60.0, gt=0)

    @field_validator("codec", mode="before")
    @classmethod
    def _codec(cls, v: Any) -> Any:
        return {"mode": v} if isinstance(v, str) else v


class VaeOptions(BaseModel):
    """How a ``VaeService`` runs its decoder pool (``mesh.vae(ckpt, **options)``).

    Fields: replicas (int, 1): decoder actors; num_gpus (float | None, None = 1 when the cluster
    has GPUs else 0); num_cpus (float, 1) per actor; idle_timeout_s (float | None, None = never):
    an actor exits after this long without work and starts again on the next request; output_dir
    (str, "outputs/vae"): where forget-mode PNGs go, on the actor's node; torch_threads (int |
    None); dtype ("auto" | "float32" | "bfloat16" | "float16", "auto": decided by each actor from
    its device); timeout_s (float, 600): default wait for results; max_retries (int, 2): times a
    request is sent again when its decoder actor dies before answering; ship ("auto" | "always" |
    "never", "auto"): send the decoder weights (once per node, cached by content hash) to a replica
    whose node cannot read the checkpoint, to every replica, or fail instead; cache_dir (str | None):
    where shipped weights are cached on the replicas' nodes (default MESH_RAY_CACHE_DIR or
    ~/.cache/mesh-ray/shards).
    """

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(default=1, ge=1)
    num_gpus: float | None = Field(default=None, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    idle_timeout_s: float | None = Field(default=None, gt=0)
    output_dir: Path = Path("outputs/vae")
    torch_threads: int | None = Field(default=None, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    timeout_s: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=2, ge=0)
    ship: Literal["auto", "always", "never"] = "auto"
    cache_dir: str | None = None


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
