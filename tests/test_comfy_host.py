"""The pack inside a real ComfyUI (CPU): loading, workflows end to end, graph execution, stream decode.

Needs a ComfyUI checkout and a Python with its requirements, one tree per run::

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_comfy_host.py

Everything runs in-process on tiny random models written to a temporary models folder. What
differs between ComfyUI lines (how the executor is built, which loaders read sizes from the
file, whether core has its causal Wan model) is decided by what the tree offers, never by its
version string.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from grounded_forcing import gf_core as gf
from grounded_forcing.gf_core.latents import to_normalised

TREES = [p for p in os.environ.get("GF_COMFYUI_PATH", "").split(os.pathsep) if p]
if not TREES:
    pytest.skip("set GF_COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI host tests", allow_module_level=True)
if len(TREES) > 1:
    pytest.skip(f"GF_COMFYUI_PATH names {len(TREES)} ComfyUI trees and a process imports one: run the host tests "
                "once per tree (GF_COMFYUI_PATH=<tree>)", allow_module_level=True)
COMFY = TREES[0]

REPO = Path(__file__).resolve().parent.parent
TESTING_NODES = REPO / "tests" / "comfy_testing_nodes"
PACK_NODES = {"GFLoadCausalWanModel", "GFDualMemory", "GFLongLiveMemory", "GFSelfForcingMemory", "GFInfinityRoPEMemory",
              "GFAnchorForcingMemory", "GFContextForcingMemory", "GFDRRoPE", "GFPromptSegment", "GFAPRTransition", "GFCut",
              "GFPromptTimeline", "GFSampler", "GFStreamDecode"}
TINY_MODEL = "gf_tiny_wan.safetensors"
TINY_AR_MODEL = "gf_tiny_wan_causal_ar.safetensors"
TINY_LORA = "gf_tiny_lora.safetensors"
NOT_A_MODEL = "gf_lora_in_the_wrong_folder.safetensors"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
FRONTEND_ONLY = {"Note", "MarkdownNote"}
CAUSAL_AR_METADATA = {"config": json.dumps({"transformer": {"causal_ar": True}})}


class _Server:
    """What PromptExecutor needs of ComfyUI's PromptServer: it records the messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def _tiny_wan(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Wan2.1 T2V state dict ComfyUI detects as such: heads of 128, text_dim 4096 (its fixed value)."""
    cfg = gf.WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096)
    return gf.random_state_dict(cfg, seed=seed)


