"""Every bad input of the engine (run configuration, segments, prompts, memory policies, noise,
kernels) and of the sampler's logic, one parametrised case each: refused with the pack's own error
(BadInput), in one sentence that names the input, before any model forward, in under a second.

The last tests cover what is not a bad input but fails where cheap checks can see it: a model whose
first chunk comes out NaN, and LongLive's recache under a bounded index rule past frame 1,024.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from grounded_forcing.gf_core.errors import BadInput as PackBadInput  # the same class, as the nodes import it
from helpers import CFG, RUN, StubKV, prompt, tiny_model

import gf_core as gf
from gf_core.config import MemoryEstimate, check_fits
from gf_core.errors import BadInput
from gf_core.kernels import choose
from gf_core.memory import Memory
from gf_core.policies import Cut, Junction, MemoryPolicy, Recache, Region
from gf_core.recache import apply_switch
from gf_core.stream import NonFiniteOutput


def seg(frames: int = 6, p: torch.Tensor | None = None, kind: str = "default", **transition) -> gf.Segment:
    return gf.Segment(prompt(0) if p is None else p, frames, gf.Transition(kind, **transition))


def two(kind: str = "apr", **transition) -> list[gf.Segment]:
    return [seg(6), gf.Segment(prompt(1), 6, gf.Transition(kind, **transition))]


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[torch.nn.Module], object]  # raises BadInput
    fragment: str  # part of the message that names the input


def generate(segments=None, memory="grounded", **options) -> Callable[[torch.nn.Module], object]:
    def run(model):
        segs = segments() if callable(segments) else (segments if segments is not None else [seg()])
        return gf.generate(model, segs, memory, **{**RUN, **options})
    return run


def policy(**changes) -> MemoryPolicy:
    return dataclasses.replace(gf.grounded(), **changes)


def sampler_check(model, segments=None, memory=None, **config):
    from grounded_forcing.nodes import sampling  # the sampler node's logic, without ComfyUI

    options = {"width": 32, "height": 32, "seed": 0, "batch_size": 1, **config}
    return sampling.check(model, segments or [seg()], memory or gf.grounded(), sampling.run_config(**options))


NAN = float("nan")
CASES = [
    # -- the run configuration
    Case("width not a multiple of 16", generate(height=32, width=40), "width 40 is not a multiple of 16; use 32"),
    Case("height zero", generate(height=0, width=32), "height 0 is not a multiple of 16"),
    Case("height negative", generate(height=-32, width=32), "height -32 is not a multiple of 16"),
    Case("width 100000", generate(height=32, width=100000), "width 100000 is above the largest size of 4096"),
    Case("height 16000", generate(height=16000, width=32), "height 16000 is above the largest size"),
    Case("width a float", generate(height=32, width=32.0), "width 32.0 is not a whole number of pixels"),
    Case("height a bool", generate(height=True, width=32), "height True is not a whole number"),
    Case("batch size 0", generate(batch_size=0), "batch size 0 is outside 1 to 64"),
    Case("batch size 1000", generate(batch_size=1000), "batch size 1000 is outside 1 to 64"),
    Case("chunk of 0 frames", generate(chunk_frames=0), "chunk size 0 is below 1 latent frame"),
    Case("seed -1", generate(seed=-1), "seed -1 is outside [0, 2**64 - 1]"),
    Case("seed 2**64", generate(seed=2**64), f"seed {2**64} is outside"),
    Case("seed a float", generate(seed=1.5), "seed 1.5 is outside"),
    Case("unknown noise order", generate(noise_order="global"), "unknown noise order 'global'"),
    Case("unknown RoPE precision", generate(rope_kind="fp16"), "unknown RoPE precision 'fp16'"),
    Case("unknown kernel setting", generate(kernels="fast"), "unknown kernel setting 'fast'"),
    Case("integer run dtype", generate(dtype=torch.int64), "run dtype torch.int64 is not a floating-point type"),
    Case("unknown run option", generate(fused=True), "unknown run option 'fused'"),
    Case("fused kernels with float64 RoPE", generate(kernels="fused", rope_kind="complex128"),
         "fused blocks rotate in float32, but the RoPE precision is complex128"),
    Case("denoising step 1200", lambda m: gf.Schedule.few_step(steps=(1200,)), "denoising steps (1200,)"),
    # -- segments
    Case("no segments", generate([]), "no prompt segments were given"),
    Case("segment shorter than a chunk", generate(lambda: [seg(6), seg(2)]), "segment 2 is 2 latent frames"),
    Case("segment of negative length", generate(lambda: [seg(-3)]), "segment 1 is -3 latent frames"),
    Case("segment length a float", generate(lambda: [seg(4.5)]), "segment 1 is 4.5 latent frames, not a whole"),
    Case("first segment a cut", generate(lambda: [seg(6, kind="cut")]), "the first segment starts with a cut"),
    Case("a billion latent frames", generate(lambda: [seg(10**9)]), "ask for 1000000002 latent frames, above the longest"),
    Case("self_forcing past 21 frames", generate(lambda: [seg(24)], "self_forcing"), "holds at most 21 latent frames"),
    Case("absolute indices past the RoPE table", generate(lambda: [seg(1100)], "longlive"),
         "numbers frames absolutely and its RoPE table has 1024 positions"),
    Case("APR under a memory without a window", generate(lambda: two("apr"), "self_forcing"),
         "segment 2: an APR switch weighs frames by their distance within D_window"),
    Case("unknown transition", lambda m: gf.Transition("fade"), "unknown transition 'fade'"),
    Case("transition alpha_max 1.5", lambda m: gf.Transition("apr", alpha_max=1.5), "alpha_max 1.5 is outside [0, 1]"),
    Case("transition alpha_max NaN", lambda m: gf.Transition("apr", alpha_max=NAN), "alpha_max nan is outside [0, 1]"),
    Case("transition D_window NaN", lambda m: gf.Transition("apr", proximity_window=NAN), "D_window nan is below 1"),
    Case("transition D_window 0.5", lambda m: gf.Transition("apr", proximity_window=0.5), "D_window 0.5 is below 1"),
    # -- prompts
    Case("prompt of another text width", generate(lambda: [seg(6, torch.randn(1, 8, CFG.text_dim + 1))]),
         "segment 1: prompt embedding of shape (1, 8, 65) does not fit"),
    Case("prompt without a batch axis", generate(lambda: [seg(6, torch.randn(8, CFG.text_dim))]),
         "segment 1: prompt embedding of shape (8, 64) does not fit"),
    Case("prompt batch 3 for batch 2", generate(lambda: [seg(6, prompt(0, batch=3))], gf.grounded(candidates="frozen"),
                                                batch_size=2), "prompt embedding of shape (3, 8, 64) does not fit"),
    Case("prompt of 0 tokens", generate(lambda: [seg(6, torch.zeros(1, 0, CFG.text_dim))]),
         "segment 1: prompt embedding has 0 tokens"),
    Case("prompt of int64", generate(lambda: [seg(6, torch.ones(1, 8, CFG.text_dim, dtype=torch.int64))]),
         "prompt embedding of dtype torch.int64 is not a float tensor"),
    Case("prompt of bool", generate(lambda: [seg(6, torch.ones(1, 8, CFG.text_dim, dtype=torch.bool))]),
         "prompt embedding of dtype torch.bool is not a float tensor"),
    Case("prompt of complex64", generate(lambda: [seg(6, torch.ones(1, 8, CFG.text_dim, dtype=torch.complex64))]),
         "prompt embedding of dtype torch.complex64 is not a float tensor"),
    Case("prompt with NaN", generate(lambda: [seg(6), seg(6, torch.full((1, 8, CFG.text_dim), NAN))]),
         "segment 2: prompt embedding holds NaN or infinite values"),
    Case("prompt with inf", generate(lambda: [seg(6, torch.full((1, 8, CFG.text_dim), math.inf))]),
         "segment 1: prompt embedding holds NaN or infinite values"),
    Case("prompt not a tensor", generate(lambda: [seg(6, [[0.0] * CFG.text_dim])]),
         "segment 1: the prompt is a list, not an embedding tensor"),
    # -- memory policies
    Case("unknown memory preset", generate(memory="infinity"), "unknown memory policy 'infinity'"),
    Case("memory not a policy", generate(memory=42), "memory 42 is not a memory policy"),
    Case("unknown DR-RoPE layout", lambda m: gf.grounded(layout="middle"), "unknown DR-RoPE layout 'middle'"),
    Case("unknown switch rule", generate(memory=policy(switch="aprr")), "unknown switch rule 'aprr'; use one of apr"),
    Case("unknown index rule", generate(memory=policy(index_rule="relative")), "unknown RoPE index rule 'relative'"),
    Case("unknown GCM update rule", generate(memory=policy(candidates="sometimes")), "unknown GCM update rule 'sometimes'"),
    Case("unknown cut rule", generate(memory=policy(cut=Cut("fade"))), "unknown cut rule 'fade'; use one of reset"),
    Case("unknown fill rule", generate(memory=policy(regions=(Region("gcm", 3, "first"), Region("ltm", 6, "lifo")))),
         "unknown fill rule of memory region 'ltm' 'lifo'"),
    Case("a region of 0 frames", generate(memory=gf.grounded(gcm_frames=0)), "'gcm' of the 'grounded' policy holds 0"),
    Case("a region named twice", generate(memory=policy(regions=(Region("a", 3, "first"), Region("a", 6, "fifo")))),
         "names a memory region twice"),
    Case("anchor region not a region", generate(memory=policy(anchor_region="gmc")), "the anchor region 'gmc' is not"),
    Case("RoPE range 2000", generate(memory=gf.grounded(rope_range=2000)), "RoPE range 2000 is outside the RoPE table"),
    Case("RoPE range too small for the memory", generate(memory=gf.grounded(rope_range=11)),
         "do not fit the RoPE range of 11"),
    Case("pinned indices without a range", generate(memory=policy(rope_range=None)),
         "the 'pinned_end' RoPE index rule needs a RoPE range"),
    Case("RoPE cut index 5000", generate(memory=gf.infinity_rope(cut_index=5000)), "RoPE cut index 5000 puts the chunk"),
    Case("APR alpha_max NaN", generate(memory=gf.grounded(alpha_max=NAN)), "alpha_max nan is outside [0, 1]; 0.8"),
    Case("APR D_window NaN", generate(memory=gf.grounded(proximity_window=NAN)), "D_window nan is below 1 frame"),
    Case("APR alpha_max -0.1", generate(memory=gf.grounded(alpha_max=-0.1)), "alpha_max -0.1 is outside"),
    Case("promotion threshold 1.5", generate(memory=gf.context_forcing(tau=1.5)), "similarity threshold tau 1.5"),
    Case("promotion every 0 chunks", generate(memory=gf.context_forcing(promote_every=0)), "promotion every 0 chunks"),
    Case("flush keeping -1 frames", generate(memory=gf.infinity_rope(flush_keep=-1)), "a flush keeping -1 frames"),
    Case("junction outside the range", generate(memory=dataclasses.replace(gf.anchor_forcing(), junction=Junction(19))),
         "the junction at temporal indices 19..21 leaves the RoPE range"),
    Case("anchor re-cache without a window", generate(memory=dataclasses.replace(gf.anchor_forcing(), recache=None)),
         "the 'anchor' switch rule re-runs a window of frames"),
    Case("LongLive recache with two sinks", generate(memory=dataclasses.replace(
        gf.longlive(), regions=(Region("a", 3, "first"), Region("b", 3, "first"), Region("local", 6, "fifo")))),
        "the LongLive recache keeps one sink region"),
    Case("LongLive recache of 0 frames", generate(memory=dataclasses.replace(gf.longlive(), recache=Recache(0))),
         "the 'longlive' switch rule re-runs a window"),
    Case("batch 2 with the GCM update", generate(memory="grounded", batch_size=2),
         "batch size 2 with the GCM diversity update"),
    # -- noise
    Case("noise of the wrong shape", generate(noise=torch.zeros(1, 5, 16, 4, 4)), "noise of shape (1, 5, 16, 4, 4)"),
    Case("noise with NaN", generate(noise=torch.full((1, 6, 16, 4, 4), NAN)), "the given noise holds NaN"),
    Case("a plan-less session in the reference order", lambda m: gf.Session(m, "grounded", **RUN),
         "the 'reference' noise order draws the whole video's noise first"),
    Case("reference noise of hundreds of GiB", generate(lambda: [seg(19_998)], gf.grounded(), height=4096, width=4096),
         "the 'reference' noise order would hold"),
    Case("a plan-less session stepped with a bad prompt",
         lambda m: gf.Session(m, "longlive", noise_order="chunk", **RUN).step(seg(3, torch.zeros(1, 8, 3))),
         "segment 1: prompt embedding of shape (1, 8, 3)"),
    Case("a session played without segments", lambda m: next(gf.Session(m, noise_order="chunk", **RUN).play()),
         "this session was made without segments"),
    # -- the sampler's logic
    Case("sampler: unknown fused setting", lambda m: sampler_check(m, fused="yes"), "unknown fused setting 'yes'"),
    Case("sampler: not a Wan model", lambda m: sampler_check(torch.nn.Linear(2, 2)), "this MODEL is not a Wan2.1 DiT"),
    Case("sampler: an image-to-video model", lambda m: sampler_check(
        gf.WanModel(gf.WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, text_dim=64, in_dim=36))),
        "this MODEL takes 36 latent channels"),
    Case("sampler: seed past 2**64 - 1", lambda m: sampler_check(m, seed=2**64 + 5), "seed 18446744073709551621"),
    Case("sampler: fused where it cannot run", lambda m: sampler_check(m, fused="on", rope_kind="complex128",
                                                                       device=torch.device("cpu")),
         "fused blocks rotate in float32"),
    Case("a run larger than the GPU", lambda m: check_fits(
        gf.estimate_memory(gf.WanConfig(), gf.grounded(), gf.RunConfig(height=4096, width=4096), torch.bfloat16),
        80 * 2**30), "this run needs about"),
    Case("no room for the cache even with offloaded weights", lambda m: check_fits(
        MemoryEstimate(10 * 2**30, 5 * 2**30, 4 * 2**30), 8 * 2**30, offloadable_weights=True),
        "needs about 9.0 GiB of GPU memory (weights 10.0, K/V cache 5.0, activations 4.0 GiB) but only 8.0"),
    Case("kernels for an unknown setting", lambda m: choose("quick", "cpu"), "unknown kernel setting 'quick'"),
]


class BlockForwards:
    """Counts forwards of the patch embedding, the text embedding and every block's projections."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        modules = [model.patch_embedding, model.text_embedding]
        modules += [b.self_attn.q for b in model.blocks] + [b.cross_attn.k for b in model.blocks]
        self.handles = [m.register_forward_hook(self.hook) for m in modules]

    def hook(self, *_) -> None:
        self.calls += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_before_any_forward(bad: Case, model) -> None:
    counter = BlockForwards(model)
    began = time.perf_counter()
    try:
        with pytest.raises((BadInput, PackBadInput)) as info:
            bad.run(model)
    finally:
        counter.close()
    seconds = time.perf_counter() - began
    message = str(info.value)
    assert bad.fragment in message, message
    assert "\n" not in message and message.count(";") <= 2 and len(message) < 400  # one sentence, not a dump
    assert counter.calls == 0
    assert seconds < 1.0, f"{bad.name} took {seconds:.2f} s"


