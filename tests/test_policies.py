"""Infinity-RoPE, Context Forcing and Anchor Forcing as memory presets: index layouts, admission
and eviction, KV flush and RoPE cut, surprisal-based promotion, the junction and the anchor-guided
re-cache, bounded indices over 2,000 chunks, and a short real generation of each on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import RUN, ChunkKV, StubKV, commit, no_source, prompt

import gf_core as gf
from gf_core.memory import Memory
from gf_core.policies import Junction, anchor_forcing, context_forcing, infinity_rope, preset
from gf_core.recache import apply_switch


def _commit(mem: Memory, stub: StubKV, start: int, kv: ChunkKV | None = None) -> dict:
    return commit(mem, start, stub.latents(3), stub.kv(3) if kv is None else kv, segment=0)


def _switch(mem: Memory, stub: StubKV, kind: str, start: int) -> dict:
    return apply_switch(mem, gf.Transition(kind), start, stub.encode, no_source).to_json()


def _layout(plan) -> tuple[dict[str, list[list[int]]], list[int]]:
    """{region: [[frame, temporal index], ...]}, query indices."""
    keys: dict[str, list[list[int]]] = {}
    for (name, frame), index in zip(plan.keys, plan.key_index):
        keys.setdefault(name, []).append([frame.index, index])
    return keys, plan.query_index


def _keys(*vectors: list[float]) -> ChunkKV:
    """A chunk whose frames have the given block-0 keys (1 token, 1 head, head dim 2)."""
    k = torch.tensor(vectors, dtype=torch.float32).view(1, len(vectors), 1, 2)
    return ChunkKV([k], [torch.zeros_like(k)])


# ---------------------------------------------------------------------------------------------
# Infinity-RoPE


def test_infinity_rope_preset_matches_the_reference_config():
    policy = infinity_rope()
    # local_attn_size 6 counts the sink (1) and the chunk (3): 2 frames slide
    assert [(r.name, r.frames, r.fill) for r in policy.regions] == [("sink", 1, "first"), ("window", 2, "fifo")]
    assert (policy.index_rule, policy.switch, policy.cut.rule, policy.cut.index, policy.flush_keep) == (
        "block_relative", "flush", "rope_cut", 45, 2)
    assert preset("infinity_rope", 3) == policy
    assert [r.frames for r in preset("infinity_rope", 2).regions] == [1, 3]


def test_infinity_rope_block_relative_layout():
    mem, stub = Memory(infinity_rope(), 3, 1), StubKV(0)
    expected = {
        0: ({}, [0, 1, 2]),
        3: ({"sink": [[0, 0]], "window": [[1, 1], [2, 2]]}, [3, 4, 5]),
        6: ({"sink": [[0, 0]], "window": [[4, 1], [5, 2]]}, [3, 4, 5]),
        9: ({"sink": [[0, 0]], "window": [[7, 1], [8, 2]]}, [3, 4, 5]),
        300: ({"sink": [[0, 0]], "window": [[298, 1], [299, 2]]}, [3, 4, 5]),
    }
    for start in range(0, 303, 3):
        if start in expected:
            assert _layout(mem.plan(start, 3)) == expected[start], start
        changes = _commit(mem, stub, start)
        assert "promotions" not in changes  # the event keeps the existing keys for policies without promotion
        if start >= 3:  # two window frames and the first of the chunk itself leave a 2-frame window
            assert changes["evicted"] == [start - 2, start - 1, start]
    assert mem.snapshot() == {"sink": [0], "window": [301, 302]}


def test_infinity_rope_flush_keeps_sink_and_two_newest():
    # with the reference's window the flush drops nothing: the window already holds the 2 newest frames
    mem, stub = Memory(infinity_rope(), 3, 1), StubKV(1)
    for start in range(0, 30, 3):
        _commit(mem, stub, start)
    assert _switch(mem, stub, "default", 30) == {"kind": "flush", "frame": 30, "dropped": []}
    assert _layout(mem.plan(30, 3)) == ({"sink": [[0, 0]], "window": [[28, 1], [29, 2]]}, [3, 4, 5])

    # a wider window: the flush drops all but the 2 newest, the indices stay block-relative
    mem, stub = Memory(infinity_rope(window_frames=12), 3, 1), StubKV(1)
    for start in range(0, 30, 3):
        _commit(mem, stub, start)
    assert mem.snapshot()["window"] == list(range(22, 30))
    event = _switch(mem, stub, "default", 30)
    assert event == {"kind": "flush", "frame": 30, "dropped": list(range(22, 28))}
    assert mem.snapshot() == {"sink": [0], "window": [28, 29]}
    assert _layout(mem.plan(30, 3)) == ({"sink": [[0, 0]], "window": [[28, 1], [29, 2]]}, [3, 4, 5])
    _commit(mem, stub, 30)
    assert _layout(mem.plan(33, 3)) == ({"sink": [[0, 0]], "window": [[28, 1], [29, 2], [30, 3], [31, 4], [32, 5]]},
                                        [6, 7, 8])
    slots = [f.slot for _, f in mem.frames()]
    assert len(set(slots)) == len(slots) and all(0 <= s < 9 for s in slots)


def test_infinity_rope_cut_moves_one_chunk_far_away():
    mem, stub = Memory(infinity_rope(window_frames=9), 3, 1), StubKV(2)
    for start in range(0, 30, 3):
        _commit(mem, stub, start)
    event = _switch(mem, stub, "cut", 30)
    assert event == {"kind": "cut", "frame": 30, "dropped": [25, 26, 27], "query": [45, 46, 47]}
    # the retained context keeps its block-relative indices; the chunk sits at 45-47 for every pass
    for _ in range(2):
        assert _layout(mem.plan(30, 3)) == ({"sink": [[0, 0]], "window": [[28, 1], [29, 2]]}, [45, 46, 47])
    _commit(mem, stub, 30)
    assert _layout(mem.plan(33, 3)) == ({"sink": [[0, 0]], "window": [[28, 1], [29, 2], [30, 3], [31, 4], [32, 5]]},
                                        [6, 7, 8])
    # the other policies keep their reset cut
    grounded = Memory(gf.grounded(), 3, 1)
    for start in range(0, 30, 3):
        _commit(grounded, stub, start)
    assert _switch(grounded, stub, "cut", 30) == {"kind": "cut", "frame": 30, "dropped": list(range(24, 30))}
    assert _layout(grounded.plan(30, 3))[1] == [3, 4, 5]


def test_flush_is_a_transition_for_any_policy():
    mem, stub = Memory(gf.grounded(), 3, 1), StubKV(3)
    for start in range(0, 30, 3):
        _commit(mem, stub, start)
    assert _switch(mem, stub, "flush", 30)["dropped"] == [24, 25, 26, 27]
    assert mem.snapshot() == {"gcm": [0, 1, 2], "ltm": [28, 29]}


# ---------------------------------------------------------------------------------------------
# Context Forcing


def test_context_forcing_preset():
    policy = context_forcing()
    assert [(r.name, r.frames, r.fill) for r in policy.regions] == [
        ("sink", 3, "first"), ("slow", 12, "promoted"), ("fast", 3, "fifo")]
    assert (policy.index_rule, policy.rope_range, policy.promotion.tau, policy.promotion.every, policy.switch) == (
        "bounded", 21, 0.95, 2, "none")
    assert preset("context_forcing", 3) == policy
    with pytest.raises(ValueError, match="tau 1.5 is outside"):
        context_forcing(tau=1.5).validate(3)
    with pytest.raises(ValueError, match="do not fit the RoPE range of 20"):
        context_forcing(rope_range=20).validate(3)


SAME, TURN = [1.0, 0.0], [0.0, 1.0]


def test_context_forcing_promotion_and_layout():
    """Keys chosen by hand: every frame [1, 0] except frame 12 (turned 90 degrees: surprising)."""
    mem, stub = Memory(context_forcing(), 3, 1), StubKV(4)

    def kv(start: int) -> ChunkKV:
        return _keys(*[TURN if f == 12 else SAME for f in range(start, start + 3)])

    layouts = {}
    promotions = {}
    for start in range(0, 36, 3):
        layouts[start] = _layout(mem.plan(start, 3))
        changes = commit(mem, start, stub.latents(3), kv(start), segment=0)
        promotions[start] = changes["promotions"]
    # candidates: the first frame of every 2nd chunk (6, 12, 18, ...) when it leaves the fast memory
    assert promotions[9] == [{"frame": 6, "similarity": 1.0, "promoted": False}]
    assert promotions[15] == [{"frame": 12, "similarity": 0.0, "promoted": True}]
    assert promotions[21] == [{"frame": 18, "similarity": 1.0, "promoted": False}]
    assert [promotions[s] for s in (0, 3, 6, 12, 18)] == [[]] * 5
    assert mem.snapshot() == {"sink": [0, 1, 2], "slow": [12], "fast": [33, 34, 35]}

    sink = [[0, 0], [1, 1], [2, 2]]
    assert layouts[0] == ({}, [0, 1, 2])
    assert layouts[3] == ({"sink": sink}, [3, 4, 5])
    assert layouts[6] == ({"sink": sink, "fast": [[3, 3], [4, 4], [5, 5]]}, [6, 7, 8])
    assert layouts[15] == ({"sink": sink, "fast": [[12, 12], [13, 13], [14, 14]]}, [15, 16, 17])
    # frame 12 promoted: slow at N_s.., fast and the chunk pinned to end at 20
    assert layouts[18] == ({"sink": sink, "slow": [[12, 3]], "fast": [[15, 15], [16, 16], [17, 17]]}, [18, 19, 20])
    assert layouts[33] == ({"sink": sink, "slow": [[12, 3]], "fast": [[30, 15], [31, 16], [32, 17]]}, [18, 19, 20])


def test_context_forcing_slow_memory_evicts_oldest_and_swaps_slots():
    policy = context_forcing(slow_frames=2, promote_every=1, tau=0.5)
    mem, stub = Memory(policy, 3, 1), StubKV(5)
    for c in range(12):  # alternate the key direction chunk by chunk: every candidate is surprising
        key = SAME if c % 2 else TURN
        changes = commit(mem, 3 * c, stub.latents(3), _keys(key, key, key), segment=0)
        if c >= 2:
            assert [p["frame"] for p in changes["promotions"] if p["promoted"]] == [3 * c - 3]
        if c >= 4:  # the oldest slow frame goes when the third arrives
            assert 3 * c - 9 in changes["evicted"]
        slots = [f.slot for _, f in mem.frames()]
        assert len(set(slots)) == len(slots) and all(0 <= s < 8 for s in slots)
    assert mem.snapshot() == {"sink": [0, 1, 2], "slow": [27, 30], "fast": [33, 34, 35]}
    # a promoted frame keeps its slot, so its K/V is what was committed
    slot = mem.regions["slow"][-1].slot
    assert torch.equal(mem.store.keys[0, 0, slot, 0, 0], torch.tensor(TURN))  # frame 30, made by chunk 10
    # the range shrinks with the memory: N_s + N_c + N_l = 3 + 2 + 6 = 11
    assert mem.policy.rope_range == 11
    assert _layout(mem.plan(36, 3)) == ({"sink": [[0, 0], [1, 1], [2, 2]], "slow": [[27, 3], [30, 4]],
                                        "fast": [[33, 5], [34, 6], [35, 7]]}, [8, 9, 10])


def test_context_forcing_cut_keeps_sink_and_slow():
    policy = context_forcing(promote_every=1, tau=0.5)
    mem, stub = Memory(policy, 3, 1), StubKV(6)
    for c in range(10):
        key = SAME if c % 2 else TURN
        commit(mem, 3 * c, stub.latents(3), _keys(key, key, key), segment=0)
    slow = mem.snapshot()["slow"]
    assert slow == list(range(3, 27, 3))
    event = _switch(mem, stub, "cut", 30)
    assert event == {"kind": "cut", "frame": 30, "dropped": [27, 28, 29]}
    assert mem.snapshot() == {"sink": [0, 1, 2], "slow": slow, "fast": []}
    keys, query = _layout(mem.plan(30, 3))
    # the sink and slow memory keep 0..10; the new shot's chunk comes right after them
    assert [i for _, i in keys["sink"] + keys["slow"]] == list(range(11)) and query == [11, 12, 13]
    # the first chunk of the new shot is not compared with the frame before the cut
    commit(mem, 30, stub.latents(3), _keys(TURN, TURN, TURN), segment=1)
    assert commit(mem, 33, stub.latents(3), _keys(SAME, SAME, SAME), segment=1)["promotions"] == []


# ---------------------------------------------------------------------------------------------
# bounded over 2,000 chunks


@pytest.mark.parametrize("name", ["infinity_rope", "context_forcing"])
def test_two_thousand_chunks_stay_bounded(name):
    policy = preset(name, 3)
    mem, stub = Memory(policy, 3, 1), StubKV(7)
    bound = 21 if name == "context_forcing" else 6
    slots_total = sum(r.frames for r in policy.regions)
    promoted = cuts = 0
    tensors = None
    for c in range(2000):
        start = 3 * c
        cut = c and c % 170 == 0
        if cut:
            event = _switch(mem, stub, "cut", start)
            cuts += 1
        elif c and c % 50 == 0:
            event = _switch(mem, stub, "default", start)
            assert event["kind"] == policy.switch
        plan = mem.plan(start, 3)
        if cut and name == "infinity_rope":
            assert plan.query_index == [45, 46, 47] and event["query"] == [45, 46, 47]
            assert all(0 <= i < bound for i in plan.key_index)
        else:
            indices = plan.key_index + plan.query_index
            assert all(0 <= i < bound for i in indices), (c, indices)
            assert indices == sorted(set(indices)), (c, indices)  # strictly increasing in attention order
        assert plan.query_index == list(range(plan.query_index[0], plan.query_index[0] + 3))
        changes = _commit(mem, stub, start)
        promoted += sum(p["promoted"] for p in changes.get("promotions", []))
        for r in policy.regions:
            assert len(mem.regions[r.name]) <= r.frames
        slots = [f.slot for _, f in mem.frames()]
        assert len(set(slots)) == len(slots) and all(0 <= s < slots_total for s in slots)
        if c == 10:
            tensors = [(t.data_ptr(), t.shape) for t in (mem.store.keys, mem.store.values, mem.store.latents)]
    assert [(t.data_ptr(), t.shape) for t in (mem.store.keys, mem.store.values, mem.store.latents)] == tensors
    assert cuts == 11
    assert mem.snapshot()["sink"] == list(range(policy.regions[0].frames))
    if name == "context_forcing":
        assert promoted > 12 and len(mem.regions["slow"]) == 12  # the slow memory filled and turned over
        assert mem.store.keys.shape[2] == 18


# ---------------------------------------------------------------------------------------------
# real generations on the tiny model


def test_infinity_rope_real_generation(model):
    segs = [gf.Segment(prompt(0), 12), gf.Segment(prompt(1), 6), gf.Segment(prompt(2), 9, gf.Transition("cut"))]
    out = gf.generate(model, segs, "infinity_rope", **RUN)
    events = out.events
    assert out.latents.shape == (1, 16, 27, 4, 4) and torch.isfinite(out.latents).all()
    assert [e["switch"] and e["switch"]["kind"] for e in events] == [None] * 4 + ["flush", None, "cut", None, None]
    assert events[4]["switch"] == {"kind": "flush", "frame": 12, "dropped": []}
    assert events[6]["switch"] == {"kind": "cut", "frame": 18, "dropped": [], "query": [45, 46, 47]}
    assert events[6]["rope"] == {"keys": {"sink": [[0, 0]], "window": [[16, 1], [17, 2]]}, "query": [45, 46, 47]}
    for c, e in enumerate(events):
        if c >= 2 and c != 6:
            assert e["rope"] == {"keys": {"sink": [[0, 0]], "window": [[3 * c - 2, 1], [3 * c - 1, 2]]},
                                 "query": [3, 4, 5]}
        assert e["memory"]["sink"] == [0]
    # the default flush keeps exactly the frames the window holds: the same video as a text-only switch
    none = gf.generate(model, [segs[0], gf.Segment(prompt(1), 6, gf.Transition("none")), segs[2]],
                       "infinity_rope", **RUN)
    assert torch.equal(none.latents, out.latents)
    # the RoPE cut matters: without it (a flush instead) the chunk after the cut differs
    flushed = gf.generate(model, [segs[0], segs[1], gf.Segment(prompt(2), 9, gf.Transition("flush"))],
                          "infinity_rope", **RUN)
    assert torch.equal(flushed.latents[:, :, :18], out.latents[:, :, :18])
    assert (flushed.latents[:, :, 18:21] - out.latents[:, :, 18:21]).abs().max() > 1e-4


def test_context_forcing_real_generation(model):
    segs = [gf.Segment(prompt(0), 24), gf.Segment(prompt(1), 9), gf.Segment(prompt(2), 6, gf.Transition("cut"))]
    policy = context_forcing(tau=1.0)  # every candidate is promoted (similarity < 1), so the slow memory fills
    gen = gf.stream(model, segs, policy, **RUN)
    events = [c.event for c in gen]
    assert len(events) == 13
    for e in events:
        keys, query = e["rope"]["keys"], e["rope"]["query"]
        fixed = [i for _, i in keys.get("sink", []) + keys.get("slow", [])]
        assert fixed == list(range(len(fixed)))
        block = [i for _, i in keys.get("fast", [])] + query
        assert block == list(range(block[0], block[0] + len(block))) and block[-1] <= 20
        assert "promotions" in e
    assert [p["frame"] for e in events for p in e["promotions"]] == [6, 12, 18, 24]
    assert events[11]["switch"] == {"kind": "cut", "frame": 33, "dropped": [30, 31, 32]}
    assert events[11]["memory"]["slow"] == [6, 12, 18, 24]
    assert events[10]["rope"]["query"] == [18, 19, 20]
    assert events[11]["rope"] == {"keys": {"sink": [[0, 0], [1, 1], [2, 2]],
                                           "slow": [[6, 3], [12, 4], [18, 5], [24, 6]]}, "query": [7, 8, 9]}


# ---------------------------------------------------------------------------------------------
# Anchor Forcing


class Recorder:
    """A re-cache ``encode`` and ``source_for`` that remember what they were asked (StubKV values)."""

    def __init__(self, stub: StubKV):
        self.stub = stub
        self.calls: list[dict] = []

    def encode(self, latents, query_index, context, own_keys_from=0, on_kv=None):
        self.calls.append({"frames": latents.shape[2], "query": list(query_index), "context": context,
                           "own_keys_from": own_keys_from})
        return self.stub.encode(latents, query_index, context, own_keys_from, on_kv)

    def source_for(self, slots, indices):
        return {"slots": list(slots), "indices": list(indices)}


def _anchor_switch(mem: Memory, rec: Recorder, start: int) -> dict:
    return apply_switch(mem, gf.Transition(), start, rec.encode, rec.source_for).to_json()


SINK = [[0, 0], [1, 1], [2, 2]]


def test_anchor_forcing_preset_matches_the_reference_config():
    policy = anchor_forcing()
    # local_attn_size 12 counts the sink (3) and the chunk (3): 6 committed frames slide
    assert [(r.name, r.frames, r.fill) for r in policy.regions] == [
        ("sink", 3, "first"), ("junction", 3, "junction"), ("local", 6, "fifo")]
    assert (policy.index_rule, policy.rope_range, policy.junction.index, policy.switch, policy.recache.frames) == (
        "tri_region", 21, 6, "anchor", 12)
    assert preset("anchor_forcing", 3) == policy
    assert gf.anchor_forcing is anchor_forcing
    with pytest.raises(ValueError, match=r"junction at temporal indices -1\.\.1 leaves the RoPE range of 21"):
        anchor_forcing(window_frames=19).validate(3)
    with pytest.raises(ValueError, match="leaves the RoPE range of 21"):
        dataclasses.replace(policy, junction=Junction(19)).validate(3)
    with pytest.raises(ValueError, match="a junction region needs the 'tri_region' RoPE index rule"):
        dataclasses.replace(policy, index_rule="bounded").validate(3)


def test_anchor_forcing_layout_before_any_switch():
    mem, stub = Memory(anchor_forcing(), 3, 1), StubKV(10)
    expected = {
        0: ({}, [0, 1, 2]),
        3: ({"sink": SINK}, [3, 4, 5]),
        6: ({"sink": SINK, "local": [[3, 3], [4, 4], [5, 5]]}, [6, 7, 8]),
        12: ({"sink": SINK, "local": [[f, f] for f in range(6, 12)]}, [12, 13, 14]),
        18: ({"sink": SINK, "local": [[f, f] for f in range(12, 18)]}, [18, 19, 20]),
        # from frame 21 on the local keys and the chunk stay pinned at 12..20
        21: ({"sink": SINK, "local": [[15 + j, 12 + j] for j in range(6)]}, [18, 19, 20]),
        300: ({"sink": SINK, "local": [[294 + j, 12 + j] for j in range(6)]}, [18, 19, 20]),
    }
    for start in range(0, 303, 3):
        if start in expected:
            assert _layout(mem.plan(start, 3)) == expected[start], start
        changes = _commit(mem, stub, start)
        if start >= 9:  # LongLive's window: the sink stays, the local region is a FIFO of 6
            assert changes["evicted"] == [start - 6, start - 5, start - 4]
    assert mem.snapshot() == {"sink": [0, 1, 2], "junction": [], "local": list(range(297, 303))}


def test_anchor_forcing_switch_recache_and_junction():
    """The reference's interactive run: switches requested at 40 and 80 take effect at 42 and 81."""
    mem, stub = Memory(anchor_forcing(), 3, 1), StubKV(11)
    rec = Recorder(stub)
    for start in range(0, 42, 3):
        _commit(mem, stub, start)
    sink_k = mem.store.keys[0, :, 0:3].clone()
    local_slots = [f.slot for f in mem.regions["local"]]

    # first switch: the last 12 latents (30..41) re-run at 9..20 under the new prompt; the sink keeps
    # its old K/V as context at 0..2; only the newest 9 are keys; the frames still held get new K/V
    event = _anchor_switch(mem, rec, 42)
    assert event == {"kind": "anchor", "frame": 42, "recached": list(range(36, 42)), "junction": [],
                     "junction_dropped": []}
    assert rec.calls[-1] == {"frames": 12, "query": list(range(9, 21)),
                             "context": {"slots": [0, 1, 2], "indices": [0, 1, 2]}, "own_keys_from": 3}
    assert torch.equal(mem.store.keys[0, :, 0:3], sink_k)
    assert mem.junction_open and _layout(mem.plan(42, 3)) == (
        {"sink": SINK, "local": [[36 + j, 12 + j] for j in range(6)]}, [18, 19, 20])

    # the first chunk under the new prompt fills the junction with the K/V of its cache pass
    kv = stub.kv(3)
    commit(mem, 42, stub.latents(3), kv, segment=1)
    assert not mem.junction_open and mem.snapshot()["junction"] == [42, 43, 44]
    junction_slots = [f.slot for f in mem.regions["junction"]]
    copies = [f.slot for f in mem.regions["local"] if f.index >= 42]
    assert torch.equal(mem.store.keys[0, :, junction_slots], mem.store.keys[0, :, copies])
    assert torch.equal(mem.store.keys[0, 0, junction_slots].flatten(), kv.keys[0][0].flatten())
    assert set(junction_slots).isdisjoint(local_slots + [0, 1, 2])

    # not attended while its frames are still in the local region (45, 48); from 51 on at 6..8
    for start in (45, 48):
        assert "junction" not in _layout(mem.plan(start, 3))[0]
        commit(mem, start, stub.latents(3), stub.kv(3), segment=1)
    for start in range(51, 81, 3):
        keys, query = _layout(mem.plan(start, 3))
        assert keys == {"sink": SINK, "junction": [[42, 6], [43, 7], [44, 8]],
                        "local": [[start - 6 + j, 12 + j] for j in range(6)]} and query == [18, 19, 20]
        commit(mem, start, stub.latents(3), stub.kv(3), segment=1)

    # second switch: the junction of the previous prompt warm-starts the re-cache, then is dropped
    junction_k = mem.store.keys[0, :, junction_slots].clone()
    event = _anchor_switch(mem, rec, 81)
    assert event == {"kind": "anchor", "frame": 81, "recached": list(range(75, 81)), "junction": [42, 43, 44],
                     "junction_dropped": [42, 43, 44]}
    assert rec.calls[-1]["context"] == {"slots": [0, 1, 2] + junction_slots, "indices": [0, 1, 2, 6, 7, 8]}
    assert rec.calls[-1]["query"] == list(range(9, 21)) and rec.calls[-1]["own_keys_from"] == 3
    assert torch.equal(mem.store.keys[0, :, junction_slots], junction_k)  # read, not re-encoded
    assert mem.snapshot()["junction"] == []
    assert "junction" not in _layout(mem.plan(81, 3))[0]
    for start in range(81, 90, 3):
        commit(mem, start, stub.latents(3), stub.kv(3), segment=2)
    assert _layout(mem.plan(90, 3))[0]["junction"] == [[81, 6], [82, 7], [83, 8]]


