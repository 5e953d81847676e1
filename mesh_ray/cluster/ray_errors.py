"""The one path from a Ray failure to a one-line ``MeshError``: every wait on Ray goes through here.

``ray_get(ref, timeout, what, ...)`` waits with a timeout; a timeout, a dead actor, a lost object
or a failed task becomes a MeshError naming ``what`` and the fix.  A MeshError raised inside the
task comes back as itself (same class, same line).
"""

from __future__ import annotations

import concurrent.futures as cf
import re
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayError, RayTaskError

from mesh_ray.errors import ClusterError, MeshError, StageError


def error_cause(e: BaseException) -> BaseException:
    """The task's own exception inside a RayTaskError (else ``e`` itself)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def cause_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of the task's own exception, on one line, without Ray's traceback wrapper."""
    e = error_cause(e)
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}"


def init_failure(e: BaseException) -> str | None:
    """``Type: message`` of the exception an actor's ``__init__`` raised (Ray keeps only its text), or None."""
    if not getattr(e, "actor_init_failed", False):
        return None
    for line in reversed(str(e).splitlines()):
        m = re.match(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", line)
        if m:
            return f"{m[1]}: {m[2].strip()[:400]}"
    return None


def ray_error(e: BaseException, what: str, timeout: float | None = None, *,
              timeout_fix: str = "wait longer (raise the timeout) or check the cluster with `mesh-ray status`",
              died_fix: str = "its worker crashed or its node left; try again",
              failed_fix: str = "see the worker log for the traceback",
              timeout_error: type[MeshError] = ClusterError, died_error: type[MeshError] = ClusterError,
              failed_error: type[MeshError] = StageError, keep: tuple[type[MeshError], ...] = (MeshError,)) -> MeshError:
    """A Ray failure while waiting on ``what`` -> a one-line MeshError naming the fix.

    ``keep``: MeshError classes raised inside the task that come back as themselves; other task
    errors become ``failed_error``.
    """
    if isinstance(e, MeshError) and not isinstance(e, RayError):  # RayTaskError(ConfigError) is both
        return e
    if isinstance(e, (GetTimeoutError, TimeoutError, cf.TimeoutError)):
        return timeout_error(f"{what} did not finish within {timeout or 0:g} s: {timeout_fix}")
    if isinstance(e, RayActorError):
        started = init_failure(e)
        if started:  # its own error names the fix
            return died_error(f"{what} failed: its actor could not start ({started})")
        return died_error(f"{what} failed: its actor died ({type(e).__name__}): {died_fix}")
    if isinstance(e, RayTaskError):
        cause = error_cause(e)
        if isinstance(cause, keep) and isinstance(cause, MeshError):
            return type(cause)(str(cause))
        detail = cause_line(e) if cause is not e else str(e).strip().splitlines()[-1][:300]
        return failed_error(f"{what} failed ({detail}): {failed_fix}")
    if isinstance(e, ObjectLostError):
        return ClusterError(f"{what} failed: its result was lost with the node that held it: try again")
    if isinstance(e, RayError):
        return ClusterError(f"{what} failed in Ray ({type(e).__name__}): check the cluster with `ray status`")
    return MeshError(f"{what} failed ({type(e).__name__}: {e})")


def ray_get(ref: Any, timeout: float, what: str, **fixes: Any) -> Any:
    """``ray.get(ref, timeout=timeout)`` with every Ray failure turned into a MeshError (see ``ray_error``)."""
    try:
        return ray.get(ref, timeout=timeout)
    except (RayError, TimeoutError, cf.TimeoutError) as e:
        raise ray_error(e, what, timeout, **fixes) from None
