"""Grounded Forcing memory: GCM + LTM regions, DR-RoPE indices, the diversity-aware GCM update
(Eq. 6-8), Adaptive Proximity Recache (Eq. 11-12), shot cuts, and a bounded cache.

Long runs drive :class:`gf_core.memory.Memory` directly with tiny fake K/V (no model); the
mechanisms that need real attention run the tiny model at 32 x 32 pixels."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from helpers import CFG, RUN, ForwardCounter, StubKV, capture_kv, commit, no_source, prompt, stream_memory

import gf_core as gf
from gf_core.memory import Memory, diversity_decision
from gf_core.recache import apply_switch, proximity_alpha
from gf_core.rope import RopeTable
from gf_core.wan import encode_text


def _commit(mem: Memory, stub: StubKV, start: int, latents: torch.Tensor | None = None) -> dict:
    latents = stub.latents(3) if latents is None else latents
    return commit(mem, start, latents, stub.kv(3), segment=0)


def _switch(mem: Memory, stub: StubKV, kind: str, start: int, **options) -> dict:
    return apply_switch(mem, gf.Transition(kind, **options), start, stub.encode, no_source).to_json()


def _layout(plan) -> tuple[dict[str, list[int]], list[int]]:
    keys: dict[str, list[int]] = {}
    for (name, _frame), index in zip(plan.keys, plan.key_index):
        keys.setdefault(name, []).append(index)
    return keys, plan.query_index


# ---------------------------------------------------------------------------------------------
# 1. DR-RoPE index layouts


def test_pinned_end_layout_first_chunks_steady_state_and_cut():
    mem, stub = Memory(gf.grounded(), 3, 1), StubKV(0)
    expected = {
        0: ({}, [0, 1, 2]),
        3: ({"gcm": [0, 0, 0]}, [3, 4, 5]),
        6: ({"gcm": [0, 0, 0], "ltm": [3, 4, 5]}, [6, 7, 8]),
        9: ({"gcm": [0, 0, 0], "ltm": [3, 4, 5, 6, 7, 8]}, [9, 10, 11]),
        12: ({"gcm": [0, 0, 0], "ltm": [6, 7, 8, 9, 10, 11]}, [12, 13, 14]),
        18: ({"gcm": [0, 0, 0], "ltm": [12, 13, 14, 15, 16, 17]}, [18, 19, 20]),
        21: ({"gcm": [0, 0, 0], "ltm": [12, 13, 14, 15, 16, 17]}, [18, 19, 20]),
        60: ({"gcm": [0, 0, 0], "ltm": [12, 13, 14, 15, 16, 17]}, [18, 19, 20]),
    }
    for start in range(0, 63, 3):
        plan = mem.plan(start, 3)
        if start in expected:
            assert _layout(plan) == expected[start], start
        # absolute frames behind the indices: GCM 0-2, LTM the 6 newest
        frames = [f.index for _, f in plan.keys]
        assert frames == ([0, 1, 2] if start else []) + list(range(max(3, start - 6), start))
        _commit(mem, stub, start)

    dropped = _switch(mem, stub, "cut", 63)["dropped"]
    assert dropped == list(range(57, 63))
    assert _layout(mem.plan(63, 3)) == ({"gcm": [0, 0, 0]}, [3, 4, 5])
    _commit(mem, stub, 63)
    assert _layout(mem.plan(66, 3)) == ({"gcm": [0, 0, 0], "ltm": [3, 4, 5]}, [6, 7, 8])
    for start in range(66, 84, 3):
        _commit(mem, stub, start)
    assert _layout(mem.plan(84, 3)) == ({"gcm": [0, 0, 0], "ltm": [12, 13, 14, 15, 16, 17]}, [18, 19, 20])


def test_after_gcm_layout():
    mem, stub = Memory(gf.grounded(layout="after_gcm"), 3, 1), StubKV(1)
    expected = {
        0: ({}, [0, 1, 2]),
        3: ({"gcm": [0, 0, 0]}, [1, 2, 3]),
        6: ({"gcm": [0, 0, 0], "ltm": [1, 2, 3]}, [4, 5, 6]),
        30: ({"gcm": [0, 0, 0], "ltm": [1, 2, 3, 4, 5, 6]}, [7, 8, 9]),
    }
    for start in range(0, 33, 3):
        if start in expected:
            assert _layout(mem.plan(start, 3)) == expected[start], start
        _commit(mem, stub, start)
    with pytest.raises(ValueError, match="unknown DR-RoPE layout"):
        gf.grounded(layout="middle")


# ---------------------------------------------------------------------------------------------
# 2. bounded indices and a bounded store over 2,000 chunks


def test_two_thousand_chunks_stay_bounded():
    policy = gf.grounded()
    mem, stub = Memory(policy, 3, 1), StubKV(2)
    tensors = None
    switches = cuts = updates = 0
    gcm_before: list[int] = []
    for c in range(2000):
        start = 3 * c
        if c and c % 170 == 0:
            event = _switch(mem, stub, "cut", start)
            assert len(event["dropped"]) == 6
            assert mem.regions["ltm"] == []
            cuts += 1
        elif c and c % 50 == 0:
            event = _switch(mem, stub, "apr", start)
            assert set(event["alpha"]) == {f"{n}:{f.index}" for n, f in mem.frames()}
            assert all(0.0 <= a <= policy.apr.alpha_max for a in event["alpha"].values())
            switches += 1
        plan = mem.plan(start, 3)
        indices = plan.key_index + plan.query_index
        assert all(0 <= i < policy.rope_range for i in indices), (c, indices)
        assert plan.query_index == list(range(plan.query_index[0], plan.query_index[0] + 3))
        changes = _commit(mem, stub, start)
        updates += sum(u["replaced"] is not None for u in changes["gcm_updates"])
        assert len(mem.regions["gcm"]) == 3
        assert len(mem.regions["ltm"]) <= 6
        if c:  # the GCM changes only through the reported diversity updates, never by eviction
            assert mem.snapshot()["gcm"] == _apply_updates(gcm_before, changes["gcm_updates"])
        gcm_before = mem.snapshot()["gcm"]
        slots = [f.slot for _, f in mem.frames()]
        assert len(set(slots)) == len(slots) and all(0 <= s < 9 for s in slots)
        if c == 10:
            tensors = [(t.data_ptr(), t.shape) for t in (mem.store.keys, mem.store.values, mem.store.latents)]
    assert [(t.data_ptr(), t.shape) for t in (mem.store.keys, mem.store.values, mem.store.latents)] == tensors
    assert mem.store.keys.shape == (1, 1, 9, 1, 1, 2)
    assert switches == 37 and cuts == 11 and updates > 0
    assert len(mem.history) == 0  # no LongLive history kept for this policy


# ---------------------------------------------------------------------------------------------
# 3. GCM protected from eviction


def test_frozen_gcm_keeps_first_frames():
    mem, stub = Memory(gf.grounded(candidates="frozen"), 3, 1), StubKV(3)
    for c in range(100):
        if c and c % 20 == 0:
            _switch(mem, stub, "apr", 3 * c)
        _commit(mem, stub, 3 * c)
    assert mem.snapshot()["gcm"] == [0, 1, 2]
    assert mem.snapshot()["ltm"] == list(range(294, 300))

    # the same run with every frame a candidate does rewrite the GCM (so the check above can fail)
    mem, stub = Memory(gf.grounded(candidates="every_frame"), 3, 1), StubKV(3)
    for c in range(100):
        _commit(mem, stub, 3 * c)
    assert mem.snapshot()["gcm"] != [0, 1, 2]
    assert len(mem.snapshot()["gcm"]) == 3


def test_gcm_not_updated_without_a_switch_by_default():
    mem, stub = Memory(gf.grounded(), 3, 1), StubKV(4)
    for c in range(30):
        assert _commit(mem, stub, 3 * c)["gcm_updates"] == []
    assert mem.snapshot()["gcm"] == [0, 1, 2]
    _switch(mem, stub, "none", 90)
    considered = sum(len(_commit(mem, stub, 3 * c)["gcm_updates"]) for c in range(30, 36))
    assert considered == 6  # one LTM turnover (W = 6 frames) of candidates after the switch


# ---------------------------------------------------------------------------------------------
# 4. Eq. 6-8 by hand


def _e(i: int, n: int = 16) -> torch.Tensor:
    v = torch.zeros(n)
    v[i] = 1.0
    return v


def test_diversity_decision_by_hand():
    small = 0.1
    anchors = torch.stack([_e(1), _e(0), _e(0) + small * _e(2)])  # anchors 1 and 2 are redundant
    cos12 = 1.0 / math.sqrt(1.0 + small**2)

    d = diversity_decision(_e(3), anchors)  # orthogonal to every anchor
    assert d["importance"] == pytest.approx(1.0, abs=1e-7)
    assert d["redundancy"] == pytest.approx(cos12, abs=1e-6)
    # R = [0, cos12, cos12]: the most redundant pair is (1, 2); argmax takes its first member
    assert d["target"] == 1
    assert d["replace"] is True

    d = diversity_decision(_e(0), anchors)  # equal to an anchor: nothing new
    assert d["importance"] == 0.0
    assert d["replace"] is False

    z = _e(1) + _e(3)  # cos 1/sqrt(2) with anchor 0
    d = diversity_decision(z, anchors)
    assert d["importance"] == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert d["replace"] is False  # 0.293 < 0.995

    spread = torch.stack([_e(0), _e(1), _e(2)])  # no redundancy at all
    d = diversity_decision(_e(0) + _e(3), spread)
    assert d["redundancy"] == 0.0 and d["target"] == 0
    assert d["importance"] == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6) and d["replace"] is True

    # scale does not matter (cosine similarity)
    assert diversity_decision(5 * _e(3), 3 * anchors) == pytest.approx(diversity_decision(_e(3), anchors))


def test_diversity_update_inside_memory():
    """The update rewrites the target anchor with the candidate's K/V and latent (REFERENCE section 8)."""
    mem, stub = Memory(gf.grounded(), 3, 1), StubKV(5)

    def frames(*vectors) -> torch.Tensor:
        return torch.stack(vectors, dim=1).view(1, 16, len(vectors), 1, 1)

    _commit(mem, stub, 0, frames(_e(1), _e(0), _e(0) + 0.1 * _e(2)))
    mem.begin_turnover()
    kv = stub.kv(3)
    changes = commit(mem, 3, frames(_e(3), _e(1), _e(4)), kv, segment=1)
    first, second, third = changes["gcm_updates"]
    # frame 3 (e3) is new; anchors 1 and 2 are the redundant pair, the first of them goes
    assert (first["target"], first["replaced"], first["frame"]) == (1, 1, 3)
    # frame 4 (e1) repeats anchor 0: importance 0, kept out
    assert second["importance"] == 0.0 and second["replaced"] is None
    slot = mem.regions["gcm"][1].slot
    assert torch.equal(mem.store.keys[0, :, slot], kv.keys[0][:, 0:1])
    assert torch.equal(mem.store.latents[0, :, slot].flatten(), _e(3))
    # after frame 3 the anchors e1, e3, e0+0.1e2 are orthogonal: frame 5 (e4) is new, replaces anchor 0
    assert (third["target"], third["replaced"]) == (0, 0)
    assert mem.snapshot()["gcm"] == [5, 3, 2]
    assert mem.snapshot()["ltm"] == [3, 4, 5]  # the candidates also stay in the LTM


