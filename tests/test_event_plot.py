"""GF Event Timeline: real event logs of a tiny model under every policy, drawn and read back pixel by pixel.

The CPU tests run GF Sampler's logic (``nodes.sampling.sample``) on a one-block tiny model at 16 x 16
pixels and check the picture at positions computed from the layout: the rows, the cells of every
memory slot, the switch and cut lines, the per-frame alphas, the RoPE indices, the GCM updates, and
the aggregated layout of a 1,000-chunk run. The last tests run the node inside ComfyUI (skipped
without ``GF_COMFYUI_PATH``)::

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_event_plot.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from grounded_forcing import gf_core as gf
from grounded_forcing.gf_core.errors import BadInput
from grounded_forcing.nodes import event_plot, sampling
from grounded_forcing.nodes.event_plot import (
    EMPTY,
    EVICTED,
    IMPORTANCE,
    QUERY,
    REDUNDANCY,
    REPLACED,
    SWITCH_COLORS,
    cell_color,
    region_color,
    switch_color,
)

COMFY = os.environ.get("GF_COMFYUI_PATH")
REPO = Path(__file__).resolve().parent.parent
CFG = gf.WanConfig.tiny(layers=1)
SIZE = 16  # pixels: one token per latent frame


def prompt(k: int) -> torch.Tensor:
    return torch.randn(1, 4, CFG.text_dim, generator=torch.Generator().manual_seed(100 + k))


def segments(plan: list[tuple[int, str]]) -> tuple[gf.Segment, ...]:
    return tuple(gf.Segment(prompt(k), frames, gf.Transition(kind)) for k, (frames, kind) in enumerate(plan))


# Every policy with its own switch rules: APR, hard recache, cuts (LTM reset, RoPE cut), LongLive's
# recache, the KV flush, the anchor re-cache with its junction, Context Forcing's promotions.
PLANS = {
    "grounded": [(12, "default"), (9, "default"), (12, "cut"), (9, "hard")],
    "longlive": [(12, "default"), (9, "default"), (12, "cut")],
    "self_forcing": [(9, "default"), (9, "default")],
    "infinity_rope": [(12, "default"), (9, "default"), (12, "cut")],
    "anchor_forcing": [(15, "default"), (15, "default"), (15, "default")],
    "context_forcing": [(30, "default"), (15, "default")],
}


@pytest.fixture(scope="module")
def model() -> gf.WanModel:
    return gf.WanModel.from_state_dict(gf.random_state_dict(CFG, seed=0))


def run_log(model, memory: str, plan: list[tuple[int, str]], schedule: gf.Schedule | None = None) -> str:
    """GF Sampler's event log of a run (its ``events`` output)."""
    config = gf.RunConfig.build(sampling.run_config(SIZE, SIZE, seed=0, batch_size=1), schedule=schedule)
    return sampling.sample(model, segments(plan), gf.preset(memory), config).log


@pytest.fixture(scope="module")
def logs(model) -> dict[str, str]:
    return {name: run_log(model, name, plan) for name, plan in PLANS.items()}


@pytest.fixture(scope="module")
def long_log(model) -> str:
    """GF Sampler's log of a 1,000-chunk run (12.5 minutes of video): 20 segments of 150 latent frames,
    every 4th starting with a cut; one denoising step per chunk keeps it fast."""
    plan = [(150, "cut" if k % 4 == 2 else "default") for k in range(20)]
    return run_log(model, "grounded", plan, gf.Schedule.few_step(steps=(1000,)))


def events_of(log: str) -> list[dict]:
    """The chunk events of a log (without its run header)."""
    return [e for e in map(json.loads, log.splitlines()) if "run" not in e]


def pixel(picture, x: int, y: int) -> tuple[int, int, int]:
    return picture.image.getpixel((x, y))


def cell_probe(layout, chunk: int, name: str, lane: int) -> tuple[int, int]:
    """A pixel inside the cell of ``lane`` of region ``name`` at ``chunk``, clear of its number and marks."""
    x0, x1 = layout.column(chunk)
    y0, _ = layout.lanes[name][lane]
    return x1 - 3 if x1 - x0 > 6 else x0 + (x1 - x0) // 2, y0 + 1


