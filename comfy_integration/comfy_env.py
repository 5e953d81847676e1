"""The ComfyUI a worker imports: the same ``comfy`` code as the ComfyUI process that sent the work.

In the ComfyUI process, ``ComfySource.here()`` names the ComfyUI tree this process runs: its folder,
version, a content hash of its ``comfy`` package, the import paths it needs besides
site-packages, and the ComfyUI arguments that change numerics (attention, precision flags).
Actors that run ComfyUI code (stages with ComfyUI's blocks, decoders with ComfyUI's VAE, ComfyUI
workers) get ``source.for_actors()`` (which adds the shipped copy when needed) and call ``source.activate()`` before they import
``comfy``.  A worker imports, in this order, the first whose content hash matches:

1. the ComfyUI process's own folder, when the worker's node has it (same machine);
2. a copy shipped through the object store once and unpacked in the node's cache by content hash
   (``~/.cache/mesh-ray/comfyui/<hash>``, beside the shard cache; ``ship="auto"`` ships when the
   cluster has more than one node, ``"always"`` always, ``"never"`` never; in the ComfyUI process
   ``$MESH_RAY_COMFY_SHIP`` chooses);
3. a ComfyUI configured on the worker's node (``MESH_RAY_COMFYUI_PATH``).

None matching is a one-line ``ComfyVersionError`` naming both versions and the fix: another ComfyUI
never computes a step.  ComfyUI itself is imported only inside functions here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mesh_ray.errors import ConfigError

Ship = Literal["auto", "always", "never"]
SHIP_MODES: tuple[str, ...] = ("auto", "always", "never")
WORKER_PATH_ENV = "MESH_RAY_COMFYUI_PATH"  # a ComfyUI folder on a worker's node, used when its content matches
SHIP_ENV = "MESH_RAY_COMFY_SHIP"  # in the ComfyUI process: auto (default), always or never
# Top-level modules of a ComfyUI folder that ``comfy``'s model code imports, shipped with it (Ray
# ships local folders only at job level, ``ray.init(runtime_env=...)``, not per actor: we ship a zip).
SHIPPED_FILES = ("node_helpers.py", "comfyui_version.py")
# ComfyUI arguments that decide numerics (attention kernel, precision, fp8 paths): the worker uses the
# ComfyUI process's values so that a block computes the same bits there.
NUMERIC_ARGS = ("force_fp32", "force_fp16", "fp32_unet", "fp64_unet", "bf16_unet", "fp16_unet", "fp8_e4m3fn_unet",
                "fp8_e5m2_unet", "fp8_e8m0fnu_unet", "fp16_vae", "fp32_vae", "bf16_vae", "fp16_intermediates",
                "force_channels_last", "use_split_cross_attention", "use_quad_cross_attention",
                "use_pytorch_cross_attention", "use_sage_attention", "use_flash_attention", "disable_xformers",
                "force_upcast_attention", "dont_upcast_attention", "fast", "supports_fp8_compute", "deterministic")


class ComfyVersionError(ConfigError):
    """A worker cannot import the ComfyUI that the ComfyUI process runs."""


@functools.lru_cache(maxsize=8)
def tree_digest(root: str) -> str:
    """Content hash of ``root/comfy/**/*.py`` and the shipped top-level files (sorted paths and bytes)."""
    base = Path(root)
    h = hashlib.blake2b(digest_size=12)
    files = sorted((base / "comfy").rglob("*.py")) + [base / f for f in SHIPPED_FILES if (base / f).is_file()]
    for p in files:
        h.update(str(p.relative_to(base)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def tree_version(root: str | os.PathLike) -> str:
    """``comfyui_version.__version__`` of a ComfyUI folder (read as text, not imported), or "unknown"."""
    p = Path(root) / "comfyui_version.py"
    if p.is_file():
        for line in p.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def _site_dirs() -> set[str]:
    import site
    import sysconfig

    dirs = set(site.getsitepackages() + [site.getusersitepackages()])
    dirs |= {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return {os.path.realpath(d) for d in dirs if d}


def _known_ship(ship: str, named: str = "comfy ship=") -> str:
    """``ship`` when it is one of SHIP_MODES, else the one-line error naming them."""
    if ship not in SHIP_MODES:
        raise ConfigError(f"{named}{ship!r} is not known: use one of {', '.join(SHIP_MODES)}")
    return ship


@dataclass(frozen=True)
class ComfySource:
    """The ComfyUI tree of the ComfyUI process, as a worker needs it (small and picklable)."""

    root: str
    version: str
    digest: str
    extra_paths: tuple[str, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)
    ship: str = "auto"
    package: tuple = ()  # (ObjectRef of the zipped comfy package,) when shipping; boxed so Ray passes the ref

    @classmethod
    def here(cls, ship: Ship | None = None) -> "ComfySource":
        """This process's ComfyUI (it must have imported ``comfy``); ``ship`` defaults to
        ``$MESH_RAY_COMFY_SHIP`` (so a ComfyUI user chooses it without a node input), else auto."""
        if ship is None:
            ship = _known_ship(os.environ.get(SHIP_ENV, "").strip() or "auto", f"{SHIP_ENV}=")
        _known_ship(ship)
        root = _imported_root()
        if root is None:
            raise ConfigError("ComfySource.here() runs inside a ComfyUI process: import ComfyUI first")
        site = _site_dirs()
        # Paths inside the tree (ComfyUI's nodes.py adds root/comfy) are not extras: a worker that
        # imports a shipped copy must not import from this process's folder through them.
        extra = tuple(p for p in sys.path if p and os.path.isdir(p) and not _inside(p, root)
                      and os.path.realpath(p) not in site and not os.path.realpath(p).startswith(sys.base_prefix)
                      and not os.path.realpath(p).startswith(sys.prefix))
        from comfy.cli_args import args as comfy_args

        numeric = {k: _plain(getattr(comfy_args, k)) for k in NUMERIC_ARGS if hasattr(comfy_args, k)}
        return cls(root, tree_version(root), tree_digest(root), extra, numeric, ship)

    @classmethod
    def of(cls, root: str | os.PathLike, extra_paths: tuple[str, ...] = (), args: dict | None = None,
           ship: Ship = "auto") -> "ComfySource":
        """The ComfyUI tree at ``root`` without importing it (``mesh-ray comfy workers``): ComfyUI's
        default arguments unless ``args`` names some; ``extra_paths`` go on the workers' ``sys.path``."""
        _known_ship(ship)
        root = str(Path(root).resolve())
        if not os.path.isfile(os.path.join(root, "comfy", "model_patcher.py")):
            raise ConfigError(f"{root} is not a ComfyUI folder (no comfy/model_patcher.py): pass the folder that "
                              f"holds ComfyUI's main.py")
        extra = tuple(str(Path(p).resolve()) for p in extra_paths)
        return cls(root, tree_version(root), tree_digest(root), extra, dict(args or {}), ship)

    def describe(self) -> str:
        return f"ComfyUI {self.version} ({self.digest[:8]})"

    def should_ship(self) -> bool:
        """Whether actors get a copy of this ComfyUI (``ship``; auto: a cluster of several nodes)."""
        if self.ship != "auto":
            return self.ship == "always"
        import ray

        return sum(1 for n in ray.nodes() if n["Alive"]) > 1

    def for_actors(self) -> "ComfySource":
        """This record as actors get it: with the zipped ``comfy`` package's ObjectRef when shipping."""
        if not self.should_ship() or self.package:
            return self
        return replace(self, package=(_package_ref(self.root, self.digest),))

    # -- on the worker ---------------------------------------------------------------------------

    def activate(self, cpu: bool | None = None) -> str:
        """Make ``import comfy`` give this ComfyUI here (see the module docstring); returns where it
        came from.  ``cpu``: ComfyUI's ``--cpu`` (default: when torch sees no GPU)."""
        root = _imported_root()
        if root is not None:
            self._check(root, "already imported in this worker")
            return root
        if sys.pycache_prefix is None:  # never write bytecode into a ComfyUI tree (it may be read-only)
            sys.pycache_prefix = str(cache_dir() / "pycache")
        tried = []
        for root, where in self._candidates():
            if tree_digest(root) == self.digest:
                if root not in sys.path:
                    sys.path.insert(0, root)
                for p in self.extra_paths:
                    if os.path.isdir(p) and p not in sys.path:
                        sys.path.append(p)
                self._configure(cpu)
                return root
            tried.append(f"{where} {tree_version(root)} ({tree_digest(root)[:8]}) at {root}")
        raise ComfyVersionError(self._mismatch("; ".join(tried) if tried else "no ComfyUI on this node"))

    def _candidates(self) -> list[tuple[str, str]]:
        out = []
        if os.path.isfile(os.path.join(self.root, "comfy", "model_patcher.py")):
            out.append((self.root, "the ComfyUI process's folder"))
        if self.package:
            out.append((_unpacked(self.package[0], self.digest), "the shipped copy"))
        configured = os.environ.get(WORKER_PATH_ENV)
        if configured and os.path.isfile(os.path.join(configured, "comfy", "model_patcher.py")):
            out.append((configured, WORKER_PATH_ENV))
        seen, unique = set(), []
        for root, where in out:
            if os.path.realpath(root) not in seen:
                seen.add(os.path.realpath(root))
                unique.append((root, where))
        return unique

    def _check(self, root: str, where: str) -> None:
        if tree_digest(root) != self.digest:
            raise ComfyVersionError(self._mismatch(f"{where}: {tree_version(root)} ({tree_digest(root)[:8]}) at {root}"))

    def _mismatch(self, found: str) -> str:
        return (f"this worker cannot import the ComfyUI process's {self.describe()} (found: {found}): "
                f"ship it (start ComfyUI with {SHIP_ENV}=always, or `mesh-ray comfy workers --ship always`; "
                f"'auto' ships on a cluster of several nodes), or install the same ComfyUI on this node and point "
                f"{WORKER_PATH_ENV} at it")

    def _configure(self, cpu: bool | None) -> None:
        """ComfyUI's arguments, set before its model management is imported (never parsed from
        ``sys.argv``: a Ray worker's are Ray's own)."""
        import torch

        import comfy.cli_args

        feature = getattr(comfy.cli_args, "PerformanceFeature", None)
        for k, v in self.args.items():
            if k == "fast" and isinstance(v, list):
                v = {feature(x) for x in v} if feature is not None else set(v)
            setattr(comfy.cli_args.args, k, v)
        comfy.cli_args.args.cpu = (not torch.cuda.is_available()) if cpu is None else cpu


