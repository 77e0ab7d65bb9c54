"""How much context a policy's rules leave the toy model: the first 21 frames of one opening under a
policy and under variants of its context, on a CPU.

Infinity-RoPE keeps a sink and the newest two frames, numbered block-relatively; the variants keep
the same three frames at their own frame indices, a longer window, or a longer sink, so the
identity each keeps (gf_core.toyworld.identity_accuracy) says how much of a loss is the rule's
indices and how much its short context.

    python bench/toy_context.py --out docs/results/toyworld_ir_context_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from report import write_json  # noqa: E402

import gf_core as gf  # noqa: E402
from gf_core import toyworld as tw  # noqa: E402

VARIANTS = {
    "infinity_rope (sink 1 + newest 2, block-relative)": lambda: gf.infinity_rope(),
    "the same frames at frame indices": lambda: replace(gf.infinity_rope(), index_rule="absolute",
                                                        fixed_index_rule=False),
    "sink 1 + newest 5, block-relative": lambda: gf.infinity_rope(window_frames=9),
    "sink 3 + newest 2, block-relative": lambda: gf.infinity_rope(sink_frames=3, window_frames=8),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="folder of a toy model (default: the shipped one)")
    ap.add_argument("--prompt", default="a big red circle bounces on the grass")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    model, words = tw.load_model(args.model).eval(), tw.load_words(args.model)
    story = tw.play([(args.prompt, 21)])
    rows = {}
    for name, policy in VARIANTS.items():
        scores = []
        for seed in range(args.seeds):
            out = gf.generate(model, story.segments(words), policy(), height=256, width=256, seed=seed)
            scores.append(round(tw.identity_accuracy(story, out.latents, 21), 4))
        rows[name] = scores
        print(f"{name}: identity over the first 21 frames per seed {scores}", flush=True)
    result = {"prompt": args.prompt, "seeds": args.seeds, "device": "cpu", "torch": torch.__version__, "rows": rows}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
