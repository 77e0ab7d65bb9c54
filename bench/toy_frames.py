"""Which frames a toy model gets wrong: per seed, the first frames of one of the quality bench's
runs under one policy, frame by frame, on a CPU.

Each seed prints one character per (frame, visible subject) the truth shows: ``#`` when the
subject is there with its colour, shape and size, ``.`` when not (gf_core.toyworld.identity_hits),
and the first frame that goes wrong. ``--png`` writes a strip of the truth over the sample
for each seed, so a wrong frame can be looked at.

    python bench/toy_frames.py --run cuts_and_return --policy self_forcing --model OUT --seeds 10
    python bench/toy_frames.py --model A --model B          # several models, one after the other
    python bench/toy_frames.py --run walk_out_enter_cut --policy infinity_rope --png strips
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from quality import ROWS, TIMELINES, truncate  # noqa: E402
from report import model_label, write_json  # noqa: E402
from train_toyworld import write_png  # noqa: E402

import gf_core as gf  # noqa: E402
from gf_core import toyworld as tw  # noqa: E402


def frame_hits(model, words: tw.Words, script: list[tuple[str, int]], policy: gf.MemoryPolicy, seed: int,
               frames: int) -> tuple[list[tuple[int, bool]], torch.Tensor, torch.Tensor]:
    """(frame, right) for every visible subject of the first ``frames`` frames of ``script`` sampled
    under ``policy`` at ``seed``, with the sample's and the truth's RGB frames [F, 3, H, W]."""
    story = tw.play(truncate(script, frames))
    out = gf.generate(model, story.segments(words), policy, height=tw.WORLD * 8, width=tw.WORLD * 8, seed=seed)
    rgb, found = tw.decode_detections(out.latents)
    truth = tw.to_rgb(tw.story_latents(story))[0]
    return tw.identity_hits(story, found, range(frames)), rgb, truth


def strip(truth: torch.Tensor, sample: torch.Tensor, frames: int, scale: int = 4) -> torch.Tensor:
    """The truth's first ``frames`` frames in a row over the sample's, each latent pixel ``scale`` x
    ``scale`` pixels: RGB [3, 2 H scale, frames W scale]."""
    row = lambda x: torch.cat(list(x[:frames]), dim=2)  # noqa: E731
    both = torch.cat([row(truth), row(sample)], dim=1)
    return both.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append",
                    help="folder of a toy model (default: the shipped one); repeat to compare several")
    ap.add_argument("--run", default="cuts_and_return", choices=sorted(TIMELINES),
                    help="which of the quality bench's timelines")
    ap.add_argument("--policy", default="self_forcing", choices=sorted(ROWS), help="a row of the quality bench")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--png", metavar="FOLDER", help="write one strip per seed (truth over sample) into FOLDER")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    if args.frames < tw.CHUNK_FRAMES or args.frames % tw.CHUNK_FRAMES:
        ap.error(f"--frames {args.frames} is not a positive multiple of {tw.CHUNK_FRAMES} (one chunk); give e.g. 21")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    policy = ROWS[args.policy][1]()
    models = {}
    for folder in args.model or [None]:
        name = model_label(folder)
        model, words = tw.load_model(folder).eval(), tw.load_words(folder)
        seeds = models[name] = []
        for seed in range(args.seeds):
            hits, rgb, truth = frame_hits(model, words, TIMELINES[args.run], policy, seed, args.frames)
            marks = "".join("#" if ok else "." for _, ok in hits)
            first_wrong = next((f for f, ok in hits if not ok), None)
            seeds.append({"seed": seed, "hits": marks, "first_wrong_frame": first_wrong,
                          "identity": round(sum(ok for _, ok in hits) / len(hits), 4) if hits else None})
            print(f"{name} seed {seed}: {marks}  first wrong frame: {first_wrong}", flush=True)
            if args.png:
                os.makedirs(args.png, exist_ok=True)
                write_png(strip(truth, rgb, args.frames),
                          os.path.join(args.png, f"{name}_{args.run}_{args.policy}_seed{seed}.png"))
    result = {"run": args.run, "policy": args.policy, "frames": args.frames, "device": "cpu",
              "torch": torch.__version__, "models": models}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
