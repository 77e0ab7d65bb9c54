"""Fused kernels (``kernels="fused"``): each DiT block as one torch.compile'd graph computes the same
video as the eager forward, for every kind of pass (denoising, cache writing, recache with
leading frames left out, APR blends, cuts); the kernel choice is one object (gf_core.kernels)."""

from __future__ import annotations

import pytest
import torch
from helpers import CFG, RUN, fail_compiling, prompt

import gf_core as gf
from gf_core.kernels import compiled
from gf_core.rope import RopeTable, apply_rope, real_freqs, rotate_real


def test_rotate_real_matches_the_complex64_product():
    rope = RopeTable(CFG.head_dim)
    freqs = rope.frequencies([0, 5, 17], 2, 3, "float32")
    x = torch.randn(2, 18, 2, CFG.head_dim)
    torch.testing.assert_close(rotate_real(x, real_freqs(freqs)), apply_rope(x, freqs), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def compiler():
    """torch.compile on a CPU needs a C++ compiler and Python's headers: skip, saying so, without them."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(4))
    except Exception as e:  # any failure means the toolchain is missing
        pytest.skip(f"torch.compile does not work on this machine ({type(e).__name__}); fused runs untested")


@pytest.mark.parametrize("policy, transitions", [
    ("grounded", ["apr", "cut"]),
    ("longlive", ["default", "default"]),  # LongLive's recache: 12 frames run, 3 left out of the keys
])
def test_fused_run_equals_the_plain_run(model, policy, transitions, compiler):
    segs = [gf.Segment(prompt(0), 15), gf.Segment(prompt(1), 9, gf.Transition(transitions[0])),
            gf.Segment(prompt(2), 6, gf.Transition(transitions[1]))]
    plain = gf.generate(model, segs, policy, seed=3, **RUN)
    fused = gf.generate(model, segs, policy, seed=3, kernels="fused", **RUN)
    rel = ((fused.latents - plain.latents).norm() / plain.latents.norm()).item()
    assert rel < 1e-5
    for a, b in zip(plain.events, fused.events):
        a, b = dict(a), dict(b)
        a.pop("seconds"), b.pop("seconds")
        assert a.keys() == b.keys()
        assert a["memory"] == b["memory"] and a["rope"] == b["rope"] and a["switch"] == b["switch"]


def test_fused_needs_float32_rope(model):
    with pytest.raises(ValueError, match="fused blocks rotate in float32, but the RoPE precision is complex128"):
        next(gf.stream(model, [gf.Segment(prompt(0), 3)], "grounded", rope_kind="complex128", kernels="fused", **RUN))


def _recording(monkeypatch, seen: list) -> None:
    """Fused kernels whose block function records its arguments and runs uncompiled (to see the layout alone)."""
    import gf_core.kernels as kernels
    import gf_core.wan as wan

    def recording_block(*args):
        seen.append(args)
        return wan.block_step(*args)

    monkeypatch.setattr(kernels, "_compiled_block", recording_block)


def test_in_place_context_is_used_in_the_steady_state_and_equals_gathering(model, monkeypatch):
    """Once the plan attends to every memory slot, a fused block reads the store in place (keys in
    slot order, its own values in the scratch slots), through APR blends and a cut."""
    seen: list = []
    _recording(monkeypatch, seen)
    segs = [gf.Segment(prompt(0), 21), gf.Segment(prompt(1), 9, gf.Transition("apr")),
            gf.Segment(prompt(2), 9, gf.Transition("cut"))]
    plain = gf.generate(model, segs, "grounded", seed=5, **RUN)
    in_place = gf.generate(model, segs, "grounded", seed=5, kernels="fused", **RUN)
    modes = ["in place" if args[7] is not None and args[7].slots is None else "other" for args in seen]
    assert modes.count("in place") > 0 and modes.count("other") > 0
    torch.testing.assert_close(in_place.latents, plain.latents, atol=1e-5, rtol=1e-5)


def test_one_kernel_object_per_run():
    """The setting is read once: eager kernels are the plain functions, fused ones name every choice."""
    import gf_core.kernels as kernels
    from gf_core.wan import EAGER, block_step, sdpa_attention

    eager = kernels.choose("eager", "cpu")
    assert eager is EAGER and eager.block is block_step and eager.rotate is apply_rope
    assert not (eager.read_in_place or eager.fold_text or eager.gelu_in_product) and eager.attention is sdpa_attention
    fused = kernels.choose("fused", "cpu")
    assert isinstance(fused.block, kernels.CompiledBlock) and fused.rotate is rotate_real
    assert fused.rotation_table is real_freqs and fused.read_in_place and fused.fold_text
    assert kernels.choose("auto", "cpu") is EAGER  # auto is fused only on a CUDA device
    mine = kernels.choose("fused", "cpu", attention=sdpa_attention)
    assert mine.attention is sdpa_attention and not mine.fold_text  # an attention the caller picked sees the whole prompt
    with pytest.raises(ValueError, match="unknown kernel setting 'fast'; use one of eager, fused, auto"):
        kernels.choose("fast", "cpu")


def test_fused_on_a_gpu_without_triton_is_refused_in_one_sentence(monkeypatch):
    import importlib.util

    from gf_core.kernels import fused_problem, resolve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(ValueError, match="install triton .* or use the eager kernels"):
        resolve("fused", torch.device("cuda"), "float32")
    assert fused_problem(torch.device("cpu"), "float32") is None  # the CPU compiler needs no Triton


def test_gelu_in_product_only_where_the_product_applies_tanh_gelu():
    """``_addmm_activation`` applies the exact GELU on a CPU, Wan's is the tanh one: the fused
    path keeps the separate GELU there (on a GPU the check decides, once per device)."""
    from gf_core.kernels import product_gelu_is_tanh

    assert product_gelu_is_tanh(torch.device("cpu")) is False


def test_a_compile_failure_is_one_sentence(model, monkeypatch):
    import gf_core.kernels as kernels

    fail_compiling(monkeypatch, kernels)
    with pytest.raises(RuntimeError, match=r"could not be compiled here \(BackendCompilerFailed\); use the eager"):
        next(gf.stream(model, [gf.Segment(prompt(0), 3)], "grounded", kernels="fused", **RUN))


def test_folded_padding_attends_as_the_whole_prompt(model):
    """A prompt's zero padding projects to one key and value: a fused run keeps 64 rows of a short
    prompt, with logit offsets that give its padding rows the weight of all of them."""
    from gf_core.wan import biased_attention, encode_text, fold_bias, padding_start, sdpa_attention

    embeds = torch.cat([prompt(0, batch=2, length=10), torch.zeros(2, 30, CFG.text_dim)], dim=1)
    embeds[1, 7:] = 0  # the shorter prompt of the batch
    assert padding_start(embeds) == 10
    assert padding_start(torch.zeros(1, 5, 3)) == 0 and padding_start(torch.ones(1, 5, 3)) == 5
    whole = encode_text(model, embeds, CFG.text_len)
    folded = encode_text(model, embeds, CFG.text_len, fold_from=padding_start(embeds))
    assert whole.bias is None and whole.keys[0].shape[1] == CFG.text_len
    assert folded.keys[0].shape[1] == 64 and folded.bias.shape == (64,) and not folded.bias[:10].any()
    q = torch.randn(2, 40, CFG.num_heads, CFG.head_dim) * 3
    for block in range(CFG.num_layers):
        torch.testing.assert_close(
            biased_attention(q, folded.keys[block], folded.values[block], folded.bias),
            sdpa_attention(q, whole.keys[block], whole.values[block]), atol=5e-5, rtol=5e-5)
    assert encode_text(model, embeds, CFG.text_len, fold_from=CFG.text_len - 10).bias is None  # nothing to fold
    for dtype in (torch.bfloat16, torch.float16):  # one offset alone would be off by up to 1.5% there
        bias = fold_bias(64, 24, 512, dtype)
        assert bias.dtype == dtype and abs(float(bias[24:].double().exp().sum()) - 488) < 0.1


def test_fused_runs_fold_the_prompt_padding_and_plain_runs_do_not(model, monkeypatch):
    from gf_core.kernels import attention_backend

    seen: list = []
    _recording(monkeypatch, seen)
    segs = [gf.Segment(prompt(0), 6), gf.Segment(prompt(1), 6, gf.Transition("apr"))]
    gf.generate(model, segs, "grounded", seed=5, kernels="fused", **RUN)
    assert seen and all(args[6].bias is not None for args in seen)
    seen.clear()
    gf.generate(model, segs, "grounded", seed=5, kernels="fused", attention=attention_backend("math"), **RUN)
    assert seen and not any(args[6].bias is not None for args in seen)  # an attention the caller picked sees the whole prompt


def test_a_failing_tuned_compile_falls_back_to_the_default_one(model, monkeypatch):
    import gf_core.kernels as kernels

    class BackendCompilerFailed(Exception):
        pass

    BackendCompilerFailed.__module__ = "torch._dynamo.exc"
    compiled_with = []
    plain_compile = torch.compile

    def compile_failing_when_tuned(fn, **kwargs):
        if kwargs.get("options"):
            def failing(*args):
                raise BackendCompilerFailed("tuned options")
            return failing
        compiled_with.append(kwargs)
        return plain_compile(fn, **kwargs)

    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", compile_failing_when_tuned)
    segs = [gf.Segment(prompt(0), 6)]
    fused = gf.generate(model, segs, "grounded", seed=5, kernels="fused", **RUN)
    plain = gf.generate(model, segs, "grounded", seed=5, **RUN)
    assert compiled_with == [{"fullgraph": True}]
    torch.testing.assert_close(fused.latents, plain.latents, atol=1e-5, rtol=1e-5)


def test_warm_up_prompt_of_another_folded_length():
    """warm_up's second prompt folds to the next length up (or down, at the text length), so a typed
    prompt longer or shorter than the first meets shapes the warm-up met."""
    from grounded_forcing.gf_core.stream import other_fold_prompt
    from grounded_forcing.gf_core.wan import FOLD_MULTIPLE, folded_rows, padding_start

    for rows, length, text_len in ((24, 512, 512), (8, 8, 512), (72, 512, 512), (448, 512, 512), (512, 512, 512),
                                   (0, 512, 512), (100, 200, 512)):
        p = torch.zeros(1, length, 4)
        p[:, :rows] = 1.5
        kept = min(folded_rows(padding_start(p)), text_len)
        other = other_fold_prompt(p, text_len)
        again = min(folded_rows(padding_start(other)), text_len)
        assert abs(again - kept) == FOLD_MULTIPLE and FOLD_MULTIPLE <= again <= text_len, (rows, kept, again)
        assert other.shape[0] == 1 and other.shape[2] == 4 and other.ne(0).any()
    assert other_fold_prompt(torch.ones(1, 8, 4), FOLD_MULTIPLE) is None  # one folded length only


def test_after_warm_up_a_live_take_compiles_nothing(model, compiler):
    """gf.warm_up before a take: switches of every page choice and cuts, at random chunks, then need no
    new compiled graph (a typed prompt never waits for a compile); a second warm-up does nothing."""
    import random

    import torch._dynamo.utils

    config = gf.RunConfig(kernels="fused", seed=0, noise_order="chunk", **RUN)
    assert gf.warm_up(model, "grounded", config, prompt(0)) > 0
    assert gf.warm_up(model, "grounded", config, prompt(0)) == 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    session = gf.Session(model, "grounded", config)
    rng = random.Random(1)
    segment = gf.Segment(prompt(1), 3)
    kinds = []
    for i in range(24):
        if i and rng.random() < 0.4:
            kinds.append(rng.choice(["apr", "hard", "none", "cut", "default"]))
            segment = gf.Segment(prompt(i % 3), 3, gf.Transition(kinds[-1]))
        session.step(segment)
    assert {"apr", "hard", "none", "cut"} <= set(kinds)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert compiled(session.kernels)