# ---------------------------------------------------------------------------------------------
# 5. Eq. 12 alphas


def test_proximity_alpha_values():
    values = [proximity_alpha(d, 0.8, 6) for d in range(1, 8)]
    assert values == pytest.approx([0.8, 2 / 3, 0.5, 1 / 3, 1 / 6, 0.0, 0.0], abs=1e-12)
    assert values[0] == 0.8  # 1 - 1/6 = 0.833 clamped to alpha_max
    assert proximity_alpha(1, 1.0, 1e12) == pytest.approx(1.0, abs=1e-9)
    assert proximity_alpha(1, 0.0, 6) == 0.0


def test_apr_event_alphas_and_blend_in_a_real_run(model):
    policy = gf.grounded(candidates="frozen")  # keeps GCM slots stable across the switch chunk
    segs = [gf.Segment(prompt(0), 9), gf.Segment(prompt(1), 9, gf.Transition("default"))]
    gen = gf.stream(model, segs, policy, **RUN)
    before = [next(gen) for _ in range(3)]
    mem = stream_memory(gen)
    assert mem.snapshot() == {"gcm": [0, 1, 2], "ltm": [3, 4, 5, 6, 7, 8]}
    slots = {f.index: f.slot for _, f in mem.frames()}
    k_old = mem.store.keys.clone()
    v_old = mem.store.values.clone()

    # K_new by hand: one forward of the 9 cached clean latents at t = 0 under the new prompt,
    # at the DR-RoPE indices of the next chunk's plan (GCM at 0, LTM 3-8)
    lat = torch.cat([c.latents for c in before], dim=2)
    with torch.inference_mode():
        text = encode_text(model, segs[1].prompt, CFG.text_len)
        index = torch.tensor([0, 0, 0, 3, 4, 5, 6, 7, 8])
        _, kv = capture_kv(model, lat, torch.zeros(1), text, None, index, RopeTable(CFG.head_dim), "float32",
                           compute_output=False)
    k_new = torch.stack(kv.keys).unflatten(2, (9, -1))
    v_new = torch.stack(kv.values).unflatten(2, (9, -1))

    e = next(gen).event
    assert e["switch"]["kind"] == "apr" and e["switch"]["frame"] == 9
    alpha = e["switch"]["alpha"]
    assert set(alpha) == {"gcm:0", "gcm:1", "gcm:2", *(f"ltm:{i}" for i in range(3, 9))}
    assert alpha["ltm:8"] == 0.8  # d = 1, clamped from 0.8333
    assert alpha["ltm:3"] == 0.0  # d = 6
    for i in range(3, 9):
        assert alpha[f"ltm:{i}"] == pytest.approx(max(0.0, min(0.8, 1 - (9 - i) / 6)), abs=1e-12)
    assert all(alpha[f"gcm:{i}"] == 0.0 for i in range(3))

    # Eq. 11 on the frames still cached after the switch chunk (6, 7, 8) and the GCM (alpha 0)
    for j, frame in enumerate([0, 1, 2, 3, 4, 5, 6, 7, 8]):
        if frame in (3, 4, 5):
            continue  # evicted by the switch chunk's commit
        a, s = alpha[("gcm:" if frame < 3 else "ltm:") + str(frame)], slots[frame]
        want_k = (1 - a) * k_old[:, :, s] + a * k_new[:, :, j]
        want_v = (1 - a) * v_old[:, :, s] + a * v_new[:, :, j]
        torch.testing.assert_close(mem.store.keys[:, :, s], want_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mem.store.values[:, :, s], want_v, atol=1e-5, rtol=1e-5)
        if a == 0:
            assert torch.equal(mem.store.keys[:, :, s], k_old[:, :, s])
        else:
            assert (mem.store.keys[:, :, s] - k_old[:, :, s]).abs().max() > 1e-4
    gen.close()