def test_anchor_forcing_early_and_short_switches():
    # a switch within the first 12 frames re-encodes everything, sink included, attending only to itself
    mem, stub = Memory(anchor_forcing(), 3, 1), StubKV(12)
    rec = Recorder(stub)
    for start in range(0, 9, 3):
        _commit(mem, stub, start)
    sink_k = mem.store.keys[0, :, 0:3].clone()
    event = _anchor_switch(mem, rec, 9)
    assert event["recached"] == list(range(9)) and event["junction"] == []
    assert rec.calls[-1] == {"frames": 9, "query": list(range(9)), "context": None, "own_keys_from": 0}
    assert not torch.equal(mem.store.keys[0, :, 0:3], sink_k)

    # a prompt held for less than the local window: its junction never becomes active and is not
    # context for the next re-cache (the reference tests the junction at the re-cache's first frame)
    for start in range(9, 30, 3):
        _commit(mem, stub, start)
    _anchor_switch(mem, rec, 30)
    _commit(mem, stub, 30)
    _commit(mem, stub, 33)
    event = _anchor_switch(mem, rec, 36)
    assert event["junction"] == [] and event["junction_dropped"] == [30, 31, 32]
    assert rec.calls[-1]["context"] == {"slots": [0, 1, 2], "indices": [0, 1, 2]}

    # the other transitions drop the junction too, and the next chunk fills it again
    for start in range(36, 60, 3):
        _commit(mem, stub, start)
    assert mem.snapshot()["junction"] == [36, 37, 38]
    event = _switch(mem, stub, "cut", 60)
    assert event["junction_dropped"] == [36, 37, 38] and mem.snapshot()["local"] == []
    assert _layout(mem.plan(60, 3)) == ({"sink": SINK}, [3, 4, 5])
    _commit(mem, stub, 60)
    assert mem.snapshot()["junction"] == [60, 61, 62]
    assert _switch(mem, stub, "apr", 63)["junction_dropped"] == [60, 61, 62]
    # policies without a junction report no junction at all
    assert "junction_dropped" not in _switch(Memory(gf.grounded(), 3, 1), stub, "default", 0)