def test_the_cases_are_distinct_and_many():
    assert len({c.name for c in CASES}) == len(CASES) >= 50
    assert len({c.fragment for c in CASES}) == len(CASES)


def test_controls_of_the_limits_run(model):
    """Inputs at the limits are accepted: the largest seed, float64 prompts, a rope range of 1024."""
    out = gf.generate(model, [seg(3, prompt(0).double())], gf.grounded(rope_range=1024), seed=2**64 - 1, **RUN)
    assert out.latents.shape[2] == 3
    gf.Session(model, "longlive", noise_order="chunk", **RUN)  # a plan-less session in the chunk order is fine
    check_fits(MemoryEstimate(10, 5, 4), 19)


def test_nan_weights_stop_after_the_first_chunk_naming_the_likely_causes():
    broken = tiny_model()
    with torch.no_grad():
        broken.blocks[0].ffn[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteOutput, match="the first chunk came out NaN or infinite: the checkpoint may be corrupt"):
        gf.generate(broken, [seg(9)], "grounded", **RUN)


def test_longlive_recache_under_a_bounded_index_rule_stays_in_range():
    """LongLive's recache under DR-RoPE indices (GF DR-RoPE on the longlive policy) re-encodes the held
    frames at the indices the next chunk's plan gives them, far past frame 1,024."""
    pinned = dataclasses.replace(gf.longlive(), index_rule="pinned_end", rope_range=21)
    mem, stub = Memory(pinned, 3, 1), StubKV(0)
    seen = []

    def encode(latents, query_index, context, own_keys_from=0, on_kv=None):
        seen.append(list(query_index))
        return stub.encode(latents, query_index, context, own_keys_from, on_kv)

    def source_for(slots, indices):
        seen.append(list(indices))
        return None

    for start in range(0, 1500, 3):
        admission = mem.admit(start, stub.latents(3), 0)
        kv = stub.kv(3)
        on_kv = mem.store.writer(admission.writes, 3)
        on_kv(0, kv.keys[0], kv.values[0])
    event = apply_switch(mem, gf.Transition(), 1500, encode, source_for)
    assert event.kind == "longlive" and event.recached == list(range(1494, 1500))
    assert seen and all(0 <= i < 21 for indices in seen for i in indices)
    plan = mem.plan(1500, 3)
    assert seen[-1] == plan.key_index[-6:]  # the held frames at the next chunk's indices
