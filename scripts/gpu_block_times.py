"""Measure per-block times of real-size FLUX models on this machine's GPU, for the planner (no Ray needed).

Run on a bare GPU machine: ``python scripts/gpu_block_times.py OUT.json``.  It loads mesh_ray's
models and profiling modules without the package's ``__init__`` (which imports Ray), times one
double and one single block, the caller's front, free memory and the host link, and writes JSON
that ``mesh_ray.split.planner.plan_for`` turns into plans for N such GPUs (``docs/gpu-results.md``).
"""

import json
import sys
import time
import types
from pathlib import Path

root = Path(__file__).resolve().parents[1]
pkg = types.ModuleType("mesh_ray")
pkg.__path__ = [str(root / "mesh_ray")]
sys.modules["mesh_ray"] = pkg

import torch  # noqa: E402

from mesh_ray.models.flux import preset  # noqa: E402
from mesh_ray.actors.profiling import measure_blocks, measure_front  # noqa: E402


def host_round_trip_ms(nbytes: int, repeats: int = 10) -> float:
    """One activation GPU -> host -> GPU through pageable memory, as a Ray hop between two GPUs copies it."""
    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = x.cpu().to("cuda")
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    del y
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "image_tokens": 4096, "txt_tokens": 512, "dtype": "bfloat16", "models": {}}
    dev = (torch.device("cuda"), torch.bfloat16)
    for name in ("flux1-dev", "flux2-klein-9b", "flux2-dev"):
        cfg = preset(name)
        m = measure_blocks(cfg, 4096, 512, repeats=10, device=dev)
        m["front_ms"] = measure_front(cfg, 4096, 512, repeats=10, device=dev)
        m["host_round_trip_ms"] = host_round_trip_ms(m["activation_bytes"])
        out["models"][name] = m
        print(name, json.dumps(m), flush=True)
        torch.cuda.empty_cache()
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
