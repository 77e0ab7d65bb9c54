"""Streaming causal Wan engine: the chunk forward against a plain block-causal reference, the
few-step schedule, RoPE, seeding and the documented draw order, validation, batching, dtypes."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import (
    CFG,
    GRID,
    LATENT,
    RUN,
    ForwardCounter,
    capture_kv,
    commit,
    initial_noise,
    prompt,
    stream_memory,
    tiny_model,
)

import gf_core as gf
from gf_core.memory import ContextSource, Memory
from gf_core.policies import self_forcing
from gf_core.rope import RopeTable, apply_rope, axis_dims
from gf_core.sampler import renoise, shifted_table, to_x0
from gf_core.wan import encode_text, forward_chunk

# ---------------------------------------------------------------------------------------------
# 1. chunked generation with the cache == one block-causal full forward


def _reference_rope(heads_x: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
    """Absolute 3-axis RoPE from REFERENCE section 1, in float64: x [B, F*h*w, H, 128]."""
    b, length, heads, dim = heads_x.shape
    pairs = dim // 2
    dims = (pairs - 2 * (pairs // 3), pairs // 3, pairs // 3)  # 22 / 21 / 21 for 128
    positions = torch.stack(
        torch.meshgrid(torch.arange(frames), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1
    ).reshape(-1, 3).double()  # [L, 3] frame-major, row-major
    angles = []
    for axis, n in enumerate(dims):
        d_axis = 2 * n
        freq = 10000.0 ** (-torch.arange(0, d_axis, 2, dtype=torch.float64) / d_axis)
        angles.append(positions[:, axis:axis + 1] * freq)
    angle = torch.cat(angles, dim=1)  # [L, pairs]
    re, im = heads_x.double().reshape(b, length, heads, pairs, 2).unbind(-1)
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.reshape(b, length, heads, dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64 over [B, L, H, D]; mask [Lq, Lk] True = may attend."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double()).float()


def _reference_forward(model, x: torch.Tensor, t: float, embeds: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """Full-sequence forward of all frames with absolute RoPE and a block-causal mask, written from
    the block equations of REFERENCE section 1 using only the model's submodules."""
    cfg = model.config
    b, _, frames, height, width = x.shape
    h, w = height // 2, width // 2
    tpf = h * w
    heads, hd = cfg.num_heads, cfg.head_dim

    tokens = model.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, F*h*w, dim]
    half = cfg.freq_dim // 2
    arg = t * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    sinus = torch.cat([arg.cos(), arg.sin()])[None].float()  # [1, freq_dim]
    e = model.time_embedding(sinus)  # [1, dim]
    e0 = model.time_projection(e).view(1, 6, cfg.dim)

    padded = torch.cat([embeds, embeds.new_zeros(b, cfg.text_len - embeds.shape[1], embeds.shape[2])], dim=1)
    ctx = model.text_embedding(padded)

    chunk_of = torch.arange(frames).repeat_interleave(tpf) // chunk_frames
    mask = chunk_of[:, None] >= chunk_of[None, :]  # query chunk i sees key chunks <= i

    for block in model.blocks:
        shift, scale, gate, c_shift, c_scale, c_gate = (block.modulation + e0).unbind(1)  # [1, dim] each
        sa = block.self_attn
        y = block.norm1(tokens) * (1 + scale) + shift
        q = sa.norm_q(sa.q(y)).view(b, -1, heads, hd)
        k = sa.norm_k(sa.k(y)).view(b, -1, heads, hd)
        v = sa.v(y).view(b, -1, heads, hd)
        q, k = _reference_rope(q, frames, h, w), _reference_rope(k, frames, h, w)
        tokens = tokens + sa.o(_attend(q, k, v, mask).flatten(2)) * gate
        ca = block.cross_attn
        qc = ca.norm_q(ca.q(block.norm3(tokens))).view(b, -1, heads, hd)
        kc = ca.norm_k(ca.k(ctx)).view(b, -1, heads, hd)
        vc = ca.v(ctx).view(b, -1, heads, hd)
        tokens = tokens + ca.o(_attend(qc, kc, vc).flatten(2))
        tokens = tokens + block.ffn(block.norm2(tokens) * (1 + c_scale) + c_shift) * c_gate

    shift, scale = (model.head.modulation + e[:, None]).unbind(1)
    out = model.head.head(model.head.norm(tokens) * (1 + scale) + shift)  # [B, L, 1*2*2*16]
    out = out.view(b, frames, h, w, 1, 2, 2, cfg.out_dim)  # (pt, ph, pw, c) last, as Wan's unpatchify
    return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.out_dim, frames, height, width)


