"""The files a ComfyUI prompt names, on both ends of the queue: no path of one machine needs to exist
on the other.

* Frontend: ``collect`` finds the prompt's string inputs that are model files of this ComfyUI (sent
  by name and content digest; the bytes only to workers that lack them) and input files
  (``LoadImage`` and the like: their bytes travel with the prompt).  ``free_name`` picks the name
  an output file gets in this ComfyUI's output folder (ComfyUI's next counter when taken).
* Worker: ``place_inputs`` writes the input files under ``input/mesh-ray/<digest>/`` and points the
  prompt there; ``ModelShelf`` resolves model names in the worker's own folders, else in its node's
  cache by digest, else receives the bytes once and caches them there; ``output_items`` lists the
  files a node's UI output names.

ComfyUI's ``folder_paths`` is imported inside the functions only.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from mesh_ray.digest import file_digest
from mesh_ray.errors import ConfigError
from mesh_ray.workflow.comfy_jobs import safe_relpath

CHUNK_BYTES = 64 << 20  # model bytes per object in the store
INPUT_SUBDIR = "mesh-ray"  # under a worker's input folder
NOT_MODELS = ("custom_nodes", "configs")
_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> digest: each file hashed once
_digest_lock = threading.Lock()


def digest_of(path: str) -> str:
    """The content digest of a file (``mesh_ray.digest.file_digest``), computed once per file version."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        if key in _digests:
            return _digests[key]
    d = file_digest(path)
    with _digest_lock:
        _digests[key] = d
    return d


# -- frontend -----------------------------------------------------------------------------------------

def collect(prompt: dict) -> tuple[dict[str, bytes], list[dict], dict[str, str]]:
    """(input files: name -> bytes, models: [{folder, name, digest, size}], model paths: digest -> path)
    of the prompt's string inputs that name files of this ComfyUI."""
    import folder_paths

    inputs: dict[str, bytes] = {}
    models: dict[tuple[str, str], dict] = {}
    paths: dict[str, str] = {}
    folders = [f for f in folder_paths.folder_names_and_paths if f not in NOT_MODELS]
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values():
            if not isinstance(value, str) or not value or len(value) > 1024 or "\n" in value:
                continue
            hit = None
            for folder in folders:
                try:
                    p = folder_paths.get_full_path(folder, value)
                except Exception:  # noqa: BLE001 - a folder a custom node registered oddly
                    p = None
                if p and os.path.isfile(p):
                    hit = (folder, p)
                    break
            if hit is not None:
                folder, p = hit
                d = digest_of(p)
                models[(folder, value)] = {"folder": folder, "name": value, "digest": d, "size": os.path.getsize(p)}
                paths[d] = p
            elif value not in inputs and folder_paths.exists_annotated_filepath(value):
                p = folder_paths.get_annotated_filepath(value)
                if os.path.isfile(p):
                    inputs[value] = Path(p).read_bytes()
    return inputs, list(models.values()), paths


def read_chunks(path: str) -> Iterator[bytes]:
    """A model file in pieces of ``CHUNK_BYTES`` (each becomes one object in the store)."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


_COUNTED = re.compile(r"^(.*)_(\d{5,})_(\.[^.]+)$")


def free_name(base: str, subfolder: str, filename: str) -> str:
    """The name a file from a worker gets in the folder ``base/subfolder`` here: its own when free; for
    ComfyUI's ``prefix_00012_.png`` the next counter of that prefix here; else a ``_k`` suffix."""
    import folder_paths

    d = os.path.join(base, subfolder)
    os.makedirs(d, exist_ok=True)
    if not os.path.exists(os.path.join(d, filename)):
        return filename
    m = _COUNTED.match(filename)
    if m:
        stem, _, ext = m.groups()
        _, _, counter, _, _ = folder_paths.get_save_image_path(os.path.join(subfolder, stem), base)
        while os.path.exists(os.path.join(d, name := f"{stem}_{counter:05}_{ext}")):
            counter += 1
        return name
    stem, ext = os.path.splitext(filename)
    k = 1
    while os.path.exists(os.path.join(d, f"{stem}_{k}{ext}")):
        k += 1
    return f"{stem}_{k}{ext}"


