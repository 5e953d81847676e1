"""The frontend side of the ComfyUI queue: prompts of this ComfyUI run on the cluster's ComfyUI
workers, and look to its UI as if they ran here.

``QueueBridge`` (one per ComfyUI process) starts a child process (``queue_child``: the only process
of this frontend that joins Ray) and hands it each prompt with its input files and the digests of
the model files it names.  What the child relays comes back here: ComfyUI's websocket events are
sent to the browser that queued the prompt (one prompt shown at a time per browser: the UI follows
one running job, so a second prompt's events wait until the first ends), output files are written
into this ComfyUI's output (or temp) folder under the names this folder gives them, and the prompt
ends in this ComfyUI's history.  A prompt is listed as running in this ComfyUI's queue from the
moment it is queued on the mesh.

When the cluster goes away, the child exits; the bridge says so in one line (``status()``, and
``queue`` refuses new prompts with that line), keeps the prompts in flight, and once the cluster
answers again starts a new child, which picks them up or submits them again: nothing is lost
(``HOLD_S`` bounds how long a prompt waits for the cluster).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

from mesh_ray.errors import ClusterError

from . import queue_wire as wire

log = logging.getLogger("mesh_ray.comfy_queue")

ADDRESS_ENV = "MESH_RAY_ADDRESS"  # the cluster a frontend queues on (else RAY_ADDRESS, else "auto")
HOLD_ENV = "MESH_RAY_QUEUE_HOLD_S"
HOLD_S = 900.0  # how long prompts in flight wait for a cluster that went away before they fail
CONNECT_WAIT_S = 120.0  # a first prompt waits this long for the child to join the cluster
RETRY_S = (2.0, 5.0, 10.0, 20.0)  # waits between attempts to reach a cluster that went away (prompts in flight)
IDLE_RETRY_S = 30.0  # with none in flight, the status route tries again at most this often
KEEP_DONE = 200  # finished prompts remembered for the status route
REPO = str(Path(__file__).resolve().parents[1])


class QueueUnavailable(ClusterError):
    """The cluster cannot take prompts now (the message says why and what to do)."""


@dataclass
class Prompt:
    """One prompt of this frontend queued on the mesh."""

    pid: str
    sid: str | None  # the browser (websocket client id) that queued it
    key: str  # its entry in this ComfyUI's currently_running
    payload: dict
    model_paths: dict[str, str]
    preview_meta: bool
    run_id: str | None = None
    since: int = 0  # events of run_id handled so far
    files: list[str] = field(default_factory=list)  # written here by the current attempt
    names: dict[tuple, str] = field(default_factory=dict)  # (type, subfolder, worker's name) -> name here
    worker: str | None = None
    attempts: int = 0
    done: dict | None = None
    pending: list[tuple] = field(default_factory=list)  # UI messages waiting until this prompt is shown
    ended: bool = False


class QueueBridge:
    """This ComfyUI's connection to the cluster's ComfyUI queue (see the module docstring)."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or os.environ.get(ADDRESS_ENV) or os.environ.get("RAY_ADDRESS") or "auto"
        self.client_id = f"comfy:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.hold_s = float(os.environ.get(HOLD_ENV, HOLD_S))
        self.state = "idle"  # idle | starting | up | down
        self.message = "not connected yet: the first prompt queued on the mesh connects"
        self.workers: list[dict] = []
        self.inflight: dict[str, Prompt] = {}
        self.finished: OrderedDict[str, dict] = OrderedDict()
        self.children = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._conn: Any = None
        self._proc: subprocess.Popen | None = None
        self._send_lock = threading.Lock()
        self._screen: dict[str, list[Prompt]] = {}  # browser -> its prompts in queue order; the first is shown
        self._retrying = False
        self._closed = False
        self._last_try = 0.0
        self._down_since: float | None = None
        self._source: Any = None

    @property
    def server(self) -> Any:
        from server import PromptServer

        return PromptServer.instance

    # -- the child ----------------------------------------------------------------------------------

    def _spawn(self) -> None:
        """Start a child and wait for it to connect to our socket (lock held by the caller: no)."""
        folder = tempfile.mkdtemp(prefix="mesh-ray-queue-")
        path = os.path.join(folder, "s")
        key = secrets.token_bytes(32)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(CONNECT_WAIT_S)
        env = dict(os.environ)
        env[wire.SOCKET_ENV], env[wire.KEY_ENV] = path, key.hex()
        env["PYTHONPATH"] = os.pathsep.join([REPO, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        env.pop("RAY_ADDRESS", None)  # the child joins self.address, nothing else
        with open(os.path.join(folder, "child.log"), "w") as logfile:
            proc = subprocess.Popen([sys.executable, "-m", "comfy_integration.queue_child", self.address,
                                     self.client_id], env=env, stdin=subprocess.DEVNULL, stdout=logfile,
                                    stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
        try:
            sock, _ = listener.accept()
            sock.setblocking(True)  # the fd goes to Connection, which reads it blocking (EOF if the child dies)
            conn = Connection(sock.detach())
            deliver_challenge(conn, key)  # what Listener(authkey=...).accept() does
            answer_challenge(conn, key)
        except (OSError, AuthenticationError, EOFError):
            proc.kill()
            raise QueueUnavailable(f"the mesh queue's helper process did not start within {CONNECT_WAIT_S:g} s: "
                                   f"see {folder}/child.log") from None
        finally:
            listener.close()
        with self._lock:
            self._conn, self._proc = conn, proc
            self.children += 1
        threading.Thread(target=self._read, args=(conn, proc), name="mesh-queue-reader", daemon=True).start()

    def _send(self, *msg: Any) -> bool:
        with self._send_lock:
            conn = self._conn
            if conn is None:
                return False
            try:
                wire.send(conn, *msg)
                return True
            except OSError:
                return False

    def _read(self, conn: Any, proc: subprocess.Popen) -> None:
        while True:
            try:
                msg = wire.recv(conn)
            except (EOFError, OSError, ValueError):
                break
            try:
                self._handle(msg)
            except Exception:  # noqa: BLE001 - one bad message must not stop the relay
                log.exception("mesh queue: message %s", msg[0])
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
        with self._lock:
            if self._conn is conn:
                self._conn = None
                if self.state != "down":
                    self._set("down", f"the connection to the Ray cluster at {self.address} ended (helper exit code "
                                      f"{rc}): trying again; prompts in flight run once it is back")
        self._retry()

    def _set(self, state: str, message: str) -> None:
        with self._lock:
            self.state, self.message = state, " ".join(message.split())
            if state == "up":
                self._down_since = None
            elif state == "down" and self._down_since is None:
                self._down_since = time.monotonic()
            self._changed.notify_all()

    def connect(self, wait_s: float = CONNECT_WAIT_S) -> None:
        """Have a child joined to the cluster (start one if none runs); QueueUnavailable when it cannot."""
        with self._lock:
            if self._closed:
                raise QueueUnavailable("the mesh queue of this ComfyUI is closed")
            start = self.state in ("idle", "down") and self._conn is None and not self._retrying
            if start:
                self.state = "starting"
                self._last_try = time.monotonic()
        if not self._start_child(wait_s, spawn=start):
            raise QueueUnavailable(self.message if self.state == "down" else
                                   f"the Ray cluster at {self.address} did not answer within {wait_s:g} s: "
                                   f"check it with `mesh-ray status`")

    def _start_child(self, wait_s: float, spawn: bool = True) -> bool:
        """Start a child (the state is "starting"; ``spawn`` False: one is starting already) and wait
        until it is up or down; True when up.  Called without the lock."""
        if spawn:
            try:
                self._spawn()
            except QueueUnavailable as e:
                self._set("down", str(e))
        with self._lock:
            self._changed.wait_for(lambda: self.state in ("up", "down"), timeout=wait_s)
            return self.state == "up"

    def _retry(self, once: bool = False) -> None:
        """Reach the cluster again in the background: while prompts are in flight (they go to the new
        child), else one attempt (``once``, or after a child ended)."""
        with self._lock:
            if self._retrying or self._closed:
                return
            self._retrying = True
        threading.Thread(target=self._retry_loop, args=(once,), name="mesh-queue-retry", daemon=True).start()

    def _retry_loop(self, once: bool) -> None:
        attempt = 0
        try:
            while not self._closed:
                if not once:
                    time.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1
                self._expire_held()
                if self._reachable() and not self._closed:
                    with self._lock:
                        self.state = "starting"
                    if self._start_child(CONNECT_WAIT_S):
                        return
                if once or not self.inflight:
                    return
        finally:
            with self._lock:
                self._retrying = False
                self._last_try = time.monotonic()

    def close(self) -> None:
        """Stop the child and stop trying (ComfyUI exits; tests)."""
        with self._lock:
            self._closed = True
            proc, conn = self._proc, self._conn
        if conn is not None:
            conn.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)

    def _reachable(self) -> bool:
        """Whether the cluster's address answers (a TCP connect; "auto" is always tried)."""
        from mesh_ray.cluster.access import probe_tcp, split_host_port
        from mesh_ray.errors import ClusterError

        try:
            split_host_port(self.address)
        except ClusterError:
            return True  # "auto" or another form Ray resolves itself: try it
        try:
            probe_tcp(self.address, 2.0)
        except ClusterError:
            return False
        return True

    def _expire_held(self) -> None:
        """Fail the prompts in flight once the cluster has been away longer than ``hold_s``."""
        with self._lock:
            away = self._down_since is not None and time.monotonic() - self._down_since > self.hold_s
            old = list(self.inflight.values()) if away else []
        for p in old:
            self._fail(p, f"the Ray cluster at {self.address} was away for more than {self.hold_s:g} s: "
                          f"queue the prompt again once it is back")

    # -- prompts --------------------------------------------------------------------------------------

    def comfy_source(self) -> Any:
        if self._source is None:
            from .comfy_env import ComfySource

            self._source = ComfySource.here()
        return self._source

    def queue(self, pid: str, prompt: dict, extra_data: dict, outputs: list[str], sid: str | None, number: Any) -> None:
        """Queue a validated prompt on the mesh (called off the event loop: it may wait for the child)."""
        import execution

        from . import prompt_files

        self.connect()
        inputs, models, paths = prompt_files.collect(prompt)
        extra = {k: v for k, v in extra_data.items() if k not in execution.SENSITIVE_EXTRA_DATA_KEYS and k != "client_id"}
        src = self.comfy_source()
        payload = {"prompt": prompt, "prompt_id": pid, "extra_data": extra, "outputs": list(outputs),
                   "inputs": inputs, "models": models, "comfy": {"version": src.version, "digest": src.digest}}
        srv = self.server
        meta = (srv.sockets_metadata.get(sid) or {}).get("feature_flags", {}) if sid else {}
        rec = Prompt(pid, sid, f"mesh:{pid}", payload, paths, bool(meta.get("supports_preview_metadata")))
        with self._lock:
            if pid in self.inflight:
                raise QueueUnavailable(f"prompt {pid} is already queued on the mesh: give a new prompt_id")
            self.inflight[pid] = rec
            if sid is not None:
                self._screen.setdefault(sid, []).append(rec)
            q = srv.prompt_queue
            with q.mutex:
                q.currently_running[rec.key] = (number, pid, prompt, {**extra_data, "client_id": sid}, list(outputs), {})
        srv.queue_updated()
        if not self._send(wire.SUBMIT, pid, payload, paths, None):
            log.info("mesh queue: prompt %s waits for the cluster", pid)

    def interrupt(self, pid: str) -> bool:
        """Stop one of our prompts (the UI's cancel); False if it is not ours."""
        with self._lock:
            rec = self.inflight.get(pid)
        if rec is None:
            return False
        if not self._send(wire.INTERRUPT, pid):  # held while the cluster is away: it ends here
            self._fail(rec, f"prompt {pid} was interrupted while the cluster was away", interrupted=True)
        return True

    def status(self) -> dict:
        """What the status route shows; while the cluster is down, asking also tries it again now and then."""
        if self.state == "down" and not self._retrying and time.monotonic() - self._last_try > IDLE_RETRY_S:
            self._retry(once=True)
        with self._lock:
            return {"state": self.state, "message": self.message, "address": self.address, "client_id": self.client_id,
                    "workers": self.workers, "children_started": self.children,
                    "inflight": {p.pid: {"run_id": p.run_id, "worker": p.worker, "attempts": p.attempts}
                                 for p in self.inflight.values()},
                    "finished": dict(self.finished)}

    # -- what the child relays ------------------------------------------------------------------------

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == wire.READY:
            with self._lock:
                self.workers = msg[2]
                waiting = [p for p in self.inflight.values() if not p.ended]
            self._set("up", f"connected to the Ray cluster at {self.address}: {len(msg[2])} ComfyUI workers")
            for p in waiting:  # a new child: it picks up every prompt in flight
                resume = {"run_id": p.run_id, "since": p.since} if p.run_id else None
                self._send(wire.SUBMIT, p.pid, p.payload, p.model_paths, resume)
        elif kind == wire.WORKERS:
            with self._lock:
                self.workers = msg[1]
                if self.state == "up":
                    self.message = f"connected to the Ray cluster at {self.address}: {len(msg[1])} ComfyUI workers"
        elif kind == wire.DOWN:
            self._set("down", msg[1])
        elif kind == wire.ACCEPTED:
            rec = self.inflight.get(msg[1])
            if rec is not None:
                with self._lock:
                    rec.run_id = msg[2]
                    if msg[3]:
                        rec.since = 0
                        self._discard_files(rec)
        elif kind == wire.REJECTED:
            rec = self.inflight.get(msg[1])
            if rec is not None:
                self._fail(rec, msg[2])
        elif kind in (wire.EVENT, wire.FILE):
            rec = self.inflight.get(msg[1])
            if rec is None or msg[2] != rec.run_id or msg[3] < rec.since:
                return  # an older run's, or seen already (a new child read it again)
            rec.since = msg[3] + 1
            if kind == wire.FILE:
                self._file(rec, msg[4], msg[5])
            else:
                self._event(rec, msg[4])

    def _event(self, rec: Prompt, ev: dict) -> None:
        from mesh_ray.workflow.comfy_jobs import EV_COMFY, EV_DONE
        from mesh_ray.workflow.events import TERMINAL

        kind = ev["type"]
        if kind == "run_started":
            with self._lock:
                if ev.get("attempt", 1) > 1:  # the worker died: the prompt runs again from the start
                    self._discard_files(rec)
                rec.worker, rec.attempts = ev.get("worker"), ev.get("attempt", 1)
        elif kind == EV_COMFY:
            self._relay(rec, ev["event"], ev["data"])
        elif kind == EV_DONE:
            rec.done = ev
        elif kind in TERMINAL:
            self._end(rec, ev)

    def _relay(self, rec: Prompt, event: str, data: Any) -> None:
        from protocol import BinaryEventTypes

        if event == "preview":
            import io

            from PIL import Image

            fmt = "PNG" if data["meta"].get("image_type") == "image/png" else "JPEG"
            image = Image.open(io.BytesIO(data["image"]))
            image.load()
            meta = {k: v for k, v in data["meta"].items() if k != "image_type"}
            if rec.preview_meta:
                self._ui(rec, BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA, ((fmt, image, None), meta))
            else:
                self._ui(rec, BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, (fmt, image, None))
            return
        if event == "executed" and isinstance(data, dict):
            data = {**data, "output": self._rename(rec, data.get("output"))}
        self._ui(rec, event, data)

    def _file(self, rec: Prompt, meta: dict, data: bytes) -> None:
        import folder_paths

        from mesh_ray.workflow.comfy_jobs import safe_relpath

        from .prompt_files import free_name, write_atomic

        base = folder_paths.get_directory_by_type(meta.get("type")) or folder_paths.get_output_directory()
        sub = safe_relpath(meta["subfolder"], "output folder") if meta.get("subfolder") else ""
        name = free_name(base, sub, safe_relpath(meta["filename"], "output file").rsplit("/", 1)[-1])
        path = os.path.join(base, sub, name)
        write_atomic(path, data)
        with self._lock:
            rec.files.append(path)
            rec.names[(meta.get("type"), meta.get("subfolder", ""), meta["filename"])] = name

    def _discard_files(self, rec: Prompt) -> None:
        """An attempt that will not finish: its files go (the next attempt writes them again)."""
        for path in rec.files:
            Path(path).unlink(missing_ok=True)
        rec.files.clear()
        rec.names.clear()
        rec.done = None

    def _rename(self, rec: Prompt, ui: Any) -> Any:
        if not isinstance(ui, dict):
            return ui
        out = {}
        for key, items in ui.items():
            if isinstance(items, list):
                items = [{**it, "filename": rec.names.get((it.get("type"), it.get("subfolder", ""), it.get("filename")),
                                                          it.get("filename"))}
                         if isinstance(it, dict) and "filename" in it else it for it in items]
            out[key] = items
        return out

    def _end(self, rec: Prompt, ev: dict) -> None:
        d = rec.done
        if d is not None and d["status"] in ("success", "error", "interrupted"):
            history = dict(d.get("history") or {})
            history["outputs"] = {n: self._rename(rec, o) for n, o in (history.get("outputs") or {}).items()}
            self._finish(rec, history, d["status"] == "success", [tuple(m) for m in d.get("messages") or []])
        else:
            self._fail(rec, (d or {}).get("error") or ev.get("message") or f"prompt {rec.pid} ended without a result",
                       interrupted=ev["type"] == "run_cancelled")

    def _fail(self, rec: Prompt, message: str, interrupted: bool = False) -> None:
        """End a prompt with a one-line error, as ComfyUI reports a failed node."""
        message = " ".join(str(message).split())
        kind = "execution_interrupted" if interrupted else "execution_error"
        data = {"prompt_id": rec.pid, "node_id": "", "node_type": "", "executed": [], "timestamp": int(time.time() * 1000)}
        if not interrupted:
            data.update(exception_message=message, exception_type="MeshQueueError", traceback=[], current_inputs={},
                        current_outputs=[])
        self._ui(rec, kind, data)
        self._finish(rec, {"outputs": {}, "meta": {}}, False, [(kind, data)], error=message)

    def _finish(self, rec: Prompt, history: dict, ok: bool, messages: list, error: str | None = None) -> None:
        import execution

        with self._lock:
            if rec.ended:
                return
            rec.ended = True
            self.inflight.pop(rec.pid, None)
            self.finished[rec.pid] = {"run_id": rec.run_id, "worker": rec.worker, "attempts": rec.attempts,
                                      "ok": ok, "error": error or (rec.done or {}).get("error"),
                                      "received_bytes": (rec.done or {}).get("received_bytes", 0),
                                      "files": [os.path.basename(p) for p in rec.files], "ended": time.time()}
            while len(self.finished) > KEEP_DONE:
                self.finished.popitem(last=False)
        srv = self.server
        srv.prompt_queue.task_done(rec.key, history,
                                   status=execution.PromptQueue.ExecutionStatus(
                                       status_str="success" if ok else "error", completed=ok, messages=messages),
                                   process_item=lambda p: p[:5])
        self._ui(rec, "executing", {"node": None, "prompt_id": rec.pid}, last=True)

    # -- one prompt on screen at a time per browser ------------------------------------------------------

    def _ui(self, rec: Prompt, event: Any, data: Any, last: bool = False) -> None:
        """Send to the prompt's browser, or keep it until the prompts queued before it there have ended
        (``last``: the prompt's final message).  ``send_sync`` only enqueues: it is called under the lock,
        so that messages leave in order."""
        if rec.sid is None:
            return
        with self._lock:
            line = self._screen.setdefault(rec.sid, [rec])
            if rec not in line:
                line.append(rec)
            if line[0] is not rec:
                rec.pending.append((event, data, last))
                return
            self.server.send_sync(event, data, rec.sid)
            while last:  # the next prompt of this browser comes on screen with what it has sent so far
                line.pop(0)
                if not line:
                    self._screen.pop(rec.sid, None)
                    return
                pending, line[0].pending = line[0].pending, []
                last = False
                for event, data, end in pending:
                    self.server.send_sync(event, data, rec.sid)
                    last = last or end


_bridge: QueueBridge | None = None
_bridge_lock = threading.Lock()


def bridge() -> QueueBridge:
    """This process's bridge (made on first use)."""
    global _bridge
    with _bridge_lock:
        if _bridge is None:
            _bridge = QueueBridge()
        return _bridge


__all__ = ["ADDRESS_ENV", "HOLD_ENV", "Prompt", "QueueBridge", "QueueUnavailable", "bridge"]