def _tiny_lora(dim: int = 256, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    prefix = "base_model.model.blocks.1.self_attn.q"
    return {f"{prefix}.lora_A.weight": torch.randn(rank, dim, generator=g) * 0.1,
            f"{prefix}.lora_B.weight": torch.randn(dim, rank, generator=g) * 0.1}


def _wan_vae(dim: int, seed: int = 0):
    """Core's own Wan2.1 VAE module at width ``dim`` with random weights (its layers skip init)."""
    from comfy.ldm.wan.vae import WanVAE

    vae = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return vae.eval()


def _write_wan_vae(path: Path) -> int:
    """The smallest Wan2.1 VAE file this tree's VAELoader builds; returns its width. Later lines read
    the width from the file (a tiny VAE), earlier ones build the full width (96) whatever the file."""
    import comfy.sd
    from safetensors.torch import save_file

    for dim in (4, 96):
        sd = _wan_vae(dim).state_dict()
        try:
            comfy.sd.VAE(sd=sd)
        except RuntimeError:  # the loader's fixed width does not take this file
            continue
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return dim
    raise AssertionError("this ComfyUI builds no Wan2.1 VAE of width 4 or 96")


def _workflow_files(models: Path) -> None:
    """The files the workflows name, in their real formats: a LongLive-style training pickle and its
    PEFT LoRA (tiny), a Wan2.1 VAE; the umT5 file stays empty (the workflow runs replace its loader)."""
    from safetensors.torch import save_file

    for wf in sorted((REPO / "workflows").glob("*.json")):
        for node in json.loads(wf.read_text())["nodes"]:
            named = list(node.get("properties", {}).get("models", []))
            if node["type"] == "GFLoadCausalWanModel":  # a converted file the user makes: no download entry
                model_name, _, lora_name = node["widgets_values"][:3]
                named.append({"directory": "diffusion_models", "name": model_name})
                if lora_name != "none":
                    named.append({"directory": "loras", "name": lora_name})
            for model in named:
                path = models / model["directory"] / model["name"]
                if path.exists():
                    continue
                safetensors = path.suffix == ".safetensors"
                if model["directory"] == "diffusion_models" and safetensors:  # as gf_core.convert writes it
                    save_file(_tiny_wan(seed=5), str(path))
                elif model["directory"] == "diffusion_models":
                    torch.save({"generator": {f"model.{k}": v for k, v in _tiny_wan(seed=5).items()}}, path)
                elif model["directory"] == "loras" and safetensors:
                    save_file(_tiny_lora(), str(path))
                elif model["directory"] == "loras":
                    torch.save({"generator_lora": _tiny_lora()}, path)
                elif model["directory"] == "vae":
                    _write_wan_vae(path)
                else:
                    path.touch()
    save_file(_tiny_wan(), str(models / "diffusion_models" / TINY_AR_MODEL), metadata=CAUSAL_AR_METADATA)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """ComfyUI imported on CPU with temporary folders, core's extra nodes, this pack and the test nodes."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("comfy")
    sys.path.insert(0, COMFY)
    # ComfyUI's nodes.py puts comfy/ first on sys.path (comfy/utils.py); import the utils package before it.
    import comfy.cli_args as cli
    import utils.extra_config
    import utils.install_util  # noqa: F401

    cli.args.cpu = True
    cli.args.preview_method = cli.LatentPreviewMethod.Latent2RGB
    import folder_paths

    for name in ("output", "temp", "input"):
        (root / name).mkdir()
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_temp_directory(str(root / "temp"))
    folder_paths.set_input_directory(str(root / "input"))
    models = root / "models"
    for kind in ("diffusion_models", "loras", "text_encoders", "vae"):
        (models / kind).mkdir(parents=True)
        folder_paths.add_model_folder_path(kind, str(models / kind), is_default=True)
    save_file(_tiny_wan(), str(models / "diffusion_models" / TINY_MODEL))
    save_file(_tiny_lora(), str(models / "loras" / TINY_LORA))
    save_file(_tiny_lora(), str(models / "diffusion_models" / NOT_A_MODEL))
    _workflow_files(models)

    import execution

    import nodes

    asyncio.run(nodes.init_builtin_extra_nodes())
    loaded_pack = asyncio.run(nodes.load_custom_node(str(REPO)))
    loaded_testing = asyncio.run(nodes.load_custom_node(str(TESTING_NODES)))
    return SimpleNamespace(nodes=nodes, execution=execution, folder_paths=folder_paths, root=root, models=models,
                           loaded=(loaded_pack, loaded_testing))


def _pack(host, name: str):
    """A module of the pack as ComfyUI loaded it: ComfyUI imports the folder under a name of its own,
    so its node classes check against their own copy of the pack's types, not the tests' import."""
    base = host.nodes.NODE_CLASS_MAPPINGS["GFSampler"].__module__.rsplit(".", 2)[0]
    return sys.modules[f"{base}.nodes.{name}"]


def _grounded(host):
    """GF Dual Memory's default memory, made by ComfyUI's copy of the pack (as _pack explains)."""
    return host.nodes.NODE_CLASS_MAPPINGS["GFDualMemory"].execute(3, 6, "after_switch", 0.8, 0.0).args[0]


def _captured(host) -> dict:
    return sys.modules[host.nodes.NODE_CLASS_MAPPINGS["GFTestCapture"].__module__].CAPTURED


def executor(execution, server):
    """A PromptExecutor as the tree's main.py builds one with its default arguments: where the
    executor takes ``cache_args``, a RAM-pressure cache with main.py's headroom sizes, else the
    classic cache with no LRU size."""
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        import comfy.model_management as mm

        ram = mm.total_ram / 1024.0  # GiB, as main.py computes it
        return execution.PromptExecutor(server, cache_type=execution.CacheType.RAM_PRESSURE, cache_args={
            "lru": 0, "ram": min(10.0, max(2.0, ram * 0.10)), "ram_inactive": min(128.0, ram)})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_size=0)


def _run(host, prompt: dict) -> str:
    """Validate and execute an API prompt (every output node); returns the final status (execution_success, ...)."""
    mappings = host.nodes.NODE_CLASS_MAPPINGS
    outputs = [k for k, v in prompt.items() if getattr(mappings[v["class_type"]], "OUTPUT_NODE", False) is True]
    valid = asyncio.run(host.execution.validate_prompt("gf-test", prompt, None))
    assert valid[0], valid
    run = executor(host.execution, _Server())
    run.execute(prompt, "gf-test", {}, outputs)
    event, data = run.status_messages[-1]
    if event == "execution_error":
        pytest.fail(f"{data['node_type']}: {data['exception_message']}\n{''.join(data['traceback'])}")
    return event


# ---------------------------------------------------------------------------------------------
# (a) the pack loads through ComfyUI's custom-node loader


def test_pack_loads_through_comfyui(host):
    assert host.loaded == (True, True)
    mappings = host.nodes.NODE_CLASS_MAPPINGS
    assert PACK_NODES <= set(mappings)
    module = sys.modules[mappings["GFSampler"].__module__.split(".nodes")[0]]
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # V3 only
    for node_id in PACK_NODES:
        cls = mappings[node_id]
        schema = cls.GET_SCHEMA()
        assert schema.node_id == node_id and schema.category == "Grounded Forcing" and schema.display_name
        assert all(i.tooltip for i in schema.inputs), f"{node_id} has an input without a tooltip"
        json.dumps(cls.GET_NODE_INFO_V1())  # what /object_info serves


def test_loader_lists_models_and_loras(host):
    spec = host.nodes.NODE_CLASS_MAPPINGS["GFLoadCausalWanModel"].INPUT_TYPES()["required"]
    assert TINY_MODEL in spec["model_name"][1]["options"]
    assert spec["lora_name"][1]["options"][0] == "none" and TINY_LORA in spec["lora_name"][1]["options"]
    assert "fp8_e4m3fn" in spec["weight_dtype"][1]["options"]


def test_loader_reports_a_bad_file_in_one_sentence(host):
    loader = host.nodes.NODE_CLASS_MAPPINGS["GFLoadCausalWanModel"]
    with pytest.raises(ValueError) as info:  # CheckpointError is a ValueError
        loader.execute(model_name=NOT_A_MODEL, weights="ema", lora_name="none", lora_strength=1.0,
                       weight_dtype="default")
    assert type(info.value).__name__ == "CheckpointError" and info.value.__suppress_context__
    assert NOT_A_MODEL in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# (b) every workflow converts to an API prompt that ComfyUI validates


def _widget_inputs(spec: dict, prefix: str = "") -> list[tuple[str, object, dict]]:
    """(name, kind, options) of every input with a widget, in the frontend's order (required, then
    optional; inputs the frontend hides still have their widget)."""
    out = []
    for section in ("required", "optional"):
        for name, definition in spec.get(section, {}).items():
            kind = definition[0]
            options = definition[1] if len(definition) > 1 else {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES or kind == DYNAMIC_COMBO) and not options.get("forceInput"):
                out.append((prefix + name, kind, options))
    return out


def _widget_default(kind, options: dict):
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0]
    if kind == "COMBO":
        return options["options"][0]
    if kind == DYNAMIC_COMBO:
        return options["options"][0]["key"]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def widget_values(spec: dict, saved: list) -> tuple[dict, list]:
    """Widget name -> value as the frontend restores a node from its saved ``widgets_values``, and
    the values left over.

    Values go to the widgets in order. Setting a DynamicCombo (core's ``io.DynamicCombo``, e.g.
    Save Video's ``format``) puts the widgets of the chosen option right after it, named
    ``<combo>.<input>``, so the next values go to them. A widget with ``control_after_generate``
    is followed by its control value ("fixed", "randomize", ...), which a prompt does not carry.
    Widgets past the saved values (added to the node after the workflow was saved) keep their defaults.
    """
    pending = _widget_inputs(spec)
    values = list(saved)
    out = {}
    while pending:
        name, kind, options = pending.pop(0)
        out[name] = values.pop(0) if values else _widget_default(kind, options)
        if options.get("control_after_generate") and values:
            values.pop(0)
        if kind == DYNAMIC_COMBO:
            chosen = next(o for o in options["options"] if o["key"] == out[name])
            pending[:0] = _widget_inputs(chosen["inputs"], prefix=f"{name}.")
    return out, values


def ui_to_api(workflow: dict, mappings: dict) -> dict:
    """UI-format workflow -> API prompt, as the frontend's ``graphToPrompt`` makes it: every
    widget's value (:func:`widget_values`), linked inputs as ``[source node id, output slot]``.
    Frontend-only nodes (notes) and muted/bypassed nodes are skipped."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        inputs, left = widget_values(mappings[node["type"]].INPUT_TYPES(), node.get("widgets_values", []))
        assert not left, f"node {node['id']} ({node['type']}) has {len(left)} widget values left over"
        for i in node.get("inputs", []):
            if i.get("link") is not None:
                link = links[i["link"]]
                inputs[i["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_validates_in_comfyui(host, path):
    workflow = json.loads(path.read_text())
    prompt = ui_to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
    ok, error, outputs, node_errors = asyncio.run(host.execution.validate_prompt("gf-wf", prompt, None))
    assert ok and not node_errors, (error, node_errors)
    assert outputs


def test_converter_handles_seed_control_widgets(host):
    workflow = {
        "nodes": [{"id": 3, "type": "GFSampler", "mode": 0, "widgets_values": [832, 480, 42, "randomize", 1, "chunk"],
                   "inputs": [{"name": "model", "type": "MODEL", "link": None}]}],
        "links": [],
    }
    inputs = ui_to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)["3"]["inputs"]
    # saved before the "fused" setting existed: the frontend gives it its default
    assert inputs == {"width": 832, "height": 480, "seed": 42, "batch_size": 1, "noise_order": "chunk", "fused": "auto"}
    workflow["nodes"][0]["widgets_values"].append("on")  # saved with the later "fused" setting
    inputs = ui_to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)["3"]["inputs"]
    assert inputs["fused"] == "on"


def test_converter_expands_dynamic_combos_as_the_frontend_does():
    """A DynamicCombo's chosen option brings its own widgets, nested ones too; the values follow in that order."""
    codec = ["COMFY_DYNAMICCOMBO_V3", {"options": [
        {"key": "auto", "inputs": {"required": {}}},
        {"key": "h264", "inputs": {"required": {}, "optional": {"crf": ["FLOAT", {"default": 23.0}]}}}]}]
    spec = {"required": {"video": ["VIDEO", {}], "prefix": ["STRING", {"default": "v"}],
                         "format": ["COMFY_DYNAMICCOMBO_V3", {"options": [
                             {"key": "mp4", "inputs": {"required": {"codec": codec}}},
                             {"key": "webm", "inputs": {"required": {}}}]}]},
            "optional": {"codec": [*codec[:1], {**codec[1], "hidden": True}]}}
    assert widget_values(spec, ["x", "mp4", "h264", 18.0]) == (
        {"prefix": "x", "format": "mp4", "format.codec": "h264", "format.codec.crf": 18.0, "codec": "auto"}, [])
    assert widget_values(spec, ["x", "webm", "auto"]) == ({"prefix": "x", "format": "webm", "codec": "auto"}, [])
    assert widget_values(spec, ["x"]) == ({"prefix": "x", "format": "mp4", "format.codec": "auto", "codec": "auto"}, [])


def _on_a_cpu(prompt: dict) -> dict:
    """A converted workflow as a CPU runs it: every segment one chunk (3 latent frames), 16 x 16
    pixels, and the test text encoder in place of CLIPLoader (umT5-XXL); every node, link and
    other widget value as converted."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] == "CLIPLoader":
            node["class_type"] = "GFTestTextEncoder"
        elif node["class_type"] == "GFSampler":
            inputs.update(width=16, height=16)
        elif node["class_type"] == "GFLiveSampler":  # no page steers it here: one chunk, unpaced
            inputs.update(width=16, height=16, max_seconds=0.75, realtime=False)
        elif node["class_type"] == "GFPromptSegment":
            inputs.update(duration=3, unit="latent frames")
        elif node["class_type"] in ("GFPromptTimeline", "GFToyWorldTimeline"):
            lines = []
            for line in inputs["script"].splitlines():
                words, bar, text = line.partition("|")
                if bar and not line.lstrip().startswith("#"):
                    words = re.sub(r"\+?\d+(?:\.\d+)?[sf]\b", "3f", words)
                lines.append(words + bar + text)
            inputs["script"] = "\n".join(lines)
    return out


def _segments(prompt: dict) -> int:
    """Segments every sampler of a converted workflow gets (its prompt segments or timeline lines)."""
    count = 0
    for node in prompt.values():
        if node["class_type"] in ("GFPromptSegment", "GFLiveSampler"):  # a live take here: one chunk
            count += 1
        elif node["class_type"] in ("GFPromptTimeline", "GFToyWorldTimeline"):
            count += sum(1 for line in node["inputs"]["script"].splitlines()
                         if "|" in line and not line.lstrip().startswith("#"))
    return count


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_end_to_end(host, path):
    """The converted workflow through ComfyUI's executor: GF loader (research pickle + LoRA), core's
    CLIPTextEncode, VAELoader, GF Stream Decode, Get Video Components, Image Stitch, Create Video, Save Video."""
    from comfy_api.latest import InputImpl

    prompt = _on_a_cpu(ui_to_api(json.loads(path.read_text()), host.nodes.NODE_CLASS_MAPPINGS))
    assert _run(host, prompt) == "execution_success"
    frames = gf.pixel_frames(3 * _segments(prompt))
    saves = [n["inputs"]["filename_prefix"] for n in prompt.values() if n["class_type"] == "SaveVideo"]
    assert saves
    for prefix in saves:
        files = sorted((host.root / "output").glob(f"{prefix}_*"))
        assert files, f"Save Video wrote nothing for {prefix}"
        components = InputImpl.VideoFromFile(str(files[-1])).get_components()
        assert components.images.shape[0] == frames and components.images.shape[1] == 16


# ---------------------------------------------------------------------------------------------
# (c) a graph runs end to end in ComfyUI's executor


def _story_prompt(model_node: dict, extra: dict | None = None) -> dict:
    prompt = {
        "1": model_node,
        "2": {"class_type": "GFDRRoPE", "inputs": {"model": ["1", 0], "mode": "dr_rope", "rope_range": 21,
                                                   "layout": "pinned_end", "precision": "float32"}},
        "3": {"class_type": "GFDualMemory", "inputs": {"gcm_frames": 3, "ltm_frames": 6, "gcm_update": "after_switch",
                                                       "alpha_max": 0.8, "d_window": 0.0}},
        "4": {"class_type": "GFTestConditioning", "inputs": {"seed": 1, "rows": 600}},
        "5": {"class_type": "GFTestConditioning", "inputs": {"seed": 2, "rows": 20}},
        "6": {"class_type": "GFPromptSegment", "inputs": {"conditioning": ["4", 0], "duration": 1.5,
                                                          "unit": "seconds"}},
        "7": {"class_type": "GFAPRTransition", "inputs": {"mode": "apr", "alpha_max": 0.8, "d_window": 0.0}},
        "8": {"class_type": "GFPromptSegment", "inputs": {"conditioning": ["5", 0], "duration": 6,
                                                          "unit": "latent frames", "previous": ["6", 0],
                                                          "transition": ["7", 0]}},
        "9": {"class_type": "GFSampler", "inputs": {"model": ["2", 0], "memory": ["3", 0], "segments": ["8", 0],
                                                    "width": 32, "height": 48, "seed": 7, "batch_size": 1,
                                                    "noise_order": "reference"}},
        "10": {"class_type": "GFTestCapture", "inputs": {"name": "story", "latent": ["9", 0], "events": ["9", 1]}},
    }
    prompt.update(extra or {})
    return prompt


def _reference_latents(sd: dict) -> torch.Tensor:
    """The same story through gf_core's own WanModel: raw latents [1, 16, 12, 6, 4]."""
    from grounded_forcing.nodes import policy, prompts

    def embedding(seed, rows):
        g = torch.Generator().manual_seed(seed)
        return prompts.prompt_embedding([[torch.randn(1, rows, 4096, generator=g), {}]])

    segments = prompts.add_segment(None, embedding(1, 600), 6)
    segments = prompts.add_segment(segments, embedding(2, 20), 6, prompts.make_transition("apr", 0.8, 0.0))
    memory, kind = policy.apply_rope(gf.grounded(), policy.RopeOptions())
    model = gf.WanModel.from_state_dict(sd)
    return gf.generate(model, list(segments), memory, width=32, height=48, seed=7, rope_kind=kind).latents


def test_graph_runs_in_the_executor_and_matches_the_engine(host):
    import comfy.utils

    progress = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, prompt_id=None, node_id=None: progress.append((value, total, preview)))
    loader = {"class_type": "GFLoadCausalWanModel", "inputs": {"model_name": TINY_MODEL, "weights": "ema",
                                                                "lora_name": TINY_LORA, "lora_strength": 1.0,
                                                                "weight_dtype": "default"}}
    save = {"11": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "gf_test"}}}
    assert _run(host, _story_prompt(loader, save)) == "execution_success"
    comfy.utils.set_progress_bar_global_hook(None)
    captured = _captured(host)["story"]
    latents = captured["latent"]["samples"]
    assert latents.shape == (1, 16, 12, 6, 4) and torch.isfinite(latents).all()
    lines = [json.loads(line) for line in captured["events"].splitlines()]
    assert lines[0]["run"]["chunks"] == 4 and [e["chunk"] for e in lines[1:]] == [0, 1, 2, 3]
    assert [e["switch"]["kind"] for e in lines[1:] if e["switch"]] == ["apr"]
    assert [p[:2] for p in progress if p[1] == 4] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(p[2] is not None and p[2][0] == "JPEG" for p in progress if p[1] == 4)  # live previews
    assert list((host.root / "output").glob("gf_test_*.latent"))  # core nodes take the LATENT

    from grounded_forcing.gf_core.checkpoints import load_lora, merge_lora

    merged = merge_lora(_tiny_wan(), load_lora(_tiny_lora()))
    reference = _reference_latents(merged)
    assert torch.allclose(to_normalised(latents), reference, atol=2e-3, rtol=1e-3), \
        float((to_normalised(latents) - reference).abs().max())