def dark_pixels(picture, box: tuple[int, int, int, int]) -> int:
    """How many pixels of ``box`` are as dark as text."""
    return int((np.asarray(picture.image.crop(box), dtype=np.int32).sum(axis=2) < 300).sum())


def segment_of(events: list[dict]) -> dict[int, int]:
    return {f: e["segment"] for e in events for f in range(*e["frames"])}


# ---------------------------------------------------------------------------------------------
# Rows and cells


@pytest.mark.parametrize("memory", list(PLANS))
def test_every_policy_draws_one_row_per_region_with_the_frames_it_holds(logs, memory):
    log = logs[memory]
    events = events_of(log)
    picture = event_plot.draw(log, 1280)
    layout = picture.layout
    assert picture.image.size == (1280, layout.height)
    assert layout.mode == "per frame" and layout.chunks == len(events) == json.loads(log.splitlines()[0])["run"]["chunks"]
    regions = list(events[0]["memory"])
    assert picture.log.regions == regions and set(regions) <= set(layout.rows)
    tops = [layout.rows[name][0] for name in ["prompt", *regions, "rope", "evicted"]]
    assert tops == sorted(tops)  # rows in order, none overlapping
    made = segment_of(events)
    for name in regions:
        capacity = max(len(e["memory"][name]) for e in events)
        assert len(layout.lanes[name]) == capacity
        for e in events:
            held = e["memory"][name]
            for lane in range(capacity):
                x, y = cell_probe(layout, e["chunk"], name, lane)
                expected = cell_color(made[held[lane]]) if lane < len(held) else EMPTY
                switch_here = e["switch"] is not None and x - layout.chunk_x(e["chunk"]) <= 1
                if not switch_here:
                    assert pixel(picture, x, y) == expected, (name, e["chunk"], lane)


def test_switches_and_cuts_are_lines_at_their_chunk_columns(logs):
    for memory in ("grounded", "longlive", "infinity_rope", "anchor_forcing", "context_forcing"):
        log = logs[memory]
        picture = event_plot.draw(log)
        layout = picture.layout
        rows = ["prompt", *picture.log.regions, "rope", "evicted"]
        lines = set(SWITCH_COLORS.values())
        kinds = []
        for e in events_of(log):
            x = layout.chunk_x(e["chunk"])
            for row in rows:
                y = sum(layout.rows[row]) // 2
                if e["switch"] is not None:
                    assert pixel(picture, x, y) == switch_color(e["switch"]["kind"]), (memory, e["chunk"], row)
                elif row == "prompt":
                    assert pixel(picture, x, y) not in lines, (memory, e["chunk"])
            if e["switch"] is not None:
                kinds.append(e["switch"]["kind"])
        assert kinds == {"grounded": ["apr", "cut", "hard"], "longlive": ["longlive", "cut"],
                         "infinity_rope": ["flush", "cut"], "anchor_forcing": ["anchor", "anchor"],
                         "context_forcing": ["none"]}[memory]


def test_switch_alphas_are_bars_of_their_height(logs):
    log = logs["grounded"]
    picture = event_plot.draw(log)
    layout = picture.layout
    painter = event_plot._Painter(picture.log, layout.width)
    painter.layout = layout
    switches = [e for e in events_of(log) if e["switch"] and e["switch"].get("alpha")]
    assert [e["switch"]["kind"] for e in switches] == ["apr", "hard"]
    apr = switches[0]["switch"]["alpha"]
    assert max(apr.values()) == pytest.approx(0.8) and min(apr.values()) == 0.0  # Eq. 12 over GCM + LTM
    nexts = [e["chunk"] for e in switches[1:]] + [layout.chunks]
    for e, nxt in zip(switches, nexts):
        for (x0, x1), (key, alpha) in zip(painter._alpha_bars(e, nxt), e["switch"]["alpha"].items()):
            color = region_color(picture.log.regions.index(key.rsplit(":", 1)[0]))
            x = (x0 + x1) // 2
            top = layout.value_y("alpha", alpha)
            assert pixel(picture, x, layout.value_y("alpha", 0)) == color, key
            assert pixel(picture, x, top) == color, key
            assert pixel(picture, x, top - 2) != color, key  # no taller than alpha