def test_anchor_forcing_two_thousand_chunks_stay_below_21():
    policy = anchor_forcing()
    mem, stub = Memory(policy, 3, 1), StubKV(13)
    rec = Recorder(stub)
    tensors = None
    switches = cuts = with_junction = 0
    last_switch = last_cut = 0
    for c in range(2000):
        start = 3 * c
        if c and c % 170 == 0:
            _switch(mem, stub, "cut", start)
            cuts += 1
            last_switch = last_cut = start
        elif c and c % 47 == 0:
            event = _anchor_switch(mem, rec, start)
            # the last 12 latents, or those made since a cut
            assert event["kind"] == "anchor" and len(rec.calls[-1]["query"]) == min(12, start - last_cut)
            assert all(0 <= i < 21 for i in rec.calls[-1]["query"])
            if rec.calls[-1]["context"]:
                assert all(0 <= i < 21 for i in rec.calls[-1]["context"]["indices"])
            switches += 1
            last_switch = start
        plan = mem.plan(start, 3)
        indices = plan.key_index + plan.query_index
        assert all(0 <= i < 21 for i in indices), (c, indices)
        assert plan.query_index == list(range(plan.query_index[0], plan.query_index[0] + 3))
        keys, _ = _layout(plan)
        if "junction" in keys:
            with_junction += 1
            junction = [f for f, _ in keys["junction"]]
            assert junction == list(range(last_switch, last_switch + 3)) and start >= last_switch + 9
            assert [i for _, i in keys["junction"]] == [6, 7, 8]
        elif c > 0 and start >= last_switch + 9 and last_switch > 0:
            raise AssertionError(f"chunk {c}: the junction of the switch at {last_switch} is missing")
        if start - mem.origin >= 21:  # steady state: sink | junction | local | chunk strictly increasing
            assert indices == sorted(set(indices)), (c, indices)
        _commit(mem, stub, start)
        for r in policy.regions:
            assert len(mem.regions[r.name]) <= r.frames
        slots = [f.slot for _, f in mem.frames()]
        assert len(set(slots)) == len(slots) and all(0 <= s < 12 for s in slots)
        assert len(mem.history) <= 12
        if c == 10:
            tensors = [(t.data_ptr(), t.shape) for t in (mem.store.keys, mem.store.values, mem.store.latents)]
    assert [(t.data_ptr(), t.shape) for t in (mem.store.keys, mem.store.values, mem.store.latents)] == tensors
    assert mem.store.keys.shape[2] == 12 and cuts == 11 and switches > 30 and with_junction > 1500
    assert mem.snapshot()["sink"] == [0, 1, 2]


