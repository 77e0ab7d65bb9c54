"""Reference parity: this engine against the Self-Forcing, LongLive 1.0, Infinity-RoPE and Anchor Forcing pipelines.

Both sides get identical random full-size Wan2.1-1.3B weights, identical prompt embeddings and
identical noise (the same seeded generator, drawn in the reference's order), and the relative
L2 error of the output latents is reported:

    python bench/parity.py --self-forcing PATH --longlive PATH --dtype fp32,bf16 --out docs/parity.json

Cases: Self-Forcing 21 latent frames; LongLive 120 latent frames; LongLive interactive with
prompt switches at frames 40 and 80 (global sink); Infinity-RoPE (sink 1, window 6) 120 frames,
and interactive with a KV flush at frame 42 and a RoPE cut at frame 84; Anchor Forcing
interactive with switches at frames 40 and 80; 45-frame versions of the last two (flush at 18,
cut at 33; Anchor Forcing switches requested at 13 and 28), short enough for strict float32. Paths may also come from the environment
(``GF_SELF_FORCING_PATH``, ``GF_LONGLIVE_PATH``, ``GF_INFINITY_ROPE_PATH``, ``GF_ANCHOR_FORCING_PATH``). ``--tiny`` runs a 2-block model on a CPU in a
few minutes to check the harness itself. See bench/reference.py for what is substituted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from report import run_header, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = {
    # name: (reference pipeline, repo, frames, switch frames[, transition per switch])
    "self_forcing_21": ("self_forcing", "self_forcing", 21, []),
    "longlive_120": ("longlive", "longlive", 120, []),
    "longlive_interactive_120": ("longlive_interactive", "longlive", 120, [40, 80]),
    "infinity_rope_120": ("infinity_rope", "infinity_rope", 120, []),
    # Infinity-RoPE switches only at block boundaries: a KV flush, then a RoPE cut (scene cut)
    "infinity_rope_interactive_120": ("infinity_rope", "infinity_rope", 120, [42, 84], ["flush", "cut"]),
    "anchor_interactive_120": ("anchor_interactive", "anchor_forcing", 120, [40, 80]),
    # shorter full-size cases, for float32 without TF32: every switch kind within 45 frames
    "infinity_rope_interactive_45": ("infinity_rope", "infinity_rope", 45, [18, 33], ["flush", "cut"]),
    # two switches (requested at 13 and 28, made at 15 and 30); each junction is attended by two chunks
    "anchor_interactive_45": ("anchor_interactive", "anchor_forcing", 45, [13, 28]),
}
TINY_FRAMES = {"self_forcing_21": 6, "longlive_120": 18, "longlive_interactive_120": 18,
               "infinity_rope_120": 12, "infinity_rope_interactive_120": 21, "anchor_interactive_120": 30,
               "infinity_rope_interactive_45": 45, "anchor_interactive_45": 45}
TINY_SWITCHES = [6, 15]
# the Infinity-RoPE flush copies the last 2 frames of its 6-frame buffer: switch once the buffer is full;
# Anchor Forcing: one switch requested at 13 (made at 15, a recache that keeps the sink); its junction
# (frames 15-17) is attended once 13 + 12 - 3 < start, i.e. by the chunks at 24 and 27. The requested
# frame is not a multiple of 3, where the reference would activate it a chunk later (docs/POLICIES.md).
TINY_CASE_SWITCHES = {"infinity_rope_interactive_120": [9, 15], "anchor_interactive_120": [13],
                      "infinity_rope_interactive_45": [18, 33], "anchor_interactive_45": [13, 28]}
WEIGHT_SEED, NOISE_SEED = 1234, 42


def model_config(tiny: bool):
    from gf_core import WanConfig

    return WanConfig(num_layers=2, ffn_dim=256) if tiny else WanConfig()


def prompts(count: int) -> dict[str, torch.Tensor]:
    """umT5-like embeddings [1, 512, 4096]: random rows up to the prompt length, zeros after."""
    out = {}
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        e = torch.randn(1, 512, 4096, generator=g) * 0.2
        e[:, 24 + 16 * i:] = 0
        out[f"prompt {i}"] = e
    return out


def case_setup(case: str, tiny: bool):
    """(kind, repo, frames, switch frames, transition per switch)."""
    kind, repo, frames, switches, *rest = CASES[case]
    transitions = rest[0] if rest else ["default"] * len(switches)
    if tiny:
        frames = TINY_FRAMES[case]
        switches = TINY_CASE_SWITCHES.get(case, TINY_SWITCHES) if switches else []
        transitions = transitions[:len(switches)]
    return kind, repo, frames, switches, transitions


def engine_policy(kind: str):
    import gf_core as gf

    if kind == "self_forcing":
        return gf.self_forcing()
    if kind == "infinity_rope":
        return gf.infinity_rope()
    if kind == "anchor_interactive":
        return gf.anchor_forcing()
    return gf.longlive(global_sink=True)


def run_side(args) -> None:
    """One side of one case in this interpreter; saves latents [B, F, 16, 60, 104] as float32."""
    from gf_core import random_state_dict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    dtype = DTYPES[args.dtype]
    kind, _repo, frames, switches, transitions = case_setup(args.case, args.tiny)
    table = prompts(len(switches) + 1)
    names = list(table)
    sd = random_state_dict(model_config(args.tiny), seed=WEIGHT_SEED, device=device)
    began = time.perf_counter()
    if args.side == "reference":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import reference

        if args.tiny:
            reference.set_model_shape(num_layers=2, ffn_dim=256)
        reference.prepare_imports(args.checkout)
        pipe = reference.build_pipeline(kind, sd, dtype, device, {k: v.to(device, dtype) for k, v in table.items()})
        torch.manual_seed(NOISE_SEED)
        noise = torch.randn([1, frames, 16, 60, 104], device=device, dtype=dtype)
        latents = reference.run(kind, pipe, noise, names, switches, cuts=[t == "cut" for t in transitions])
    else:
        import gf_core as gf

        model = gf.WanModel.from_state_dict(sd, dtype=dtype, device=device)
        policy = engine_policy(kind)
        bounds = [0, *switches, frames]
        kinds = ["default", *transitions]
        segments = [gf.Segment(table[names[i]], bounds[i + 1] - bounds[i], gf.Transition(kinds[i]))
                    for i in range(len(bounds) - 1)]
        generator = torch.Generator(device=device).manual_seed(NOISE_SEED)
        result = gf.generate(model, segments, policy, generator=generator, noise_order="reference",
                             rope_kind=args.rope, output_device=device, dtype=dtype,
                             kernels="fused" if args.fused else "eager")
        latents = result.latents.permute(0, 2, 1, 3, 4)
    if device == "cuda":
        torch.cuda.synchronize()
    torch.save({"latents": latents.float().cpu(), "seconds": time.perf_counter() - began}, args.save)


def compare(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-forcing", default=os.environ.get("GF_SELF_FORCING_PATH"), help="Self-Forcing checkout")
    ap.add_argument("--longlive", default=os.environ.get("GF_LONGLIVE_PATH"), help="LongLive checkout (branch v1.0)")
    ap.add_argument("--infinity-rope", default=os.environ.get("GF_INFINITY_ROPE_PATH"),
                    help="Infinity-RoPE checkout (yesiltepe-hidir/infinity-rope)")
    ap.add_argument("--anchor-forcing", default=os.environ.get("GF_ANCHOR_FORCING_PATH"),
                    help="Anchor Forcing checkout (vivoCameraResearch/Anchor-Forcing)")
    ap.add_argument("--case", default="all", help=f"comma list of {', '.join(CASES)} or 'all'")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--rope", default="complex128", help="engine RoPE precision: complex128 or float32")
    ap.add_argument("--tf32", action="store_true", help="float32 runs use TF32 matrix units (both sides alike)")
    ap.add_argument("--fused", action="store_true", help="engine with fused (torch.compile'd) blocks; needs --rope float32")
    ap.add_argument("--tiny", action="store_true", help="2-block model, few frames: checks the harness on a CPU")
    ap.add_argument("--out", help="write the results as JSON here")
    # internal: run one side in this process
    ap.add_argument("--side", choices=["reference", "engine"])
    ap.add_argument("--checkout")
    ap.add_argument("--save")
    args = ap.parse_args()
    if args.side:
        run_side(args)
        return

    checkouts = {"self_forcing": args.self_forcing, "longlive": args.longlive,
                 "infinity_rope": args.infinity_rope, "anchor_forcing": args.anchor_forcing}
    cases = list(CASES) if args.case == "all" else args.case.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            repo = CASES[case][1]
            if not checkouts[repo]:
                raise SystemExit(f"case {case} needs the {repo} checkout: pass --{repo.replace('_', '-')} or set the variable")
            for dt in args.dtype.split(","):
                outputs = {}
                for side in ("reference", "engine"):
                    path = os.path.join(tmp, f"{case}-{dt}-{side}.pt")
                    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--case", case, "--dtype", dt,
                           "--rope", args.rope, "--checkout", checkouts[repo], "--save", path]
                    cmd += ["--tiny"] if args.tiny else []
                    cmd += ["--tf32"] if args.tf32 else []
                    cmd += ["--fused"] if args.fused else []
                    subprocess.run(cmd, check=True)
                    outputs[side] = torch.load(path, weights_only=True)
                ref, eng = outputs["reference"]["latents"], outputs["engine"]["latents"]
                _, _, _, switches, transitions = case_setup(case, args.tiny)
                row = {
                    "case": case, "dtype": dt, "frames": ref.shape[1], "rope": args.rope, "tf32": args.tf32,
                    "fused": args.fused,
                    "switches": switches, "transitions": transitions,
                    "rel_l2": compare(eng, ref), "max_abs": float((eng - ref).abs().max()),
                    "reference_s": round(outputs["reference"]["seconds"], 2),
                    "engine_s": round(outputs["engine"]["seconds"], 2),
                    "per_chunk_rel_l2": [compare(eng[:, i:i + 3], ref[:, i:i + 3]) for i in range(0, ref.shape[1], 3)],
                }
                rows.append(row)
                print(f"{case:26s} {dt:5s} frames {row['frames']:4d} rel L2 {row['rel_l2']:.3e} "
                      f"max|d| {row['max_abs']:.3e}  ref {row['reference_s']}s engine {row['engine_s']}s", flush=True)
    write_json(run_header(tiny=args.tiny, results=rows), args.out)
    print("\n| case | dtype | latent frames | relative L2 | max abs diff |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['dtype']} | {r['frames']} | {r['rel_l2']:.2e} | {r['max_abs']:.2e} |")


if __name__ == "__main__":
    main()
