"""Quality of every memory policy on the toy world: measured from the world's known truth.

One command runs every row (a policy or an ablation of Grounded Forcing) on the same toy model,
each row in its own process, all at once on one GPU, and writes one JSON:

    python bench/quality.py --out OUT                        # every row, 3 seeds -> OUT/quality.json
    python bench/quality.py --out OUT --budget 100           # each row stops starting seeds after ~100 s
    python bench/quality.py --table OUT/quality.json         # the markdown table of docs/QUALITY.md

Runs per row and seed: two scripted multi-prompt timelines of 240 latent frames (60 s: action
switches, a subject that walks out and is called back, a second subject entering, cuts) and a
single-prompt run of 1,000 latent frames; self_forcing, whose cache ends at 21 frames, runs the
first 21 frames of each timeline. Measures (gf_core.toyworld.measure) are averaged over a seed's
runs; the table gives their mean and standard deviation over seeds. A "truth" row measures the
world's own videos, the ceiling (and the normal motion) every row is compared with.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gf_core as gf  # noqa: E402
from gf_core import toyworld as tw  # noqa: E402
from gf_core.policies import FILL_FIFO, Region  # noqa: E402

TIMELINES = {
    "walk_out_enter_cut": [
        ("a big red circle bounces on the grass", 24),
        ("then it moves right", 36),
        ("then it moves left", 24),
        ("then it pulses", 24),
        ("then a small yellow triangle enters", 24),
        ("then it bounces", 24),
        ("cut to the snow where it moves left", 30),
        ("then it moves right", 30),
        ("then it rests", 24),
    ],
    "cuts_and_return": [
        ("a small magenta square moves left on the sand", 30),
        ("then it moves right", 24),
        ("then it bounces", 24),
        ("cut to the night where it pulses", 24),
        ("then a big blue circle enters", 24),
        ("then it moves right", 30),
        ("then it moves left", 24),
        ("cut to the grass where it rests", 30),
        ("then it bounces", 30),
    ],
}
LONG = {
    "bouncing_circle": "a big red circle bounces on the grass",
}


def _grounded(**changes) -> gf.MemoryPolicy:
    return replace(gf.grounded(), **changes)


ROWS = {
    "grounded": ("Grounded Forcing (defaults: GCM 3 + LTM 6, DR-RoPE, APR, GCM update after switches)", gf.grounded),
    "grounded_ltm_only": ("  without the GCM (LTM only)", lambda: _grounded(
        regions=(Region("ltm", 6, FILL_FIFO),), anchor_region=None, candidates="frozen")),
    "grounded_absolute": ("  without DR-RoPE (absolute indices)", lambda: _grounded(index_rule="absolute")),
    "grounded_hard": ("  APR replaced by a hard recache", lambda: _grounded(switch="hard")),
    "grounded_none": ("  APR replaced by no recache", lambda: _grounded(switch="none")),
    "grounded_frozen": ("  GCM frozen (no diversity update)", lambda: gf.grounded(candidates="frozen")),
    "longlive": ("LongLive (sink 3 + window, KV recache)", gf.longlive),
    "infinity_rope": ("Infinity-RoPE (block-relative, KV flush, RoPE cut)", gf.infinity_rope),
    "anchor_forcing": ("Anchor Forcing (tri-region RoPE, anchor re-cache)", gf.anchor_forcing),
    "context_forcing": ("Context Forcing (sink + slow + fast memory)", gf.context_forcing),
    "self_forcing": ("Self-Forcing (whole cache; first 21 frames only)", gf.self_forcing),
}
SHORT_ROWS = ("self_forcing",)  # rows whose memory ends at 21 frames


def truncate(script: list[tuple[str, int]], frames: int) -> list[tuple[str, int]]:
    """The script's first ``frames`` latent frames (the last sentence shortened, at least one chunk)."""
    out, total = [], 0
    for text, n in script:
        if total >= frames:
            break
        n = min(n, frames - total)
        if n < tw.CHUNK_FRAMES:
            break
        out.append((text, n))
        total += n
    return out


def runs(args: argparse.Namespace, row: str) -> list[tuple[str, list[tuple[str, int]]]]:
    """(name, script) of every run of a row."""
    out = []
    for name, script in TIMELINES.items():
        frames = 21 if row in SHORT_ROWS else args.timeline_frames
        out.append((name, truncate(script, frames)))
    if row not in SHORT_ROWS:
        out += [(name, [(text, args.long_frames)]) for name, text in LONG.items()]
    return out


