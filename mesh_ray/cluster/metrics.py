"""Prometheus metrics of mesh-ray, recorded with ``ray.util.metrics`` in whichever process does the work.

Ray's metrics agent on each node exports them (prefixed ``ray_``) on the node's metrics port
(``ray.nodes()[i]["MetricsExportPort"]``, fixed with ``ray start --metrics-export-port``).
``METRICS`` is the one list of names; docs/metrics.md describes them.  Recording never raises:
a metric that cannot be recorded is logged once and skipped, so it never breaks a generation.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

log = logging.getLogger("mesh_ray.cluster.metrics")

MS_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000, 120000]

# name -> (kind, description, tag keys); the exported name is "ray_" + name.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mesh_ray_stage_step_ms": ("histogram", "Wall time of one forward of a stage's blocks (ms), per stage",
                               ("stage",)),
    "mesh_ray_wire_raw_bytes": ("counter", "Bytes an activation hop would carry uncoded, per link", ("link", "mode")),
    "mesh_ray_wire_coded_bytes": ("counter", "Bytes an activation hop carried on the wire (coded), per link",
                                  ("link", "mode")),
    "mesh_ray_wire_encode_ms": ("histogram", "Codec encode time of one hop (ms), per link", ("link", "mode")),
    "mesh_ray_wire_decode_ms": ("histogram", "Codec decode time of one hop (ms), per link", ("link", "mode")),
    "mesh_ray_retries": ("counter", "Work sent again after a worker died (stage steps, VAE decodes)", ("kind",)),
    "mesh_ray_restarts": ("counter", "Actors started again after they died (stages, VAE replicas)", ("kind",)),
    "mesh_ray_service_runs": ("gauge", "Workflow runs in the service's queues, by state", ("state",)),
    "mesh_ray_vae_decode_ms": ("histogram", "Wall time of one VAE decode on a decoder actor (ms)", ("mode",)),
}

_lock = threading.Lock()
_made: dict[str, Any] = {}
_broken: set[str] = set()


def _metric(name: str) -> Any:
    """The process's metric object for ``name`` (created once)."""
    m = _made.get(name)
    if m is not None:
        return m
    from ray.util import metrics as rm

    kind, description, tags = METRICS[name]
    with _lock:
        if name not in _made:
            if kind == "histogram":
                _made[name] = rm.Histogram(name, description=description, boundaries=MS_BUCKETS, tag_keys=tags)
            elif kind == "counter":
                _made[name] = rm.Counter(name, description=description, tag_keys=tags)
            else:
                _made[name] = rm.Gauge(name, description=description, tag_keys=tags)
        return _made[name]


def _record(name: str, value: float, tags: dict[str, str]) -> None:
    if name in _broken or not ray.is_initialized():
        return
    try:
        m = _metric(name)
        kind = METRICS[name][0]
        if kind == "histogram":
            m.observe(float(value), tags=tags)
        elif kind == "counter":
            if value > 0:
                m.inc(float(value), tags=tags)
        else:
            m.set(float(value), tags=tags)
    except Exception as e:  # noqa: BLE001 - metrics must never break the data path
        _broken.add(name)
        log.warning("metric %s cannot be recorded (%s: %s): it is skipped from now on", name, type(e).__name__, e)


def stage_step(stage: int, ms: float) -> None:
    """One forward of stage ``stage`` took ``ms``."""
    _record("mesh_ray_stage_step_ms", ms, {"stage": str(stage)})


def wire_hop(hop: Any) -> None:
    """One activation hop as ``mesh_ray.actors.wire`` records it (link, mode, raw/wire bytes,
    encode/decode ms), given as its record or as a dict with the same field names."""
    get = hop.get if isinstance(hop, dict) else lambda k: getattr(hop, k, None)
    tags = {"link": str(get("link") or "?"), "mode": str(get("mode") or "?")}
    _record("mesh_ray_wire_raw_bytes", get("raw_bytes") or 0, tags)
    _record("mesh_ray_wire_coded_bytes", get("wire_bytes") or 0, tags)
    if tags["mode"] != "raw":
        for key in ("encode_ms", "decode_ms"):
            if get(key) is not None:
                _record(f"mesh_ray_wire_{key}", get(key), tags)


def retry(kind: str) -> None:
    """Work of ``kind`` ("stage_step", "vae_decode") was sent again after its worker died."""
    _record("mesh_ray_retries", 1, {"kind": kind})


def restart(kind: str) -> None:
    """An actor of ``kind`` ("stage", "vae_replica") was started again."""
    _record("mesh_ray_restarts", 1, {"kind": kind})


def service_runs(queued: int, running: int) -> None:
    """The workflow scheduler's queue depth and running runs right now."""
    _record("mesh_ray_service_runs", queued, {"state": "queued"})
    _record("mesh_ray_service_runs", running, {"state": "running"})


def vae_decode(ms: float, mode: str) -> None:
    """One decode on a VAE decoder actor took ``ms``."""
    _record("mesh_ray_vae_decode_ms", ms, {"mode": mode})


def read_metrics(timeout_s: float = 10.0) -> dict[str, list[tuple[dict, float]]]:
    """mesh-ray's samples as every node's Prometheus endpoint shows them now (Ray must be connected):
    exported name (``ray_mesh_ray_...``, histograms as ``_bucket`` / ``_count`` / ``_sum``) -> [(labels, value)]."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict, float]]] = {}
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=timeout_s).read().decode()
        except OSError as e:
            log.warning("cannot read %s (%s)", url, e)
            continue
        for fam in text_string_to_metric_families(text):
            if fam.name.startswith("ray_mesh_ray_"):
                for smp in fam.samples:
                    out.setdefault(smp.name, []).append((dict(smp.labels), smp.value))
    return out


def total(samples: dict[str, list[tuple[dict, float]]], name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels`` (0.0 when none)."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == val for k, val in labels.items()))


__all__ = ["METRICS", "read_metrics", "total", "restart", "retry", "service_runs", "stage_step", "vae_decode", "wire_hop"]