def test_core_load_diffusion_model_works_downstream(host):
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL, "weight_dtype": "default"}}
    assert _run(host, _story_prompt(unet)) == "execution_success"
    latents = _captured(host)["story"]["latent"]["samples"]
    reference = _reference_latents(_tiny_wan())
    assert torch.allclose(to_normalised(latents), reference, atol=2e-3, rtol=1e-3)


def test_cancel_keeps_the_finished_chunks(host):
    import comfy.utils

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if total == 4 and value == 2:
            host.nodes.interrupt_processing(True)  # the user presses Cancel after two chunks

    comfy.utils.set_progress_bar_global_hook(hook)
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL, "weight_dtype": "default"}}
    prompt = _story_prompt(unet)
    prompt["9"]["inputs"]["seed"] = 8  # not cached from the previous test
    status = _run(host, prompt)
    comfy.utils.set_progress_bar_global_hook(None)
    assert status == "execution_interrupted"
    saved = sorted((host.root / "output" / "grounded_forcing").glob("partial_*.latent"))
    assert saved
    from safetensors.torch import load_file

    kept = load_file(str(saved[-1]))["latent_tensor"]
    assert kept.shape == (1, 16, 6, 6, 4)  # the two finished chunks


# ---------------------------------------------------------------------------------------------
# (d) Stream Decode equals core's whole-video decode