# ---------------------------------------------------------------------------------------------
# 6. the two APR limits


def test_apr_limits_are_hard_recache_and_no_recache(model):
    noise = torch.randn(1, 15, 16, 4, 4, generator=torch.Generator().manual_seed(8))

    def run(transition: gf.Transition) -> torch.Tensor:
        segs = [gf.Segment(prompt(0), 9), gf.Segment(prompt(1), 6, transition)]
        return gf.generate(model, segs, "grounded", noise=noise, seed=2, **RUN).latents

    hard = run(gf.Transition("hard"))
    none = run(gf.Transition("none"))
    apr_hard = run(gf.Transition("apr", alpha_max=1.0, proximity_window=1e12))
    apr_none = run(gf.Transition("apr", alpha_max=0.0))
    assert (hard - none).abs().max() > 1e-3  # the recache matters, so the limits below can fail
    torch.testing.assert_close(apr_hard, hard, atol=1e-6, rtol=1e-6)
    assert torch.equal(apr_none, none)
    assert torch.equal(hard[:, :, :9], none[:, :, :9])  # nothing differs before the switch


# ---------------------------------------------------------------------------------------------
# 7. shot cut


def _apply_updates(gcm: list[int], updates: list[dict]) -> list[int]:
    gcm = list(gcm)
    for u in updates:
        if u["replaced"] is not None:
            assert gcm[u["target"]] == u["replaced"]
            gcm[u["target"]] = u["frame"]
    return gcm


