"""Issue 10's GPU check: kill a stage on the GPU mid-generation; it restarts, the step is retried,
the image equals the fault-free one, and the stage's GPU memory after recovery equals before.

``python -m mesh_ray.bench.gpu_fault_check --out DIR`` on a machine with one CUDA GPU and Ray:
an embedded Ray with the GPU, a FLUX.1-architecture checkpoint at full width (3072, bf16, random
weights) with ``--double``/``--single`` blocks, two stages at ``num_gpus=0.5`` each, 1024x1024
tokens.  Writes DIR/gpu_fault_check.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _gpu_used_mib() -> list[int]:
    import subprocess

    if not torch.cuda.is_available():
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return [int(x) for x in out.split()]


def run(out_dir: Path, double: int, single: int, steps: int, size: int, transport: str = "auto") -> dict:
    import ray

    from mesh_ray.mesh import connect
    from mesh_ray.models.checkpoint import save_checkpoint
    from mesh_ray.models.flux import PRESETS, random_state_dict
    from mesh_ray.split.sampler import generate, random_conditioning

    gpu = torch.cuda.is_available()
    base = PRESETS["flux1-dev" if gpu else "tiny-flux1"]
    cfg = base.model_copy(update={"depth": double, "depth_single_blocks": single})
    sd = random_state_dict(cfg, seed=0, dtype=torch.bfloat16 if gpu else torch.float32, device="cuda" if gpu else "cpu")
    ckpt = save_checkpoint({k: v.cpu() for k, v in sd.items()}, out_dir / "flux1-fullwidth.safetensors", cfg)
    del sd
    mesh = connect(num_gpus=1 if gpu else 0)
    n = double + single
    stages = [{"blocks": f"0-{n // 2 - 1}", "num_gpus": 0.5 if gpu else 0},
              {"blocks": f"{n // 2}-{n - 1}", "num_gpus": 0.5 if gpu else 0}]
    res: dict = {"model": f"flux1 width 3072, {double} double + {single} single blocks, bf16 random",
                 "image": f"{size}x{size}", "steps": steps, "gpu": torch.cuda.get_device_name(0) if gpu else "none (CPU dry run)"}
    gen = dict(width=size, height=size, steps=steps, seed=5, progress=False)
    with mesh.split(str(ckpt), stages=stages, codec="raw", transport=transport) as split:
        res["links"] = split.links
        txt, y = random_conditioning(split.config, seed=1)
        t0 = time.perf_counter()
        clean = generate(split, txt, y, **gen)
        res["clean_s"] = time.perf_counter() - t0
        before = split.stage_info()
        res["stage_cuda_bytes_before"] = [i["cuda_bytes"] for i in before]
        res["stage_devices"] = [i["device"] for i in before]
        res["gpu_used_mib_before"] = _gpu_used_mib()

        def kill(step: int, _steps: int, _img: torch.Tensor) -> None:
            if step == steps // 2:
                ray.kill(split.segments[1].actor, no_restart=False)

        t0 = time.perf_counter()
        faulty = generate(split, txt, y, callback=kill, **gen)
        res["faulty_s"] = time.perf_counter() - t0
        after = split.stage_info()
        res["stage_cuda_bytes_after"] = [i["cuda_bytes"] for i in after]
        res["gpu_used_mib_after"] = _gpu_used_mib()
        res["restarts"], res["retries"] = split.recovery.restarts, split.recovery.retries
        res["identical"] = bool(torch.equal(clean, faulty))
        res["max_abs_diff"] = float((clean.float() - faulty.float()).abs().max())
        res["pids_changed"] = before[1]["pid"] != after[1]["pid"]
        res["hops"] = [{"link": h.link, "transport": h.transport, "transfer_ms": h.transfer_ms}
                       for h in split.last.transfers]
    res["same_stage_memory_after_recovery"] = res["stage_cuda_bytes_before"] == res["stage_cuda_bytes_after"]
    ray.shutdown()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/gpu")
    ap.add_argument("--double", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--transport", default="auto", help="the split's transport (auto: CUDA IPC for two stages on one GPU)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(out, args.double, args.single, args.steps, args.size, args.transport)
    (out / "gpu_fault_check.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
