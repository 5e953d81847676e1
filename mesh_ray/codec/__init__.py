"""Tensor <-> bytes for the wire: raw, quant8 (+ entropy), hevc (nvenc | x265); see docs/codec.md."""

from mesh_ray.codec.api import decode, decode_sections, encode, encode_sections
from mesh_ray.codec.errors import CodecError
from mesh_ray.codec.header import FORMAT_VERSION
from mesh_ray.codec.metrics import TransferMetrics, decode_with_metrics, encode_with_metrics, error_stats, measure
from mesh_ray.codec.probe import BackendStatus, choose_spec, probe_backends
from mesh_ray.codec.spec import CodecSpec

__all__ = ["FORMAT_VERSION", "BackendStatus", "CodecError", "CodecSpec", "TransferMetrics", "choose_spec",
           "decode", "decode_sections", "decode_with_metrics", "encode", "encode_sections", "encode_with_metrics",
           "error_stats", "measure", "probe_backends"]