def test_cut_keeps_gcm_and_empties_ltm(model):
    segs = [gf.Segment(prompt(0), 12), gf.Segment(prompt(1), 9, gf.Transition("cut"))]
    events = gf.generate(model, segs, "grounded", **RUN).events
    before, cut, after = events[3], events[4], events[5]
    assert before["memory"] == {"gcm": [0, 1, 2], "ltm": list(range(6, 12))}
    assert cut["switch"] == {"kind": "cut", "frame": 12, "dropped": list(range(6, 12))}
    assert cut["rope"] == {"keys": {"gcm": [[0, 0], [1, 0], [2, 0]]}, "query": [3, 4, 5]}
    assert cut["evicted"] == []
    assert cut["memory"]["ltm"] == [12, 13, 14]
    assert len(cut["gcm_updates"]) == 3  # the new shot's frames are GCM candidates
    assert cut["memory"]["gcm"] == _apply_updates(before["memory"]["gcm"], cut["gcm_updates"])
    assert after["rope"]["keys"]["ltm"] == [[12, 3], [13, 4], [14, 5]] and after["rope"]["query"] == [6, 7, 8]


# ---------------------------------------------------------------------------------------------
# 8. the cache does not grow with the length of the video


def test_frame_store_does_not_grow_in_a_real_run(model):
    segs = [gf.Segment(prompt(0), 60), gf.Segment(prompt(1), 45, gf.Transition("apr")),
            gf.Segment(prompt(2), 45, gf.Transition("cut"))]
    gen = gf.stream(model, segs, "grounded", **RUN)
    stores = {}
    for c, chunk in enumerate(gen):
        if c in (4, 49):
            mem = stream_memory(gen)
            stores[c] = [(t.data_ptr(), t.shape, t.numel()) for t in (mem.store.keys, mem.store.values, mem.store.latents)]
            # [layers, B, slots = 3 + 6, tokens_per_frame, heads, head_dim]
            assert mem.store.keys.shape == (CFG.num_layers, 1, 9, 4, CFG.num_heads, CFG.head_dim)
        assert all(0 <= i < 21 for i in chunk.event["rope"]["query"])
    assert c == 49 and stores[49] == stores[4]
    assert mem.store.keys is None  # the finished stream dropped its store


