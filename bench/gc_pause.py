"""What a full pass of Python's garbage collector costs before and after compiled blocks are warmed
up, and once the process's objects are frozen as GF Live Sampler freezes them for a take: the tiny
model on a CPU, fused kernels.

    python bench/gc_pause.py
"""

from __future__ import annotations

import gc
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from helpers import RUN, tiny_model  # noqa: E402

import gf_core as gf  # noqa: E402


def full_pass() -> float:
    began = time.perf_counter()
    gc.collect()
    return time.perf_counter() - began


def main() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    prompt = torch.randn(1, 16, model.text_embedding[0].in_features)
    config = gf.RunConfig(kernels="fused", seed=0, noise_order="chunk", **RUN)
    gc.collect()
    before, tracked = full_pass(), len(gc.get_objects())
    gf.warm_up(model, "grounded", config, prompt)
    gc.collect()
    after, tracked_after = full_pass(), len(gc.get_objects())
    gc.freeze()
    frozen = full_pass()
    gc.unfreeze()
    print(f"tracked objects {tracked} -> {tracked_after} after the warm-up; a full collection took "
          f"{before * 1e3:.1f} ms before it, {after * 1e3:.1f} ms after it, {frozen * 1e3:.1f} ms after gc.freeze")


if __name__ == "__main__":
    main()
