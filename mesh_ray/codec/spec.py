"""CodecSpec: the one validated description of how a tensor is coded for the wire."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mesh_ray.codec.errors import CodecError
from mesh_ray.errors import validation_line

Mode = Literal["raw", "quant8", "hevc", "auto"]
Backend = Literal["auto", "nvenc", "x265"]
Entropy = Literal["auto", "zstd", "nvcomp", "none"]


class CodecSpec(BaseModel):
    """How to code one tensor.

    Fields (type, default):
      mode (``raw | quant8 | hevc | auto``, ``auto``): auto is resolved per link by ``choose_spec``.
      qp (int 0..51, 18): HEVC constant quantisation parameter (lower = closer, bigger).
      tile_dim (int | None, None): channel tiles per plane side in HEVC frames; None picks one.
      lossless (bool, False): quant8 only: code the original bits, decode is byte-exact.
      clip_percentile (float | None, None): e.g. 99.99: per-channel range from these percentiles;
          values outside are sent exactly in a sparse side list.
      backend (``auto | nvenc | x265``, ``auto``): HEVC encoder.
      entropy (``auto | zstd | nvcomp | none``, ``auto``): entropy stage after quant8.
      debug_metrics (bool, False): also measure cosine and max abs error per transfer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "auto"
    qp: int = Field(18, ge=0, le=51)
    tile_dim: int | None = Field(None, ge=1, le=256)
    lossless: bool = False
    clip_percentile: float | None = Field(None, gt=50.0, lt=100.0)
    backend: Backend = "auto"
    entropy: Entropy = "auto"
    debug_metrics: bool = False

    @model_validator(mode="after")
    def _check(self) -> "CodecSpec":
        if self.lossless and self.mode not in ("quant8", "auto"):
            raise ValueError(f"lossless=True is byte-exact only in quant8 mode, not {self.mode}: "
                             "use mode='quant8' (or 'raw')")
        return self

    @classmethod
    def parse(cls, spec: "CodecSpec | dict[str, Any] | str | None") -> "CodecSpec":
        """A CodecSpec from a spec, a dict such as {"mode": "hevc", "qp": 18}, a mode name or None."""
        if isinstance(spec, CodecSpec):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, str):
            spec = {"mode": spec}
        if not isinstance(spec, dict):
            raise CodecError(f"codec spec must be a CodecSpec, dict or mode name, got {type(spec).__name__}: "
                             "pass e.g. {'mode': 'quant8'}")
        try:
            return cls(**spec)
        except ValidationError as exc:
            raise CodecError(f"bad codec spec {spec!r}: {validation_line(exc, 'CodecSpec', cls.model_fields, 'field')}") from None