def _decoder_calls(vae, run) -> list[int]:
    """Latent frames of every call of ``vae.decoder`` while ``run()`` runs."""
    calls = []
    handle = vae.decoder.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[2]))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("frames", [1, 2, 7, 8])
def test_stream_decoder_equals_core_decode_in_any_grouping(host, frames):
    """Pushed 1 frame at a time, in chunks of 3 or all at once: bit for bit core's ``WanVAE.decode``."""
    from grounded_forcing.nodes.decoding import StreamDecoder, is_wan21_vae

    vae = _wan_vae(4)
    assert is_wan21_vae(vae)
    z = torch.randn(1, 16, frames, 4, 6, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        whole = vae.decode(z)
    assert whole.shape == (1, 3, gf.pixel_frames(frames), 32, 48)
    for step in (1, 3, frames):
        decoder = StreamDecoder(vae)
        pieces = [decoder.push(z[:, :, i:i + step]) for i in range(0, frames, step)] + [decoder.flush()]
        assert torch.equal(torch.cat(pieces, dim=2), whole), step


def test_stream_decoder_feeds_core_grouping_through_one_cache(host):
    """The decoder sees the same groups as in core's own decode (one group's activations at a time),
    whatever the pushes; where core groups more than one frame, one frame per call would differ."""
    from grounded_forcing.nodes.decoding import StreamDecoder

    vae = _wan_vae(4)
    z = torch.randn(1, 16, 7, 4, 6, generator=torch.Generator().manual_seed(3))
    core = _decoder_calls(vae, lambda: vae.decode(z))
    decoder = StreamDecoder(vae)
    decoder.push(z[:, :, :1])  # the first push reads the schedule off core's decode: a probe call of its own
    streamed = _decoder_calls(vae, lambda: [decoder.push(z[:, :, i:i + 1]) for i in range(1, 7)] + [decoder.flush()])
    assert [1, *streamed] == core and max(core) == decoder.schedule.group
    with torch.no_grad():
        whole = vae.decode(z)
        cache = [None] * decoder.schedule.cache_slots
        frame_by_frame = []
        for i in range(7):  # one persistent cache, but one latent frame per call
            out = vae.decoder(vae.conv2(z[:, :, i:i + 1]), feat_cache=cache, feat_idx=[0])
            frame_by_frame.append(torch.cat(out, dim=2) if isinstance(out, list) else out)
        frame_by_frame = torch.cat(frame_by_frame, dim=2)
        naive = [vae.decode(chunk) for chunk in (z[:, :, :1], z[:, :, 1:4], z[:, :, 4:7])]
    assert torch.equal(frame_by_frame, whole) == (decoder.schedule.group == 1)
    # separate decode calls start a fresh cache each: frames are lost at every chunk start
    assert sum(n.shape[2] for n in naive) < whole.shape[2]


def test_stream_decoder_refuses_a_decoder_schedule_it_does_not_know(host):
    from grounded_forcing.nodes.decoding import StreamDecoder

    class WholeAtOnce(torch.nn.Module):  # a decode that feeds every latent frame in one call
        def __init__(self, vae):
            super().__init__()
            self.conv2, self.decoder = vae.conv2, vae.decoder

        def decode(self, z):
            return self.decoder(self.conv2(z), feat_cache=[None] * 64, feat_idx=[0])

    with pytest.raises(RuntimeError, match=r"decoder calls of \[10\] frames, a pattern GF Stream Decode does not know"):
        StreamDecoder(WholeAtOnce(_wan_vae(4))).push(torch.zeros(1, 16, 1, 2, 2))


def test_stream_decode_node_equals_core_vae_decode(host):
    """GF Stream Decode with the VAE core's VAELoader made: each video bit for bit core's
    ``VAE.decode`` of it, PNG frames as it goes, the default MP4 written frame by frame."""
    import comfy.sd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(host.models / "vae" / "wan_2.1_vae.safetensors")))
    z = torch.randn(2, 16, 4, 2, 3, generator=torch.Generator().manual_seed(2))
    node = host.nodes.NODE_CLASS_MAPPINGS["GFStreamDecode"]
    out = node.execute(samples={"samples": z}, vae=vae, fps=16.0, save_frames=True, filename_prefix="gf/frames",
                       keep_video_in="memory")
    components = out.args[0].get_components()
    assert components.images.shape == (2 * 13, 16, 24, 3) and components.frame_rate == 16
    for b in range(2):  # core decodes a batch in one call where memory allows: batched convolutions round differently
        core = vae.decode(z[b:b + 1]).reshape(-1, 16, 24, 3)
        assert torch.equal(components.images[13 * b:13 * (b + 1)], core.float()), b
    assert torch.allclose(components.images, vae.decode(z).reshape(-1, 16, 24, 3).float(), atol=1e-5)
    pngs = sorted((host.root / "output" / "gf").glob("frames_00001_*.png"))
    assert len(pngs) == 26 and pngs[-1].name == "frames_00001_00025.png"
    # the default keeps the video in an MP4 written frame by frame: same frames, H.264-compressed
    filed = node.execute(samples={"samples": z}, vae=vae, fps=16.0, save_frames=False, filename_prefix="gf/x")
    source = filed.args[0].get_stream_source()
    assert isinstance(source, str) and source.endswith(".mp4")
    from_file = filed.args[0].get_components()
    assert from_file.images.shape == components.images.shape and from_file.frame_rate == 16
    # H.264 keeps the picture, not every pixel of this noise-like test video: compare per-frame means
    means = (from_file.images.mean(dim=(1, 2, 3)) - components.images.mean(dim=(1, 2, 3))).abs().max().item()
    assert means < 0.02, means
    with pytest.raises(ValueError, match="needs the Wan2.1 VAE"):
        node.execute(samples={"samples": z}, vae=SimpleNamespace(first_stage_model=torch.nn.Linear(1, 1)),
                     fps=16.0, save_frames=False, filename_prefix="x")


