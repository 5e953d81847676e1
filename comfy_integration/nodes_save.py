"""MeshSavePromisedImage and MeshSavePromisedVideo: save a decode from Mesh VAE Decode when it is ready.

Both return at once (the queue moves on while the decode runs), write from a background thread
when the decode finishes (``mesh_ray.vae.promise.defer``), with ComfyUI's prompt/workflow
metadata, named as ComfyUI's own Save Image / Save Video name files, and then send ComfyUI's
``executed`` event so the page shows the result on the node.  A failed decode writes nothing and
is logged.  The video node writes through ComfyUI's own video writer (``video_files.write_video``:
``comfy_api``'s ``VideoFromComponents``, as Save Video does), with the LTX audio when there is one.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

from mesh_ray.errors import ConfigError, MeshError
from mesh_ray.vae.promise import SaveHandle, defer

from .node_spec import mesh_node
from .promised import PromisedImages, comfy_metadata, send_executed
from .registry import prompt_server
from .video_files import VIDEO_SUFFIX, write_video

log = logging.getLogger("mesh_ray.comfy")

_lock = threading.Lock()
_reserved: dict[tuple[str, str], int] = {}  # (folder, name) -> last counter handed out, not yet written


def _target(prefix: str, p: PromisedImages, count: int, suffix: str) -> tuple[str, str]:
    """(path of the first file, subfolder) named as ComfyUI's savers name files; counters stay reserved
    until written, so two saves that are still pending never get the same name."""
    import folder_paths

    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), p.width, p.height)
    name = name.replace("%batch_num%", "0")
    with _lock:
        counter = max(counter, _reserved.get((folder, name), 0) + 1)
        _reserved[(folder, name)] = counter + count - 1
    return os.path.join(folder, f"{name}_{counter:05}_{suffix}"), subfolder


def _when_written(handle: SaveHandle, node: str, unique_id: str | None, subfolder: str,
                  output: Callable[[list[dict]], dict]) -> None:
    """Log the written files (or the error) and send ``executed`` with ``output(files)`` to the page."""
    instance = prompt_server()
    client_id = getattr(instance, "client_id", None)
    prompt_id = getattr(instance, "last_prompt_id", None)

    def done(h: SaveHandle) -> None:
        try:
            written = h.result(0)
        except MeshError as e:
            log.error("%s (node %s): %s", node, unique_id, e)
            return
        log.info("%s wrote %s", node, ", ".join(str(p) for p in written))
        files = [{"filename": os.path.basename(p), "subfolder": subfolder, "type": "output"} for p in written]
        send_executed(unique_id, prompt_id, client_id, output(files))

    handle.add_done_callback(done)


def _no_promise(node: str) -> ConfigError:
    return ConfigError(f"{node} got no promise: Mesh VAE Decode in forget mode saves by itself; use mode promise or "
                       f"wait to save here")


def _inputs(prefix: str, how: str, required: dict | None = None, optional: dict | None = None) -> dict:
    """A save node's inputs: the promise, a file name prefix (default ``prefix``), then its own."""
    return {"required": {"promise": ("PROMISE", {"tooltip": "The pending decode from Mesh VAE Decode (promise or "
                                                            "wait mode)."}),
                         "filename_prefix": ("STRING", {"default": prefix, "tooltip": "File name prefix inside "
                                                        f"ComfyUI's output folder, {how}."}),
                         **(required or {})},
            **({"optional": optional} if optional else {}),
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}}


@mesh_node("save", "Writes the PNG (with the workflow metadata) when the decode finishes, without holding up the "
           "queue; the image appears on this node once written.", output_node=True)
class MeshSavePromisedImage:
    """Save a promised decode as PNG when it is ready; returns at once."""

    INPUTS = _inputs("mesh_ray", "with sub-folders and %date% style variables as in Save Image")

    def save(self, promise: PromisedImages | None, filename_prefix: str = "mesh_ray", prompt: Any = None,
             extra_pnginfo: Any = None, unique_id: str | None = None) -> dict:
        if promise is None:
            raise _no_promise("Mesh Save Promised Image")
        path, subfolder = _target(filename_prefix, promise, promise.batch, ".png")
        handle = promise.promise.save(path, comfy_metadata(prompt, extra_pnginfo))
        _when_written(handle, "Mesh Save Promised Image", unique_id, subfolder, lambda files: {"images": files})
        self.last_handle = handle  # for callers in Python (tests, scripts) that want to wait on it
        return {"ui": {"text": [f"writing {os.path.basename(path)} when the decode finishes"]}}


@mesh_node("save", "Writes the frames (and the LTX audio, when Mesh VAE Decode had an audio VAE or the audio input "
           "is connected) as an MP4 through ComfyUI's own video writer when the decode finishes, without holding up "
           "the queue; the video appears on this node once written. Needs ComfyUI's comfy_api video types "
           "(verified on ComfyUI 0.20.1).", output_node=True)
class MeshSavePromisedVideo:
    """Save a promised decode (video frames, or an image batch as frames) as a video when it is ready."""

    INPUTS = _inputs("video/mesh_ray", "as in Save Video", required={
        "fps": ("FLOAT", {"default": 24.0, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip":
                "Frames per second (the frame rate the video was sampled for; LTX: 24 or 25)."})}, optional={
        "audio": ("AUDIO", {"tooltip": "Audio to put in the video instead of the promise's own LTX audio."})})

    def save(self, promise: PromisedImages | None, filename_prefix: str = "video/mesh_ray", fps: float = 24.0,
             audio: dict | None = None, prompt: Any = None, extra_pnginfo: Any = None,
             unique_id: str | None = None) -> dict:
        if promise is None:
            raise _no_promise("Mesh Save Promised Video")
        if fps <= 0:
            raise ConfigError(f"Mesh Save Promised Video: fps {fps:g} must be above 0: use the video's frame rate")
        path, subfolder = _target(filename_prefix, promise, 1, VIDEO_SUFFIX)
        metadata = comfy_metadata(prompt, extra_pnginfo)
        p = promise.promise

        def write() -> list:
            frames = p.result()
            sound = audio if audio is not None else promise.audio_dict(p.timeout_s)
            return [write_video(frames, path, float(fps), sound, metadata)]

        handle = defer(write, f"video save of {p.label} to {path}", p.timeout_s)
        _when_written(handle, "Mesh Save Promised Video", unique_id, subfolder,
                      lambda files: {"images": files, "animated": [True]})
        self.last_handle = handle
        return {"ui": {"text": [f"writing {os.path.basename(path)} when the decode finishes"]}}


NODE_CLASS_MAPPINGS = {"MeshSavePromisedImage": MeshSavePromisedImage, "MeshSavePromisedVideo": MeshSavePromisedVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshSavePromisedImage": "Mesh Save Promised Image",
                              "MeshSavePromisedVideo": "Mesh Save Promised Video"}