def test_rope_row_marks_the_chunk_and_every_key_at_its_index(logs):
    for memory in ("grounded", "infinity_rope", "longlive"):
        log = logs[memory]
        picture = event_plot.draw(log)
        layout = picture.layout
        for e in events_of(log):
            x0, x1 = layout.column(e["chunk"])
            x = (x0 + x1) // 2
            query = e["rope"]["query"]
            for index in query:
                assert pixel(picture, x, layout.value_y("rope", index)) == QUERY, (memory, e["chunk"])
            for name, pairs in e["rope"]["keys"].items():
                for _, index in pairs:
                    if not min(query) <= index <= max(query):
                        y = layout.value_y("rope", index)
                        assert pixel(picture, x, y) == region_color(picture.log.regions.index(name))
        if memory == "infinity_rope":  # the RoPE cut puts the chunk far from its context, at 45-47
            assert layout.scales["rope"][1] == 47
        if memory == "grounded":  # DR-RoPE: everything below the range
            assert layout.scales["rope"][1] == 20


def test_gcm_updates_show_importance_redundancy_and_replacements(logs):
    log = logs["grounded"]
    picture = event_plot.draw(log)
    layout = picture.layout
    painter = event_plot._Painter(picture.log, layout.width)
    updates = [(e, u) for e in events_of(log) for u in e["gcm_updates"]]
    assert updates and any(u["replaced"] is not None for _, u in updates)
    top = layout.rows["gcm_update"][0]
    for e, u in updates:
        x = layout.chunk_x(painter.frame_position(e, u["frame"]))
        assert pixel(picture, x, layout.value_y("gcm_update", u["importance"])) == IMPORTANCE
        if abs(u["importance"] - u["redundancy"]) > 0.1:  # apart enough not to be covered by the importance dot
            assert pixel(picture, x, layout.value_y("gcm_update", u["redundancy"])) == REDUNDANCY
        assert (pixel(picture, x, top + 1) == REPLACED) == (u["replaced"] is not None)
    events = events_of(log)
    marked = 0
    for before, e in zip(events, events[1:]):  # a slot that took a new anchor is marked at its left edge
        for lane, (old, new) in enumerate(zip(before["memory"]["gcm"], e["memory"]["gcm"])):
            x0, _ = layout.column(e["chunk"])
            if e["switch"] is None:
                assert (pixel(picture, x0, layout.lanes["gcm"][lane][0] + 1) == event_plot.CHANGED) == (old != new)
                marked += old != new
    assert marked


def test_every_switch_kind_is_described_in_one_line(logs):
    described = {}
    for memory, log in logs.items():
        for e in events_of(log):
            if e["switch"]:
                described[memory, e["switch"]["kind"]] = event_plot.switch_details(e["switch"])
    assert described["grounded", "apr"].startswith("alpha gcm 0=0.00 1=0.00 2=0.00; ltm 6=0.00 7=0.17")
    assert described["grounded", "apr"].endswith("11=0.80")
    assert described["grounded", "hard"].startswith("alpha gcm") and "0.17" not in described["grounded", "hard"]
    assert described["grounded", "cut"] == described["longlive", "cut"] == "dropped 15-20"
    assert described["longlive", "longlive"] == "recached 0-2, 6-11, sink 0-2"
    assert described["infinity_rope", "flush"] == "dropped nothing"
    assert described["infinity_rope", "cut"] == "dropped nothing, chunk at RoPE 45-47"
    assert described["anchor_forcing", "anchor"] == "recached 24-29, junction dropped 15-17"  # the second switch
    assert described["context_forcing", "none"] == "prompt changed, cache kept"