# (digest, Ray connection) -> ObjectRef of the zipped tree: one upload per tree and connection (a
# ComfyUI process that reconnected after its cluster came back must not hand out a reference of the
# old session).
_packages: dict[tuple[str, tuple[str, ...]], Any] = {}


def cache_dir() -> Path:
    """Where workers keep shipped ComfyUI trees: beside mesh-ray's shard cache."""
    from mesh_ray.actors.shards import default_cache_dir

    return Path(default_cache_dir()).parent / "comfyui"


def _package_ref(root: str, digest: str) -> Any:
    """The zipped ``comfy`` package and shipped files of ``root`` in the object store (put once)."""
    import io
    import zipfile

    import ray

    key = (digest, _connection())
    if key not in _packages:
        base = Path(root)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted((base / "comfy").rglob("*")):
                if p.is_file() and "__pycache__" not in p.parts:
                    z.write(p, str(p.relative_to(base)))
            for f in SHIPPED_FILES:
                if (base / f).is_file():
                    z.write(base / f, f)
        for old in [k for k in _packages if k[1] != key[1]]:  # references of an earlier connection are dead
            del _packages[old]
        _packages[key] = ray.put(buf.getvalue())
    return _packages[key]


def _connection() -> tuple[str, ...]:
    """This process's Ray connection: cluster address, its node and its job (a driver's worker id is
    derived from its job id, which a cluster started again hands out again; the node id is new)."""
    import ray

    ctx = ray.get_runtime_context()
    return ctx.gcs_address, ctx.get_node_id(), ctx.get_job_id()