# ---------------------------------------------------------------------------------------------
# (e) core's own causal Wan model (autoregressive video) runs in GF Sampler


def test_causal_ar_file_loads_as_core_causal_wan_and_samples_in_gf_sampler(host):
    if importlib.util.find_spec("comfy.ldm.wan.ar_model") is None:
        pytest.skip("this ComfyUI has no CausalWanModel (core's autoregressive Wan model, comfy/ldm/wan/ar_model.py)")
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(host.models / "diffusion_models" / TINY_AR_MODEL))
    assert type(model.model.diffusion_model).__name__ == "CausalWanModel"
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_AR_MODEL, "weight_dtype": "default"}}
    prompt = _story_prompt(unet, {"10": {"class_type": "GFTestCapture", "inputs": {
        "name": "causal_ar", "latent": ["9", 0], "events": ["9", 1]}}})
    assert _run(host, prompt) == "execution_success"
    latents = _captured(host)["causal_ar"]["latent"]["samples"]
    reference = _reference_latents(_tiny_wan())
    assert torch.allclose(to_normalised(latents), reference, atol=2e-3, rtol=1e-3)


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"gf_bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comfy_versions_bench_samples_as_gf_sampler_does(host):
    """bench/comfy_versions.py takes GF Sampler's steps without the node module (which needs PyAV):
    the latents are the node's, fused blocks included."""
    import comfy.sd
    prompts = _pack(host, "prompts")

    bench = _bench("comfy_versions")
    model = comfy.sd.load_diffusion_model(str(host.models / "diffusion_models" / TINY_AR_MODEL))
    embedding = bench.prompt_embedding()
    latents, fused = bench.gf_sampler(model, embedding, 6, 32, 32, 0, "on")
    node = host.nodes.NODE_CLASS_MAPPINGS["GFSampler"].execute(
        model=model, memory=_grounded(host), segments=prompts.add_segment(None, embedding, 6), width=32,
        height=32, seed=0, batch_size=1, noise_order="reference", fused="on").args[0]["samples"]
    assert fused and torch.equal(latents, node)


