"""Which backends this machine can use, each with the reason, and the per-link choice of codec."""

from __future__ import annotations

from dataclasses import dataclass

from mesh_ray.codec import entropy, nvenc, x265
from mesh_ray.codec.spec import CodecSpec


@dataclass(frozen=True)
class BackendStatus:
    """One backend: usable here or not, and why (shown by ``mesh-ray doctor``)."""

    name: str
    usable: bool
    reason: str


def probe_backends() -> list[BackendStatus]:
    """Every codec backend with usable/not and the reason; never raises."""
    rows = [BackendStatus("raw", True, "always available (exact bytes)"),
            BackendStatus("zstd", True, "zstandard on the CPU (quant8 entropy stage)")]
    for name, fn in (("nvcomp", entropy.nvcomp_status), ("nvenc", nvenc.encoder_status),
                     ("nvdec", nvenc.decoder_status), ("x265", x265.status)):
        try:
            usable, reason = fn()
        except Exception as exc:  # a broken driver must not break doctor
            usable, reason = False, f"probe failed ({type(exc).__name__}: {exc})"
        rows.append(BackendStatus(name, usable, reason))
    return rows


def hevc_backend(asked: str) -> str:
    """Concrete HEVC encoder for ``backend``: auto -> nvenc when an encoder is present, else x265."""
    if asked == "auto":
        return "nvenc" if nvenc.encoder_status()[0] else "x265"
    return asked


def choose_spec(spec: "CodecSpec | dict | str | None", same_node: bool) -> CodecSpec:
    """Resolve ``auto`` for one link: raw on the same node; across nodes hevc/nvenc if an encoder
    is present, hevc/x265 if ``backend='x265'`` was asked, otherwise quant8 (+ entropy)."""
    spec = CodecSpec.parse(spec)
    if spec.mode == "hevc":
        return spec.model_copy(update={"backend": hevc_backend(spec.backend)})
    if spec.mode != "auto":
        return spec
    if same_node:
        return spec.model_copy(update={"mode": "raw", "lossless": False})
    if spec.lossless:
        return spec.model_copy(update={"mode": "quant8"})
    if spec.backend == "x265":
        return spec.model_copy(update={"mode": "hevc"})
    if spec.backend in ("auto", "nvenc") and nvenc.encoder_status()[0]:
        return spec.model_copy(update={"mode": "hevc", "backend": "nvenc"})
    return spec.model_copy(update={"mode": "quant8"})
