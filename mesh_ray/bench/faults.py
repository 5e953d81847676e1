"""``mesh-ray bench faults``: every fault of docs/faults.md injected once on one local multi-node cluster,
plus the leak soak and the many-client load.

Per fault: injected, survived, outputs lost (goal 0) and the extra seconds the recovery cost
(faulted run minus the same run without the fault).  Leaks (``mesh_ray/bench/soak.py``): driver
RSS, each stage's (and decoder's) RSS and the object store's used bytes sampled through many
generations (and promise decodes) after a warm-up: growth to the end and over the second half,
and the driver's malloc in-use bytes; goal < 1 % growth.  Load: N clients through the shared service,
outputs compared with each graph run alone, fairness as max/min of the clients' mean completion
times (1.0 = perfectly even).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from mesh_ray.tables import text_table
from mesh_ray.bench.soak import change, rss, soak, trend
from mesh_ray.workflow.graph import Graph, validate_graph
from mesh_ray.workflow.memory import store_bytes_used
from mesh_ray.workflow.modules import TESTING_NODES

STAGE_OPTS = dict(stages=2, codec="raw", dtype="float32", torch_threads=1, start_timeout_s=60, step_timeout_s=120)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _fault(name: str, survived: bool, lost: int, clean_s: float | None, fault_s: float | None, note: str) -> dict:
    extra = None if clean_s is None or fault_s is None else round(fault_s - clean_s, 2)
    return {"fault": name, "injected": 1, "survived": bool(survived), "outputs_lost": int(lost), "extra_s": extra,
            "note": note}


# -- faults -----------------------------------------------------------------------------------------


def remove_node(cluster: Any, node_id: str, timeout_s: float = 90.0) -> None:
    """Remove a ``ray.cluster_utils.Cluster`` node (no drain) and wait until Ray reports it dead, so the
    next step surely meets the loss."""
    from mesh_ray.errors import ClusterError

    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node_id), allow_graceful=False)
    end = time.monotonic() + timeout_s
    while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        if time.monotonic() > end:
            raise ClusterError(f"Ray did not report node {node_id[:8]} dead within {timeout_s:g} s after its removal")
        time.sleep(0.2)



def _stage_kill(split, txt, y, gen: dict) -> dict:
    from mesh_ray.split.sampler import generate

    clean, clean_s = _timed(lambda: generate(split, txt, y, **gen))

    def kill(step: int, _n: int, _img: torch.Tensor) -> None:
        if step == 1:
            ray.kill(split.segments[1].actor, no_restart=False)

    out, fault_s = _timed(lambda: generate(split, txt, y, callback=kill, **gen))
    same = torch.equal(out, clean)
    return _fault("stage actor killed mid-generation", same, 0 if same else 1, clean_s, fault_s,
                  f"restarted and reloaded, step sent again; image bit-identical: {same}")


def _node_loss(cluster, mesh, ckpt: str, txt, y, gen: dict, cache_dir: str) -> dict:
    from mesh_ray.split.sampler import generate

    with mesh.split(ckpt, ship="always", cache_dir=cache_dir, **STAGE_OPTS) as split:
        clean, clean_s = _timed(lambda: generate(split, txt, y, **gen))
        node_id = split.stage_info()[1]["node_id"]

        def lose(step: int, _n: int, _img: torch.Tensor) -> None:
            if step == 1:
                remove_node(cluster, node_id)

        try:
            out, fault_s = _timed(lambda: generate(split, txt, y, callback=lose, **gen))
        except Exception as e:  # noqa: BLE001 - reported as not survived
            return _fault("node holding a stage removed", False, 1, clean_s, None, f"{type(e).__name__}: {e}")
        same = torch.equal(out, clean)
        where = split.stage_info()[1]
    return _fault("node holding a stage removed", same, 0 if same else 1, clean_s, fault_s,
                  f"stage 1 placed again on another node (shard from {where['shard_source']}); identical: {same}")


def _vae_kill(vae_path: str, out_dir: Path, n: int) -> dict:
    from mesh_ray.vae.service import VaeService

    lats = [torch.randn(1, 16, 48, 48, generator=torch.Generator().manual_seed(s)) for s in range(n)]
    with VaeService(vae_path, replicas=2, num_cpus=0.5, torch_threads=1, output_dir=out_dir) as svc:
        svc.decode(lats[0], timeout=120)  # both warm enough; the first load is not counted
        clean, clean_s = _timed(lambda: [p.result(300) for p in [svc.decode(x, mode="promise") for x in lats]])
        victim = svc.actors()[0]
        t0 = time.perf_counter()
        promises = [svc.decode(x, mode="promise", save=out_dir / "faulted") for x in lats]
        while not ray.get(victim.info.remote(), timeout=60)["busy"]:
            time.sleep(0.02)
        ray.kill(victim)
        lost, same = 0, True
        for p, ref in zip(promises, clean):
            try:
                same &= torch.equal(p.result(300), ref)
                p.saved.result(300)
            except Exception:  # noqa: BLE001 - counted
                lost += 1
        fault_s = time.perf_counter() - t0
        retries = svc.stats()["retries"]
    return _fault("VAE decoder killed with promises pending", lost == 0 and same, lost, clean_s, fault_s,
                  f"{retries} requests re-sent; images equal to the clean batch: {same}")


LEAVER = textwrap.dedent("""
    import json, sys, time, ray
    from mesh_ray.workflow import TESTING_NODES, Workflows
    ray.init(address=sys.argv[1], namespace="mesh-ray", log_to_driver=False, configure_logging=False)
    wf = Workflows.connect(sys.argv[1], service=True, client_id="leaver")
    g = {"s": {"class_type": "Sleep", "inputs": {"seconds": 300, "value": "x"}},
         "c": {"class_type": "Checksum", "inputs": {"data": ["s", 0]}}}
    print(json.dumps([wf.submit(g, node_modules=[TESTING_NODES]).run_id for _ in range(2)]), flush=True)
    time.sleep(900)