def run_row(args: argparse.Namespace, row: str, save=lambda result: None) -> dict:
    """Every run of one row, every seed: the measures of each (``save`` gets the result after each seed)."""
    torch.set_num_threads(1)
    device = torch.device(args.device)
    words = tw.load_words(args.model)
    results, began = [], time.perf_counter()
    generate_seconds = 0.0
    if row == "truth":
        for name, script in runs(args, "grounded"):
            story = tw.play(script)
            results.append({"run": name, "seed": 0, **tw.measure(story, tw.story_latents(story, args.size))})
        return {"row": row, "runs": results, "seconds": round(time.perf_counter() - began, 1)}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = tw.load_model(args.model, dtype=dtype, device=device)
    policy = ROWS[row][1]()
    seeds_done = 0
    for seed in range(args.seeds):
        elapsed = time.perf_counter() - began
        if seed and elapsed + elapsed / seed > args.budget:
            break  # the next seed would not finish within the budget: the row reports the seeds it has
        done = []
        for name, script in runs(args, row):
            story = tw.play(script)
            t = time.perf_counter()
            out = gf.generate(model, story.segments(words), policy, height=args.size * 8, width=args.size * 8, seed=seed)
            generate_seconds += time.perf_counter() - t
            done.append({"run": name, "seed": seed, **tw.measure(story, out.latents)})
        results += done
        seeds_done += 1
        save({"row": row, "runs": results, "seeds_done": seeds_done, "seconds": round(time.perf_counter() - began, 1),
              "generate_seconds": round(generate_seconds, 1)})
    return {"row": row, "runs": results, "seeds_done": seeds_done, "seconds": round(time.perf_counter() - began, 1),
            "generate_seconds": round(generate_seconds, 1)}


# ---------------------------------------------------------------------------------------------
# Aggregation and the table

COLUMNS = (
    # (key, header, runs it is taken from: "timeline" / "long" / "all", how a run's value is read)
    ("identity_first", "identity, first 21 frames", "all"),
    ("identity", "identity, 60 s timelines", "timeline"),
    ("scene", "scene, timelines", "timeline"),
    ("recall", "recall after leaving", "timeline"),
    ("cut_identity", "identity after a cut", "timeline"),
    ("switch_response", "switch response (frames)", "timeline"),
    ("switch_shock", "switch shock", "timeline"),
    ("flicker", "flicker (truth ~{truth})", "timeline"),
    ("identity_long", "identity, 1,000 frames", "long"),
    ("drift_first", "drift, minute 1", "long"),
    ("drift_last", "drift, minute 4+", "long"),
    ("collapse_last", "collapse, minute 4+", "long"),
)


def run_value(run: dict, key: str) -> float | None:
    """One run's value of a table column (lists are averaged; a switch never answered counts as its segment)."""
    if key == "identity_long":
        return run["identity"]
    if key == "drift_first":
        return run["drift"][0]
    if key == "drift_last":
        return run["drift"][-1]
    if key == "collapse_last":
        return run["collapse"][-1]
    value = run[key]
    if isinstance(value, list):
        if key == "switch_response":
            value = [24 if v is None else v for v in value]
        value = [v for v in value if v is not None]
        return sum(value) / len(value) if value else None
    return value


def aggregate(row: dict) -> dict:
    """Per column: the mean over seeds of each seed's mean over runs, the standard deviation over seeds."""
    out = {}
    long_runs = set(LONG)
    for key, _, kind in COLUMNS:
        per_seed: dict[int, list[float]] = {}
        for run in row["runs"]:
            is_long = run["run"] in long_runs
            if (kind == "timeline" and is_long) or (kind == "long" and not is_long):
                continue
            v = run_value(run, key)
            if v is not None:
                per_seed.setdefault(run["seed"], []).append(v)
        means = [sum(v) / len(v) for v in per_seed.values()]
        if means:
            mean = sum(means) / len(means)
            std = math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1)) if len(means) > 1 else 0.0
            out[key] = {"mean": mean, "std": std, "seeds": len(means)}
    return out


