"""The benchmark goals, in one place: the benches check against them and the CLI help quotes them."""

from __future__ import annotations

SPLIT = {"ratio_split_over_local": 1.05}  # at most: split step time over local step time (raw links)
VAE = {"throughput_ratio_promise_over_wait": 1.6, "blocked_ms_per_image_promise": 5.0}  # at least / below
RELEASE = {"level2_over_min_live": 0.05, "level2_below_level0": 0.40}  # at most / at least
PIPELINE = {"throughput_ratio_k2_m4": 1.8, "planner_over_best_hand": 0.9,  # at least: K=2, M>=4; planner within 10%
            "slow_planner_over_even_split": 1.3}  # at least: one stage 2x slower, the planner's plan against the even split
CODEC_DEVICE = {"quant8_gb_s": 20.0,  # at least: quant8 encode and decode on an H100/H200 (entropy none or nvCOMP)
                "nvdec_ms_per_512_frame": 10.0}  # at most: one 512x512 HEVC frame through NVDEC