""")


def kill_service(timeout_s: float = 60.0) -> None:
    """Kill the workflow service as a crash would (no shutdown) and wait until its name is free."""
    from mesh_ray.errors import ClusterError
    from mesh_ray.workflow.service import find_service

    ray.kill(find_service())
    end = time.monotonic() + timeout_s
    while find_service() is not None:
        if time.monotonic() > end:
            raise ClusterError(f"the killed workflow service still holds its name after {timeout_s:g} s")
        time.sleep(0.1)


def _graph(tag: str, seconds: float = 0.2) -> Graph:
    """Sleep, then a digest: testing node types (the graph names their module)."""
    return validate_graph({"s": {"class_type": "Sleep", "inputs": {"seconds": seconds, "value": tag}},
                           "c": {"class_type": "Checksum", "inputs": {"data": ["s", 0]}}}, modules=[TESTING_NODES])


def _client_disconnect(address: str, tmp: Path) -> dict:
    from mesh_ray.workflow.service import Workflows, find_service, service_call

    script = tmp / "leaver.py"
    script.write_text(LEAVER)
    stay = Workflows.connect(service=True, client_id="stayer")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), address], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    try:
        running, queued = json.loads(proc.stdout.readline())
        end = time.monotonic() + 120
        while stay._do("status", running) != "running" and time.monotonic() < end:
            time.sleep(0.1)
        other = stay.submit(_graph("stayer", 1.0))
        proc.kill()
        t0 = time.perf_counter()
        handle = find_service()
        while "leaver" not in service_call(handle, "info")["dropped"] and time.perf_counter() - t0 < 120:
            time.sleep(0.1)
        states = [stay._do("result", rid, 30.0, timeout=90)["status"] for rid in (running, queued)]
        noticed = time.perf_counter() - t0
        ok = other.result(timeout=120).status == "finished"
    finally:
        if proc.poll() is None:
            proc.kill()
    return _fault("service client disconnected mid-run", ok and states == ["cancelled", "cancelled"], 0 if ok else 1,
                  0.0, noticed, f"its 2 runs cancelled {noticed:.1f} s after it died; the other client's run finished: {ok}")


def _service_restart() -> dict:
    from mesh_ray.workflow.service import Workflows, serve

    wf = Workflows.connect(service=True, client_id="dave")
    held = wf.submit(_graph("held", 3.0))
    queued = wf.submit(_graph("queued"))
    end = time.monotonic() + 120
    while held.status() != "running" and time.monotonic() < end:
        time.sleep(0.1)
    t0 = time.perf_counter()
    kill_service()
    serve(max_parallel=2)
    lost = 0
    for run in (held, queued):  # the client submits what the old service held again: nothing is lost
        try:
            lost += run.result(timeout=120).status != "finished"
        except Exception:  # noqa: BLE001 - counted
            lost += 1
    ok = lost == 0 and wf.submit(_graph("after")).result(timeout=120).status == "finished"
    return _fault("workflow service restarted under a client", ok, lost, 0.0, time.perf_counter() - t0,
                  "client attached to the new service and submitted the running and the queued run again")


# -- leaks and load ---------------------------------------------------------------------------------


def _leak_figures(rows: list[dict], count_key: str, count: int, warm: int, worker_key: str) -> dict:
    """The soak's figures: the driver's and the worker's RSS trends, the driver's malloc in-use change
    and the object store's change, all from after the warm-up to the end."""
    driver, worker = trend(rows, "driver_rss"), trend(rows, worker_key)
    return {count_key: count, "warmup": warm, "samples_done": [r["done"] for r in rows],
            "driver_rss_growth_pct": driver["growth_pct"], "driver_rss_second_half_pct": driver["second_half_pct"],
            "driver_rss_change_bytes": change(rows, "driver_rss"),
            "driver_malloc_in_use_change_bytes": change(rows, "malloc_in_use"),
            f"{worker_key}_growth_pct": worker["growth_pct"],
            f"{worker_key}_second_half_pct": worker["second_half_pct"],
            "store_growth_bytes": change(rows, "store_used"),
            "series": {"driver_rss": driver["series"], worker_key: worker["series"],
                       "malloc_in_use": [r["malloc_in_use"] for r in rows], "store_used": [r["store_used"] for r in rows]}}