def test_chunked_cache_equals_block_causal_full_forward(model):
    chunk, chunks, batch, t = 3, 3, 2, 437.5
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 16, chunk * chunks, LATENT, LATENT, generator=g)
    embeds = torch.randn(batch, 8, CFG.text_dim, generator=g)
    timestep = torch.full((batch,), t)

    with torch.inference_mode():
        text = encode_text(model, embeds, CFG.text_len)
        rope = RopeTable(CFG.head_dim)
        mem = Memory(self_forcing(), chunk)
        outs = []
        for c in range(chunks):
            start = c * chunk
            xc = x[:, :, start:start + chunk]
            plan = mem.plan(start, chunk)
            assert plan.key_index == list(range(start)) and plan.query_index == list(range(start, start + chunk))
            source = mem.source(plan, rope, "complex128", GRID) if plan.keys else None
            query = torch.tensor(plan.query_index)
            out, kv = capture_kv(model, xc, timestep, text, source, query, rope, "complex128")
            commit(mem, start, xc, kv)
            outs.append(out)
        chunked = torch.cat(outs, dim=2)
        reference = _reference_forward(model, x, t, embeds, chunk)

    assert chunked.shape == reference.shape == x.shape
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)
    # the later chunks really depend on the cache: without it they differ
    with torch.inference_mode():
        alone = forward_chunk(model, x[:, :, 6:9], timestep, text, None, torch.arange(6, 9), rope, "complex128")
    assert (alone - reference[:, :, 6:9]).abs().max() > 1e-3


