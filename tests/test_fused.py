"""Fused blocks (``fused=True``): each DiT block as one torch.compile'd graph computes the same
video as the plain forward, for every kind of pass (denoising, cache writing, recache with
leading frames left out, APR blends, cuts)."""

from __future__ import annotations

import pytest
import torch
from helpers import CFG, RUN, prompt

import gf_core as gf
from gf_core.rope import RopeTable, apply_rope
from gf_core.wan import real_freqs, rotate_real


def test_rotate_real_matches_the_complex64_product():
    rope = RopeTable(CFG.head_dim)
    freqs = rope.frequencies([0, 5, 17], 2, 3, "float32")
    x = torch.randn(2, 18, 2, CFG.head_dim)
    torch.testing.assert_close(rotate_real(x, real_freqs(freqs)), apply_rope(x, freqs), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("policy, transitions", [
    ("grounded", ["apr", "cut"]),
    ("longlive", ["default", "default"]),  # LongLive's recache: 12 frames run, 3 left out of the keys
])
def test_fused_run_equals_the_plain_run(model, policy, transitions):
    segs = [gf.Segment(prompt(0), 15), gf.Segment(prompt(1), 9, gf.Transition(transitions[0])),
            gf.Segment(prompt(2), 6, gf.Transition(transitions[1]))]
    plain = gf.generate(model, segs, policy, seed=3, **RUN)
    fused = gf.generate(model, segs, policy, seed=3, fused=True, **RUN)
    rel = ((fused.latents - plain.latents).norm() / plain.latents.norm()).item()
    assert rel < 1e-5
    for a, b in zip(plain.events, fused.events):
        a, b = dict(a), dict(b)
        a.pop("seconds"), b.pop("seconds")
        assert a.keys() == b.keys()
        assert a["memory"] == b["memory"] and a["rope"] == b["rope"] and a["switch"] == b["switch"]


def test_fused_needs_float32_rope(model):
    with pytest.raises(ValueError, match="rope_kind='float32'"):
        next(gf.stream(model, [gf.Segment(prompt(0), 3)], "grounded", rope_kind="complex128", fused=True, **RUN))