def _split_leaks(split, txt, y, gen: dict, generations: int) -> dict:
    from mesh_ray.split.sampler import generate

    def sample() -> dict:
        return {"driver_rss": rss(), "stage_rss": [i["rss_bytes"] for i in split.stage_info()],
                "store_used": store_bytes_used()}

    warm = _warmup(generations)
    rows = soak(lambda _k: generate(split, txt, y, **gen), generations, sample, warm)
    return _leak_figures(rows, "generations", generations, warm, "stage_rss")


def _promise_leaks(vae_path: str, out_dir: Path, decodes: int) -> dict:
    from mesh_ray.vae.service import VaeService

    lat = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    with VaeService(vae_path, replicas=1, num_cpus=0.5, torch_threads=1, output_dir=out_dir) as svc:
        def decode(k: int) -> None:
            svc.decode(lat, mode="promise", save=out_dir / f"leak{k % 4}.png").saved.result(120)

        def sample() -> dict:
            return {"driver_rss": rss(), "decoder_rss": rss(svc.replica_info()[0]["pid"]),
                    "store_used": store_bytes_used()}

        warm = _warmup(decodes)
        rows = soak(decode, decodes, sample, warm)
    return _leak_figures(rows, "decodes", decodes, warm, "decoder_rss")


def _warmup(n: int) -> int:
    """Runs before the soak's baseline: a quarter of the soak (the allocators' pools settle within
    about 50 generations or decodes here), at least 2."""
    return max(2, n // 4)


def _load(clients: int, runs_per_client: int) -> dict:
    from mesh_ray.workflow.service import Workflows

    tags = [[f"c{c}-r{r}" for r in range(runs_per_client)] for c in range(clients)]
    alone_wf = Workflows.connect(service=True, client_id="alone")
    alone = {t: alone_wf.run(_graph(t)).outputs["c"] for row in tags for t in row}
    done: dict[int, list[float]] = {c: [] for c in range(clients)}
    outputs: dict[str, Any] = {}
    errors: list[str] = []
    t0 = time.perf_counter()

    def client(c: int) -> None:
        try:
            wf = Workflows.connect(service=True, client_id=f"load-{c}")
            handles = [(t, wf.submit(_graph(t))) for t in tags[c]]
            for t, h in handles:
                r = h.result(timeout=600)
                outputs[t] = r.outputs.get("c")
                done[c].append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(f"client {c}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=900)
    means = [statistics.mean(v) for v in done.values() if v]
    finished = sum(len(v) for v in done.values())
    return {"clients": clients, "runs_per_client": runs_per_client, "finished": finished,
            "outputs_equal_alone": all(outputs.get(t) == alone[t] for row in tags for t in row),
            "fairness_max_over_min": round(max(means) / min(means), 3) if means else None,
            "seconds": round(time.perf_counter() - t0, 2), "errors": errors}


# -- the run ----------------------------------------------------------------------------------------


def run_faults_bench(generations: int = 20, decodes: int = 20, clients: int = 8, runs_per_client: int = 2,
                     steps: int = 4, size: int = 64) -> dict:
    """All faults, leaks and load on one local cluster: a CPU-less head (the driver) and 3 two-CPU nodes."""
    from ray.cluster_utils import Cluster

    from mesh_ray.mesh import connect
    from mesh_ray.models import write_random_checkpoint
    from mesh_ray.models.vae import write_random_vae
    from mesh_ray.split.sampler import random_conditioning
    from mesh_ray.workflow.service import serve, stop_service

    os.environ.setdefault("RAY_free_objects_period_milliseconds", "20")
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    result: dict[str, Any] = {"faults": [], "leaks": {}, "load": {}}
    t_all = time.perf_counter()
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        mesh = connect(cluster.address)
        with tempfile.TemporaryDirectory(prefix="mesh-ray-faults-") as d:
            tmp = Path(d)
            ckpt = str(write_random_checkpoint(tmp / "tiny.safetensors", "tiny-flux1", seed=7))
            vae = str(write_random_vae(tmp / "vae.safetensors", "tiny-flux1", seed=11))
            gen = dict(width=size, height=size, steps=steps, seed=0, progress=False)
            with mesh.split(ckpt, **STAGE_OPTS) as split:
                txt, y = random_conditioning(split.config, seed=1)
                result["faults"].append(_stage_kill(split, txt, y, gen))
                result["leaks"]["split"] = _split_leaks(split, txt, y, gen, generations)
            result["faults"].append(_vae_kill(vae, tmp / "vae-out", 6))
            result["leaks"]["promise"] = _promise_leaks(vae, tmp / "leak-out", decodes)
            serve(max_parallel=2)
            try:
                result["load"] = _load(clients, runs_per_client)
                result["faults"].append(_client_disconnect(cluster.address, tmp))
                result["faults"].append(_service_restart())
            finally:
                stop_service()
            result["faults"].append(_node_loss(cluster, mesh, ckpt, txt, y, gen, str(tmp / "shards")))
    finally:
        ray.shutdown()
        cluster.shutdown()
    f = result["faults"]
    result.update({"injected": sum(x["injected"] for x in f), "survived": sum(x["survived"] for x in f),
                   "outputs_lost": sum(x["outputs_lost"] for x in f), "seconds": round(time.perf_counter() - t_all, 1)})
    return result


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:+.2f} MB"


def format_table(r: dict) -> str:
    """The figures for people (the JSON has everything)."""
    lines = [text_table(["fault", "survived", "lost", "extra s", "note"],
                        [[x["fault"], x["survived"], x["outputs_lost"], x["extra_s"], x["note"]] for x in r["faults"]])]
    lines.append(f"survived {r['survived']}/{r['injected']}, outputs lost {r['outputs_lost']}")
    s, p, ld = r["leaks"].get("split", {}), r["leaks"].get("promise", {}), r["load"]
    lines.append("leaks: growth from after the warm-up to the end (in brackets: over the soak's second half); "
                 "malloc = change in the bytes the driver's malloc has handed out (what it holds; RSS growth "
                 "beyond it is the allocator's free pool, thread stacks or mappings)")
    for name, soak_, unit, worker in (("generations", s, "generations", "stage_rss"),
                                      ("promise decodes", p, "decodes", "decoder_rss")):
        if not soak_:
            continue
        lines.append(f"  {soak_.get(unit)} {name} after {soak_.get('warmup')} warm-up: driver RSS "
                     f"{soak_.get('driver_rss_growth_pct')} % ({soak_.get('driver_rss_second_half_pct')} %), malloc "
                     f"{_mb(soak_.get('driver_malloc_in_use_change_bytes'))}; {worker.split('_')[0]}s "
                     f"{soak_.get(worker + '_growth_pct')} % ({soak_.get(worker + '_second_half_pct')} %); "
                     f"store {soak_.get('store_growth_bytes')} B")
    lines.append(f"load: {ld.get('clients')} clients x {ld.get('runs_per_client')} runs, {ld.get('finished')} finished, "
                 f"outputs equal alone: {ld.get('outputs_equal_alone')}, fairness max/min {ld.get('fairness_max_over_min')}")
    return "\n".join(lines)


__all__ = ["format_table", "kill_service", "remove_node", "run_faults_bench"]