def test_promotions_and_evictions(logs):
    log = logs["context_forcing"]
    picture = event_plot.draw(log)
    layout = picture.layout
    assert "promotion" in layout.rows and "gcm_update" not in layout.rows
    promotions = [(e, p) for e in events_of(log) for p in e["promotions"]]
    assert any(p["promoted"] for _, p in promotions)
    painter = event_plot._Painter(picture.log, layout.width)
    for e, p in promotions:
        x = layout.chunk_x(painter.frame_position(e, p["frame"]))
        assert pixel(picture, x, layout.value_y("promotion", p["similarity"])) == REDUNDANCY
        if p["promoted"]:
            assert pixel(picture, x, layout.rows["promotion"][0] + 1) == REPLACED
    _, bottom = layout.rows["evicted"]
    for e in events_of(log):
        x0, x1 = layout.column(e["chunk"])
        assert (pixel(picture, x1 - 3, bottom - 2) == EVICTED) == bool(e["evicted"]), e["chunk"]
    cut = event_plot.draw(logs["grounded"])
    e = next(e for e in events_of(logs["grounded"]) if e["switch"] and e["switch"]["kind"] == "cut")
    x0, x1 = cut.layout.column(e["chunk"])
    assert pixel(cut, x1 - 3, cut.layout.rows["evicted"][1] - 2) == SWITCH_COLORS["cut"]  # the LTM dropped


# ---------------------------------------------------------------------------------------------
# Long and short runs


def test_a_thousand_chunk_run_is_aggregated_into_columns(long_log):
    events = events_of(long_log)
    assert len(events) == 1000
    picture = event_plot.draw(long_log, 1280)
    layout = picture.layout
    assert layout.mode == "aggregated" and layout.chunks_per_column == 3
    assert picture.image.width == 1280 and picture.image.height < 1000
    made = segment_of(events)
    per = layout.chunks_per_column
    for first in range(0, 1000, per):
        last = events[min(first + per, 1000) - 1]  # a column shows the memory after its last chunk
        x0, x1 = layout.column(first)
        for name in ("gcm", "ltm"):
            for lane, frame in enumerate(last["memory"][name]):
                x, y = x0, layout.lanes[name][lane][0] + 1
                if pixel(picture, x, y) in set(SWITCH_COLORS.values()) | {event_plot.CHANGED}:
                    continue  # a switch line or an anchor-replaced mark at the column's left edge
                assert pixel(picture, x, y) == cell_color(made[frame]), (first, name, lane)
    for e in events:
        if e["switch"]:
            x = layout.chunk_x(e["chunk"])
            assert pixel(picture, x, sum(layout.rows["ltm"]) // 2) == switch_color(e["switch"]["kind"])


def test_a_twenty_chunk_run_numbers_every_held_frame(model):
    log = run_log(model, "grounded", [(20, "default"), (16, "default"), (12, "cut"), (12, "hard")])
    picture = event_plot.draw(log)
    layout = picture.layout
    assert layout.chunks == 20 and layout.mode == "per frame"
    held = events_of(log)[10]["memory"]["ltm"]
    for lane in range(len(held)):
        x0, x1 = layout.column(10)
        y0, y1 = layout.lanes["ltm"][lane]
        assert dark_pixels(picture, (x0, y0, x1, y1 + 1)), f"frame {held[lane]} is written in its cell"
    narrow = event_plot.draw(log, 640)  # 22 pixels a chunk: coloured cells, no numbers
    x0, x1 = narrow.layout.column(10)
    y0, y1 = narrow.layout.lanes["ltm"][0]
    assert narrow.layout.mode == "per chunk" and not dark_pixels(narrow, (x0, y0, x1, y1 + 1))


def test_width_sets_the_columns(logs):
    small, large = event_plot.draw(logs["grounded"], 640), event_plot.draw(logs["grounded"], 2048)
    assert small.image.width == 640 and large.image.width == 2048
    assert large.layout.chunk_x(7) - large.layout.left > small.layout.chunk_x(7) - small.layout.left
    with pytest.raises(BadInput, match="width 100 is outside 640..4096"):
        event_plot.draw(logs["grounded"], 100)


def test_a_stopped_run_keeps_the_whole_axis_and_a_log_may_lack_its_header(logs):
    header, *chunks = logs["grounded"].splitlines()
    headerless = event_plot.draw("\n".join(chunks))  # gf.write_events' format (the demo's events.jsonl)
    assert headerless.log.run == {} and headerless.layout.chunks == len(chunks)
    stopped = event_plot.draw("\n".join([header, *chunks[:5]]))
    assert stopped.layout.chunks == len(chunks) and len(stopped.log.chunks) == 5
    x0, x1 = stopped.layout.column(8)  # never made: empty slots
    assert pixel(stopped, x1 - 3, stopped.layout.lanes["ltm"][0][0] + 1) == EMPTY


# ---------------------------------------------------------------------------------------------
# Bad input: one sentence each


@pytest.mark.parametrize("make, message", [
    (lambda log: "", "the event log is empty"),
    (lambda log: "a cat walks through a garden", "the last line of the event log is not complete JSON"),
    (lambda log: "a cat\n" + log, "line 1 of the event log is not complete JSON"),
    (lambda log: log[:-25], "the last line of the event log is not complete JSON"),
    (lambda log: '{"run": {"memory": "grounded"}}', "the event log has no chunk lines"),
    (lambda log: '{"chunk": 0, "frames": [0, 3]}', "line 1 is not a GF Sampler chunk event \\(it has no 'segment'\\)"),
    (lambda log: "[1, 2, 3]", "line 1 of the event log holds a list, not an event"),
    (lambda log: '{"chunk": 0, "frames": [0, 3], "segment": 0, "memory": {"ltm": 5}}', "malformed 'frames', 'segment'"),
    (lambda log: "\n".join(log.splitlines()[:3] + log.splitlines()[5:]), "jumps from chunk 1 to chunk 4 on line 4"),
    (lambda log: "\n".join(log.splitlines()[3:]), "starts at chunk 2 on line 1"),
])
def test_bad_input_is_one_sentence(logs, make, message):
    with pytest.raises(BadInput, match=message) as info:
        event_plot.draw(make(logs["grounded"]))
    text = str(info.value)
    assert "\n" not in text and text.endswith("unchanged") and text.count("; ") == 1


# ---------------------------------------------------------------------------------------------
# The node inside ComfyUI

host_only = pytest.mark.skipif(not COMFY, reason="set GF_COMFYUI_PATH to a ComfyUI checkout (and use its Python) "
                                                 "to run the node inside ComfyUI")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI's node registry on CPU with temporary output and temp folders, and this pack loaded."""
    root = tmp_path_factory.mktemp("comfy")
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args as cli
    import utils.extra_config  # noqa: F401  (before nodes.py puts comfy/ first on sys.path)

    cli.args.cpu = True
    import folder_paths

    for name in ("output", "temp"):
        (root / name).mkdir()
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_temp_directory(str(root / "temp"))
    import execution

    import nodes

    if "GFSampler" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_builtin_extra_nodes())
        assert asyncio.run(nodes.load_custom_node(str(REPO)))
    return nodes, execution, root


