"""The README's library example runs as written.

The test takes the README's python block, writes the files it names in their real formats (a
LongLive-style training pickle and PEFT LoRA of a tiny random model, prompt embeddings saved with
torch.save) into a scratch folder, and runs the block there as a script in a fresh interpreter. It
changes only what a CPU test needs, each listed in SUBSTITUTIONS: the CPU instead of CUDA and a
32 x 32 frame instead of 832 x 480 (every other line runs as printed), and it appends CHECK, which
holds the result to the shape the README's comment gives at that size and the stepped session to its
two chunks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import gf_core as gf

REPO = Path(__file__).resolve().parent.parent
# README text -> what the test runs instead, with how often the README must contain it.
SUBSTITUTIONS = [
    ('device="cuda"', 'device="cpu"', 1),
    ("height=480, width=832", "height=32, width=32", 1),
]
CHECK = """
assert tuple(raw.shape) == (1, 16, 120, 4, 4), raw.shape  # [1, 16, 120, 60, 104] at 832 x 480
assert session.frames == 6 and switched.event["switch"]["kind"] == "apr", switched.event
"""
CFG = gf.WanConfig.tiny()
PROMPT_ROWS = 24  # rows of an embedding; the first 5-9 carry a "prompt", the rest are zeros as umT5 gives


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1, f"README.md should have exactly one python block, found {len(blocks)}"
    return blocks[0]


def write_inputs(folder: Path) -> None:
    """The files the example names, in the formats the real ones have."""
    sd = gf.random_state_dict(CFG, seed=3)
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, folder / "longlive_base.pt")
    g = torch.Generator().manual_seed(4)
    lora = {}
    for block in range(CFG.num_layers):
        for module in ("self_attn.q", "self_attn.v", "cross_attn.k", "ffn.0"):
            rows, cols = sd[f"blocks.{block}.{module}.weight"].shape
            prefix = f"base_model.model.blocks.{block}.{module}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(4, cols, generator=g) / cols**0.5
            lora[f"{prefix}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * 0.05
    torch.save({"generator_lora": lora, "step": 1}, folder / "lora.pt")
    for i, name in enumerate(("walk", "run", "dog")):
        embedding = torch.zeros(1, PROMPT_ROWS, CFG.text_dim)
        embedding[:, : 5 + 2 * i] = torch.randn(1, 5 + 2 * i, CFG.text_dim, generator=g)
        torch.save(embedding, folder / f"{name}.pt")


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    code = readme_example()
    for original, replacement, count in SUBSTITUTIONS:
        assert code.count(original) == count, f"README example: expected {original!r} {count}x; update SUBSTITUTIONS"
        code = code.replace(original, replacement)
    write_inputs(tmp_path)
    (tmp_path / "example.py").write_text(code + CHECK, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    chunks = run.stdout.splitlines()
    assert len(chunks) == 40 and chunks[0].startswith("0 ") and chunks[-1].startswith("39 "), run.stdout[-500:]
    events = (tmp_path / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(events) == 40  # 120 latent frames in chunks of 3
