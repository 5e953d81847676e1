"""The Ray side of a frontend: a child process of ComfyUI that joins the cluster and queues prompts.

The ComfyUI process itself never joins Ray for the queue: Ray ends a driver whose cluster stays away
(``gcs_rpc_server_reconnect_timeout_s``) or whose node's object store vanishes, and that must end
this child, never ComfyUI.  The child connects (``mesh_ray.connect``: reachability and token checked
first), attaches to the dispatcher (``mesh-ray serve``; started here when none runs) as the
frontend's client id, submits each prompt with the model bytes the workers' nodes lack (put in
the object store once per model), follows its events, fetches its output files, and relays all of
it to the parent (``queue_wire``).  It exits when the parent goes (the socket closes: the
dispatcher then drops the frontend's queued prompts) or when the cluster stops answering (after a
``DOWN`` message: the parent starts a new child once the cluster is back).

    python -m comfy_integration.queue_child ADDRESS CLIENT_ID    (socket and key in the environment)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from multiprocessing.connection import Client
from typing import Any

from comfy_integration import queue_wire as wire

log = logging.getLogger("mesh_ray.comfy_queue")

WATCH_S = 2.0  # how often the cluster is checked
PROBE_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 30.0
FILE_TIMEOUT_S = 300.0
PROMPT_TIMEOUT_S = 24 * 3600.0


class QueueChild:
    """One frontend's connection to the cluster's ComfyUI queue."""

    def __init__(self, conn: Any, address: str, client_id: str) -> None:
        self.conn, self.address, self.client_id = conn, address, client_id
        self._send_lock = threading.Lock()
        self._handles: dict[str, Any] = {}
        self._refs: dict[str, list] = {}  # model digest -> its chunks in the object store (put once)
        self._refs_lock = threading.Lock()
        self.wf: Any = None

    def send(self, *msg: Any) -> None:
        with self._send_lock:
            wire.send(self.conn, *msg)

    # -- the cluster ------------------------------------------------------------------------------

    def connect(self) -> None:
        from mesh_ray.mesh import connect
        from mesh_ray.workflow.service import Workflows

        connect(self.address, timeout_s=CONNECT_TIMEOUT_S)
        self.wf = Workflows(self._service(), True, self.client_id)
        self.send(wire.READY, self.address, self.wf.comfy_workers())

    @staticmethod
    def _service() -> Any:
        from mesh_ray.workflow.service import find_service, serve

        handle = find_service()
        if handle is None:
            serve()  # a frontend needs a dispatcher: start the shared one
            handle = find_service()
        return handle

    def watch(self) -> None:
        """Tell the parent when the cluster stops answering (then exit), and the workers now and then."""
        import ray

        from mesh_ray.cluster.access import probe_tcp
        from mesh_ray.errors import MeshError
        from mesh_ray.workflow.service import ServiceGone

        gcs = ray.get_runtime_context().gcs_address
        while True:
            time.sleep(WATCH_S)
            try:
                probe_tcp(gcs, PROBE_TIMEOUT_S)
            except MeshError:
                self.down(f"the Ray cluster at {self.address} went away (its head at {gcs} does not answer): "
                          f"start it again; queued prompts run once it is back")
            try:
                self.send(wire.WORKERS, self.wf.comfy_workers())
            except ServiceGone:
                self._service()  # nobody restarted the dispatcher: start it (the next call re-attaches)
            except MeshError as e:
                log.warning("asking the dispatcher for its workers failed: %s", e)

    def down(self, message: str) -> None:
        try:
            self.send(wire.DOWN, " ".join(message.split()))
        finally:
            os._exit(3)

    # -- prompts ----------------------------------------------------------------------------------

    def serve(self) -> None:
        """Read the parent's messages until it goes away."""
        while True:
            try:
                msg = wire.recv(self.conn)
            except (EOFError, OSError):
                os._exit(0)  # the ComfyUI process is gone: the dispatcher drops our prompts
            if msg[0] == wire.SUBMIT:
                threading.Thread(target=self.follow, args=msg[1:], name=f"mesh-queue-{msg[1]}", daemon=True).start()
            elif msg[0] == wire.INTERRUPT:
                handle = self._handles.get(msg[1])
                if handle is not None:
                    threading.Thread(target=handle.cancel, daemon=True).start()

    def follow(self, pid: str, payload: dict, model_paths: dict[str, str], resume: dict | None) -> None:
        """Submit (or pick up again) one prompt and relay its events and files until it ends."""
        import ray

        from mesh_ray.errors import MeshError
        from mesh_ray.workflow.comfy_jobs import EV_DONE, EV_FILE
        from mesh_ray.workflow.events import TERMINAL

        try:
            handle, index = self._resume(payload, resume) if resume else (None, 0)
            if handle is None:
                full = {**payload, "chunks": self._chunks(payload.get("models") or [], model_paths)}
                handle, index = self.wf.submit_comfy(full, PROMPT_TIMEOUT_S), 0
                self.send(wire.ACCEPTED, pid, handle.run_id, True)
            self._handles[pid] = handle
            while True:
                for ev in handle.events(wait_s=5.0):
                    if ev["type"] == "run_resubmitted":  # the dispatcher restarted: the prompt runs from the start
                        index = 0
                        self.send(wire.ACCEPTED, pid, handle.run_id, True)
                        continue
                    if ev["type"] == EV_FILE:
                        data = ray.get(ev["ref"][0], timeout=FILE_TIMEOUT_S)
                        self.send(wire.FILE, pid, handle.run_id, index, ev["meta"], data, ev.get("worker"))
                    else:
                        self.send(wire.EVENT, pid, handle.run_id, index, {k: v for k, v in ev.items() if k != "ref"})
                    index += 1
                    if ev["type"] in TERMINAL:
                        handle.forget()
                        self._handles.pop(pid, None)
                        return
                    if ev["type"] == EV_DONE:
                        self._drop_shipped(payload.get("models") or [])
        except MeshError as e:
            self._handles.pop(pid, None)
            self.send(wire.REJECTED, pid, str(e))
        except Exception as e:  # noqa: BLE001 - a Ray failure under us: the cluster may be going
            log.exception("prompt %s", pid)
            self._handles.pop(pid, None)
            self.send(wire.REJECTED, pid, f"the cluster connection failed ({type(e).__name__}: {e}): queue it again")

    def _resume(self, payload: dict, resume: dict) -> tuple[Any, int]:
        """A handle on the run an earlier child followed, if the dispatcher still has all of it."""
        from mesh_ray.errors import ConfigError
        from mesh_ray.workflow.comfy_jobs import EV_DONE
        from mesh_ray.workflow.events import TERMINAL

        handle = self.wf.follow_comfy(resume["run_id"], payload, int(resume.get("since", 0)), PROMPT_TIMEOUT_S)
        try:
            if handle.status() in ("queued", "running"):
                return handle, int(resume.get("since", 0))
            rest = handle.events()
        except ConfigError:  # a new dispatcher (or it forgot the run): submit again
            handle.forget()
            return None, 0
        if any(e["type"] in TERMINAL for e in rest) and not any(e["type"] == EV_DONE for e in rest):
            handle.forget()  # it ended without its results (cancelled when the old child went): run it again
            return None, 0
        handle.seek(int(resume.get("since", 0)))  # read again in follow()
        return handle, int(resume.get("since", 0))

    def _chunks(self, models: list[dict], paths: dict[str, str]) -> dict[str, list]:
        """Object-store chunks of the models some worker's node does not cache (each model put once)."""
        import ray

        from comfy_integration.prompt_files import read_chunks

        digests = [m["digest"] for m in models]
        if not digests:
            return {}
        have = set(self.wf.comfy_cached(digests))
        out = {}
        for d in digests:
            if d in have or d not in paths:
                continue
            with self._refs_lock:
                if d not in self._refs:
                    self._refs[d] = [ray.put(c) for c in read_chunks(paths[d])]
                out[d] = self._refs[d]
        return out

    def _drop_shipped(self, models: list[dict]) -> None:
        """Free the chunks of models that every worker's node caches now."""
        digests = [m["digest"] for m in models if m["digest"] in self._refs]
        if digests:
            for d in self.wf.comfy_cached(digests):
                with self._refs_lock:
                    self._refs.pop(d, None)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    address, client_id = argv[1], argv[2]
    conn = Client(os.environ[wire.SOCKET_ENV], family="AF_UNIX", authkey=bytes.fromhex(os.environ[wire.KEY_ENV]))
    child = QueueChild(conn, address, client_id)
    from mesh_ray.errors import MeshError

    try:
        child.connect()
    except MeshError as e:
        child.down(str(e))
    except Exception as e:  # noqa: BLE001 - anything else from Ray: one line to the parent
        child.down(f"cannot join the Ray cluster at {address} ({type(e).__name__}: {e})")
    threading.Thread(target=child.watch, name="mesh-queue-watch", daemon=True).start()
    child.serve()


if __name__ == "__main__":
    main(sys.argv)