def test_cache_holds_clean_kv_of_the_context_pass(model):
    """After a chunk, the cache holds the raw K/V of one more forward of its clean latents at the
    context timestep (0), attending to the same memory as the chunk (REFERENCE section 2)."""
    segs = [gf.Segment(prompt(0), 9)]
    gen = gf.stream(model, segs, "longlive", **RUN)
    chunks = [next(gen), next(gen)]
    mem = stream_memory(gen)
    rope = RopeTable(CFG.head_dim)
    with torch.inference_mode():
        text = encode_text(model, segs[0].prompt, CFG.text_len)
        zero = torch.zeros(1)
        _, kv0 = capture_kv(model, chunks[0].latents, zero, text, None, torch.arange(3), rope, "float32",
                            compute_output=False)
        sink = [f.slot for f in mem.regions["sink"]]
        context = ContextSource(mem.store, sink, rope.frequencies(torch.arange(3), *GRID, "float32"))
        _, kv1 = capture_kv(model, chunks[1].latents, zero, text, context, torch.arange(3, 6), rope, "float32",
                            compute_output=False)
    local = [f.slot for f in mem.regions["local"]]
    for slots, kv in ((sink, kv0), (local, kv1)):
        torch.testing.assert_close(mem.store.keys[:, :, slots], torch.stack(kv.keys).unflatten(2, (3, -1)))
        torch.testing.assert_close(mem.store.values[:, :, slots], torch.stack(kv.values).unflatten(2, (3, -1)))
    torch.testing.assert_close(mem.store.latents[:, :, local], chunks[1].latents)
    gen.close()

    # the context timestep is the schedule's: another one gives another cache and other later chunks
    noise = initial_noise(1, 6, seed=3)
    at_zero = gf.generate(model, [gf.Segment(prompt(0), 6)], "longlive", noise=noise, **RUN).latents
    at_100 = gf.generate(model, [gf.Segment(prompt(0), 6)], "longlive", noise=noise, **RUN,
                         schedule=gf.Schedule.few_step(context_timestep=100.0)).latents
    assert torch.equal(at_zero[:, :, :3], at_100[:, :, :3])
    assert (at_zero[:, :, 3:] - at_100[:, :, 3:]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. sampler constants


def test_few_step_schedule_constants():
    s = gf.Schedule.few_step()
    assert s.timesteps.dtype == torch.float32 and s.sigmas.dtype == torch.float32 and len(s) == 4
    assert s.timesteps[0].item() == 1000.0 and s.timesteps[1].item() == 937.5 and s.timesteps[3].item() == 625.0
    assert s.sigmas[0].item() == 1.0 and s.sigmas[1].item() == 0.9375 and s.sigmas[3].item() == 0.625
    assert s.timesteps[2].item() == pytest.approx(2500 / 3, abs=1e-4)
    assert s.sigmas[2].item() == pytest.approx(5 / 6, abs=1e-7)
    # the float32 value the references compute (5 * 0.5 / (1 + 4 * 0.5) in float32)
    half = torch.tensor(0.5)
    assert s.sigmas[2].item() == (5 * half / (1 + 4 * half)).item()
    assert s.context_timestep == 0.0


def test_shift_formula_and_table():
    sigmas, timesteps = shifted_table(5.0)
    assert sigmas.shape == (1000,) and sigmas.dtype == torch.float32
    u = torch.linspace(1.0, 0.0, 1001)[:-1].double()
    torch.testing.assert_close(sigmas.double(), 5 * u / (1 + 4 * u), atol=1e-6, rtol=0)
    torch.testing.assert_close(timesteps, sigmas * 1000)
    identity, _ = shifted_table(1.0)
    torch.testing.assert_close(identity, u.float())
    custom = gf.Schedule.few_step(steps=(1000, 500), shift=3.0)
    assert custom.sigmas.tolist() == pytest.approx([1.0, 3 * 0.5 / (1 + 2 * 0.5)], abs=1e-7)
    with pytest.raises(ValueError, match="denoising steps"):
        gf.Schedule.few_step(steps=(1200,))


def test_to_x0_and_renoise_arithmetic():
    x = torch.tensor([1.0, -2.0, 0.5])
    v = torch.tensor([0.25, 1.0, -3.0])
    sigma = torch.tensor(0.9375)
    x0 = to_x0(x, v, sigma)
    assert x0.dtype == torch.float32
    assert x0.tolist() == [1.0 - 0.9375 * 0.25, -2.0 - 0.9375, 0.5 + 0.9375 * 3.0]
    # the references evaluate x0 in float64 and round once; float32 arithmetic rounds twice
    g = torch.Generator().manual_seed(0)
    xb, vb, sb = torch.randn(4096, generator=g), torch.randn(4096, generator=g), gf.Schedule.few_step().sigmas[2]
    expected = (xb.double() - sb.double() * vb.double()).float()
    assert torch.equal(to_x0(xb, vb, sb), expected)
    assert not torch.equal(xb - sb * vb, expected)  # (so the check above can tell the two apart)
    eps = torch.tensor([0.0, 1.0, 2.0])
    r = renoise(x0, eps, torch.tensor(0.625))
    torch.testing.assert_close(r, 0.375 * x0 + 0.625 * eps)
    assert renoise(x0, eps.bfloat16(), torch.tensor(0.625)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# 3. RoPE


def test_rope_axis_split():
    assert axis_dims(128) == (22, 21, 21)
    assert sum(axis_dims(128)) == 64
    assert axis_dims(64) == (12, 10, 10)


def test_rope_float32_matches_complex128():
    table = RopeTable(128)
    idx = torch.tensor([0, 5, 17, 300])
    x = torch.randn(2, 4 * 3 * 5, 2, 128, generator=torch.Generator().manual_seed(0))
    exact = apply_rope(x, table.frequencies(idx, 3, 5, "complex128"))
    fast = apply_rope(x, table.frequencies(idx, 3, 5, "float32"))
    assert exact.dtype == fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, atol=1e-6, rtol=0)
    assert (exact - x).abs().max() > 0.1  # it does rotate


def test_rope_identity_at_origin_on_temporal_channels():
    table = RopeTable(128)
    x = torch.randn(1, 2 * 2, 1, 128, generator=torch.Generator().manual_seed(1))
    t_pairs = axis_dims(128)[0]
    for kind in ("complex128", "float32"):
        at0 = apply_rope(x, table.frequencies(torch.tensor([0]), 2, 2, kind))
        # token 0 sits at (t, h, w) = (0, 0, 0): identity everywhere
        torch.testing.assert_close(at0[:, 0], x[:, 0], atol=1e-6, rtol=0)
        # every token of frame 0 keeps its temporal channels
        torch.testing.assert_close(at0[..., : 2 * t_pairs], x[..., : 2 * t_pairs], atol=1e-6, rtol=0)
        at3 = apply_rope(x, table.frequencies(torch.tensor([3]), 2, 2, kind))
        assert (at3[..., : 2 * t_pairs] - x[..., : 2 * t_pairs]).abs().max() > 0.1


def test_rope_temporal_relative_property():
    table = RopeTable(128)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 128, generator=g)
    k = torch.randn(1, 1, 1, 128, generator=g)

    def dot(i: int, j: int) -> float:
        qi = apply_rope(q, table.frequencies(torch.tensor([i]), 1, 1, "complex128"))
        kj = apply_rope(k, table.frequencies(torch.tensor([j]), 1, 1, "complex128"))
        return float((qi.double() * kj.double()).sum())

    for i, j, shift in ((5, 2, 10), (20, 20, 7), (3, 9, 100)):
        assert dot(i + shift, j + shift) == pytest.approx(dot(i, j), abs=1e-5)
    assert abs(dot(5, 2) - dot(5, 3)) > 1e-3  # depends on the difference