def table(result: dict) -> str:
    """The markdown table of a quality JSON: one row per policy, mean ± std over seeds."""
    truth = result["rows"].get("truth", {}).get("summary", {})
    flicker = truth.get("flicker", {}).get("mean")
    headers = [h.format(truth=f"{flicker:.1f}" if flicker is not None else "?") for _, h, _ in COLUMNS]
    lines = ["| row | " + " | ".join(headers) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row, entry in result["rows"].items():
        label = "world truth" if row == "truth" else f"{ROWS[row][0].strip()} ({entry.get('seeds_done', '?')} seeds)"
        cells = []
        for key, _, _ in COLUMNS:
            s = entry["summary"].get(key)
            if s is None:
                cells.append("-")
                continue
            pct = key.startswith(("identity", "scene", "recall", "cut", "collapse"))
            m, d = (100 * s["mean"], 100 * s["std"]) if pct else (s["mean"], s["std"])
            cells.append(f"{m:.1f}" if row == "truth" else f"{m:.1f} ± {d:.1f}")
        lines.append(f"| {label.strip()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for quality.json (and one JSON per row)")
    ap.add_argument("--rows", default="all", help=f"comma-separated rows or 'all': truth, {', '.join(ROWS)}")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # one row, in this process (what --rows starts)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--timeline-frames", type=int, default=240)
    ap.add_argument("--long-frames", type=int, default=1000)
    ap.add_argument("--size", type=int, default=tw.WORLD, help="latent pixels across (the toy model knows 32)")
    ap.add_argument("--model", default=None, help="folder with the toy model and word table (default: the shipped one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jobs", type=int, default=0, help="rows run at once (default: all)")
    ap.add_argument("--budget", type=float, default=3600.0,
                    help="seconds per row: a row starts another seed only if it would end within this")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a quality JSON and exit")
    args = ap.parse_args(argv)

    if args.table:
        with open(args.table, encoding="utf-8") as fh:
            print(table(json.load(fh)))
        return
    if not args.out:
        ap.error("--out is required (the folder the JSON goes to)")
    if args.seeds < 1 or args.timeline_frames < tw.CHUNK_FRAMES or args.long_frames < tw.CHUNK_FRAMES:
        ap.error("--seeds must be at least 1 and the run lengths at least one chunk (3 frames)")
    os.makedirs(args.out, exist_ok=True)
    if args.row:
        def save(result: dict) -> None:
            path = os.path.join(args.out, f"row_{args.row}.json")
            with open(path + ".part", "w", encoding="utf-8") as fh:
                json.dump(result, fh)
            os.replace(path + ".part", path)  # a row stopped at the deadline keeps its finished seeds

        save(run_row(args, args.row, save))
        return
    rows = ["truth", *ROWS] if args.rows == "all" else args.rows.split(",")
    unknown = [r for r in rows if r != "truth" and r not in ROWS]
    if unknown:
        ap.error(f"unknown row '{unknown[0]}'; use truth, {', '.join(ROWS)}")
    began = time.perf_counter()
    base = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--seeds", str(args.seeds),
            "--timeline-frames", str(args.timeline_frames), "--long-frames", str(args.long_frames),
            "--size", str(args.size), "--device", args.device, "--budget", str(args.budget)] \
        + (["--model", args.model] if args.model else [])
    pending, running, failed, stopped = list(rows), [], [], []
    jobs = args.jobs or len(rows)
    deadline = began + args.budget + 30
    while pending or running:
        if time.perf_counter() > deadline:
            for row, proc, log in running:  # what a row finished so far is in its JSON already
                proc.kill()
                proc.wait()
                log.close()
                stopped.append(row)
            running, pending = [], []
            break
        while pending and len(running) < jobs:
            row = pending.pop(0)
            log = open(os.path.join(args.out, f"row_{row}.log"), "w")
            running.append((row, subprocess.Popen(base + ["--row", row], stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(0.5)
        for item in list(running):
            row, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode:
                    failed.append(row)
                    with open(log.name, encoding="utf-8") as fh:
                        print(f"row {row} failed:\n{fh.read()[-2000:]}", flush=True)
                else:
                    os.remove(log.name)
                    print(f"row {row} done", flush=True)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "seeds": args.seeds, "timeline_frames": args.timeline_frames,
              "long_frames": args.long_frames, "timelines": TIMELINES, "long": LONG, "rows": {},
              "failed": failed, "stopped_at_deadline": stopped}
    for row in rows:
        path = os.path.join(args.out, f"row_{row}.json")
        if row in failed or not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as fh:
            entry = json.load(fh)
        os.remove(path)
        entry["summary"] = aggregate(entry)
        result["rows"][row] = entry
    result["seconds"] = round(time.perf_counter() - began, 1)
    with open(os.path.join(args.out, "quality.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(table(result))
    print(f"{len(result['rows'])} rows in {result['seconds']:.0f} s; wrote {os.path.join(args.out, 'quality.json')}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
