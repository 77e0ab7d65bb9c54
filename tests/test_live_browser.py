"""GF Live Sampler end to end: a real ComfyUI server (CPU), its web frontend in headless Chromium.

The shipped workflow (workflows/gf_live.json) is opened in the page with tiny random models put in;
Run; two prompts are typed into the panel (the page is reloaded between them) and Cut and Stop are
pressed. Then: frames reached the player, the take's script names each change at the chunk where it
took effect, and GF Prompt Timeline + GF Sampler replay the take to identical latents. The live
routes' refusals are checked over HTTP on the same server. Needs a ComfyUI checkout, its Python
(with selenium) and Debian's chromium + chromium-driver::

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_live_browser.py
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from comfy_server import chromium_driver, comfy_server, skip_reason, wait_for_app
from grounded_forcing import gf_core as gf
from grounded_forcing.nodes import loading, prompts
from safetensors.torch import load_file, save

COMFY = os.environ.get("GF_COMFYUI_PATH")
_REASON = skip_reason(COMFY)
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
TEST_NODES = REPO / "tests" / "comfy_testing_nodes"  # GFTestTextEncoder: a small stand-in for umT5
TINY_MODEL = "gf_tiny_wan.safetensors"
TINY_VAE = "gf_random_wan_vae.safetensors"
SIZE = 32
SEED = 7
FIRST, SECOND, THIRD = "a fox in the snow", "the fox runs", "the fox jumps over a log"


def _tiny_wan() -> bytes:
    cfg = gf.WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096)  # ComfyUI's fixed text_dim
    return save(gf.random_state_dict(cfg, seed=0))


def _wan_vae_decoder() -> bytes:
    """A Wan2.1 VAE file in the shape every ComfyUI version builds (dim 96), random weights, holding
    only what decoding reads (ComfyUI loads VAE weights non-strictly): conv2, the decoder, and the
    encoder's first convolution, which newer versions read the image channels from."""
    sys.path.insert(0, COMFY)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management looks for a GPU
        from comfy.ldm.wan.vae import WanVAE
    finally:
        sys.path.remove(COMFY)
    vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in vae.state_dict().items():
        if not name.startswith(("conv2.", "decoder.", "encoder.conv1.")):
            continue
        if name.endswith("gamma"):
            state[name] = torch.ones_like(p)
        elif p.ndim > 1:
            state[name] = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
        else:
            state[name] = torch.zeros_like(p)
    return save({k: v.to(torch.bfloat16) for k, v in state.items()})


@pytest.fixture(scope="module")
def server():
    models = {"diffusion_models": {TINY_MODEL: _tiny_wan()}, "vae": {TINY_VAE: _wan_vae_decoder()}}
    with comfy_server(COMFY, extra_custom_nodes=[TEST_NODES], models=models) as running:
        yield running


