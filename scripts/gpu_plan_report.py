"""Plans for N GPUs like the one measured by ``gpu_block_times.py``: ``python scripts/gpu_plan_report.py docs/data/gpu_block_times_h200.json``.

The link cost per hop is the measured GPU -> host -> GPU round trip of one activation (what a Ray
object-store hop between two GPUs of one box copies over PCIe), not counting Ray's own overhead.
"""

import json
import sys

from mesh_ray.models.flux import preset
from mesh_ray.split.planner import plan_for


def main() -> None:
    data = json.load(open(sys.argv[1]))
    steps = 20
    print(f"{data['device']}, torch {data['torch']}, {data['date']}: {data['image_tokens']} image + "
          f"{data['txt_tokens']} text tokens (1024x1024), {data['dtype']}, {steps} steps")
    for name, m in data["models"].items():
        cfg = preset(name)
        one = (cfg.depth * m["double_ms"] + cfg.depth_single_blocks * m["single_ms"] + m["front_ms"]) * steps
        print(f"\n{name}: double block {m['double_ms']:.2f} ms, single block {m['single_ms']:.2f} ms, front "
              f"{m['front_ms']:.2f} ms, GPU->host->GPU hop {m['host_round_trip_ms']:.2f} ms; one GPU: "
              f"{1000 / one:.3f} images/s")
        for n in (2, 4):
            plan = plan_for([(m["double_ms"], m["single_ms"])] * n, m["front_ms"], [m["free_bytes"]] * n, cfg,
                            names=[f"gpu{i}" for i in range(n)], link_ms=m["host_round_trip_ms"], steps=steps,
                            work_bytes=m["work_bytes"], h2d_bytes_per_s=m["h2d_bytes_per_s"])
            print(f"  {n} GPUs: {plan.predicted_images_per_s:.3f} images/s ({plan.predicted_images_per_s * one / 1000:.2f}x one GPU), "
                  f"ranges {[s.blocks for s in plan.stages]}, bottleneck {plan.bottleneck} {plan.bottleneck_ms:.1f} ms/step")


if __name__ == "__main__":
    main()
