"""A ComfyUI prompt as the dispatcher queues it, and what a ComfyUI worker sends back while running it.

A frontend (the user's ComfyUI with mesh-ray's nodes) or any API client sends a payload dict:

    {"prompt": {node id: {"class_type": str, "inputs": {...}}},    # ComfyUI's API format
     "prompt_id": str, "extra_data": {...}, "outputs": [node ids],  # as ComfyUI's POST /prompt has them
     "inputs": {name: bytes},                                        # input files the prompt names (LoadImage ...)
     "models": [{"folder", "name", "digest", "size"}],               # model files the sender has
     "chunks": {digest: [ObjectRef, ...]},                           # their bytes, for workers that lack them
     "comfy": {"version": str, "digest": str}}                       # the sender's ComfyUI (comfy_env.ComfySource)

``ComfyJob.from_payload`` checks its shape (one-line ``ConfigError``); ComfyUI itself validates the
prompt on the frontend and again on the worker.  A worker's stream is a sequence of items: ``event``
(a ComfyUI websocket event), ``file`` (an output file's name; the next item is its bytes, which the
dispatcher keeps as an object ref for the frontend to fetch) and one ``done``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mesh_ray.errors import ConfigError

# Items of a worker's stream (``kind``), and the run events the dispatcher makes of them (``type``).
ITEM_EVENT, ITEM_FILE, ITEM_DONE = "event", "file", "done"
EV_COMFY, EV_FILE, EV_DONE = "comfy", "comfy_file", "comfy_done"

_DIGEST = re.compile(r"^[0-9a-f]{16,128}$")


def safe_relpath(name: str, what: str) -> str:
    """``name`` as a relative path inside a folder (no absolute path, no ``..``), or a one-line ConfigError."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"{what} {name!r} is not a plain relative file name: name files inside ComfyUI's folders")
    return "/".join(parts)


@dataclass(frozen=True)
class ModelFile:
    """A model file of the sender: a worker that lacks ``folder/name`` gets it by ``digest``."""

    folder: str
    name: str
    digest: str
    size: int


@dataclass
class ComfyJob:
    """One ComfyUI prompt to run on a worker."""

    prompt: dict
    prompt_id: str
    client: str
    extra_data: dict = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    inputs: dict[str, bytes] = field(default_factory=dict)
    models: list[ModelFile] = field(default_factory=list)
    chunks: dict[str, list] = field(default_factory=dict)
    comfy: dict = field(default_factory=dict)

    @classmethod
    def from_payload(cls, payload: Any, client: str) -> "ComfyJob":
        """The job of a submitted payload (see the module docstring), checked in one line."""
        if not isinstance(payload, dict):
            raise ConfigError("a ComfyUI job is a dict with a 'prompt' in ComfyUI's API format: queue it through "
                              "the frontend's /mesh/queue route or Workflows.submit_comfy")
        prompt = payload.get("prompt")
        if not isinstance(prompt, dict) or not prompt:
            raise ConfigError("the ComfyUI job has no prompt: send ComfyUI's API format "
                              "({node id: {'class_type': ..., 'inputs': {...}}}, 'Export (API)' in ComfyUI)")
        for nid, node in prompt.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                    or not isinstance(node.get("inputs", {}), dict):
                raise ConfigError(f"prompt node {nid!r} is not in ComfyUI's API format: each node needs a "
                                  f"'class_type' string and an 'inputs' dict ('Export (API)' in ComfyUI)")
        inputs = payload.get("inputs") or {}
        if not isinstance(inputs, dict) or not all(isinstance(k, str) and isinstance(v, (bytes, bytearray))
                                                   for k, v in inputs.items()):
            raise ConfigError("the job's 'inputs' must map input file names to their bytes")
        models = []
        for m in payload.get("models") or []:
            try:
                mf = ModelFile(str(m["folder"]), safe_relpath(str(m["name"]), "model"), str(m["digest"]), int(m["size"]))
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"model entry {m!r} needs folder, name, digest and size") from None
            if not _DIGEST.match(mf.digest) or not re.match(r"^[A-Za-z0-9_.-]+$", mf.folder):
                raise ConfigError(f"model entry {m!r} has a bad folder or digest: send what the frontend computed")
            models.append(mf)
        chunks = payload.get("chunks") or {}
        if not isinstance(chunks, dict) or not all(isinstance(v, list) for v in chunks.values()):
            raise ConfigError("the job's 'chunks' must map a model digest to a list of object refs")
        for name in inputs:
            safe_relpath(name.split(" [")[0], "input file")
        return cls(prompt=prompt, prompt_id=str(payload.get("prompt_id") or ""), client=client,
                   extra_data=dict(payload.get("extra_data") or {}), outputs=[str(o) for o in payload.get("outputs") or []],
                   inputs={k: bytes(v) for k, v in inputs.items()}, models=models, chunks=chunks,
                   comfy=dict(payload.get("comfy") or {}))

    def class_types(self) -> set[str]:
        return {node["class_type"] for node in self.prompt.values()}

    def digests(self) -> set[str]:
        return {m.digest for m in self.models}

    def for_worker(self) -> dict:
        """What the worker's ``run`` takes (plain data; the chunk refs stay refs)."""
        return {"prompt": self.prompt, "prompt_id": self.prompt_id, "client": self.client,
                "extra_data": self.extra_data, "outputs": self.outputs, "inputs": self.inputs,
                "models": [vars(m) for m in self.models], "chunks": self.chunks}


__all__ = ["ComfyJob", "EV_COMFY", "EV_DONE", "EV_FILE", "ITEM_DONE", "ITEM_EVENT", "ITEM_FILE", "ModelFile",
           "safe_relpath"]
