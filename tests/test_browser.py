"""The workflows in the real ComfyUI frontend: headless Chromium against a CPU ComfyUI server.

Every workflow in workflows/ loads with no missing node type, no node flagged with an error or
holding a value its widget does not offer, no node grown past its saved size, no two nodes
overlapping, and the whole graph inside the saved view; the template browser names every workflow
and shows its thumbnail. Needs a ComfyUI checkout, its Python (with selenium) and Chromium::

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_browser.py

The server runs from a temporary base directory (tests/comfy_server.py) holding empty model files
under the names the workflows use, so the frontend finds every model it lists.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import pytest
from comfy_server import (
    PACK_FOLDER,
    chromium_driver,
    comfy_server,
    load_workflow,
    responses,
    skip_reason,
    wait_for_app,
    workflow_models,
)

COMFY = os.environ.get("GF_COMFYUI_PATH")
REASON = skip_reason(COMFY)
if REASON:
    pytest.skip(REASON, allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
VIEWPORT = (1920, 960)  # the window tools/make_workflows.py fits the saved view into (CSS pixels)
SIDEBAR, TOP_BAR = 64, 80  # the frontend's left tool bar and top bars cover this much of the canvas
# A GF Dual Memory saved before one memory node per policy: policy, then the options of all six.
OLD_DUAL_MEMORY = ["longlive", 3, 6, "after_switch", 0.8, 0, 3, 12, True, 1, 6, 2, 45, 3, 12, 6, 0.95, 2, 3, 12]


@pytest.fixture(scope="module")
def frontend():
    started = time.monotonic()
    with comfy_server(COMFY, models=workflow_models(WORKFLOWS)) as server, chromium_driver(*VIEWPORT) as driver:
        driver.get(server.url)
        wait_for_app(driver)
        driver.server = server
        yield driver
    print(f"\nbrowser test: server, browser and pages took {time.monotonic() - started:.1f} s")


def _graph(driver) -> dict:
    """What the frontend made of the loaded workflow: every node's box and state, and the view."""
    return driver.execute_script("""
        const T = LiteGraph.NODE_TITLE_HEIGHT;
        const nodes = app.graph._nodes.map(n => ({
          id: n.id, type: n.type, title: n.title, size: [...n.size], min: [...n.computeSize()],
          box: [n.pos[0], n.pos[1] - T, n.size[0], n.size[1] + T],
          registered: !!LiteGraph.registered_node_types[n.type],
          errors: !!n.has_errors,
          bad_values: (n.widgets || []).filter(w => w.type === "combo" && Array.isArray(w.options?.values)
                                                   && !w.options.values.includes(w.value)).map(w => w.name),
        }));
        return {nodes, scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset],
                viewport: [innerWidth, innerHeight], node_errors: app.extensionManager?.lastNodeErrors ?? null};""")


def _overlap(a: list[float], b: list[float]) -> float:
    """The area two [x, y, w, h] boxes share."""
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(dx, 0) * max(dy, 0)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_tidy(frontend, path):
    workflow = json.loads(path.read_text())
    load_workflow(frontend, workflow)
    graph = _graph(frontend)
    nodes = graph["nodes"]
    assert len(nodes) == len(workflow["nodes"])
    assert not [n["type"] for n in nodes if not n["registered"]], "node types the frontend does not know"
    assert not [n["title"] for n in nodes if n["errors"]] and not graph["node_errors"], "nodes flagged with an error"
    assert not {n["title"]: n["bad_values"] for n in nodes if n["bad_values"]}, "values the widgets do not offer"
    saved = {str(n["id"]): n["size"] for n in workflow["nodes"]}
    grown = {n["type"]: [round(v) for v in n["min"]] for n in nodes
             if any(now > was + 0.5 for now, was in zip(n["size"], saved[str(n["id"])]))}
    assert not grown, f"the frontend grew these nodes to what their widgets need (raise SIZES): {grown}"
    overlaps = [(a["title"], b["title"]) for a, b in itertools.combinations(nodes, 2) if _overlap(a["box"], b["box"])]
    assert not overlaps, f"overlapping nodes: {overlaps}"
    ds = workflow["extra"]["ds"]
    assert graph["scale"] == pytest.approx(ds["scale"]) and graph["offset"] == pytest.approx(ds["offset"])
    width, height = graph["viewport"]
    scale, (ox, oy) = graph["scale"], graph["offset"]
    outside = [n["title"] for n in nodes
               if not (SIDEBAR <= (n["box"][0] + ox) * scale and (n["box"][0] + n["box"][2] + ox) * scale <= width
                       and TOP_BAR <= (n["box"][1] + oy) * scale
                       and (n["box"][1] + n["box"][3] + oy) * scale <= height)]
    assert not outside, f"nodes outside the saved view of {width} x {height}: {outside}"
    drawn = frontend.execute_script("""
        const texts = [], ctx = app.canvas.ctx, fill = ctx.fillText;
        ctx.fillText = function (text, ...rest) { texts.push(String(text)); return fill.call(this, text, ...rest); };
        try { app.canvas.draw(true, true); } finally { delete ctx.fillText; }
        return {low_quality: !!app.canvas.low_quality, texts};""")
    assert not drawn["low_quality"], f"at the saved zoom {scale} the frontend draws the nodes without their widgets"
    assert any("seed" in t for t in drawn["texts"])  # the widgets were drawn
    texts = drawn["texts"]
    cut = [" ".join(texts[max(i - 2, 0):i + 1]) for i, t in enumerate(texts) if t.endswith(("\u2026", "\u2025", "\u2024"))]
    assert not cut, f"labels, values or titles drawn cut short (widen SIZES): {cut}"


