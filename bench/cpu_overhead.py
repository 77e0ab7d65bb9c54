"""Per-chunk engine overhead on a CPU with the tiny model (no GPU needed).

The tiny model (dim 256, 2 blocks) at 32x32 pixels does almost no arithmetic, so the time per
chunk is mostly the engine's own work: memory bookkeeping, index plans, RoPE tables, K/V writes,
event building. A regression there shows up here first:

    python bench/cpu_overhead.py            # median ms per chunk for each policy
    python bench/cpu_overhead.py --fused    # the same with compiled blocks (compiles first)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gf_core as gf  # noqa: E402


def measure(policy: str, chunks: int, switch_every: int, fused: bool = False) -> tuple[float, float]:
    cfg = gf.WanConfig.tiny()
    model = gf.WanModel.from_state_dict(gf.random_state_dict(cfg, seed=0))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, 16, cfg.text_dim, generator=g) for _ in range(2)]
    frames = 3 * switch_every
    segments = [gf.Segment(prompts[i % 2], frames, gf.Transition("default")) for i in range(chunks // switch_every)]
    if fused:  # compile every shape of the run first
        list(gf.stream(model, segments[:2], policy, height=32, width=32, seed=0, kernels="fused"))
    times, switches = [], []
    last = time.perf_counter()
    for chunk in gf.stream(model, segments, policy, height=32, width=32, seed=0,
                           kernels="fused" if fused else "eager"):
        now = time.perf_counter()
        (switches if chunk.event["switch"] else times).append(now - last)
        last = now
    return statistics.median(times[1:]) * 1e3, (statistics.median(switches) * 1e3 if switches else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=60)
    ap.add_argument("--switch-every", type=int, default=10, help="chunks per segment")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fused", action="store_true", help="compiled blocks (torch.compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| policy | median ms / chunk | median ms / switch chunk |\n| --- | --- | --- |")
    for policy in ("grounded", "longlive"):
        chunk_ms, switch_ms = measure(policy, args.chunks, args.switch_every, args.fused)
        print(f"| {policy} | {chunk_ms:.1f} | {switch_ms:.1f} |")


if __name__ == "__main__":
    main()