def test_comfy_versions_bench_runs_a_tree_in_its_own_process(host, tmp_path):
    """The bench's command at tiny size on this tree: both samplers where core has its AR sampler."""
    import subprocess

    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "comfy_versions.py"), "--comfyui", COMFY, "--size", "tiny",
                    "--frames", "6", "--warmup-frames", "3", "--width", "32", "--height", "32", "--fused", "off",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    (tree,) = json.loads(out.read_text())["trees"]
    gf_row, core_row = tree["rows"]
    assert gf_row["sampler"] == "gf_sampler_grounded" and gf_row["latent_shape"] == [1, 16, 6, 4, 4]
    assert gf_row["finite"] and gf_row["seconds"] > 0 and gf_row["pixel_frames"] == 21
    if importlib.util.find_spec("comfy.ldm.wan.ar_model") is None:
        assert gf_row["model_class"] == "WanModel" and "no ar_video sampler" in core_row["skipped"]
    else:
        assert gf_row["model_class"] == core_row["model_class"] == "CausalWanModel"
        assert core_row["latent_shape"] == [1, 16, 6, 4, 4] and core_row["finite"] and core_row["seconds"] > 0


# ---------------------------------------------------------------------------------------------
# adapters called directly


def test_sampler_validates_before_loading_the_model(host, monkeypatch):
    import comfy.model_management as mm
    import comfy.sd
    prompts = _pack(host, "prompts")

    loads = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: loads.append(a))
    model = comfy.sd.load_diffusion_model_state_dict(_tiny_wan())
    segments = prompts.add_segment(None, torch.zeros(1, 8, 4096), 6)
    sampler = host.nodes.NODE_CLASS_MAPPINGS["GFSampler"]
    args = {"model": model, "memory": _grounded(host), "segments": segments, "seed": 0, "batch_size": 1,
            "noise_order": "chunk"}
    with pytest.raises(ValueError, match="width 40 is not a multiple of 16; use "):
        sampler.execute(width=40, height=32, **args)
    with pytest.raises(ValueError, match="holds at most 21 latent frames"):
        sampler.execute(width=32, height=32, **{**args, "memory": host.nodes.NODE_CLASS_MAPPINGS["GFSelfForcingMemory"].execute(21).args[0],
                                                "segments": prompts.add_segment(None, torch.zeros(1, 8, 4096), 30)})
    assert loads == []


