"""Checks before joining a Ray cluster by address: something listens, the token fits, versions match.

Ray 2.60 clusters enforce token auth, but a client given an explicit address runs with auth
disabled unless told otherwise, and then fails after ~20 s with "Failed to connect".  These
checks present the token when this machine has one and turn each failure into one line with its fix.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from mesh_ray.errors import ClusterError

AUTH_MODE_VAR = "RAY_AUTH_MODE"
TOKEN_FIX = ("copy the head's ~/.ray/auth_token to ~/.ray/auth_token on this machine, or set RAY_AUTH_TOKEN "
             "to its content (or RAY_AUTH_TOKEN_PATH to a file holding it)")


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` (optionally ``ray://``-prefixed) as a pair; a ClusterError names the expected form."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port: use e.g. 127.0.0.1:6379, ray://host:10001 or 'auto'")
    return host, int(port)


def resolve_address(address: str) -> str:
    """``address`` as host:port; "auto" becomes the cluster Ray itself would join from this machine."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    if not found:
        raise ClusterError("address='auto' found no Ray running on this machine: start one with "
                           "`ray start --head`, or give the head's address (host:port)")
    return found


def probe_tcp(address: str, timeout_s: float) -> None:
    """Fail fast when host:port does not accept connections (ray.init would retry for minutes)."""
    host, port = split_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 5.0)):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}): nothing listens there; "
                           f"check the address and port (the head's `ray start --head --port=...`) and the firewall, "
                           f"start one with `ray start --head`, or use address=None for an embedded local Ray") from None


def token_source() -> str | None:
    """Where Ray will read this machine's auth token from, in Ray's own order, or None when it has none."""
    from ray._raylet import AuthenticationTokenLoader

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return "~/.ray/auth_token"


def present_token_if_available() -> str:
    """Turn token auth on for this process when a token exists and RAY_AUTH_MODE is unset; returns the mode.

    Ray does the same for ``address="auto"`` but not for an explicit address.  An explicit
    RAY_AUTH_MODE is always respected; auth is never turned off here.
    """
    mode = os.environ.get(AUTH_MODE_VAR)
    if mode is None and token_source() is not None:
        from ray._raylet import Config

        os.environ[AUTH_MODE_VAR] = "token"
        Config.initialize("")  # Ray caches its config; refresh it so this process sees token mode
        return "token"
    return (mode or "disabled").lower()


def _auth_error(address: str, mode: str) -> ClusterError:
    """The one-line reason why the cluster at ``address`` refused this client's token (or lack of one)."""
    source = token_source()
    if mode != "token" and source is not None:
        return ClusterError(f"Ray at {address} requires an auth token but {AUTH_MODE_VAR}={os.environ.get(AUTH_MODE_VAR)} "
                            f"here: unset {AUTH_MODE_VAR} (or set it to token) so the token from {source} is sent")
    if source is None:
        return ClusterError(f"Ray at {address} requires an auth token and this machine has none: {TOKEN_FIX}")
    return ClusterError(f"Ray at {address} rejected this machine's auth token (from {source}): it is not the "
                        f"cluster's token; {TOKEN_FIX}")


def client_refused(address: str) -> ClusterError:
    """Why a Ray Client (``ray://``) connection timed out: a missing or wrong token, or no client server there."""
    source = token_source()
    token = f"this machine's token (from {source}) may not be the cluster's" if source else "this machine has no auth token"
    return ClusterError(f"the Ray Client server at {address} did not let this driver in: {token}: {TOKEN_FIX}; "
                        f"or the head runs no client server on that port (`ray start --head "
                        f"--ray-client-server-port=10001` is the default)")


def check_versions(metadata: dict, address: str) -> None:
    """Ray's own version check on the cluster's metadata, as a one-line ClusterError naming both sides."""
    from ray._private.utils import check_version_info, compute_version_info

    try:
        check_version_info(metadata, "this machine", raise_on_mismatch=True)
    except RuntimeError:
        mine_ray, mine_py = compute_version_info()[:2]
        ray_v, py_v = metadata["ray_version"], metadata["python_version"]
        raise ClusterError(f"version mismatch with the Ray cluster at {address}: it runs Ray {ray_v} on Python {py_v}, "
                           f"this machine has Ray {mine_ray} on Python {mine_py}: install Python {py_v} and "
                           f"`pip install ray=={ray_v}` here (or run the driver on a cluster node)") from None


def _gcs_metadata(address: str) -> dict:
    """Connect a bare GCS client (no driver) and read the cluster's version metadata."""
    from ray._common.usage.usage_lib import get_cluster_metadata
    from ray._raylet import GcsClient

    return get_cluster_metadata(GcsClient(address=address)) or {}


def preflight(address: str, timeout_s: float) -> None:
    """Check token and versions against the GCS at ``address`` (host:port) before ``ray.init`` joins it.

    The token is presented only when the cluster asks for one: a cluster without token auth (one a
    script started with ``ray.cluster_utils.Cluster``, or ``RAY_AUTH_MODE=disabled`` on the head)
    is joined without it, since a driver in token mode cannot run actors there.
    """
    from ray.exceptions import AuthenticationError

    explicit = os.environ.get(AUTH_MODE_VAR)
    mode = (explicit or "disabled").lower()
    result = _probe_gcs(address, timeout_s)
    if isinstance(result.get("error"), AuthenticationError) and explicit is None and token_source() is not None:
        mode = present_token_if_available()  # the cluster wants a token and this machine has one
        result = _probe_gcs(address, timeout_s)
    error = result.get("error")
    if isinstance(error, AuthenticationError):
        raise _auth_error(address, mode)
    if error is not None:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ClusterError(f"the Ray head at {address} did not answer ({first}): check that `ray status` works on "
                           f"the head and that this machine reaches its port") from None
    if result.get("metadata"):
        check_versions(result["metadata"], address)


def _probe_gcs(address: str, timeout_s: float) -> dict[str, Any]:
    """{"metadata": ...} or {"error": exc} from a bare GCS client, within ``timeout_s``."""
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            result["metadata"] = _gcs_metadata(address)
        except BaseException as e:  # noqa: BLE001 - reported to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=probe, name="mesh-ray-gcs-probe", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ClusterError(f"something listens at {address} but it did not answer as a Ray head (GCS) within "
                           f"{timeout_s:g} s: check the port (the head's `ray start --head --port=...`) or raise timeout_s")
    return result