def _unpacked(ref: Any, digest: str) -> str:
    """The shipped tree unpacked in this node's cache (fetched and unpacked once per node)."""
    import io
    import tempfile
    import zipfile

    import ray

    target = cache_dir() / digest
    if not (target / "comfy" / "model_patcher.py").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{digest}."))
        with zipfile.ZipFile(io.BytesIO(ray.get(ref, timeout=600))) as z:
            z.extractall(tmp)
        try:
            os.replace(tmp, target)  # atomic: another worker on this node may unpack the same tree
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _imported_root() -> str | None:
    """The ComfyUI folder whose ``comfy`` package this process imported (a namespace package: no __file__)."""
    mod = sys.modules.get("comfy")
    paths = list(getattr(mod, "__path__", []) or []) if mod is not None else []
    return str(Path(paths[0]).resolve().parent) if paths else None


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (real paths)."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r + os.sep)


def _plain(v: Any) -> Any:
    """A plain value for the record that travels to workers: enums as their value, sets as sorted lists."""
    if isinstance(v, (set, frozenset)):
        return sorted((_plain(x) for x in v), key=str)
    if hasattr(v, "value") and not isinstance(v, (int, float, str, bool)):
        return v.value
    return v


__all__ = ["ComfySource", "ComfyVersionError", "SHIP_ENV", "SHIP_MODES", "WORKER_PATH_ENV", "tree_digest", "tree_version"]