# ---------------------------------------------------------------------------------------------
# 4-5. seeds and the documented draw order


def _two_chunks(batch: int = 1) -> list[gf.Segment]:
    return [gf.Segment(prompt(0, batch), 6)]


def test_same_seed_same_output_different_seed_different(model):
    a = gf.generate(model, _two_chunks(), "longlive", seed=3, **RUN).latents
    b = gf.generate(model, _two_chunks(), "longlive", seed=3, **RUN).latents
    c = gf.generate(model, _two_chunks(), "longlive", seed=4, **RUN).latents
    assert a.shape == (1, 16, 6, LATENT, LATENT)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_reference_noise_order_by_hand(model):
    batch, frames, chunk, seed = 2, 6, 3, 11
    segs = _two_chunks(batch)
    used = torch.Generator().manual_seed(seed)
    run = gf.generate(model, segs, "longlive", batch_size=batch, generator=used, **RUN)

    # the draws by hand: initial noise of the whole video first, then per chunk per non-final step
    g = torch.Generator().manual_seed(seed)
    initial = torch.randn(batch, frames, 16, LATENT, LATENT, generator=g)
    schedule = gf.Schedule.few_step()
    rope = RopeTable(CFG.head_dim)
    with torch.inference_mode():
        text = encode_text(model, segs[0].prompt.expand(batch, -1, -1), CFG.text_len)
        x = initial[:, 0:chunk].permute(0, 2, 1, 3, 4)
        for i in range(len(schedule)):
            t = schedule.timesteps[i].expand(batch)
            velocity = forward_chunk(model, x, t, text, None, torch.arange(chunk), rope, "float32")
            x0 = to_x0(x, velocity, schedule.sigmas[i])
            if i + 1 < len(schedule):
                eps = torch.randn(batch * chunk, 16, LATENT, LATENT, generator=g)
                x = renoise(x0, eps.view(batch, chunk, 16, LATENT, LATENT).permute(0, 2, 1, 3, 4), schedule.sigmas[i + 1])
    torch.testing.assert_close(run.latents[:, :, :chunk], x0, atol=1e-6, rtol=0)
    for _ in range(len(schedule) - 1):  # chunk 2's draws
        torch.randn(batch * chunk, 16, LATENT, LATENT, generator=g)
    assert torch.equal(used.get_state(), g.get_state())  # nothing else was drawn


def test_given_initial_noise_with_same_seed_reproduces_seeded_run(model):
    segs = _two_chunks()
    seeded = gf.generate(model, segs, "longlive", seed=5, **RUN).latents
    initial = torch.randn(1, 6, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(5))
    given = gf.generate(model, segs, "longlive", seed=5, noise=initial, **RUN).latents
    assert torch.equal(given, seeded)


# ---------------------------------------------------------------------------------------------
# 6. validation


