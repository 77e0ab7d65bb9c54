"""Draws the GF Event Timeline pictures in docs/images/ from real runs of a tiny model on the CPU.

    python3 tools/make_event_timeline.py            # writes docs/images/event_timeline.png and _20.png

A random tiny Wan model (``gf_core.WanConfig.tiny()``, 32 x 32 pixels) streams through GF Sampler's
logic (``nodes.sampling.sample``), so the memory, RoPE indices, switches, cuts and GCM updates are
those of a real run; only the pictures' values (importance, redundancy) come from random weights.
Takes a few seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "grounded_forcing"


def pack_module(name: str):
    """``grounded_forcing.<name>``, with the repository root loaded as that package (as ComfyUI loads it)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.{name}")


# (seconds, transition) per segment: 180 s = 720 latent frames = 240 chunks.
LONG_RUN = [(24, "default"), (20, "default"), (22, "cut"), (26, "hard"), (20, "default"), (24, "cut"),
            (22, "default"), (22, "apr")]
SHORT_RUN = [(5, "default"), (4, "default"), (3, "cut"), (3, "hard")]  # 15 s = 60 latent frames = 20 chunks


def run_log(plan: list[tuple[float, str]], memory: str = "grounded", seed: int = 0) -> str:
    """The event log of a tiny-model run over ``plan``."""
    gf, sampling, prompts = (pack_module(n) for n in ("gf_core", "nodes.sampling", "nodes.prompts"))
    cfg = gf.WanConfig.tiny()
    model = gf.WanModel.from_state_dict(gf.random_state_dict(cfg, seed=1))
    g = torch.Generator().manual_seed(seed)
    segments = tuple(
        gf.Segment(torch.randn(1, 8, cfg.text_dim, generator=g), prompts.latent_frames(seconds, "seconds"),
                   gf.Transition(kind))
        for seconds, kind in plan
    )
    result = sampling.sample(model, segments, gf.preset(memory), sampling.run_config(32, 32, seed, batch_size=1))
    return result.log


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder for the pictures")
    ap.add_argument("--width", type=int, default=1280, help="picture width in pixels")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    event_plot = pack_module("nodes.event_plot")
    args.out.mkdir(parents=True, exist_ok=True)
    for plan, name in ((LONG_RUN, "event_timeline.png"), (SHORT_RUN, "event_timeline_20.png")):
        picture = event_plot.draw(run_log(plan), args.width)
        picture.image.save(args.out / name, optimize=True)
        print(f"{args.out / name}: {picture.image.width}x{picture.image.height}, {picture.layout.chunks} chunks, "
              f"{picture.layout.mode}")


if __name__ == "__main__":
    main()
