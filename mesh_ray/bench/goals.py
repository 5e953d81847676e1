"""The benchmark goals, in one place: the benches check against them and the CLI help quotes them."""

from __future__ import annotations

SPLIT = {"ratio_split_over_local": 1.05}  # at most: split step time over local step time (raw links)
VAE = {"throughput_ratio_promise_over_wait": 1.6, "blocked_ms_per_image_promise": 5.0}  # at least / below
RELEASE = {"level2_over_min_live": 0.05, "level2_below_level0": 0.40}  # at most / at least