@pytest.mark.parametrize(
    "segments, policy, options, fragment",
    [
        (lambda: [gf.Segment(prompt(0), 6)], "longlive", {"height": 32, "width": 40}, "width 40 is not a multiple of 16"),
        (lambda: [gf.Segment(prompt(0), 6), gf.Segment(prompt(1), 2)], "longlive", RUN, "shorter than one chunk"),
        (lambda: [gf.Segment(prompt(0), 6, gf.Transition("cut"))], "grounded", RUN, "nothing to cut from"),
        (lambda: [gf.Segment(torch.randn(1, 8, CFG.text_dim + 1), 6)], "longlive", RUN, "does not fit"),
        (lambda: [gf.Segment(prompt(0), 24)], "self_forcing", RUN, "at most 21"),
        (lambda: [gf.Segment(prompt(0), 6)], "infinity", RUN, "unknown memory policy 'infinity'"),
        (lambda: [gf.Segment(prompt(0), 6)], "longlive", {**RUN, "noise_order": "global"}, "unknown noise order"),
        (lambda: [gf.Segment(prompt(0), 6)], "longlive", {**RUN, "rope_kind": "fp16"}, "unknown RoPE precision"),
        (lambda: [gf.Segment(prompt(0), 6)], "longlive", {**RUN, "noise": torch.zeros(1, 5, 16, 4, 4)}, "noise of shape"),
        (lambda: [gf.Segment(prompt(0), 6), gf.Segment(prompt(1), 6, gf.Transition("default"))],
         dataclasses.replace(gf.longlive(), recache=None), RUN, "'longlive' switch rule re-runs a window"),
        (lambda: [gf.Segment(prompt(0), 6), gf.Segment(prompt(1), 6, gf.Transition("default"))],
         dataclasses.replace(gf.longlive(), name="custom"), RUN, None),  # a renamed preset runs as the preset
        (lambda: [gf.Segment(prompt(0), 6, gf.Transition("hard")), gf.Segment(prompt(1), 6, gf.Transition("default"))],
         "self_forcing", RUN, None),
        (lambda: [gf.Segment(prompt(0), 6), gf.Segment(prompt(1), 6, gf.Transition("default"))],
         gf.grounded(), RUN, None),
    ],
)
def test_validation_errors_before_any_forward(model, segments, policy, options, fragment):
    counter = ForwardCounter(model)
    try:
        if fragment is None:  # controls: these are valid and must run
            out = gf.generate(model, segments(), policy, **options)
            assert out.latents.shape[2] == 12 and counter.calls > 0
            return
        with pytest.raises(ValueError, match=fragment):
            gf.generate(model, segments(), policy, **options)
        assert counter.calls == 0
    finally:
        counter.close()


# ---------------------------------------------------------------------------------------------
# 7. batching


def _batch_and_alone(model, policy):
    """Batch of 2 (own prompts, a prompt switch) vs each sample alone with the same initial noise."""
    noise = initial_noise(2, 12, seed=5)
    first_prompts, second_prompts = (prompt(10), prompt(11)), (prompt(12), prompt(13))
    one_step = gf.Schedule.few_step(steps=(1000,))  # no re-noise draws, so only `noise` is random

    def run(a, b, n):
        segs = [gf.Segment(a, 6), gf.Segment(b, 6, gf.Transition("apr"))]
        return gf.generate(model, segs, policy, batch_size=n.shape[0], noise=n, schedule=one_step, **RUN)

    both = run(torch.cat(first_prompts), torch.cat(second_prompts), noise)
    alone = [run(first_prompts[i], second_prompts[i], noise[i:i + 1]) for i in range(2)]
    return both, alone


def test_batch_equals_each_sample_alone(model):
    # frozen GCM: no batch-level memory decision, so this isolates the engine's batching
    both, alone = _batch_and_alone(model, gf.grounded(candidates="frozen"))
    for i in range(2):
        torch.testing.assert_close(both.latents[i:i + 1], alone[i].latents, atol=1e-5, rtol=1e-5)
    assert (both.latents[0] - both.latents[1]).abs().max() > 1e-2

    # with the full 4-step schedule a shared prompt broadcasts to the batch
    noise = initial_noise(2, 6, seed=6)
    full = gf.generate(model, [gf.Segment(prompt(0), 6)], "longlive", batch_size=2, noise=noise, **RUN).latents
    assert full.shape == (2, 16, 6, LATENT, LATENT) and torch.isfinite(full).all()
    assert (full[0] - full[1]).abs().max() > 1e-2


def test_batch_with_gcm_updates_is_refused_before_any_forward(model):
    # one GCM serves the whole batch, so a diversity decision per batch would couple the videos
    counter = ForwardCounter(model)
    try:
        with pytest.raises(ValueError, match="batch size 2 with the GCM diversity update"):
            gf.generate(model, [gf.Segment(prompt(0), 6)], gf.grounded(), batch_size=2, **RUN)
    finally:
        counter.close()
    assert counter.calls == 0


