"""Where a toy-world model goes wrong: one denoising step from the world's true pictures.

For random opening sentences, the model predicts a chunk's picture in one step from the true
picture noised to each of the sampler's four noise levels, and the subject identity of that
prediction is measured (gf_core.toyworld.identity_hits):

- ``first_chunk``: a story's first chunk, with nothing before it (the picture drawn from the prompt);
- ``third_chunk``: the third chunk, with the true first two chunks as its context (a picture copied
  from what came before).

A sampled video starts from pure noise (level 0) and copies its first chunk from then on, so a low
``first_chunk`` at level 0 beside a high ``third_chunk`` says the model draws a subject from its
prompt worse than it keeps one.

    python bench/toy_diagnose.py                      # the shipped model, on a CPU
    python bench/toy_diagnose.py --model OUT --out diagnose.json
    python bench/toy_diagnose.py --model A --model B        # several models, one after the other
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import train_toyworld as train  # noqa: E402
from report import model_label, write_json  # noqa: E402

from gf_core import toyworld as tw  # noqa: E402
from gf_core.rope import RopeTable  # noqa: E402
from gf_core.sampler import Schedule  # noqa: E402
from gf_core.wan import WanConfig  # noqa: E402

CHUNK = tw.CHUNK_FRAMES


def diagnose(folder: str | None, sentences: int, seed: int) -> dict:
    words = tw.load_words(folder)
    model = tw.load_model(folder).eval()
    rope = RopeTable(WanConfig.from_module(model).head_dim)
    schedule = Schedule.few_step()
    rng = random.Random(seed)
    hits = {name: [[0, 0] for _ in range(len(schedule))] for name in ("first_chunk", "third_chunk")}
    for i in range(sentences):
        subject = tw.Subject(rng.choice(list(tw.SIZES)), rng.choice(list(tw.COLOURS)), rng.choice(tw.SHAPES))
        text = f"a {subject} {rng.choice(tw.ACTIONS)} on the {rng.choice(list(tw.SCENES))}"
        for name, chunks in (("first_chunk", 1), ("third_chunk", 3)):
            story = tw.play([(text, CHUNK * chunks)])
            x0 = tw.story_latents(story)
            e = words.embed(text)
            prompts = torch.zeros(1, chunks, train.MAX_WORDS, e.shape[-1])
            prompts[0, :, : e.shape[1]] = e[0]
            context = [list(range(c * CHUNK)) for c in range(chunks)]
            for level in range(len(schedule)):
                sigma = schedule.sigmas[level]
                eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + i))
                noisy = (1 - sigma) * x0 + sigma * eps
                with torch.no_grad():
                    v = train.train_forward(model, x0, noisy, schedule.timesteps[level].view(1, 1).expand(1, chunks),
                                            prompts, context, rope)
                _, found = tw.decode_detections(noisy - sigma * v)
                shown = [ok for f, ok in tw.identity_hits(story, found) if f >= (chunks - 1) * CHUNK]
                hits[name][level][0] += sum(shown)
                hits[name][level][1] += len(shown)
    return {
        "model": model_label(folder),
        "sentences": sentences, "seed": seed, "sigmas": [round(float(s), 4) for s in schedule.sigmas],
        **{name: [round(a / b, 4) if b else None for a, b in levels] for name, levels in hits.items()},
    }


def main(argv: list[str] | None = None) -> dict | list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append",
                    help="folder of a trained toy model (default: the shipped one); repeat to compare several")
    ap.add_argument("--sentences", type=int, default=24)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    results = [diagnose(folder, args.sentences, args.seed) for folder in (args.model or [None])]
    for result in results:
        for name in ("first_chunk", "third_chunk"):
            print(f"{result['model']}: {name}: identity per noise level {result['sigmas']}: {result[name]}")
    result = results[0] if len(results) == 1 else results
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
