"""Identity over the first 21 frames of every toy-world subject, under every policy.

The quality table's first-21 column comes from its three runs, two of which open with the same
sentence (the big red circle bouncing on the grass), so it says how a policy keeps one or two
subjects. This runs all 24 subjects (3 shapes x 4 colours x 2 sizes), each with the next action
and scene in turn, so that a policy's score is not one subject's. Per row: the mean over seeds of
each seed's mean over openings, the spread over seeds, and each opening's mean over seeds.

    python bench/toy_openings.py --out OUT.json                     # every row, 3 seeds, a CPU
    python bench/toy_openings.py --rows infinity_rope,grounded --seeds 1 --model OUT
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from quality import ROWS  # noqa: E402
from report import run_header, write_json  # noqa: E402

import gf_core as gf  # noqa: E402
from gf_core import toyworld as tw  # noqa: E402

# rows that differ from another inside a single-prompt run (the switch ablations equal "grounded" there)
DEFAULT_ROWS = ("grounded", "grounded_ltm_only", "grounded_absolute", "longlive", "infinity_rope",
                "anchor_forcing", "context_forcing", "self_forcing")


def openings() -> list[str]:
    """One opening sentence per subject, the actions and scenes taken in turn."""
    scenes, out = list(tw.SCENES), []
    for shape in tw.SHAPES:
        for colour in tw.COLOURS:
            for size in tw.SIZES:
                i = len(out)
                out.append(f"a {size} {colour} {shape} {tw.ACTIONS[i % len(tw.ACTIONS)]} on the {scenes[i % len(scenes)]}")
    return out


def score_row(row: str, model_dir: str | None, seeds: int, frames: int, device: str) -> dict:
    """Identity over the first ``frames`` frames of every opening under ``row``, per seed."""
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = tw.load_model(model_dir, dtype=dtype, device=device)
    words = tw.load_words(model_dir)
    policy = ROWS[row][1]()
    began = time.perf_counter()
    per_seed = []
    for seed in range(seeds):
        scores = []
        for text in openings():
            story = tw.play([(text, frames)])
            out = gf.generate(model, story.segments(words), policy, height=tw.WORLD * 8, width=tw.WORLD * 8, seed=seed)
            scores.append(tw.identity_accuracy(story, out.latents.float().cpu(), frames))
        per_seed.append(scores)
    return {"row": row, "per_seed": per_seed, "seconds": round(time.perf_counter() - began, 1)}


def summarise(entry: dict) -> dict:
    """Mean over seeds of each seed's mean over openings, its spread, and each opening's mean."""
    means = [sum(s for s in scores if s is not None) / sum(s is not None for s in scores) for scores in entry["per_seed"]]
    mean = sum(means) / len(means)
    std = math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1)) if len(means) > 1 else 0.0
    per_opening = {}
    for i, text in enumerate(openings()):
        values = [scores[i] for scores in entry["per_seed"] if scores[i] is not None]
        per_opening[text] = round(sum(values) / len(values), 4) if values else None
    return {"mean": round(mean, 4), "std": round(std, 4), "seeds": len(means), "seconds": entry["seconds"],
            "per_opening": per_opening}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated rows of the quality bench: {', '.join(ROWS)}")
    ap.add_argument("--model", help="folder of a toy model (default: the shipped one)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jobs", type=int, default=0, help="rows at once, each in its own process (default: one per core)")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows names {', '.join(unknown)}, which the quality bench does not have; pick from {', '.join(ROWS)}")
    if args.frames < tw.CHUNK_FRAMES or args.frames % tw.CHUNK_FRAMES:
        ap.error(f"--frames {args.frames} is not a positive multiple of {tw.CHUNK_FRAMES} (one chunk); give e.g. 21")
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds} is below 1; give 1 or more")
    tw.load_model(args.model)  # a missing or broken model says so here, before any row starts
    jobs = min(args.jobs or (len(rows) if args.device.startswith("cuda") else os.cpu_count() or 1), len(rows))
    began = time.perf_counter()
    work = (rows, [args.model] * len(rows), [args.seeds] * len(rows), [args.frames] * len(rows), [args.device] * len(rows))
    if jobs == 1:
        done = list(map(score_row, *work))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(score_row, *work))
    result = run_header(frames=args.frames, seeds=args.seeds, openings=openings(),
                        seconds=round(time.perf_counter() - began, 1), rows={})
    for entry in done:
        summary = result["rows"][entry["row"]] = summarise(entry)
        worst = sorted((v, k) for k, v in summary["per_opening"].items() if v is not None)[:3]
        print(f"{entry['row']}: {100 * summary['mean']:.1f} ± {100 * summary['std']:.1f} over {summary['seeds']} seeds; "
              f"worst: " + "; ".join(f"{k} {100 * v:.0f}" for v, k in worst), flush=True)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