# ---------------------------------------------------------------------------------------------
# 8. dtypes


def test_bf16_run_close_to_fp32(model):
    segs = [gf.Segment(prompt(0), 6)]
    noise = initial_noise(1, 6, seed=9)
    ref = gf.generate(model, segs, "grounded", noise=noise, seed=1, **RUN).latents
    bf16 = tiny_model(torch.bfloat16)
    out = gf.generate(bf16, segs, "grounded", noise=noise, seed=1, **RUN).latents
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
    assert torch.isfinite(out.float()).all()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel < 5e-2


# ---------------------------------------------------------------------------------------------
# overlap: each chunk is handed out once the next one is queued


def _four_chunks() -> list[gf.Segment]:
    return [gf.Segment(prompt(0), 6), gf.Segment(prompt(1), 6, gf.Transition("apr"))]


def test_overlapped_stream_hands_out_the_same_chunks_one_chunk_later(model):
    counter = ForwardCounter(model)
    try:
        forwards = {}
        for overlap in (False, True):
            chunks, counter.calls = [], 0
            for chunk in gf.stream(model, _four_chunks(), "grounded", seed=2, overlap=overlap, **RUN):
                chunks.append(chunk)
                forwards[overlap, chunk.index] = counter.calls
            forwards[overlap] = chunks
    finally:
        counter.close()
    plain, overlapped = forwards[False], forwards[True]
    assert [c.index for c in overlapped] == [0, 1, 2, 3]
    for a, b in zip(plain, overlapped):
        assert torch.equal(a.latents, b.latents)
        assert {**a.event, "seconds": 0} == {**b.event, "seconds": 0}
    # a chunk is 1 prompt encode (first chunk) + 5 forwards; overlapped, chunk 0 comes out after chunk 1 ran
    assert forwards[False, 0] == 6 and forwards[True, 0] == 11
    assert forwards[False, 3] == forwards[True, 3]  # the last chunk waits for nothing


def test_an_error_mid_run_hands_out_the_finished_chunks_first(model, monkeypatch):
    stream_module = importlib.import_module("gf_core.stream")  # the package's "stream" is the function
    calls = {"n": 0}
    real = stream_module.forward_chunk

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:  # chunk 2 (the switch's recache) fails
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(stream_module, "forward_chunk", failing)
    got = []
    with pytest.raises(RuntimeError, match="out of memory"):
        for chunk in gf.stream(model, _four_chunks(), "grounded", seed=2, overlap=True, **RUN):
            got.append(chunk.index)
    assert got == [0, 1]


def test_split_attention_equals_one_call():
    from gf_core.kernels import attention_backend, split_attention
    from gf_core.wan import sdpa_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 2, 32, generator=g)
    k, v = torch.randn(2, 48, 2, 32, generator=g), torch.randn(2, 48, 2, 32, generator=g)
    one = sdpa_attention(q, k, v)
    for parts in (2, 3, 4):
        torch.testing.assert_close(split_attention(q, k, v, parts), one, atol=1e-6, rtol=1e-5)
    assert not torch.equal(split_attention(q, k, v, 2), one)  # two runs of keys really were merged
    assert torch.equal(split_attention(q, k, v, 5), one)  # 48 keys do not split in 5: one call
    split = attention_backend("split2")
    assert torch.equal(split(q, k[:, :20], v[:, :20]), sdpa_attention(q, k[:, :20], v[:, :20]))  # < 2x: one call
    torch.testing.assert_close(split(q, k, v), one, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="splitN"):
        attention_backend("split")


# ---------------------------------------------------------------------------------------------
# the event log's format: the same JSON as the stored log (tests/data/event_log_expected.json)


def _event_log_cases() -> dict[str, tuple[list[gf.Segment], object]]:
    def three(a, b, c, t1, t2):
        return [gf.Segment(prompt(0), a), gf.Segment(prompt(1), b, gf.Transition(t1)),
                gf.Segment(prompt(2), c, gf.Transition(t2))]

    return {
        "grounded": (three(12, 9, 12, "apr", "cut"), "grounded"),
        "grounded_every_frame_hard": (three(12, 9, 9, "hard", "flush"), gf.grounded(candidates="every_frame")),
        "longlive": (three(18, 15, 9, "default", "default"), "longlive"),
        "infinity_rope": (three(12, 9, 12, "default", "cut"), "infinity_rope"),
        "context_forcing": (three(36, 12, 12, "default", "cut"), "context_forcing"),
        "anchor_forcing": (three(15, 15, 15, "default", "default"), "anchor_forcing"),
    }


