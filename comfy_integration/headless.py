"""ComfyUI's prompt executor without its server, in a process that is not ComfyUI's ``main.py``
(a ComfyUI worker actor).

What ``main.py`` sets up for its executor is done here by hand: ComfyUI's arguments are set, never
parsed (a Ray worker's ``sys.argv`` is Ray's); ComfyUI's ``utils`` package is imported before
``nodes`` (nodes.py puts ``comfy/`` first on ``sys.path``, after which ``utils`` would be
``comfy/utils.py``); ``PromptServer.instance`` is a small stand-in with what the executor and some
nodes use; the progress hook of main.py's ``hijack_progress`` gives progress events, previews and
the interrupt check between sampler steps; comfy_extras and the custom nodes are loaded.  Call
``ComfySource.activate()`` first (comfy_env.py), so that ``import comfy`` is the right ComfyUI.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

OnEvent = Callable[[str, Any], None]
FOLDERS = ("input", "output", "temp", "user")


class HeadlessServer:
    """What ComfyUI's executor, its progress handler and some nodes read from ``PromptServer.instance``."""

    def __init__(self) -> None:
        from aiohttp import web
        from app.node_replace_manager import NodeReplaceManager

        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.node_replace_manager = NodeReplaceManager()
        self.routes = web.RouteTableDef()  # custom nodes add routes at import; never served here
        self.supports = ["custom_nodes_from_web"]
        self.on_event: OnEvent = lambda event, data: None

    def send_sync(self, event: Any, data: Any, sid: Any = None) -> None:
        self.on_event(event, data)

    def queue_updated(self) -> None:
        pass

    def send_progress_text(self, text: Any, node_id: Any, sid: Any = None) -> None:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        self.on_event("progress_text", {"node": str(node_id), "text": text})


@dataclass
class Booted:
    server: HeadlessServer
    dirs: dict[str, str]
    node_types: list[str]
    failed_imports: list[str]


_booted: Booted | None = None
_boot_lock = threading.Lock()


def boot(base_dir: str, custom_nodes: tuple[str, ...] = (), model_roots: tuple[str, ...] = ()) -> Booted:
    """Import and set up ComfyUI in this process once, with input/output/temp/user under ``base_dir``,
    the custom node folders ``custom_nodes`` and the models under each of ``model_roots`` (ComfyUI
    ``models`` folders) besides ``base_dir/models``."""
    global _booted
    with _boot_lock:
        if _booted is not None:
            return _booted
        from comfy.cli_args import args

        args.base_directory = base_dir
        args.disable_all_custom_nodes = False
        import utils.extra_config  # noqa: F401 - before nodes (see the module docstring)
        import folder_paths

        dirs = {name: os.path.join(base_dir, name) for name in FOLDERS}
        for d in (*dirs.values(), os.path.join(base_dir, "custom_nodes"), os.path.join(base_dir, "models")):
            os.makedirs(d, exist_ok=True)
        folder_paths.set_output_directory(dirs["output"])
        folder_paths.set_input_directory(dirs["input"])
        folder_paths.set_temp_directory(dirs["temp"])
        folder_paths.set_user_directory(dirs["user"])
        for d in custom_nodes:
            folder_paths.add_model_folder_path("custom_nodes", os.path.abspath(d))
        for root in model_roots:
            for folder in list(folder_paths.folder_names_and_paths):
                if folder != "custom_nodes" and os.path.isdir(os.path.join(root, folder)):
                    folder_paths.add_model_folder_path(folder, os.path.join(os.path.abspath(root), folder))

        import comfy.model_management
        import comfy.utils
        import execution  # noqa: F401
        import nodes
        import server
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        srv = HeadlessServer()
        server.PromptServer.instance = srv
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))

        def hook(value, total, preview_image, prompt_id=None, node_id=None):  # main.py's hijack_progress
            ctx = get_executing_context()
            prompt_id = prompt_id or (ctx.prompt_id if ctx is not None else None) or srv.last_prompt_id
            node_id = node_id or (ctx.node_id if ctx is not None else None) or srv.last_node_id
            comfy.model_management.throw_exception_if_processing_interrupted()
            get_progress_state().update_progress(node_id, value, total, preview_image)
            srv.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id})

        comfy.utils.set_progress_bar_global_hook(hook)
        _booted = Booted(srv, dirs, sorted(nodes.NODE_CLASS_MAPPINGS), [str(f) for f in failed or []])
        return _booted