def test_timeline_node_encodes_each_line_with_the_clip(host):
    class FakeClip:
        def __init__(self):
            self.texts = []

        def tokenize(self, text):
            self.texts.append(text)
            return {"text": text}

        def encode_from_tokens_scheduled(self, tokens):
            return [[torch.full((1, 600, 4096), float(len(self.texts))), {"pooled_output": None}]]

    clip = FakeClip()
    node = host.nodes.NODE_CLASS_MAPPINGS["GFPromptTimeline"]
    segments = node.execute(clip=clip, script="5s | one\ncut +2s | two").args[0]
    assert clip.texts == ["one", "two"]
    assert [(s.frames, s.transition.kind, tuple(s.prompt.shape)) for s in segments] == \
        [(20, "default", (1, 512, 4096)), (8, "cut", (1, 512, 4096))]
    with pytest.raises(ValueError, match="line 2: unknown word 'fade'"):
        node.execute(clip=clip, script="5s | one\nfade 2s | two")


def test_fp8_weights_sample_in_the_manual_cast_dtype(host):
    prompts = _pack(host, "prompts")

    nodes = host.nodes.NODE_CLASS_MAPPINGS
    model = nodes["GFLoadCausalWanModel"].execute(model_name=TINY_MODEL, weights="ema", lora_name="none",
                                                  lora_strength=1.0, weight_dtype="fp8_e4m3fn").args[0]
    assert model.model.get_dtype() == torch.float8_e4m3fn and model.model.manual_cast_dtype is not None
    segments = prompts.add_segment(None, torch.randn(1, 16, 4096, generator=torch.Generator().manual_seed(0)), 6)
    out = nodes["GFSampler"].execute(model=model, memory=_grounded(host), segments=segments, width=32,
                                     height=32, seed=0, batch_size=1, noise_order="chunk")
    latents = out.args[0]["samples"]
    assert latents.shape == (1, 16, 6, 4, 4) and torch.isfinite(latents).all()


def test_bf16_model_without_manual_cast_runs_as_on_a_gpu(host, monkeypatch):
    """On a GPU with bf16, ComfyUI builds the model without manual casting (its patch embedding stays
    float32); force that on CPU, where ComfyUI would otherwise compute in float32."""
    import comfy.model_management as mm
    import comfy.sd
    prompts = _pack(host, "prompts")

    monkeypatch.setattr(mm, "unet_manual_cast", lambda *a, **k: None)
    model = comfy.sd.load_diffusion_model_state_dict(_tiny_wan(), model_options={"dtype": torch.bfloat16})
    assert model.model.manual_cast_dtype is None and model.model.get_dtype() == torch.bfloat16
    assert model.model.diffusion_model.patch_embedding.weight.dtype == torch.float32
    segments = prompts.add_segment(None, torch.randn(1, 16, 4096, generator=torch.Generator().manual_seed(0)), 6)
    out = host.nodes.NODE_CLASS_MAPPINGS["GFSampler"].execute(
        model=model, memory=_grounded(host), segments=segments, width=32, height=32, seed=0, batch_size=1,
        noise_order="chunk")
    latents = out.args[0]["samples"]
    assert latents.shape == (1, 16, 6, 4, 4) and torch.isfinite(latents).all()