# ---------------------------------------------------------------------------------------------
# 9. a scripted timeline on the tiny model, checked against the policy's promises


def test_scripted_timeline_event_log(model, tmp_path):
    segs = [gf.Segment(prompt(0), 12), gf.Segment(prompt(1), 9, gf.Transition("apr")),
            gf.Segment(prompt(2), 12, gf.Transition("cut"))]
    out = gf.generate(model, segs, "grounded", **RUN)
    events = out.events
    assert out.latents.shape == (1, 16, 33, 4, 4) and torch.isfinite(out.latents).all()
    assert len(events) == 11
    segment_of = [0] * 4 + [1] * 3 + [2] * 4
    origin = 0
    for c, e in enumerate(events):
        start = 3 * c
        assert e["chunk"] == c and e["frames"] == [start, start + 3] and e["segment"] == segment_of[c]
        if c == 4:
            assert e["switch"]["kind"] == "apr" and e["switch"]["frame"] == 12
        elif c == 7:
            assert e["switch"]["kind"] == "cut" and e["switch"]["frame"] == 21
            origin = 21 - 3
        else:
            assert e["switch"] is None
        keys, query = e["rope"]["keys"], e["rope"]["query"]
        # GCM at 0; LTM and query consecutive, pinned to end below 21
        assert all(rope == 0 for _, rope in keys.get("gcm", []))
        block = [rope for _, rope in keys.get("ltm", [])] + query
        assert block == list(range(block[0], block[0] + len(block)))
        assert block[-1] == min(20, start + 2 - origin)
        assert all(0 <= i < 21 for i in block)
        # the LTM keys are the newest committed frames since the last cut
        first_ltm = 21 if c >= 7 else 3
        assert [f for f, _ in keys.get("ltm", [])] == list(range(max(first_ltm, start - 6), start))
        assert len(e["memory"]["gcm"]) == 3 and len(e["memory"]["ltm"]) <= 6
        if c:
            previous = events[c - 1]["memory"]["gcm"]
            assert e["memory"]["gcm"] == _apply_updates(previous, e["gcm_updates"])

    apr = events[4]["switch"]["alpha"]
    assert set(apr) == {"gcm:0", "gcm:1", "gcm:2", *(f"ltm:{i}" for i in range(6, 12))}
    for name, a in apr.items():
        d = 12 - int(name.split(":")[1])
        assert a == pytest.approx(max(0.0, min(0.8, 1 - d / 6)), abs=1e-12)
    assert apr["ltm:11"] == 0.8
    assert events[7]["switch"]["dropped"] == list(range(15, 21))
    assert events[7]["memory"]["ltm"] == [21, 22, 23]
    # candidates: one LTM turnover (6 frames) after the switch and after the cut, none before
    considered = [len(e["gcm_updates"]) for e in events]
    assert considered == [0, 0, 0, 0, 3, 3, 0, 3, 3, 0, 0]

    path = tmp_path / "events.jsonl"
    gf.write_events(events, str(path))
    lines = path.read_text().splitlines()
    assert len(lines) == 11 and [json.loads(line) for line in lines] == events
    buffer = io.StringIO()
    gf.write_events(events, buffer)
    assert buffer.getvalue() == path.read_text()