def test_event_log_is_the_stored_json(model):
    """Every event of six runs (each policy, every switch kind) serialises to the stored JSON line
    for line, key order included; only the timing ``seconds`` is left out. Measured numbers (a GCM
    update's importance and redundancy) come from float32 sums, whose last bits differ between
    processors: they match to 1e-5 relative or 1e-6 absolute, everything else exactly."""
    stored = json.loads((Path(__file__).parent / "data" / "event_log_expected.json").read_text())
    for name, (segments, policy) in _event_log_cases().items():
        events = gf.generate(model, segments, policy, seed=1, **RUN).events
        assert all(isinstance(e["seconds"], float) for e in events)
        lines = [json.dumps({k: v for k, v in e.items() if k != "seconds"}) for e in events]
        assert len(lines) == len(stored[name]), name
        for line, want in zip(lines, stored[name]):
            _same_json(json.loads(line, object_pairs_hook=list), json.loads(want, object_pairs_hook=list), name)


def _same_json(got, want, where: str) -> None:
    """Equal JSON values, keys in the same order; floats equal to 1e-5 relative or 1e-6 absolute."""
    if isinstance(want, float) and isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where
        return
    assert type(got) is type(want), where
    if isinstance(want, list):
        assert len(got) == len(want), where
        for g, w in zip(got, want):
            _same_json(g, w, where)
    elif isinstance(want, tuple):  # a key and its value (object_pairs_hook=list)
        assert got[0] == want[0], where
        _same_json(got[1], want[1], f"{where}.{want[0]}")
    else:
        assert got == want, where


# ---------------------------------------------------------------------------------------------
# the per-chunk session (live steering builds on it)


@pytest.mark.parametrize("policy", ["grounded", "longlive", "anchor_forcing"])
def test_a_session_stepped_segment_by_segment_equals_generate(model, policy):
    """With the chunk draw order a session needs no total length, and stepping it chunk by chunk
    under each segment in turn replays ``generate`` bit for bit, events included."""
    segments = [gf.Segment(prompt(0), 9), gf.Segment(prompt(1), 6, gf.Transition("apr")),
                gf.Segment(prompt(2), 6, gf.Transition("cut")), gf.Segment(prompt(3), 6)]
    whole = gf.generate(model, segments, policy, seed=4, noise_order="chunk", **RUN)
    session = gf.Session(model, policy, gf.RunConfig(seed=4, noise_order="chunk", **RUN))
    chunks = []
    for segment in segments:
        for _ in range(segment.frames // 3):
            chunks.append(session.step(segment))
    session.close()
    assert session.frames == 27 and [c.index for c in chunks] == list(range(9))
    assert torch.equal(torch.cat([c.latents for c in chunks], dim=2), whole.latents)
    assert [{**c.event, "seconds": 0} for c in chunks] == [{**e, "seconds": 0} for e in whole.events]
    with pytest.raises(RuntimeError, match="closed"):
        session.step(segments[-1])


def test_a_session_applies_a_transition_only_for_a_new_segment_object(model):
    a, b = gf.Segment(prompt(0), 3), gf.Segment(prompt(1), 3, gf.Transition("hard"))
    session = gf.Session(model, "grounded", noise_order="chunk", **RUN)
    events = [session.step(s).event for s in (a, a, b, b)]
    assert [e["segment"] for e in events] == [0, 0, 1, 1]
    assert [e["switch"] and e["switch"]["kind"] for e in events] == [None, None, "hard", None]


def test_a_session_without_a_plan_needs_the_chunk_draw_order(model):
    counter = ForwardCounter(model)
    try:
        with pytest.raises(gf.BadInput, match="'reference' noise order draws the whole video's noise first"):
            gf.Session(model, "grounded", **RUN)
        session = gf.Session(model, "longlive", noise_order="chunk", **RUN)
        with pytest.raises(gf.BadInput, match="segment 1: prompt embedding of shape"):
            session.step(gf.Segment(torch.zeros(1, 8, CFG.text_dim + 1), 3))
    finally:
        counter.close()
    assert counter.calls == 0
