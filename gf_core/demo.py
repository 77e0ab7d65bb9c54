"""A self-contained demo of the streaming engine: no downloads, runs on a CPU in seconds.

Builds a small random Wan-architecture model, makes a three-segment latent video under the
Grounded Forcing memory (an APR prompt switch, then a shot cut), and writes:
- ``preview.gif``: the latents seen through the Wan latent-to-RGB preview projection,
- ``events.jsonl``: one JSON line per chunk (frames, memory regions, RoPE indices, switches).

Random weights make no picture; the demo shows the engine, the memory and the files it writes.
Run ``python -m gf_core.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import os

import torch

from . import Segment, Transition, WanConfig, WanModel, random_state_dict, stream, write_events
from .latents import preview_rgb


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_output", help="folder for preview.gif and events.jsonl")
    ap.add_argument("--memory", default="grounded", help="memory policy: grounded, longlive or self_forcing")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each of the three segments")
    ap.add_argument("--size", type=int, default=128, help="frame width and height in pixels (multiple of 16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cfg = WanConfig.tiny()
    model = WanModel.from_state_dict(random_state_dict(cfg, seed=1))
    g = torch.Generator().manual_seed(args.seed)
    frames = max(3, round(args.seconds * 16 / 4))  # 16 fps, 4 pixel frames per latent frame
    prompts = [torch.randn(1, 24, cfg.text_dim, generator=g) for _ in range(3)]
    segments = [
        Segment(prompts[0], frames),
        Segment(prompts[1], frames, Transition("apr")),
        Segment(prompts[2], frames, Transition("cut")),
    ]
    os.makedirs(args.out, exist_ok=True)
    chunks, events = [], []
    for chunk in stream(model, segments, args.memory, height=args.size, width=args.size, seed=args.seed):
        e = chunk.event
        note = f" {e['switch']['kind']}" if e["switch"] else ""
        print(f"chunk {e['chunk']:3d} frames {e['frames'][0]:3d}-{e['frames'][1] - 1:3d} segment {e['segment']}"
              f"{note:6s} memory {e['memory']}")
        chunks.append(chunk.latents)
        events.append(e)
    latents = torch.cat(chunks, dim=2)
    write_events(events, os.path.join(args.out, "events.jsonl"))
    _write_gif(preview_rgb(latents)[0], os.path.join(args.out, "preview.gif"))
    print(f"{latents.shape[2]} latent frames; wrote {args.out}/preview.gif and {args.out}/events.jsonl")


def _write_gif(frames: torch.Tensor, path: str, scale: int = 4) -> None:
    from PIL import Image

    images = [Image.fromarray(f.numpy()).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
              for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=250, loop=0)


if __name__ == "__main__":
    main()