def encode_preview(preview: Any) -> tuple[bytes, dict]:
    """ComfyUI's preview ``((format, PIL image, max size), metadata)`` as image bytes and metadata."""
    (fmt, image, max_size), meta = preview
    if max_size is not None:
        from PIL import ImageOps

        image = ImageOps.contain(image, (max_size, max_size))
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=95, compress_level=1)
    return buf.getvalue(), {**(meta or {}), "image_type": "image/png" if fmt == "PNG" else "image/jpeg"}


class Runner:
    """One ComfyUI ``PromptExecutor`` (its node cache lives across prompts), one prompt at a time."""

    def __init__(self) -> None:
        import execution

        if _booted is None:
            raise RuntimeError("headless.boot() first")
        self.server = _booted.server
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0.0})
        self.lock = threading.Lock()

    def run(self, prompt: dict, prompt_id: str, client_id: str, extra_data: dict, outputs: list[str] | None,
            on_event: OnEvent) -> dict:
        """Validate and execute one API-format prompt (the caller holds ``lock``), sending every event
        to ``on_event``; returns ``status`` (success | error | interrupted | invalid), ``history``,
        ``messages`` and, when invalid, ``error`` (one line) and ``node_errors``."""
        import execution
        from protocol import BinaryEventTypes

        valid, err, good, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            return {"status": "invalid", "error": invalid_line(err, node_errors), "node_errors": node_errors,
                    "history": {}, "messages": []}

        def sink(event: Any, data: Any) -> None:
            if event == BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA:
                image, meta = encode_preview(data)
                event, data = "preview", {"image": image, "meta": meta}
            elif event == BinaryEventTypes.UNENCODED_PREVIEW_IMAGE:
                image, meta = encode_preview((data, {}))
                event, data = "preview", {"image": image, "meta": meta}
            elif not isinstance(event, str):
                return  # other binary events (text) are not relayed
            on_event(event, data)

        self.server.on_event = sink
        self.server.last_prompt_id = prompt_id
        self.server.sockets_metadata = {client_id: {"feature_flags": {"supports_preview_metadata": True}}}
        try:
            self.executor.execute(prompt, prompt_id, {**extra_data, "client_id": client_id}, outputs or good)
        finally:
            self.server.on_event = lambda event, data: None
        messages = list(self.executor.status_messages)
        kinds = [m[0] for m in messages]
        status = ("success" if self.executor.success and "execution_success" in kinds
                  else "interrupted" if "execution_interrupted" in kinds else "error")
        error = next((f"{d.get('node_type')} (node {d.get('node_id')}): {d.get('exception_type')}: "
                      f"{d.get('exception_message')}" for k, d in messages if k == "execution_error"), None)
        return {"status": status, "history": getattr(self.executor, "history_result", {}), "messages": messages,
                "error": " ".join(str(error).split())[:500] if error else None}


def invalid_line(err: dict | None, node_errors: dict) -> str:
    """ComfyUI's validation answer as one line: the first node error, or the prompt error."""
    for nid, ne in (node_errors or {}).items():
        for e in ne.get("errors", []):
            return " ".join(f"prompt failed validation: node {nid} ({ne.get('class_type')}): {e.get('message')}: "
                            f"{e.get('details')}".split())[:500]
    err = err or {}
    return " ".join(f"prompt failed validation: {err.get('message')}: {err.get('details')}".split())[:500]


def interrupt() -> None:
    """Stop the running prompt at its next node or sampler step (it ends with execution_interrupted)."""
    import comfy.model_management

    comfy.model_management.interrupt_current_processing(True)


__all__ = ["Booted", "HeadlessServer", "Runner", "boot", "encode_preview", "interrupt", "invalid_line"]