@host_only
def test_node_draws_the_log_and_shows_it(comfy, logs):
    nodes, execution, root = comfy
    node = nodes.NODE_CLASS_MAPPINGS["GFEventTimeline"]
    schema = node.GET_SCHEMA()
    assert schema.is_output_node and schema.category == "Grounded Forcing"
    assert [i.id for i in schema.inputs] == ["events", "width"]
    prompt = {"1": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": logs["grounded"]}},
              "2": {"class_type": "GFEventTimeline", "inputs": {"events": ["1", 0], "width": 1280}}}
    valid = asyncio.run(execution.validate_prompt("gf-timeline", prompt, None))
    assert valid[0], valid
    out = node.execute(events=logs["grounded"], width=1280)
    image = out.result[0]
    expected = event_plot.draw(logs["grounded"], 1280).image
    assert image.shape == (1, expected.height, expected.width, 3) and image.dtype == torch.float32
    assert torch.equal((image[0] * 255).round().to(torch.uint8),
                       torch.frombuffer(bytearray(expected.tobytes()), dtype=torch.uint8).view(expected.height,
                                                                                             expected.width, 3))
    shown = out.ui.as_dict()["images"]
    assert len(shown) == 1 and (root / "temp" / shown[0]["subfolder"] / shown[0]["filename"]).is_file()
    with pytest.raises(ValueError, match="not complete JSON") as info:  # the pack's BadInput, as ComfyUI loaded it
        node.execute(events=logs["grounded"][:-25], width=1280)
    assert type(info.value).__name__ == "BadInput"