# ---------------------------------------------------------------------------------------------
# 10. bad input is refused before any forward


@pytest.mark.parametrize(
    "policy, fragment",
    [
        (lambda: gf.grounded(gcm_frames=0), "'gcm' of the 'grounded' policy holds 0 frames"),
        (lambda: gf.grounded(ltm_frames=0), "'ltm' of the 'grounded' policy holds 0 frames"),
        (lambda: gf.grounded(gcm_frames=3, ltm_frames=16), "do not fit the RoPE range of 21"),
        (lambda: gf.grounded(rope_range=11), "do not fit the RoPE range of 11"),
        (lambda: gf.grounded(alpha_max=1.5), "alpha_max 1.5 is outside"),
        (lambda: gf.grounded(alpha_max=-0.1), "alpha_max -0.1 is outside"),
        (lambda: gf.grounded(proximity_window=0.5), "D_window 0.5 is below 1"),
        (lambda: gf.grounded(candidates="sometimes"), "unknown GCM update rule"),
    ],
)
def test_bad_policy_refused_before_any_forward(model, policy, fragment):
    counter = ForwardCounter(model)
    try:
        with pytest.raises(ValueError, match=fragment):
            gf.generate(model, [gf.Segment(prompt(0), 6)], policy(), **RUN)
    finally:
        counter.close()
    assert counter.calls == 0


def test_policy_limits_that_fit_run(model):
    out = gf.generate(model, [gf.Segment(prompt(0), 9)], gf.grounded(gcm_frames=3, ltm_frames=15), **RUN)
    assert out.latents.shape[2] == 9  # 3 + 15 + 3 = 21 fits the range exactly
    assert Memory(gf.grounded(alpha_max=0.0, proximity_window=1.0), 3).policy.window == 1.0
    assert Memory(gf.grounded(), 3).policy.window == 6.0


def test_bad_transitions_and_cut_on_first_segment(model):
    for options, fragment in (({"alpha_max": 1.01}, "alpha_max 1.01 is outside"),
                              ({"alpha_max": -0.5}, "alpha_max -0.5 is outside"),
                              ({"proximity_window": 0.0}, "D_window 0.0 is below 1")):
        with pytest.raises(ValueError, match=fragment):
            gf.Transition("apr", **options)
    with pytest.raises(ValueError, match="unknown transition 'fade'"):
        gf.Transition("fade")
    counter = ForwardCounter(model)
    try:
        with pytest.raises(ValueError, match="nothing to cut from"):
            gf.generate(model, [gf.Segment(prompt(0), 6, gf.Transition("cut")), gf.Segment(prompt(1), 6)],
                        "grounded", **RUN)
    finally:
        counter.close()
    assert counter.calls == 0