def post(server, route: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(server.url + route, data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    return status, json.loads(body) if body else {}


def command(server, message: dict) -> tuple[int, dict]:
    return post(server, "/api/gf_live/command", json.dumps(message).encode())


# ---------------------------------------------------------------------------------------------
# The page


PREPARE = """
const [workflow, names, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
(async () => {
  await app.loadGraphData(workflow);
  const g = app.graph;
  const find = (type) => g._nodes.find((n) => n.type === type);
  const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
  const live = find("GFLiveSampler");
  const model = find("GFLoadCausalWanModel");
  set(model, "model_name", names.model); set(model, "lora_name", names.no_lora); set(model, "weight_dtype", "default");
  set(find("VAELoader"), "vae_name", names.vae);
  for (const [k, v] of Object.entries(names.live)) set(live, k, v);
  const clip = find("CLIPLoader");
  const encoder = LiteGraph.createNode("GFTestTextEncoder");
  g.add(encoder);
  set(encoder, "clip_name", "umt5"); set(encoder, "type", "wan");
  encoder.connect(0, live, live.findInputSlot("clip"));
  g.remove(clip);
  const keep = LiteGraph.createNode("SaveLatent");
  g.add(keep);
  live.connect(0, keep, 0);
  set(keep, "filename_prefix", "gf_live_take");
  // the whole live node on screen, so its panel can be typed into
  app.canvas.ds.scale = 0.8;
  app.canvas.ds.offset = [-live.pos[0] + 150, -live.pos[1] + 80];
  app.canvas.setDirty(true, true);
  done((await app.graphToPrompt()).output);
})().catch((e) => done({error: String(e)}));
"""

PANEL = ".gf-live"


def panel_data(driver) -> dict:
    return driver.execute_script(f"const p = document.querySelector('{PANEL}'); return p ? {{...p.dataset}} : null;")


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_applied(driver, seq: int, timeout: float = 60.0) -> int:
    """The chunk first made under command ``seq``, as the panel saw it."""
    def seen():
        data = panel_data(driver) or {}
        applied = json.loads(data.get("applied") or "{}")
        return applied.get(str(seq)) if str(seq) in applied else None

    return wait_until(lambda: (c := seen()) is not None and (c,), timeout, f"command {seq} to take effect")[0]


def click_run(driver) -> None:
    """Press the frontend's Run (Queue) button."""
    for selector in ('[data-testid="queue-button"]', ".comfyui-queue-button button", "button.comfyui-queue-button"):
        for button in driver.find_elements("css selector", selector):
            if button.is_displayed():
                button.click()
                return
    raise AssertionError("no Run button found in the page")


def type_prompt(driver, text: str, transition: str | None = None) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    if transition is not None:
        Select(driver.find_element("css selector", f"{PANEL} .gf-live-transition")).select_by_value(transition)
    box = driver.find_element("css selector", f"{PANEL} .gf-live-prompt")
    box.click()
    box.send_keys(text, Keys.ENTER)


def history(server, prompt_id: str | None = None, timeout: float = 120.0) -> dict:
    def done():
        entries = server.get_json(f"/history/{prompt_id}" if prompt_id else "/history")
        finished = [e for e in entries.values() if e.get("status", {}).get("completed")]
        failed = [e for e in entries.values() if e.get("status", {}).get("status_str") == "error"]
        assert not failed, json.dumps(failed[0]["status"], indent=1)[:3000] + server.log_tail()
        return finished[0] if finished else None

    return wait_until(done, timeout, "the prompt to finish", poll=0.5)


def saved_latent(server, outputs: dict, node: str) -> torch.Tensor:
    entry = outputs[node]["latents"][0]
    path = server.base / "output" / entry["subfolder"] / entry["filename"]
    return load_file(str(path))["latent_tensor"]


def video_frames(server, output: dict) -> int:
    """Frames of the video a SaveVideo output names."""
    import av

    entry = (output.get("images") or output.get("videos") or output.get("animated"))[0]
    with av.open(str(server.base / "output" / entry["subfolder"] / entry["filename"])) as container:
        return sum(1 for _ in container.decode(video=0))


def api_node(server, class_type: str, **inputs) -> dict:
    """An API-format node: ``inputs`` over the defaults of its required widgets (from /object_info)."""
    info = server.get_json(f"/object_info/{class_type}")[class_type]["input"]
    values = {}
    for name, spec in info.get("required", {}).items():
        kind, options = spec[0], spec[1] if len(spec) > 1 else {}
        if isinstance(kind, list):
            values[name] = options.get("default", kind[0])
        elif kind == "COMBO":
            values[name] = options.get("default", options.get("options", [None])[0])
        elif "default" in options:
            values[name] = options["default"]
    return {"class_type": class_type, "inputs": {**values, **inputs}}


def test_live_take_in_the_page_replays_through_gf_sampler(server):
    status, reply = command(server, {"session": "0" * 32, "type": "stop"})
    assert status == 409 and reply["error"].startswith("no live take is running")

    workflow = json.loads((REPO / "workflows" / "gf_live.json").read_text())
    names = {"model": TINY_MODEL, "vae": TINY_VAE, "no_lora": loading.NO_LORA,
             "live": {"prompt": FIRST, "seed": SEED, "width": SIZE, "height": SIZE, "max_seconds": 120.0}}
    with chromium_driver() as driver:
        driver.get(server.url)
        wait_for_app(driver)
        api = driver.execute_async_script(PREPARE, workflow, names)
        assert "error" not in api, api
        click_run(driver)
        wait_until(lambda: int((panel_data(driver) or {}).get("received") or 0) > 0, 120, "the first frames")
        running = server.get_json("/api/gf_live/session")
        assert running["state"] == "running" and running["prompt"] == FIRST
        session = running["session"]

        # the routes' refusals while the take runs
        assert command(server, {"session": "f" * 32, "type": "stop"})[0] == 409
        status, reply = command(server, {"session": session, "type": "prompt", "text": "x", "path": "/etc/passwd"})
        assert status == 400 and "unknown field 'path'" in reply["error"]
        status, reply = command(server, {"session": session, "type": "prompt", "text": "y" * 2001})
        assert status == 400 and "2000" in reply["error"]
        status, reply = post(server, "/api/gf_live/command", b"{not json")
        assert status == 400 and "not JSON" in reply["error"]
        status, reply = post(server, "/api/gf_live/command", b" " * 20000)
        assert status == 413

        type_prompt(driver, SECOND)
        second_at = wait_applied(driver, 1)

        driver.refresh()  # a reloaded page attaches to the running take and steers it on
        wait_for_app(driver)
        wait_until(lambda: int((panel_data(driver) or {}).get("received") or 0) > 0, 60, "frames after the reload")
        type_prompt(driver, THIRD, transition="hard")
        third_at = wait_applied(driver, 2)
        driver.find_element("css selector", f"{PANEL} .gf-live-cut").click()
        cut_at = wait_applied(driver, 3)
        driver.find_element("css selector", f"{PANEL} .gf-live-stop").click()
        status_line = driver.find_element("css selector", f"{PANEL} .gf-live-status")
        wait_until(lambda: "stopped" in status_line.text, 60, "the end of the take")
        data = panel_data(driver)  # (the panel writes its status and counters together)
        assert int(data["received"]) > 0 and int(data["played"]) > 0  # since the reload
        assert "prompt latency" in status_line.text and data["total"]
        page_log = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not [m for m in page_log if "gf_live" in m or "live.js" in m], page_log

    take = history(server)
    outputs = take["outputs"]
    live_id = next(k for k, v in api.items() if v["class_type"] == "GFLiveSampler")
    script_node = next(k for k, v in api.items() if v["class_type"] == "PreviewAny")
    keep = next(k for k, v in api.items() if v["class_type"] == "SaveLatent")
    script = outputs[script_node]["text"][0]
    lines = prompts.parse_script(script)
    starts = [sum(x.frames for x in lines[:k]) for k in range(len(lines))]
    assert [(x.text, x.transition and x.transition.kind) for x in lines] == [
        (FIRST, None), (SECOND, "apr"), (THIRD, "hard"), (THIRD, "cut")]
    assert starts[1:] == [3 * second_at, 3 * third_at, 3 * cut_at]  # where each change took effect
    latents = saved_latent(server, outputs, keep)
    assert latents.shape[:3] == (1, 16, sum(x.frames for x in lines))
    assert int(data["total"]) == gf.pixel_frames(latents.shape[2])  # every frame of the take went to the page
    video = next(k for k, v in api.items() if v["class_type"] == "SaveVideo")
    assert video_frames(server, outputs[video]) == gf.pixel_frames(latents.shape[2])
    assert int(data["latent"]) == latents.shape[2]

    # replay: the script through GF Prompt Timeline + GF Sampler, same model, memory and seed
    memory = next(k for k, v in api.items() if k != live_id and v["class_type"].startswith("GF")
                  and "Memory" in v["class_type"])
    model = api[live_id]["inputs"]["model"][0]
    clip = api[live_id]["inputs"]["clip"][0]
    replay = {model: api[model], memory: api[memory], clip: api[clip],
              "900": api_node(server, "GFPromptTimeline", clip=[clip, 0], script=script),
              "901": api_node(server, "GFSampler", model=[model, 0], memory=[memory, 0], segments=["900", 0],
                              width=SIZE, height=SIZE, seed=SEED, batch_size=1, noise_order="chunk"),
              "902": api_node(server, "SaveLatent", samples=["901", 0], filename_prefix="gf_live_replay")}
    status, queued = post(server, "/prompt", json.dumps({"prompt": replay, "client_id": "gf-test"}).encode())
    assert status == 200, queued
    replayed = saved_latent(server, history(server, queued["prompt_id"])["outputs"], "902")
    assert torch.equal(replayed, latents)
    assert server.get_json("/api/gf_live/session") == {"session": None}


def test_frontend_serves_the_panel_script(server):
    listed = server.get_json("/extensions")
    ours = [p for p in listed if p.endswith("/live.js")]
    assert ours, listed
    assert b"GroundedForcing.Live" in server.get(ours[0])


def test_a_cancelled_take_keeps_its_latents_script_and_video(server):
    """ComfyUI's Cancel (POST /interrupt) mid-take: the node saves what it finished."""
    graph = {
        "1": api_node(server, "GFLoadCausalWanModel", model_name=TINY_MODEL, lora_name=loading.NO_LORA,
                      weight_dtype="default"),
        "2": api_node(server, "GFTestTextEncoder", clip_name="umt5", type="wan"),
        "3": api_node(server, "VAELoader", vae_name=TINY_VAE),
        "4": api_node(server, "GFDualMemory"),
        "5": api_node(server, "GFLiveSampler", model=["1", 0], memory=["4", 0], clip=["2", 0], vae=["3", 0],
                      prompt=FIRST, seed=SEED, width=SIZE, height=SIZE, max_seconds=120.0, realtime=True),
    }
    status, queued = post(server, "/prompt", json.dumps({"prompt": graph, "client_id": "gf-test"}).encode())
    assert status == 200, queued
    wait_until(lambda: (server.get_json("/api/gf_live/session").get("latent_frames") or 0) >= 6, 120,
               "two chunks of the take")
    post(server, "/interrupt", b"{}")

    def ended():
        entry = server.get_json(f"/history/{queued['prompt_id']}").get(queued["prompt_id"])
        return entry if entry and entry["status"].get("status_str") else None

    entry = wait_until(ended, 120, "the take to stop", poll=0.5)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    saved = sorted((server.base / "output" / "grounded_forcing").glob("partial_*"))
    by_kind = {p.suffix: p for p in saved}
    assert set(by_kind) == {".latent", ".txt", ".mp4"}, saved
    latents = load_file(str(by_kind[".latent"]))["latent_tensor"]
    lines = prompts.parse_script(by_kind[".txt"].read_text())
    assert [x.text for x in lines] == [FIRST] and lines[0].frames == latents.shape[2] >= 6
    import av

    with av.open(str(by_kind[".mp4"])) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    # every frame decoded before the cancel; a cancel may stop the last chunk's decode
    assert gf.pixel_frames(latents.shape[2] - 4) <= decoded <= gf.pixel_frames(latents.shape[2])
    assert server.get_json("/api/gf_live/session") == {"session": None}


TOY_FIRST, TOY_SECOND, TOY_BAD = "a big red circle moves right on the grass", "then it moves left", "then it flies"

OPEN_TOY = """
const [workflow, done] = [arguments[0], arguments[arguments.length - 1]];
(async () => {
  await app.loadGraphData(workflow);
  const live = app.graph._nodes.find((n) => n.type === "GFLiveSampler");
  app.canvas.ds.scale = 0.8;  // the whole live node on screen, so its panel can be typed into
  app.canvas.ds.offset = [-live.pos[0] + 150, -live.pos[1] + 80];
  app.canvas.setDirty(true, true);
  done((await app.graphToPrompt()).output);
})().catch((e) => done({error: String(e)}));
"""


def toy_live_take(server, driver, before_stop=None) -> tuple[dict, dict]:
    """workflows/gf_toy_world_live.json as it ships (nothing to download, no VAE): Run, a sentence typed
    in the panel, a sentence with a word outside the toy world's vocabulary, Stop. ``before_stop`` is
    called with the driver once the typed sentence shows. Returns the API prompt, the finished history
    entry and the refusal the panel showed."""
    workflow = json.loads((REPO / "workflows" / "gf_toy_world_live.json").read_text())
    driver.get(server.url)
    wait_for_app(driver)
    api = driver.execute_async_script(OPEN_TOY, workflow)
    assert "error" not in api, api
    click_run(driver)
    wait_until(lambda: int((panel_data(driver) or {}).get("received") or 0) > 0, 120, "the first frames")
    prompt_id = server.get_json("/queue")["queue_running"][0][1]
    type_prompt(driver, TOY_SECOND)
    wait_applied(driver, 1)
    type_prompt(driver, TOY_BAD)
    reply = driver.find_element("css selector", f"{PANEL} .gf-live-reply")
    refusal = wait_until(lambda: "flies" in reply.text and reply.text, 60, "the refusal of the unknown word")
    wait_until(lambda: int((panel_data(driver) or {}).get("played") or 0) > 40, 60, "frames played after the switch")
    if before_stop is not None:
        before_stop(driver)
    driver.find_element("css selector", f"{PANEL} .gf-live-stop").click()
    status_line = driver.find_element("css selector", f"{PANEL} .gf-live-status")
    wait_until(lambda: "stopped" in status_line.text, 60, "the end of the take")
    return api, history(server, prompt_id), refusal


def test_toy_world_live_workflow_runs_as_shipped(server):
    """A new user's first live take: the toy model steered from the page, with nothing downloaded."""
    with chromium_driver() as driver:
        api, take, refusal = toy_live_take(server, driver)
        data = panel_data(driver)
    assert "does not know the word 'flies'" in refusal
    assert int(data["received"]) > 0 and int(data["played"]) > 0
    script_node = next(k for k, v in api.items() if v["class_type"] == "PreviewAny")
    lines = prompts.parse_script(take["outputs"][script_node]["text"][0])
    assert [(x.text, x.transition and x.transition.kind) for x in lines] == [(TOY_FIRST, None), (TOY_SECOND, "apr")]
    video = next(k for k, v in api.items() if v["class_type"] == "SaveVideo")
    assert video_frames(server, take["outputs"][video]) == gf.pixel_frames(sum(x.frames for x in lines))
