"""The set-up demo: the shipped toy-world model makes a short video on a CPU, no downloads.

A small model of this pack's Wan architecture, trained on the toy world (gf_core.toyworld),
plays a three-prompt script under a memory policy: a subject moves, a prompt switch changes its
action, a shot cut changes the scene and keeps the subject. It writes
- ``preview.gif``: the latents seen through the Wan latent-to-RGB preview projection (256 x 256),
- ``events.jsonl``: one JSON line per chunk (frames, memory regions, RoPE indices, switches),
and prints how well the video kept to its script (measured from the toy world's known truth).
Run ``python -m gf_core.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from . import stream, write_events
from . import toyworld as tw
from .errors import BadInput
from .latents import preview_rgb
from .policies import PRESETS

SCRIPT = (
    "a big red circle moves right on the grass",
    "then it bounces",
    "cut to the snow where it moves left",
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gf_core.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_output", help="folder for preview.gif and events.jsonl")
    ap.add_argument("--memory", default="grounded", choices=tuple(PRESETS), metavar="POLICY",
                    help=f"memory policy: {', '.join(PRESETS)} (default grounded; self_forcing ends at 21 frames)")
    ap.add_argument("--seconds", type=float, default=2.25, help="length of each prompt in seconds (4 latent frames each)")
    ap.add_argument("--prompt", action="append", metavar="SENTENCE",
                    help="a prompt of the toy world, in order (repeat for more; default: the three-prompt script); "
                         f"forms: {'; '.join(tw.FORMS)}")
    ap.add_argument("--size", type=int, default=tw.PIXELS, help=f"frame width and height in pixels (the toy model knows {tw.PIXELS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: PyTorch's choice)")
    args = ap.parse_args(argv)
    if not math.isfinite(args.seconds):
        ap.error(f"--seconds {args.seconds} is not a number of seconds; use e.g. 2.25")
    frames = round(args.seconds * 4)  # 16 fps, 4 pixel frames per latent frame
    try:
        tw.check_size(args.size, args.size)
        if frames < tw.CHUNK_FRAMES:
            raise BadInput(f"--seconds {args.seconds} is shorter than one chunk of {tw.CHUNK_FRAMES} latent frames; "
                           "use 0.75 or more")
        story = tw.play([(p, frames) for p in (args.prompt or SCRIPT)])
        segments = story.segments()
        model = tw.load_model()
    except BadInput as e:
        ap.error(str(e))
    if args.threads < 0:
        ap.error(f"--threads {args.threads} is negative; use 1 or more (0: PyTorch's choice)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        ap.error(f"cannot make the output folder {args.out} ({e.strerror}); pick another --out")
    chunks, events = [], []
    try:
        for chunk in stream(model, segments, args.memory, height=args.size, width=args.size, seed=args.seed):
            e = chunk.event
            note = f" {e['switch']['kind']}" if e["switch"] else ""
            print(f"chunk {e['chunk']:3d} frames {e['frames'][0]:3d}-{e['frames'][1] - 1:3d} segment {e['segment']}"
                  f"{note:6s} memory {e['memory']}", flush=True)
            chunks.append(chunk.latents)
            events.append(e)
    except ValueError as e:  # the engine refuses input before any work; say it as the CLI would
        ap.error(str(e))
    latents = torch.cat(chunks, dim=2)
    write_events(events, os.path.join(args.out, "events.jsonl"))
    _write_gif(preview_rgb(latents)[0], os.path.join(args.out, "preview.gif"), scale=args.size // latents.shape[-1])
    m = tw.measure(story, latents)
    scored = ", ".join(f"{name} {100 * m[key]:.0f}%" for key, name in
                       (("identity", "subject right"), ("scene", "scene right"), ("cut_identity", "subject kept across the cut"))
                       if m[key] is not None)
    print(f"{latents.shape[2]} latent frames; {scored}; wrote {args.out}/preview.gif and {args.out}/events.jsonl")


def _write_gif(frames: torch.Tensor, path: str, scale: int = 8) -> None:
    from PIL import Image

    images = [Image.fromarray(f.numpy()).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
              for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=250, loop=0)


if __name__ == "__main__":
    main(sys.argv[1:])
