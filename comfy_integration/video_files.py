"""Video files written by ComfyUI's own writer, as its ``SaveVideo`` node writes them.

``write_video`` builds ``comfy_api``'s ``VideoFromComponents`` (frames, optional audio, frame rate,
as ``CreateVideo`` does) and calls its ``save_to`` with ComfyUI's defaults (container and codec
``auto``: MP4 / H.264, AAC audio; PyAV underneath), into a temporary name that is renamed into
place, so a killed writer never leaves a half file.  Used by ``Mesh Save Promised Video`` in the
ComfyUI process and by decoder actors in forget mode (where the actor's ComfyUI has ``comfy_api``:
the ComfyUI folder itself or ``MESH_RAY_COMFYUI_PATH``, not the shipped ``comfy`` package).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Mapping

import torch

from mesh_ray.errors import ConfigError

VIDEO_SUFFIX = ".mp4"  # what ComfyUI's VideoContainer "auto" writes


def _writer() -> Any:
    try:
        from comfy_api.latest import InputImpl, Types
    except ImportError as e:
        raise ConfigError(f"this process cannot import ComfyUI's video writer (comfy_api: {e}): run it where the "
                          f"whole ComfyUI folder is (not only the shipped comfy package), or save with Mesh Save "
                          f"Promised Video in the ComfyUI process") from None
    return InputImpl, Types


def write_video(frames: torch.Tensor, path: str | os.PathLike, fps: float, audio: Mapping[str, Any] | None = None,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``frames`` ``[N, H, W, 3]`` 0..1 (and ``audio`` ``{"waveform": [B, C, T], "sample_rate"}``) to
    ``path`` through ComfyUI's ``VideoFromComponents.save_to``; atomic.  ``metadata``: ComfyUI's
    prompt/workflow, stored as the container's tags (JSON), as SaveVideo stores them."""
    from fractions import Fraction

    if frames.ndim != 4 or frames.shape[0] < 1:
        raise ConfigError(f"video frames have shape {tuple(frames.shape)}, expected [N, H, W, 3] with N >= 1: "
                          f"decode a video (or image batch) latent first")
    if fps <= 0:
        raise ConfigError(f"fps {fps:g} must be above 0: use the frame rate the model was sampled for (LTX: 24 or 25)")
    InputImpl, Types = _writer()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp{path.suffix}"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    video = InputImpl.VideoFromComponents(Types.VideoComponents(images=frames, audio=dict(audio) if audio else None,
                                                                frame_rate=Fraction(fps)))
    try:
        video.save_to(str(tmp), format=Types.VideoContainer.AUTO, codec=Types.VideoCodec.AUTO,
                      metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["VIDEO_SUFFIX", "write_video"]