def test_template_browser_lists_every_workflow_with_its_thumbnail(frontend):
    from selenium.webdriver.support.ui import WebDriverWait

    names = sorted(p.stem for p in WORKFLOWS)
    assert sorted(json.loads(frontend.server.get("/workflow_templates"))[PACK_FOLDER]) == names
    responses(frontend)  # forget what the page loaded so far
    frontend.execute_script("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    find_pack = """return [...document.querySelectorAll('[role=dialog] *')]
                     .find(e => e.children.length === 0 && e.textContent.trim() === arguments[0]) || null"""
    pack = WebDriverWait(frontend, 30).until(lambda d: d.execute_script(find_pack, PACK_FOLDER))
    frontend.execute_script("arguments[0].click()", pack)  # the category list entry named after the pack
    cards = """const dialog = document.querySelector('[role=dialog]');
               return [dialog.innerText, [...dialog.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).length]"""
    WebDriverWait(frontend, 30).until(lambda d: all(n in d.execute_script(cards)[0] for n in names)
                                      and d.execute_script(cards)[1] >= len(names))
    time.sleep(0.5)  # the network log lags the page by a moment
    thumbnails = {url.rsplit("/", 1)[1]: status for url, status in responses(frontend).items()
                  if f"/workflow_templates/{PACK_FOLDER}/" in url}
    assert thumbnails == {f"{name}.jpg": 200 for name in names}  # both frontends ask for <workflow>.jpg beside it
    for name in names:
        assert frontend.server.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.jpg")[:3] == b"\xff\xd8\xff"
    frontend.execute_script("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'}))")


def test_an_old_dual_memory_node_is_flagged_and_refused(frontend):
    """A workflow saved with the 20-option GF Dual Memory loads, but its values land on the wrong
    widgets: the node shows them as invalid and ComfyUI refuses to queue it, instead of running some
    other memory than the one saved (docs/WORKFLOWS.md)."""
    old = {"last_node_id": 2, "last_link_id": 1, "links": [[1, 1, 0, 2, 0, "GF_MEMORY"]], "groups": [], "config": {},
           "version": 0.4, "nodes": [
               {"id": 1, "type": "GFDualMemory", "pos": [100, 100], "size": [320, 300], "flags": {}, "order": 0,
                "mode": 0, "inputs": [], "properties": {},
                "outputs": [{"name": "memory", "type": "GF_MEMORY", "links": [1]}], "widgets_values": OLD_DUAL_MEMORY},
               {"id": 2, "type": "PreviewAny", "pos": [500, 100], "size": [320, 200], "flags": {}, "order": 1,
                "mode": 0, "inputs": [{"name": "source", "type": "*", "link": 1}], "outputs": [], "properties": {},
                "widgets_values": []}]}
    load_workflow(frontend, old)
    memory = next(n for n in _graph(frontend)["nodes"] if n["type"] == "GFDualMemory")
    assert memory["registered"] and memory["bad_values"] == ["gcm_update"]
    values = frontend.execute_script(
        "return app.graph._nodes.find(n => n.type === 'GFDualMemory').widgets.map(w => [w.name, w.value])")
    assert values[:3] == [["gcm_frames", "longlive"], ["ltm_frames", 3], ["gcm_update", 6]]
    status, answer = frontend.execute_async_script("""
        const done = arguments[0];
        app.graphToPrompt().then(p => fetch('/api/prompt', {method: 'POST', body: JSON.stringify({prompt: p.output})}))
          .then(r => r.json().then(body => done([r.status, body])));""")
    assert status == 400
    errors = answer["node_errors"]["1"]["errors"]
    assert "gcm_frames" in {e["extra_info"]["input_name"] for e in errors}  # "longlive" is no number of frames
