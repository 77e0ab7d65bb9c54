"""Wan2.1 VAE stream decode speed on one GPU, with cuDNN's autotuner off and on.

ComfyUI's ``WanVAE`` at the Wan2.1 shape with random weights, bf16, decoding the latent frames
group by group, in the installed ComfyUI's own grouping, through ``nodes/decoding.StreamDecoder``
(what GF Stream Decode does), at 832x480:

    python bench/decode_speed.py --comfyui $GF_COMFYUI_PATH --frames 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = Path(__file__).resolve().parent.parent

from report import random_wan_vae, run_header, write_json  # noqa: E402


def wan_vae(comfyui: str | None, device: str, dtype: torch.dtype):
    """ComfyUI's Wan2.1 VAE (``comfy.ldm.wan.vae.WanVAE``) at the shape comfy/sd.py builds, random
    weights, and the pack's comfy-free decoding module."""
    import importlib.util

    if not comfyui:
        raise SystemExit("this bench needs a ComfyUI checkout: pass --comfyui or set GF_COMFYUI_PATH")
    spec = importlib.util.spec_from_file_location("gf_decoding", ROOT / "nodes" / "decoding.py")
    decoding = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = decoding  # its dataclasses look their module up while it loads
    spec.loader.exec_module(decoding)
    return random_wan_vae(comfyui, device, dtype), decoding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("GF_COMFYUI_PATH"))
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    vae, decoding = wan_vae(args.comfyui, "cuda", torch.bfloat16)
    z = torch.randn(1, 16, args.frames, 60, 104, device="cuda", dtype=torch.bfloat16)
    rows = []
    # (a channels_last_3d variant fails: the VAE has parameters of other ranks)
    for benchmark, layout in ((False, "contiguous"), (True, "contiguous")):
        torch.backends.cudnn.benchmark = benchmark
        outputs = []
        for attempt in ("warm-up", "timed"):
            decoder = decoding.StreamDecoder(vae)
            torch.cuda.synchronize()
            began = time.perf_counter()
            frames = [*decoder.push_groups(z[:, :, :4] if attempt == "warm-up" else z), decoder.flush()]
            torch.cuda.synchronize()
            seconds = time.perf_counter() - began
            outputs = frames
        pixel_frames = sum(f.shape[2] for f in outputs)
        row = {"cudnn_benchmark": benchmark, "layout": layout, "latent_frames": args.frames,
               "pixel_frames": pixel_frames, "seconds": seconds, "pixel_fps": pixel_frames / seconds,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.reset_peak_memory_stats()
    write_json(run_header(rows=rows), args.out)


if __name__ == "__main__":
    main()