def test_anchor_forcing_real_generation(model):
    segs = [gf.Segment(prompt(0), 14), gf.Segment(prompt(1), 25), gf.Segment(prompt(2), 12)]
    out = gf.generate(model, segs, "anchor_forcing", **RUN)
    events = out.events
    assert out.latents.shape == (1, 16, 51, 4, 4) and torch.isfinite(out.latents).all()
    assert [e["switch"] and e["switch"]["kind"] for e in events] == (
        [None] * 5 + ["anchor"] + [None] * 7 + ["anchor"] + [None] * 3)
    assert events[5]["switch"] == {"kind": "anchor", "frame": 15, "recached": [9, 10, 11, 12, 13, 14],
                                   "junction": [], "junction_dropped": []}
    assert events[13]["switch"] == {"kind": "anchor", "frame": 39, "recached": list(range(33, 39)),
                                    "junction": [15, 16, 17], "junction_dropped": [15, 16, 17]}
    for c, e in enumerate(events):
        keys, query = e["rope"]["keys"], e["rope"]["query"]
        assert all(0 <= i < 21 for name in keys for _, i in keys[name]) and max(query) <= 20
        assert ("junction" in keys) == (8 <= c <= 12 or c >= 16), c
        if "junction" in keys:
            assert [i for _, i in keys["junction"]] == [6, 7, 8]
    assert events[8]["rope"] == {"keys": {"sink": SINK, "junction": [[15, 6], [16, 7], [17, 8]],
                                          "local": [[18 + j, 12 + j] for j in range(6)]}, "query": [18, 19, 20]}
    assert events[16]["memory"]["junction"] == [39, 40, 41]

    # the junction is the mechanism: without it the video is the same until it is first attended
    no_junction = dataclasses.replace(anchor_forcing(), regions=tuple(
        r for r in anchor_forcing().regions if r.name != "junction"))
    plain = gf.generate(model, segs, no_junction, **RUN)
    assert torch.equal(plain.latents[:, :, :24], out.latents[:, :, :24])
    assert (plain.latents[:, :, 24:27] - out.latents[:, :, 24:27]).abs().max() > 1e-4
