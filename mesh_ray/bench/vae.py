"""``mesh-ray bench vae``: remote VAE decode, Wait against Promise, side by side in one run.

Each generation samples a latent with a seeded tiny FLUX model in this process, then decodes it
on a VAE decoder actor and saves a PNG.  Wait blocks on the decode and saves inline; Promise
returns at once (``decode(mode="promise")`` + ``promise.save``), so the next generation's
sampling overlaps this one's decode.  The number of sampler steps is chosen so that sampling and
decoding take about the same time (the case the overlap helps most), and each side gets one torch
thread so the two do not fight over the cores.  Ideal ratio with ``g`` generations:
``2g / (g + 1)`` (1.71 at 6).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from mesh_ray.bench import goals, median_ms
from mesh_ray.models.images import save_images
from mesh_ray.mesh import connect
from mesh_ray.models.flux import PRESETS, build, random_state_dict
from mesh_ray.models.vae import VAE_PRESETS, write_random_vae
from mesh_ray.split.sampler import generate, random_conditioning

GOALS = goals.VAE


def run_vae_bench(generations: int = 6, size: int = 512, arch: str = "flux1", vae_preset: str | None = None,
                  steps: int | None = None, threads: int = 1, checkpoint: str | None = None,
                  out_dir: str | None = None, seed: int = 0, rounds: int = 2, vae_width: int | None = 16) -> dict:
    """Wait vs Promise over ``generations`` images of ``size`` px; returns a JSON-ready dict.

    ``steps`` None picks the sampler steps that make sampling last about one decode.
    ``threads`` torch threads for the sampler (this process) and for the decoder actor each.
    ``vae_width`` overrides the VAE preset's base width ``ch`` (None keeps it).
    ``rounds`` alternations of wait and promise; each mode's fastest round is reported.
    """
    from mesh_ray.vae.service import VaeService

    load_before = os.getloadavg()[0]
    cfg = PRESETS[f"tiny-{arch}"]
    vae_preset = vae_preset or f"tiny-{arch}"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    service = None
    try:
        connect(num_cpus=4)  # embedded Ray unless one is running in this process already
        with tempfile.TemporaryDirectory(prefix="mesh-ray-bench-vae-") as tmp:
            out = Path(out_dir or tmp) / "bench-vae"
            # Twice the tiny width by default: the decode then spans several sampler steps, so the
            # step count can match it closely (one step is the granularity of the balance).
            vae_cfg = VAE_PRESETS[vae_preset]
            if vae_width is not None:
                vae_cfg = vae_cfg.model_copy(update={"ch": vae_width})
            ckpt = checkpoint or str(write_random_vae(Path(tmp) / "vae.safetensors", vae_cfg, seed=seed))
            model = build(cfg)
            model.load_state_dict(random_state_dict(cfg, seed))
            model.eval()
            txt, y = random_conditioning(cfg, seed=seed)
            service = VaeService(ckpt, replicas=1, torch_threads=threads, num_cpus=1, output_dir=out)

            def sample(n_steps: int, s: int) -> torch.Tensor:
                return generate(model, txt, y, width=size, height=size, steps=n_steps, seed=s, progress=False)

            # Warm both sides, then size the sampler to what the caller waits for per image in
            # wait mode (decode + save): of the two nearest step counts, the one with the best
            # ideal overlap (S + D) / (max(S, D) + min(S, D) / g).
            latent = sample(1, seed)
            service.decode(latent, timeout=300)
            decode_ms = median_ms(lambda: service.decode(latent, timeout=300))
            save_ms = median_ms(lambda: save_images(service.decode(latent, timeout=300), out / "calibrate", stem="c")) - decode_ms
            step_ms = median_ms(lambda: sample(1, seed))
            d = decode_ms + max(save_ms, 0.0)

            def ideal(n: int) -> float:
                s_ms = n * step_ms
                return (s_ms + d) / (max(s_ms, d) + min(s_ms, d) / generations)

            n_steps = steps or max((max(1, int(d // step_ms)), max(1, int(d // step_ms) + 1)), key=ideal)
            sample_ms = median_ms(lambda: sample(n_steps, seed), repeats=2)

            def run_wait() -> tuple[float, float]:
                """Sample, decode (blocking), save inline: (wall s, caller s blocked on the VAE)."""
                blocked, t0 = 0.0, time.perf_counter()
                for g in range(generations):
                    lat = sample(n_steps, seed + g)
                    b0 = time.perf_counter()
                    images = service.decode(lat, mode="wait", timeout=300)
                    save_images(images, out / "wait", {"generation": g}, stem=f"wait_{g:03d}")
                    blocked += time.perf_counter() - b0
                return time.perf_counter() - t0, blocked

            def run_promise() -> tuple[float, float]:
                """Sample, decode(mode="promise") + save(), both return at once; wall ends when all are written."""
                blocked, handles, t0 = 0.0, [], time.perf_counter()
                for g in range(generations):
                    lat = sample(n_steps, seed + g)
                    b0 = time.perf_counter()
                    promise = service.decode(lat, mode="promise", timeout=300)
                    handles.append(promise.save(out / "promise", {"generation": g}))
                    blocked += time.perf_counter() - b0
                for h in handles:
                    h.result(timeout=300)
                return time.perf_counter() - t0, blocked

            # Alternate the modes so that load from elsewhere hits both alike; keep each one's best round.
            waits, promises = [], []
            for _ in range(rounds):
                waits.append(run_wait())
                promises.append(run_promise())
            wait_s, wait_blocked = min(waits)
            promise_s, blocked = min(promises)
            written = sum(1 for _ in (out / "promise").glob("*.png"))

        ratio = wait_s / promise_s
        blocked_promise = blocked * 1000 / generations
        return {
            "arch": arch, "vae": vae_preset if vae_width is None else f"{vae_preset} (ch={vae_width})", "size": size, "generations": generations, "rounds": rounds,
            "sampler_steps": n_steps,
            "threads_per_side": threads, "device": service.replica_info()[0].get("device", "?"),
            "sample_ms_per_image": round(sample_ms, 1), "decode_ms_per_image": round(decode_ms, 1),
            "wait_s": round(wait_s, 3), "promise_s": round(promise_s, 3),
            "wait_s_rounds": [round(w, 3) for w, _ in waits], "promise_s_rounds": [round(p, 3) for p, _ in promises],
            "images_per_s_wait": round(generations / wait_s, 3), "images_per_s_promise": round(generations / promise_s, 3),
            "blocked_ms_per_image_wait": round(wait_blocked * 1000 / generations, 2),
            "blocked_ms_per_image_promise": round(blocked_promise, 3),
            "throughput_ratio_promise_over_wait": round(ratio, 3),
            "ideal_ratio": round(2 * generations / (generations + 1), 3),
            "ideal_ratio_at_these_steps": round(ideal(n_steps), 3), "save_ms_per_image": round(save_ms, 1),
            "promise_images_written": written,
            # The ratio needs two idle cores (sampler + decoder): other load on the machine lowers it.
            "cpu_count": os.cpu_count(), "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "goals_met": {"throughput_ratio_promise_over_wait": ratio >= GOALS["throughput_ratio_promise_over_wait"],
                          "blocked_ms_per_image_promise": blocked_promise < GOALS["blocked_ms_per_image_promise"]},
        }
    finally:
        torch.set_num_threads(old_threads)
        if service is not None:
            service.close()


def format_table(result: dict) -> str:
    """A small table for people: wait and promise side by side, then the ratios against goals."""
    r = result
    lines = [
        f"VAE decode bench: {r['generations']} generations x {r['rounds']} rounds (best kept), {r['size']}px, {r['arch']} sampler "
        f"{r['sampler_steps']} steps ({r['sample_ms_per_image']} ms) vs decode {r['decode_ms_per_image']} ms "
        f"on {r['device']}, {r['threads_per_side']} torch thread(s) per side; "
        f"load avg {r['loadavg_1m_before']} -> {r['loadavg_1m_after']} on {r['cpu_count']} cores",
        f"{'mode':<10}{'wall s':>10}{'images/s':>12}{'blocked ms/img':>18}",
        f"{'wait':<10}{r['wait_s']:>10.3f}{r['images_per_s_wait']:>12.3f}{r['blocked_ms_per_image_wait']:>18.2f}",
        f"{'promise':<10}{r['promise_s']:>10.3f}{r['images_per_s_promise']:>12.3f}{r['blocked_ms_per_image_promise']:>18.3f}",
        f"throughput ratio promise/wait: {r['throughput_ratio_promise_over_wait']:.3f} "
        f"(goal >= {GOALS['throughput_ratio_promise_over_wait']}, ideal {r['ideal_ratio']}) "
        f"{'ok' if r['goals_met']['throughput_ratio_promise_over_wait'] else 'MISSED'}",
        f"caller blocked per image (promise): {r['blocked_ms_per_image_promise']:.3f} ms "
        f"(goal < {GOALS['blocked_ms_per_image_promise']}) "
        f"{'ok' if r['goals_met']['blocked_ms_per_image_promise'] else 'MISSED'}",
    ]
    return "\n".join(lines)


__all__ = ["GOALS", "format_table", "run_vae_bench"]
