"""Diffusion throughput on one GPU: this engine against the LongLive 1.0 and Self-Forcing pipelines.

Identical random full-size Wan2.1-1.3B weights, 832x480, 4 steps, bf16, diffusion only (no text
encoder, no VAE). One command measures every row:

    python bench/throughput.py --self-forcing PATH --longlive PATH --out docs/throughput.json

Rows: engine "grounded" 120 latent frames (add "+fused" to a row name for compiled blocks); engine "grounded" 6-segment APR timeline (120);
engine "longlive" (120); LongLive reference (120); Self-Forcing reference (21); and the flat-cost
run: engine "grounded" for ``--long-frames`` (1,000) latent frames. Each row runs in a fresh
interpreter. Pixel frames/s counts 4 pixel frames per latent frame (the first latent frame of a
video decodes to 1, which is ignored here as the references' own FPS figures do).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import run_header, write_json  # noqa: E402

ROWS = ("grounded_120", "grounded_apr6_120", "longlive_engine_120", "longlive_reference_120",
        "self_forcing_reference_21", "grounded_long")


def _prompts(n: int) -> list[torch.Tensor]:
    from parity import prompts

    return list(prompts(n).values())


def run_row(row: str, args) -> dict:
    """One measurement. An engine row may add "+fused" (blocks compiled with torch.compile) and end
    in "@backend" to pick its attention (e.g. "grounded_120+fused@cudnn"; without it the kernels'
    own choice)."""
    name = row
    row, _, backend = row.partition("@")
    if backend:
        args.attention = backend
    row, *variants = row.split("+")
    unknown = set(variants) - {"fused"}
    if unknown:
        raise SystemExit(f"unknown row variant '+{sorted(unknown)[0]}' in {name}; the engine rows take +fused")
    kernels = "fused" if "fused" in variants else "eager"
    from parity import model_config

    from gf_core import random_state_dict

    torch.backends.cuda.matmul.allow_tf32 = True
    dtype, device = torch.bfloat16, "cpu" if args.tiny else "cuda"
    cuda = device == "cuda"
    scale = 10 if args.tiny else 1  # --tiny: a tenth of the frames (rounded to chunks) on a 2-block model

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sd = random_state_dict(model_config(args.tiny), seed=1234, dtype=dtype, device=device)
    sync()
    result: dict = {"row": name}
    if row.endswith(("reference_120", "reference_21")):
        import reference

        kind = "longlive" if row.startswith("longlive") else "self_forcing"
        frames = (120 if kind == "longlive" else 21) // scale // 3 * 3 or 3
        if args.tiny:
            reference.set_model_shape(num_layers=2, ffn_dim=256)
        reference.prepare_imports(args.longlive if kind == "longlive" else args.self_forcing)
        pipe = reference.build_pipeline(kind, sd, dtype, device, {"prompt 0": _prompts(1)[0].to(device, dtype)})
        del sd
        if cuda:
            torch.cuda.empty_cache()
        for attempt in ("warmup", "timed"):
            torch.manual_seed(0)
            noise = torch.randn([1, frames if attempt == "timed" else 6, 16, 60, 104], device=device, dtype=dtype)
            if attempt == "timed":
                pipe.kv_cache1 = None  # the reference re-allocates its caches per video
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
            sync()
            began = time.perf_counter()
            reference.run(kind, pipe, noise, ["prompt 0"])
            sync()
        seconds = time.perf_counter() - began
        result.update(frames=frames, seconds=seconds, chunk_seconds=None, first_chunk_s=None)
    else:
        import gf_core as gf
        from gf_core.kernels import attention_backend

        model = gf.WanModel.from_state_dict(sd, dtype=dtype, device=device)
        del sd
        if cuda:
            torch.cuda.empty_cache()
        policy = "longlive" if row.startswith("longlive") else "grounded"
        frames = (args.long_frames if row == "grounded_long" else 120) // scale
        ps = _prompts(6)
        if row == "grounded_apr6_120":
            segments = [gf.Segment(p, 20 // scale // 3 * 3 or 3, gf.Transition("apr")) for p in ps]
            frames = sum(s.frames for s in segments)
        else:
            segments = [gf.Segment(ps[0], frames)]
        # warm-up: every shape of the run (no context up to a full window, a prompt switch, and each
        # prompt: fused runs fold a prompt's padding, so prompt lengths give shapes too) once
        switch = gf.Transition("apr") if row == "grounded_apr6_120" else gf.Transition("default")
        warm = [gf.Segment(ps[0], 24), gf.Segment(ps[1], 9, switch)]
        if row == "grounded_apr6_120":
            warm += [gf.Segment(p, 3, switch) for p in ps[2:]]
        attention = None if args.attention == "auto" else attention_backend(args.attention)
        began = time.perf_counter()
        list(gf.stream(model, warm, policy, seed=0, dtype=dtype, attention=attention, kernels=kernels))
        sync()
        result["warmup_s"] = time.perf_counter() - began
        from gf_core.kernels import product_gelu_is_tanh

        result["gelu_in_product"] = kernels == "fused" and product_gelu_is_tanh(torch.device(device))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        chunk_s, mem_after, switches = [], {}, []
        began = time.perf_counter()
        for chunk in gf.stream(model, segments, policy, seed=0, dtype=dtype, attention=attention, kernels=kernels):
            chunk_s.append(chunk.event["seconds"])  # GPU time from the previous chunk's end to this one's
            if chunk.event["switch"]:
                switches.append(chunk.index)
            if chunk.index in (10, 300) and cuda:
                mem_after[chunk.index] = torch.cuda.memory_allocated()
        seconds = time.perf_counter() - began
        plain = [s for i, s in enumerate(chunk_s) if i not in switches and i > 0]
        median = statistics.median(plain)
        result.update(frames=frames, seconds=seconds, chunk_seconds=chunk_s, first_chunk_s=chunk_s[0],
                      median_chunk_s=median,
                      switch_cost_chunks=[chunk_s[i] / median for i in switches] if switches else None,
                      switch_added_chunks=[chunk_s[i] / median - 1 for i in switches] if switches else None,
                      memory_after_chunk=mem_after)
        if row == "grounded_long" and len(chunk_s) > 330:
            early, late = statistics.median(chunk_s[10:40]), statistics.median(chunk_s[300:330])
            result.update(median_10_40=early, median_300_330=late, late_over_early=late / early)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    result["pixel_fps"] = 4 * result["frames"] / result["seconds"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-forcing", default=os.environ.get("GF_SELF_FORCING_PATH"))
    ap.add_argument("--longlive", default=os.environ.get("GF_LONGLIVE_PATH"))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--long-frames", type=int, default=1000)
    ap.add_argument("--attention", default="auto",
                    help="engine attention: auto (the kernels' choice), flash, cudnn, efficient, math or splitN")
    ap.add_argument("--tiny", action="store_true",
                    help="2-block model on a CPU, a tenth of the frames: checks the harness, measures nothing")
    ap.add_argument("--out")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        with open(args.save, "w") as fh:
            json.dump(run_row(args.row, args), fh)
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows.split(","):
            path = os.path.join(tmp, row + ".json")
            cmd = [sys.executable, os.path.abspath(__file__), "--row", row, "--save", path,
                   "--long-frames", str(args.long_frames), "--attention", args.attention]
            cmd += ["--tiny"] if args.tiny else []
            for flag, value in (("--self-forcing", args.self_forcing), ("--longlive", args.longlive)):
                if value:
                    cmd += [flag, value]
            done = subprocess.run(cmd)
            if done.returncode:
                print(f"{row}: failed with exit code {done.returncode}", flush=True)
                continue
            with open(path) as fh:
                r = json.load(fh)
            results.append(r)
            extra = ""
            if r.get("median_chunk_s"):
                extra = f" median chunk {r['median_chunk_s'] * 1e3:.0f} ms first {r['first_chunk_s'] * 1e3:.0f} ms"
            if r.get("switch_cost_chunks"):
                extra += (f" switch chunk {max(r['switch_cost_chunks']):.3f} chunk times"
                          f" (adds {max(r['switch_added_chunks']):.3f})")
            if r.get("warmup_s"):
                extra += f" warm-up {r['warmup_s']:.0f} s"
            if r.get("late_over_early"):
                extra += f" late/early {r['late_over_early']:.3f} mem10 {r['memory_after_chunk'].get('10')} mem300 {r['memory_after_chunk'].get('300')}"
            print(f"{row:28s} {r['pixel_fps']:6.1f} px-fps peak {r['peak_gib']:.2f} GiB{extra}", flush=True)
    ref = next((r for r in results if r["row"].startswith("longlive_reference_120")), None)
    write_json(run_header(attention=args.attention, results=results), args.out)
    print("\n| row | latent frames | pixel frames/s | x LongLive ref | peak GiB |\n| --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r['pixel_fps'] / ref['pixel_fps']:.2f}" if ref else "-"
        print(f"| {r['row']} | {r['frames']} | {r['pixel_fps']:.1f} | {ratio} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
