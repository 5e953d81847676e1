"""A ComfyUI process outside the tests' Ray, for tests where ComfyUI joins a cluster of its own by
address (a Ray actor cannot: its process already belongs to the tests' cluster).

``ComfyProcess`` starts ``python comfy_proc.py`` (its own session, so it is ended by its group id),
which boots ComfyUI through ``comfy_host.ComfyHost`` and runs the functions the test sends over a
socket pair, each answer bounded by a timeout.  ``KEPT`` (in the child's ``__main__``) holds what a
test keeps between calls, e.g. the MODEL that ComfyUI's cache would hand to the next queue.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
KEPT: dict = {}


def kill_group(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGKILL a child started in its own session (``start_new_session=True``) and its whole group."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout)


class ComfyProcess:
    """A child Python process that is a ComfyUI (``--cpu``, temporary folders under ``workdir``)."""

    def __init__(self, repo: Path, comfyui_dir: Path, workdir: Path, log: Path):
        parent, child = socket.socketpair()
        from comfy_host import stubs_of

        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        env.update(PYTHONPATH=os.pathsep.join([str(HERE), str(repo)]), PYTHONUNBUFFERED="1")
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "comfy_proc.py"), str(child.fileno()), str(repo), str(comfyui_dir),
             stubs_of(comfyui_dir) or "", str(workdir)],
            env=env, pass_fds=(child.fileno(),), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        child.close()
        self.conn = Connection(parent.detach())

    def call(self, fn: Callable, *args: Any, timeout: float) -> Any:
        """Run ``fn(*args)`` in the ComfyUI process; its result, or AssertionError with its traceback."""
        from ray import cloudpickle

        self.conn.send_bytes(cloudpickle.dumps((fn, args)))
        if not self.conn.poll(timeout):
            raise AssertionError(f"the ComfyUI process did not answer within {timeout:g} s")
        ok, value = cloudpickle.loads(self.conn.recv_bytes())
        if not ok:
            raise AssertionError(f"in the ComfyUI process: {value}")
        return value

    def close(self) -> None:
        """End the child and everything it started (its process group)."""
        kill_group(self.proc)
        self.conn.close()
        self._log.close()


def _serve(fd: int, repo: str, comfy_path: str, stubs: str, workdir: str) -> None:
    from ray import cloudpickle

    from comfy_host import ComfyHost

    conn = Connection(fd)
    ComfyHost(repo, comfy_path, stubs or None, workdir)
    while True:
        try:
            fn, args = cloudpickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            reply = (True, fn(*args))
        except BaseException:  # noqa: BLE001 - reported to the test
            reply = (False, traceback.format_exc()[-4000:])
        conn.send_bytes(cloudpickle.dumps(reply))


if __name__ == "__main__":
    _serve(int(sys.argv[1]), *sys.argv[2:6])
