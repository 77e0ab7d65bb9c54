"""Baseline memory policies on the tiny model: Self-Forcing's growing cache, LongLive's sink and
window, LongLive's KV-recache at a prompt switch, and where segment boundaries fall."""

from __future__ import annotations

import pytest
import torch
from helpers import CFG, GRID, RUN, ForwardCounter, capture_kv, prompt, stream_memory

import gf_core as gf
from gf_core.memory import ContextSource
from gf_core.rope import RopeTable
from gf_core.stream import chunk_plan
from gf_core.wan import encode_text


def _pairs(frames) -> list[list[int]]:
    return [[f, f] for f in frames]


# ---------------------------------------------------------------------------------------------
# Self-Forcing


def test_self_forcing_attends_to_every_committed_frame(model):
    out = gf.generate(model, [gf.Segment(prompt(0), 18)], "self_forcing", **RUN)
    assert len(out.events) == 6
    for c, e in enumerate(out.events):
        start = 3 * c
        assert e["frames"] == [start, start + 3]
        assert e["rope"]["query"] == [start, start + 1, start + 2]
        if c == 0:
            assert e["rope"]["keys"] == {}
        else:
            assert e["rope"]["keys"] == {"context": _pairs(range(start))}
        assert e["memory"]["context"] == list(range(start + 3))
        assert e["evicted"] == []


def test_self_forcing_makes_21_frames(model):
    out = gf.generate(model, [gf.Segment(prompt(0), 21)], "self_forcing", **RUN)
    assert out.latents.shape[2] == 21
    assert out.events[-1]["rope"]["keys"] == {"context": _pairs(range(18))}


def test_self_forcing_refuses_24_frames_before_any_forward(model):
    counter = ForwardCounter(model)
    try:
        with pytest.raises(ValueError, match="at most 21"):
            gf.generate(model, [gf.Segment(prompt(0), 24)], "self_forcing", **RUN)
        with pytest.raises(ValueError, match="at most 21"):  # rounding up to the chunk counts too
            gf.generate(model, [gf.Segment(prompt(0), 11), gf.Segment(prompt(1), 11)], "self_forcing", **RUN)
    finally:
        counter.close()
    assert counter.calls == 0


# ---------------------------------------------------------------------------------------------
# LongLive


def test_longlive_sink_window_and_evictions(model):
    out = gf.generate(model, [gf.Segment(prompt(0), 24)], "longlive", **RUN)
    events = out.events
    assert len(events) == 8
    for c, e in enumerate(events):
        start = 3 * c
        assert e["rope"]["query"] == [start, start + 1, start + 2]  # absolute
        if c == 0:
            assert e["rope"]["keys"] == {}
            continue
        keys = e["rope"]["keys"]
        assert keys["sink"] == _pairs(range(3))
        local = list(range(max(3, start - 6), start))
        assert keys.get("local", []) == _pairs(local)
        seen = len(keys["sink"]) + len(keys.get("local", [])) + 3
        assert seen == min(12, start + 3)
        assert e["memory"]["sink"] == [0, 1, 2]
        # the commit after chunk c evicts the frames that fell out of the window
        assert e["evicted"] == list(range(max(3, start - 6), max(3, start - 3)))
        assert not set(e["evicted"]) & {0, 1, 2}
    # steady state: sink 0-2 + the 6 newest committed frames + the chunk = 12 frames
    last = events[-1]
    assert last["rope"]["keys"]["local"] == _pairs(range(15, 21))
    assert last["evicted"] == [15, 16, 17]
    assert last["memory"] == {"sink": [0, 1, 2], "local": list(range(18, 24))}