def _fused_and_unfused(host, weight_dtype: str, segments) -> list[torch.Tensor]:
    """GF Sampler's latents with fused "off", then "on", for the tiny model stored in ``weight_dtype``."""
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    model = nodes["GFLoadCausalWanModel"].execute(model_name=TINY_MODEL, weights="ema", lora_name="none",
                                                  lora_strength=1.0, weight_dtype=weight_dtype).args[0]
    return [nodes["GFSampler"].execute(model=model, memory=_grounded(host), segments=segments, width=32,
                                       height=32, seed=0, batch_size=1, noise_order="chunk",
                                       fused=fused).args[0]["samples"] for fused in ("off", "on")]


def test_fused_sampler_through_comfyui_modules_equals_unfused(host):
    """``fused`` compiles ComfyUI's own WanModel blocks (its cast-on-the-fly layers) too."""
    prompts = _pack(host, "prompts")

    g = torch.Generator().manual_seed(0)
    segments = prompts.add_segment(None, torch.randn(1, 16, 4096, generator=g), 9)
    segments = prompts.add_segment(segments, torch.randn(1, 16, 4096, generator=g), 6,
                                   prompts.make_transition("apr", 0.8, 0.0))
    outs = _fused_and_unfused(host, "default", segments)
    assert torch.allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5), float((outs[1] - outs[0]).abs().max())


def test_fused_sampler_with_fp8_weights_equals_unfused(host):
    """fp8 storage: ComfyUI's layers cast their weights per call, inside the compiled graph too."""
    prompts = _pack(host, "prompts")

    segments = prompts.add_segment(None, torch.randn(1, 16, 4096, generator=torch.Generator().manual_seed(0)), 6)
    outs = _fused_and_unfused(host, "fp8_e4m3fn", segments)
    assert torch.allclose(outs[1], outs[0], atol=1e-4, rtol=1e-4), float((outs[1] - outs[0]).abs().max())


def test_plain_wan_takes_the_weights_the_patcher_applied(host):
    """Fused runs compile plain modules holding what core's layers compute with: a patch core's
    patcher applied (here a LoRA-style diff) is in; a weight already on the device is shared."""
    import comfy.model_management as mm
    import comfy.sd
    from grounded_forcing.nodes.comfy_model import plain_wan

    sd = _tiny_wan()
    key = "blocks.1.self_attn.q.weight"
    diff = torch.randn(256, 256, generator=torch.Generator().manual_seed(4)) * 0.1
    model = comfy.sd.load_diffusion_model_state_dict(_tiny_wan()).clone()
    model.add_patches({f"diffusion_model.{key}": (diff,)}, 0.5)
    mm.load_models_gpu([model])
    plain = plain_wan(model, model.load_device, torch.float32)
    assert isinstance(plain, gf.WanModel)
    weights = plain.state_dict()
    assert set(weights) == set(sd)
    assert torch.allclose(weights[key], sd[key] + 0.5 * diff, atol=1e-6)
    assert all(torch.equal(weights[k], sd[k]) for k in sd if k != key)
    held = model.model.diffusion_model.blocks[0].ffn[0].weight
    assert plain.blocks[0].ffn[0].weight.data_ptr() == held.data_ptr()


def test_fused_blocks_compile_where_core_layers_cannot_be_traced(host, monkeypatch):
    """Under dynamic VRAM (comfy-aimdo, ComfyUI's default on NVIDIA GPUs) core's layers page their
    weights in through ctypes calls, which torch.compile cannot trace. A ctypes call in core's Linear
    stands in for that on a CPU: core's layer no longer compiles, GF Sampler's fused run still does."""
    import ctypes

    import comfy.ops
    prompts = _pack(host, "prompts")

    libc = ctypes.CDLL(None)
    forward = comfy.ops.disable_weight_init.Linear.forward

    def paged_forward(self, *args, **kwargs):
        libc.getpid()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(comfy.ops.disable_weight_init.Linear, "forward", paged_forward)
    layer = comfy.ops.manual_cast.Linear(8, 8)
    layer.weight, layer.bias = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(Exception) as info:
        torch.compile(layer, fullgraph=True)(torch.randn(2, 8))
    assert type(info.value).__name__ == "Unsupported"
    segments = prompts.add_segment(None, torch.randn(1, 16, 4096, generator=torch.Generator().manual_seed(6)), 6)
    outs = _fused_and_unfused(host, "default", segments)
    assert torch.allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5), float((outs[1] - outs[0]).abs().max())


def test_fused_sampler_refuses_complex128_rope_before_loading(host):
    prompts = _pack(host, "prompts")

    nodes = host.nodes.NODE_CLASS_MAPPINGS
    model = nodes["GFLoadCausalWanModel"].execute(model_name=TINY_MODEL, weights="ema", lora_name="none",
                                                  lora_strength=1.0, weight_dtype="default").args[0]
    model = nodes["GFDRRoPE"].execute(model=model, mode="dr_rope", rope_range=21, layout="pinned_end",
                                      precision="complex128").args[0]
    segments = prompts.add_segment(None, torch.randn(1, 16, 4096), 6)
    with pytest.raises(ValueError, match="fused blocks rotate in float32, but GF DR-RoPE asks for complex128"):
        nodes["GFSampler"].execute(model=model, memory=_grounded(host), segments=segments, width=32,
                                   height=32, seed=0, batch_size=1, noise_order="chunk", fused="on")
