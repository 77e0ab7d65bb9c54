"""Screenshots of the workflows from the real ComfyUI frontend: the template thumbnails and the README picture.

Starts a CPU ComfyUI server with the pack (tests/comfy_server.py), opens every workflow in a headless
Chromium and writes

- ``workflows/<workflow>.jpg``: the whole graph, the UI hidden (focus mode, no minimap), the picture the
  template browser shows on the workflow's card (both frontends ask for ``<workflow>.jpg`` beside it);
- ``docs/images/workflow.png``: gf_60s_single_prompt as a user sees it on opening it (the saved view);
- ``docs/images/workflow_ab.png``: the A/B workflow the same way;
- ``docs/images/live_panel.png``: the GF Live Sampler node of gf_toy_world_live during a take, after a
  sentence typed in its panel took effect and one with an unknown word was refused
  (tests/test_live_browser.py's toy take).

Run it with the Python of a ComfyUI checkout that has selenium, after tools/make_workflows.py::

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python tools/screenshot_workflows.py
    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python tools/screenshot_workflows.py --live-panel  # that one
"""

import io
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from comfy_server import (  # noqa: E402
    chromium_driver,
    comfy_server,
    load_workflow,
    skip_reason,
    wait_for_app,
    workflow_models,
)

COMFY = os.environ.get("GF_COMFYUI_PATH")
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
VIEWPORT = (1920, 960)  # the window tools/make_workflows.py fits the saved view into
THUMBNAIL = (1024, 768)  # the card picture; drawn at twice this size, then scaled down
README = {"gf_60s_single_prompt": "workflow.png", "gf_ab_memory_policies": "workflow_ab.png"}
PLAIN = {  # the graph and nothing else for the thumbnails
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.NodeBadge.NodeSourceBadgeMode": "None",
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # draw the widgets however small
}


def fit_view(driver, margin: float = 24.0) -> None:
    """Scale and move the canvas so that every node (title bars included) fits the window."""
    driver.execute_script("""
        const m = arguments[0], T = LiteGraph.NODE_TITLE_HEIGHT, ds = app.canvas.ds;
        const boxes = app.graph._nodes.map(n => [n.pos[0], n.pos[1] - T, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
        const x1 = Math.max(...boxes.map(b => b[2])), y1 = Math.max(...boxes.map(b => b[3]));
        const scale = Math.min((innerWidth - 2 * m) / (x1 - x0), (innerHeight - 2 * m) / (y1 - y0));
        ds.scale = scale;
        ds.offset[0] = (innerWidth - scale * (x1 - x0)) / 2 / scale - x0;
        ds.offset[1] = (innerHeight - scale * (y1 - y0)) / 2 / scale - y0;
        app.canvas.setDirty(true, true);""", margin)
    time.sleep(1.0)  # DOM widgets (the text boxes) follow the canvas on the next frames


def live_panel(driver) -> None:
    """Screenshot the GF Live Sampler node (title to panel) at the canvas's natural scale."""
    driver.execute_script("""
        const n = app.graph._nodes.find((n) => n.type === "GFLiveSampler"), ds = app.canvas.ds;
        ds.scale = 1;
        ds.offset = [-n.pos[0] + 160, -n.pos[1] + 150];
        app.canvas.setDirty(true, true);""")
    time.sleep(1.5)  # DOM widgets (the panel) follow the canvas on the next frames; frames keep playing
    x, y, w, h, ratio = driver.execute_script("""
        const n = app.graph._nodes.find((n) => n.type === "GFLiveSampler"), ds = app.canvas.ds;
        const r = app.canvas.canvas.getBoundingClientRect(), T = LiteGraph.NODE_TITLE_HEIGHT;
        return [(n.pos[0] + ds.offset[0]) * ds.scale + r.left, (n.pos[1] - T + ds.offset[1]) * ds.scale + r.top,
                n.size[0] * ds.scale, (n.size[1] + T) * ds.scale, devicePixelRatio];""")
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    m = 6
    box = [round(v * ratio) for v in (x - m, y - m, x + w + m, y + h + m)]
    target = REPO / "docs" / "images" / "live_panel.png"
    image.crop(box).save(target)
    print("wrote", target.relative_to(REPO))


def shoot_live_panel() -> None:
    with comfy_server(COMFY) as server, chromium_driver(*VIEWPORT) as driver:
        import conftest  # noqa: F401  (the pack importable as grounded_forcing, as in the tests)
        from test_live_browser import toy_live_take

        toy_live_take(server, driver, before_stop=live_panel)


def main() -> None:
    reason = skip_reason(COMFY)
    if reason:
        raise SystemExit(reason)
    if sys.argv[1:] == ["--live-panel"]:  # that picture alone
        return shoot_live_panel()
    models = workflow_models(WORKFLOWS)
    with comfy_server(COMFY, models=models) as server, chromium_driver(*VIEWPORT) as driver:
        driver.get(server.url)
        wait_for_app(driver)
        for path in WORKFLOWS:
            if path.stem in README:
                load_workflow(driver, json.loads(path.read_text()), path.stem)
                time.sleep(1.0)
                target = REPO / "docs" / "images" / README[path.stem]
                target.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(target))
                print("wrote", target.relative_to(REPO))
    shoot_live_panel()
    with comfy_server(COMFY, models=models, settings=PLAIN) as server, chromium_driver(*(2 * side for side in THUMBNAIL)) as driver:
        driver.get(server.url)
        wait_for_app(driver)
        driver.execute_script("app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        for path in WORKFLOWS:
            load_workflow(driver, json.loads(path.read_text()))
            fit_view(driver)
            image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
            image = image.resize(THUMBNAIL, Image.Resampling.LANCZOS)
            target = path.with_suffix(".jpg")
            image.save(target, "JPEG", quality=85, optimize=True)
            print("wrote", target.relative_to(REPO), image.size)


if __name__ == "__main__":
    main()