def write_atomic(path: str, data: bytes) -> None:
    """Write a file so that no reader sees it half written."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".mesh-ray-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- worker -------------------------------------------------------------------------------------------

def place_inputs(prompt: dict, inputs: dict[str, bytes], client: str) -> dict:
    """Write the prompt's input files into this ComfyUI's input folder (by content, so equal files keep
    equal names and ComfyUI's cache keys) and point the prompt's values at them."""
    import folder_paths

    if not inputs:
        return prompt
    where = {}
    for name, data in inputs.items():
        base = safe_relpath(name.split(" [")[0], "input file").rsplit("/", 1)[-1]
        sub = f"{INPUT_SUBDIR}/{client_dir(client)}/{hashlib.blake2b(data, digest_size=8).hexdigest()}"
        path = os.path.join(folder_paths.get_input_directory(), sub, base)
        if not os.path.isfile(path):
            write_atomic(path, data)
        where[name] = f"{sub}/{base}"
    for node in prompt.values():
        for k, v in (node.get("inputs") or {}).items():
            if isinstance(v, str) and v in where:
                node["inputs"][k] = where[v]
    return prompt


def client_dir(client: str) -> str:
    """A client's folder name among the input files (its id, hashed: ids hold any characters)."""
    return hashlib.blake2b(client.encode(), digest_size=6).hexdigest()


class ModelShelf:
    """Model files on a worker: its own folders first, then its node's cache by digest, then bytes
    received once from the sender and kept in that cache (shared by the node's workers)."""

    def __init__(self, cache_dir: str, shipped_dir: str) -> None:
        self.cache, self.shipped = Path(cache_dir), Path(shipped_dir)
        self.received_bytes = 0
        self._folders: set[str] = set()

    def has(self, digest: str) -> bool:
        return (self.cache / digest).is_file()

    def cached(self, digests: list[str]) -> list[str]:
        return [d for d in digests if self.has(d)]

    def ensure(self, model: dict, chunks: list | None, get: Any) -> int:
        """Make ``model`` resolvable by name here; returns the bytes received for it (0 when it was here).
        ``get(ref)`` fetches one chunk from the object store."""
        import folder_paths

        folder, name, digest = model["folder"], safe_relpath(model["name"], "model"), model["digest"]
        try:
            if folder_paths.get_full_path(folder, name):
                return 0  # the worker's own file of that name
        except Exception:  # noqa: BLE001 - a folder this ComfyUI does not know yet
            pass
        received = 0
        if not self.has(digest):
            if not chunks:
                raise ConfigError(f"model {folder}/{name} is neither in this worker's folders nor in its node's "
                                  f"cache, and the frontend did not send it: queue the prompt again")
            received = self._receive(digest, chunks, get, f"{folder}/{name}")
        link = self.shipped / folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_file() or os.path.realpath(link) != str((self.cache / digest).resolve()):
            tmp = link.with_name(f".{link.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.cache / digest)
            os.replace(tmp, link)
        if folder not in self._folders:
            folder_paths.add_model_folder_path(folder, str(self.shipped / folder))
            self._folders.add(folder)
        folder_paths.filename_list_cache.pop(folder, None)
        return received

    def _receive(self, digest: str, chunks: list, get: Any, what: str) -> int:
        self.cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache, prefix=f".{digest}.")
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for ref in chunks:
                    data = get(ref)
                    f.write(data)
                    size += len(data)
            if file_digest(tmp) != digest:
                raise ConfigError(f"model {what} arrived with other contents than its digest {digest[:12]}: "
                                  f"queue the prompt again")
            os.replace(tmp, self.cache / digest)  # atomic: another worker of the node may write it too
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.received_bytes += size
        return size


def output_items(ui: Any) -> Iterator[dict]:
    """The output and temp files a node's UI output names: {key, type, subfolder, filename, path}."""
    import folder_paths

    if not isinstance(ui, dict):
        return
    for key, items in ui.items():
        if not isinstance(items, list):
            continue
        for it in items:
            if not (isinstance(it, dict) and it.get("filename") and it.get("type") in ("output", "temp")):
                continue
            sub = str(it.get("subfolder") or "")
            rel = safe_relpath(f"{sub}/{it['filename']}" if sub else str(it["filename"]), "output file")
            yield {"key": key, "type": it["type"], "subfolder": sub, "filename": str(it["filename"]),
                   "path": os.path.join(folder_paths.get_directory_by_type(it["type"]), rel)}


def prune(folder: str, keep: int) -> int:
    """Delete all but the ``keep`` newest files under ``folder`` (a worker's output and temp folders);
    returns how many went."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    if len(files) <= keep:
        return 0
    files.sort(key=lambda p: p.stat().st_mtime_ns)
    for p in files[:-keep] if keep else files:
        p.unlink(missing_ok=True)
    return len(files) - keep


__all__ = ["CHUNK_BYTES", "ModelShelf", "client_dir", "collect", "digest_of", "free_name", "output_items",
           "place_inputs", "prune", "read_chunks", "write_atomic"]
