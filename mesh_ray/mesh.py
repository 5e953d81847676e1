"""``mesh_ray.connect()`` and the ``Mesh`` handle: the entry point of the public API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray

from mesh_ray.cluster.resources import describe_resources
from mesh_ray.cluster.connect import ensure_ray
from mesh_ray.config import ConnectOptions, SplitOptions, StageSpec, load_settings
from mesh_ray.errors import ClusterError
from mesh_ray.split.model import SplitModel, make_split

if TYPE_CHECKING:
    import os

    from mesh_ray.actors.vae_host import VaeHost
    from mesh_ray.split.plan import Plan
    from mesh_ray.vae.service import VaeService


class Mesh:
    """A connection to Ray (embedded or a cluster) that creates and tracks mesh-ray actors."""

    def __init__(self, mode: str, options: ConnectOptions):
        self.mode = mode
        self.options = options
        self._splits: list[SplitModel] = []
        self._services: list = []

    def split(self, checkpoint: str, stages: int | list[str | dict | StageSpec] | None = None,
              n_blocks_remote: int | None = None, options: SplitOptions | dict | str | None = None,
              plan: "str | Plan | None" = None, plan_options: dict | None = None, **option_kwargs: Any) -> SplitModel:
        """Split a FLUX checkpoint over stage actors.

        ``stages``: a number of remote stages with an even split (default 2), or a list of block
        ranges (``"double:0-9"``) / ``StageSpec`` dicts covering every block once, in order.
        ``n_blocks_remote``: instead, keep the front blocks in this process and run the back N
        blocks on one remote stage.  ``options`` (a ``SplitOptions``, a dict or a YAML/JSON file) and
        other keywords are ``SplitOptions`` fields.  Precedence: keywords > ``MESH_RAY_<FIELD>``
        variables > ``options`` (for an object, only its explicitly set fields) > defaults.
        ``plan="auto"``: measure the candidate devices and choose the block ranges (``stages`` is then
        the number of candidates; ``plan_options`` are ``auto_plan`` keywords such as width, height,
        threads); a ``Plan`` from ``mesh_ray.auto_plan`` / ``plan_for`` is used as given.  The plan
        used is ``split.plan``.
        """
        chosen = None
        if plan is not None:
            from mesh_ray.split.planner import resolve_plan

            chosen, stages, option_kwargs = resolve_plan(checkpoint, plan, stages, n_blocks_remote, plan_options,
                                                         option_kwargs)
        s = make_split(checkpoint, stages, n_blocks_remote, options, **option_kwargs)
        s.plan = chosen
        self._splits.append(s)
        return s

    def vae(self, checkpoint: "str | os.PathLike | VaeHost", replicas: int = 1, **kwargs: Any) -> "VaeService":
        """A pool of VAE decoder actors for ``checkpoint``: a FLUX VAE file (BFL ``ae.safetensors``
        layout, mesh-ray's own decoder) or a ``VaeHost`` (e.g. ComfyUI's VAE class, from ``comfy_integration``).

        ``vae.decode(latent, mode="wait" | "forget" | "promise", save=...)``; keywords are
        ``VaeOptions`` fields (num_gpus, num_cpus, idle_timeout_s, output_dir, torch_threads, dtype,
        timeout_s), validated into one model: a bad one is a one-line ConfigError.
        """
        from mesh_ray.vae.service import VaeService

        service = VaeService(checkpoint, replicas=replicas, **kwargs)
        self._services.append(service)
        return service

    def actors(self, timeout_s: float = 30) -> list[dict]:
        """The mesh-ray actors alive in this cluster (any driver's), with where they run and what they hold."""

        out = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"] if isinstance(entry, dict) else entry
            ns = entry.get("namespace") if isinstance(entry, dict) else None
            if not name.startswith("mesh-ray/"):
                continue
            try:
                handle = ray.get_actor(name, namespace=ns)
                out.append({"name": name, "actor_id": handle._actor_id.hex(),
                            **ray.get(handle.info.remote(), timeout=timeout_s)})
            except Exception as e:  # noqa: BLE001 - a dying actor should not break status
                out.append({"name": name, "kind": "unknown", "error": str(e).splitlines()[0]})
        return out

    def status(self) -> dict:
        """Cluster resources and the mesh actors (kind, block range, node, GPU, memory)."""
        return {"mode": self.mode, **describe_resources(), "actors": self.actors()}

    def close(self) -> None:
        """Close every split and VAE service made through this handle (the Ray connection stays)."""
        for s in self._splits:
            s.close()
        for v in self._services:
            v.close(wait=False)
        self._splits.clear()
        self._services.clear()


def connect(address: str | None = None, options: ConnectOptions | dict | str | None = None, **kwargs: Any) -> Mesh:
    """Join the Ray cluster at ``address`` ("auto", "host:port", "ray://…", or RAY_ADDRESS), or
    start an embedded local Ray sized to this machine when there is none.  Unreachable
    addresses fail within ``timeout_s`` with a one-line ClusterError.  ``options`` (a
    ``ConnectOptions``, dict or YAML/JSON file) and keywords are ``ConnectOptions`` fields;
    keywords > ``MESH_RAY_<FIELD>`` variables > ``options``."""
    options = load_settings(ConnectOptions, options, address=address, **kwargs)
    mode = ensure_ray(options)
    if not ray.is_initialized():  # pragma: no cover - ensure_ray raises instead
        raise ClusterError("Ray did not start: see the log above")
    return Mesh(mode, options)
