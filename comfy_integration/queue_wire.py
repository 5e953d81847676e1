"""The messages between a frontend's ComfyUI process (``queue_bridge``) and its Ray child
(``queue_child``), named once here, and how they cross the AF_UNIX socket between the two.

A message is a list ``[KIND, ...]`` of JSON values and bytes: ``send`` writes it as one JSON text
in which every bytes value is a placeholder, then the bytes themselves, each as a frame of its own
(``multiprocessing.connection``'s ``send_bytes``, after both processes proved they hold the same
key); ``recv`` puts them back.  Nothing is unpickled.

Parent to child:
  [SUBMIT, prompt_id, payload, model_paths, resume]  resume: {"run_id", "since"} or None
  [INTERRUPT, prompt_id]
Child to parent:
  [READY, address, workers]               connected to the cluster and the dispatcher
  [WORKERS, workers]                      the ComfyUI workers now (every few seconds)
  [ACCEPTED, prompt_id, run_id, fresh]    fresh: a new run (the earlier attempt's files go)
  [EVENT, prompt_id, run_id, index, event]
  [FILE, prompt_id, run_id, index, meta, data, worker]
  [REJECTED, prompt_id, message]          a one-line error: the prompt will not run
  [DOWN, message]                         the cluster went away; the child exits after this
"""

from __future__ import annotations

import json
from typing import Any

SUBMIT, INTERRUPT = "submit", "interrupt"
READY, WORKERS, ACCEPTED, EVENT, FILE, REJECTED, DOWN = "ready", "workers", "accepted", "event", "file", "rejected", "down"
SOCKET_ENV, KEY_ENV = "MESH_RAY_QUEUE_SOCKET", "MESH_RAY_QUEUE_KEY"
_BLOB = "$mesh-ray-bytes"


def send(conn: Any, *msg: Any) -> None:
    """Write one message (the caller serialises senders)."""
    blobs: list[bytes] = []

    def enc(x: Any) -> Any:
        if isinstance(x, (bytes, bytearray, memoryview)):
            blobs.append(bytes(x))
            return {_BLOB: len(blobs) - 1}
        if isinstance(x, dict):
            return {str(k): enc(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [enc(v) for v in x]
        return x

    head = json.dumps([enc(list(msg)), len(blobs)], default=str).encode()
    conn.send_bytes(head)
    for b in blobs:
        conn.send_bytes(b)


def recv(conn: Any) -> list:
    """Read one message (EOFError when the other process is gone)."""
    body, n = json.loads(conn.recv_bytes())
    blobs = [conn.recv_bytes() for _ in range(n)]

    def dec(x: Any) -> Any:
        if isinstance(x, dict):
            return blobs[x[_BLOB]] if len(x) == 1 and _BLOB in x else {k: dec(v) for k, v in x.items()}
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(body)