def _run_to_switch(model, policy, first_frames: int, second_frames: int):
    """Stream up to the chunk before the switch; return the generator, its memory and the latents so far."""
    segs = [gf.Segment(prompt(0), first_frames), gf.Segment(prompt(1), second_frames, gf.Transition("default"))]
    gen = gf.stream(model, segs, policy, **RUN)
    before = [next(gen) for _ in range(first_frames // 3)]
    return segs, gen, stream_memory(gen), torch.cat([c.latents for c in before], dim=2)


def _slots(mem, region: str, frames=None) -> list[int]:
    return [f.slot for f in mem.regions[region] if frames is None or f.index in frames]


def _recache_by_hand(model, latents, query_index, new_prompt, context):
    """LongLive's recache from REFERENCE section 3: one forward of the clean latents at timestep 0
    under the new prompt, returning their raw keys."""
    rope = RopeTable(CFG.head_dim)
    with torch.inference_mode():
        text = encode_text(model, new_prompt, CFG.text_len)
        _, kv = capture_kv(model, latents, torch.zeros(1), text, context, torch.tensor(query_index), rope,
                           "float32", compute_output=False)
    return torch.stack(kv.keys)  # [layers, B, N*T, H, D]


def test_longlive_recache_global_sink(model):
    segs, gen, mem, lat = _run_to_switch(model, gf.longlive(global_sink=True), 15, 9)
    sink_slots = _slots(mem, "sink")
    sink_before = mem.store.keys[:, :, sink_slots].clone()
    sink_values_before = mem.store.values[:, :, sink_slots].clone()
    kept = _slots(mem, "local", {12, 13, 14})
    local_before = mem.store.keys[:, :, kept].clone()

    # what the recache must write: the 9 newest frames (6-14) attending to the old-prompt sink
    rope = RopeTable(CFG.head_dim)
    sink_context = ContextSource(mem.store, sink_slots, rope.frequencies(torch.arange(3), *GRID, "float32"))
    expected = _recache_by_hand(model, lat[:, :, 6:15], list(range(6, 15)), segs[1].prompt, sink_context)
    expected = expected.unflatten(2, (9, -1))[:, :, 6:9]  # frames 12, 13, 14

    chunk = next(gen)
    e = chunk.event
    assert e["switch"]["kind"] == "longlive" and e["switch"]["frame"] == 15
    assert e["switch"]["recached"] == list(range(9, 15))
    assert e["switch"]["sink"] == [0, 1, 2]
    assert e["rope"]["keys"]["sink"] == _pairs(range(3))
    assert torch.equal(mem.store.keys[:, :, sink_slots], sink_before)  # old-prompt K/V kept
    assert torch.equal(mem.store.values[:, :, sink_slots], sink_values_before)
    assert (mem.store.keys[:, :, kept] - local_before).abs().max() > 1e-3
    torch.testing.assert_close(mem.store.keys[:, :, kept], expected, atol=1e-5, rtol=1e-5)
    gen.close()


def test_longlive_recache_without_global_sink(model):
    segs, gen, mem, lat = _run_to_switch(model, gf.longlive(global_sink=False), 15, 9)
    sink_slots = _slots(mem, "sink")
    sink_before = mem.store.keys[:, :, sink_slots].clone()
    # everything of the window (frames 3-14) is re-encoded together; frames 3-5 become the sink
    expected = _recache_by_hand(model, lat[:, :, 3:15], list(range(3, 15)), segs[1].prompt, None)
    expected = expected.unflatten(2, (12, -1))[:, :, 0:3]

    e = next(gen).event
    assert e["switch"]["sink"] == [3, 4, 5]
    assert e["switch"]["recached"] == [3, 4, 5, 9, 10, 11, 12, 13, 14]
    assert e["memory"]["sink"] == [3, 4, 5]
    assert e["rope"]["keys"]["sink"] == _pairs(range(3, 6))
    assert (mem.store.keys[:, :, sink_slots] - sink_before).abs().max() > 1e-3
    torch.testing.assert_close(mem.store.keys[:, :, sink_slots], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mem.store.latents[:, :, sink_slots], lat[:, :, 3:6])
    gen.close()


def test_longlive_early_switch_reencodes_everything(model):
    segs, gen, mem, lat = _run_to_switch(model, gf.longlive(global_sink=True), 9, 9)
    sink_slots = _slots(mem, "sink")
    sink_before = mem.store.keys[:, :, sink_slots].clone()
    expected = _recache_by_hand(model, lat, list(range(9)), segs[1].prompt, None).unflatten(2, (9, -1))

    e = next(gen).event
    assert e["switch"]["recached"] == list(range(9))
    assert e["switch"]["sink"] == [0, 1, 2]
    assert (mem.store.keys[:, :, sink_slots] - sink_before).abs().max() > 1e-3
    torch.testing.assert_close(mem.store.keys[:, :, sink_slots], expected[:, :, 0:3], atol=1e-5, rtol=1e-5)
    gen.close()


# ---------------------------------------------------------------------------------------------
# chunk boundaries


def test_segment_boundaries_round_up_to_chunks(model):
    segs = [gf.Segment(prompt(k), 4, gf.Transition("default")) for k in range(3)]
    assert chunk_plan(segs, 3) == [(0, 0), (3, 0), (6, 1), (9, 2)]
    assert chunk_plan(segs, 4) == [(0, 0), (4, 1), (8, 2)]
    assert chunk_plan([gf.Segment(prompt(0), 6), gf.Segment(prompt(1), 3)], 3) == [(0, 0), (3, 0), (6, 1)]

    out = gf.generate(model, segs, "longlive", **RUN)
    assert out.latents.shape[2] == 12  # 4 + 4 + 4 frames end at chunk boundary 12
    assert [e["frames"] for e in out.events] == [[0, 3], [3, 6], [6, 9], [9, 12]]
    assert [e["segment"] for e in out.events] == [0, 0, 1, 2]
    switches = [e["switch"] and (e["switch"]["kind"], e["switch"]["frame"]) for e in out.events]
    assert switches == [None, None, ("longlive", 6), ("longlive", 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writer_blends_like_a_float32_lerp_per_frame(dtype):
    """The writer blends each frame in place in the store's dtype: bit-identical to a float32 lerp
    per frame cast back (Eq. 11), and plain stores for alpha 1."""
    from gf_core.memory import FrameStore

    g = torch.Generator().manual_seed(4)
    first = [torch.randn(1, 4 * 6, 2, 8, generator=g).to(dtype) for _ in range(2)]
    new = [torch.randn(1, 4 * 4, 2, 8, generator=g).to(dtype) for _ in range(2)]
    writes = [(0, 3, 1.0), (1, 0, 0.25), (2, 5, 0.5), (3, 1, 0.75)]
    stores = [FrameStore(6, 2), FrameStore(6, 2)]
    for store in stores:
        for block in range(2):
            store.writer([(f, f, 1.0) for f in range(6)], 6)(block, *first)
    for block in range(2):
        stores[0].writer(writes, 4)(block, *new)
        for frame, slot, alpha in writes:
            for store, tensor in ((stores[1].keys, new[0]), (stores[1].values, new[1])):
                part, old = tensor.view(1, 4, 4, 2, 8)[:, frame], store[block, :, slot]
                store[block, :, slot] = part if alpha == 1.0 else torch.lerp(old.float(), part.float(), alpha).to(dtype)
    assert torch.equal(stores[0].keys, stores[1].keys) and torch.equal(stores[0].values, stores[1].values)
    assert not torch.equal(stores[0].keys[1, :, 0], first[0].view(1, 6, 4, 2, 8)[:, 0])  # blended
