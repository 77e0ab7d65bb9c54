"""The nodes' logic on CPU without ComfyUI: every node's plain functions on tiny inputs."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from grounded_forcing import gf_core as gf
from grounded_forcing.gf_core.checkpoints import CheckpointError
from grounded_forcing.gf_core.errors import BadInput
from grounded_forcing.gf_core.latents import to_normalised, to_raw
from grounded_forcing.gf_core.policies import (
    anchor_forcing,
    context_forcing,
    grounded,
    infinity_rope,
    longlive,
    self_forcing,
)
from grounded_forcing.nodes import loading, policy, prompts, sampling
from helpers import fail_compiling
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
TEXT_DIM = 64


def cond(rows: int, value: float = 1.0, dim: int = 4096) -> list:
    """A CONDITIONING as ComfyUI's CLIPTextEncode returns it: [[tensor [1, rows, dim], {...}]]."""
    return [[torch.full((1, rows, dim), value), {"pooled_output": None}]]


# ---------------------------------------------------------------------------------------------
# Durations, conditioning, segments


@pytest.mark.parametrize("duration, unit, frames", [
    (5, "seconds", 20), (60, "seconds", 240), (1.1, "seconds", 4), (0.75, "seconds", 3), (0.25, "seconds", 3),
    (21, "latent frames", 21), (3, "latent frames", 3),
])
def test_duration_to_latent_frames(duration, unit, frames):
    assert prompts.latent_frames(duration, unit) == frames


@pytest.mark.parametrize("duration, unit, message", [
    (2, "latent frames", "shorter than one chunk"),
    (4.5, "latent frames", "not a whole number"),
    (0, "seconds", "not a positive number"),
    (5, "minutes", "unknown duration unit"),
])
def test_duration_errors(duration, unit, message):
    with pytest.raises(ValueError, match=message):
        prompts.latent_frames(duration, unit)


def test_conditioning_is_truncated_to_512_rows():
    long = cond(600)
    long[0][0][:, 512:] = 7.0
    emb = prompts.prompt_embedding(long)
    assert emb.shape == (1, 512, 4096) and bool((emb == 1.0).all())
    assert prompts.prompt_embedding(cond(77)).shape == (1, 77, 4096)
    with pytest.raises(ValueError, match="conditioning is empty"):
        prompts.prompt_embedding([])
    with pytest.raises(ValueError, match="no \\[1, L, 4096\\] text embedding"):
        prompts.prompt_embedding([[torch.zeros(4096), {}]])


def test_segments_chain_without_mutating_the_previous():
    first = prompts.add_segment(None, torch.zeros(1, 8, 16), 20)
    second = prompts.add_segment(first, torch.ones(1, 8, 16), 16, prompts.make_transition("apr", 0.5, 4))
    third = prompts.add_segment(second, torch.ones(1, 8, 16), 12, prompts.cut())
    assert len(first) == 1 and len(second) == 2 and len(third) == 3
    assert [s.frames for s in third] == [20, 16, 12]
    assert [s.transition.kind for s in third] == ["default", "apr", "cut"]
    assert third[1].transition.alpha_max == 0.5 and third[1].transition.proximity_window == 4
    with pytest.raises(ValueError, match="nothing to switch from"):
        prompts.add_segment(None, torch.zeros(1, 8, 16), 20, prompts.cut())


def test_transitions():
    assert prompts.make_transition("apr", 0.8, 0).proximity_window is None  # 0 = the LTM size
    assert prompts.make_transition("hard") == gf.Transition("hard")
    assert prompts.make_transition("none") == gf.Transition("none")
    with pytest.raises(ValueError, match="unknown transition mode 'fade'"):
        prompts.make_transition("fade")
    with pytest.raises(ValueError, match="alpha_max 1.5 is outside"):
        prompts.make_transition("apr", 1.5)


# ---------------------------------------------------------------------------------------------
# Timeline script

SCRIPT = """\
# a story in four segments
5s | a cat walks through a garden

+4s apr(0.8,6) | the cat starts running | fast
cut 6s | a new scene: a dog sleeps by the fire
20f hard | the dog wakes up
apr(0.5) 1s | the dog yawns
none +3f | the dog sleeps again
"""


def test_timeline_grammar_parses_every_form():
    lines = prompts.parse_script(SCRIPT)
    assert [ln.line for ln in lines] == [2, 4, 5, 6, 7, 8]
    assert [ln.frames for ln in lines] == [20, 16, 24, 20, 4, 3]
    assert lines[0].transition is None
    assert lines[1].transition == gf.Transition("apr", alpha_max=0.8, proximity_window=6.0)
    assert lines[1].text == "the cat starts running | fast"  # only the first '|' separates
    assert lines[2].transition == gf.Transition("cut")
    assert lines[3].transition == gf.Transition("hard")
    assert lines[4].transition == gf.Transition("apr", alpha_max=0.5)
    assert lines[5].transition == gf.Transition("none")
    assert lines[2].text == "a new scene: a dog sleeps by the fire"


@pytest.mark.parametrize("script, message", [
    ("5s | a\n4s a cat", "line 2: no '\\|'"),
    ("5s | a\n\n| a cat", "line 3: no duration"),
    ("5s 4s | a", "line 1: two durations"),
    ("5s | a\n4s fade | b", "line 2: unknown word 'fade'"),
    ("5s | a\n4s cut hard | b", "line 2: two transitions"),
    ("cut 5s | a", "line 1: the first segment has a 'cut' transition"),
    ("5s | a\n# c\n4s apr(1.5) | b", "line 3: alpha_max 1.5 is outside"),
    ("5s | a\n4s apr(0.8, 6, 2) | b", "line 2: 'apr\\(0.8, 6, 2\\)' has 3 numbers"),
    ("5s | a\n4s apr(x) | b", "line 2: 'apr\\(x\\)' holds something that is not a number"),
    ("5s | a\n2f | b", "line 2: duration 2 latent frames is shorter than one chunk"),
    ("5s |   ", "line 1: the prompt after '\\|' is empty"),
    ("# only a comment\n\n", "has no segments"),
])
def test_timeline_errors_name_the_line(script, message):
    with pytest.raises(ValueError, match=message):
        prompts.parse_script(script)


def test_timeline_encodes_every_line():
    encoded = []

    def encode(text):
        encoded.append(text)
        return cond(600, float(len(encoded)))

    segments = prompts.timeline("5s | one\n+3s apr | two\ncut 12f | three", encode)
    assert encoded == ["one", "two", "three"]
    assert [s.frames for s in segments] == [20, 12, 12]
    assert [s.transition.kind for s in segments] == ["default", "apr", "cut"]
    assert all(s.prompt.shape == (1, 512, 4096) for s in segments)
    assert [float(s.prompt[0, 0, 0]) for s in segments] == [1.0, 2.0, 3.0]


def test_timeline_reports_grammar_errors_before_encoding():
    calls = []
    with pytest.raises(ValueError, match="line 2"):
        prompts.timeline("5s | one\n5s oops | two", lambda text: calls.append(text) or cond(8))
    assert calls == []


# ---------------------------------------------------------------------------------------------
# Memory and the RoPE patch


def test_fixed_index_rules_keep_their_indices_under_the_rope_patch():
    """A policy whose index rule is the method (the capability, not the preset's name) keeps it."""
    for preset in (infinity_rope, context_forcing, anchor_forcing):
        memory = preset()
        assert memory.fixed_index_rule
        assert policy.apply_rope(memory, policy.RopeOptions(precision="complex128", rope_range=30)) == \
            (memory, "complex128")
        with pytest.raises(BadInput, match=f"the '{memory.name}' memory places its own bounded RoPE indices"):
            policy.apply_rope(memory, policy.RopeOptions(mode="absolute"))
    renamed = dataclasses.replace(anchor_forcing(), name="grounded")
    assert policy.apply_rope(renamed, policy.RopeOptions(rope_range=30))[0] == renamed
    fixed = dataclasses.replace(gf.grounded(), fixed_index_rule=True)
    assert policy.apply_rope(fixed, policy.RopeOptions(layout="after_gcm"))[0] == fixed
    assert not any(p().fixed_index_rule for p in (gf.grounded, gf.longlive, gf.self_forcing))


# The memory nodes themselves import ComfyUI's comfy_api: run with GF_COMFYUI_PATH and the ComfyUI Python.
MEMORY_NODES = {  # node id -> (its inputs in order, the preset its execute calls)
    "GFDualMemory": (("gcm_frames", "ltm_frames", "gcm_update", "alpha_max", "d_window"), grounded),
    "GFLongLiveMemory": (("sink_frames", "window_frames", "global_sink"), longlive),
    "GFSelfForcingMemory": (("cache_frames",), self_forcing),
    "GFInfinityRoPEMemory": (("sink_frames", "window_frames", "flush_keep", "cut_index"), infinity_rope),
    "GFAnchorForcingMemory": (("sink_frames", "window_frames"), anchor_forcing),
    "GFContextForcingMemory": (("sink_frames", "slow_frames", "fast_frames", "tau", "promote_every"), context_forcing),
}


@pytest.fixture(scope="module")
def memory_nodes():
    comfy = os.environ.get("GF_COMFYUI_PATH")
    if not comfy:
        pytest.skip("set GF_COMFYUI_PATH to a ComfyUI checkout (and use its Python) to test the memory nodes")
    if comfy not in sys.path:
        sys.path.insert(0, comfy)
    try:
        import comfy.cli_args as cli

        cli.args.cpu = True
        from grounded_forcing.nodes import memory_nodes
    except ImportError as e:
        pytest.skip(f"ComfyUI does not import with this Python ({e}); run with the ComfyUI venv's Python")
    return memory_nodes


def test_each_memory_node_has_only_its_own_inputs(memory_nodes):
    from grounded_forcing.nodes.extension import NODES

    assert set(MEMORY_NODES) <= {n.GET_SCHEMA().node_id for n in NODES}
    for node_id, (inputs, preset) in MEMORY_NODES.items():
        node = getattr(memory_nodes, node_id)
        schema = node.GET_SCHEMA()
        assert schema.node_id == node_id and schema.display_name.startswith("GF ") and schema.description
        assert tuple(i.id for i in schema.inputs) == inputs
        assert all(i.tooltip and not i.optional for i in schema.inputs), node_id
        assert [o.io_type for o in schema.outputs] == ["GF_MEMORY"]
        assert tuple(inspect.signature(node.execute).parameters) == inputs
        assert node.execute(**{i.id: i.default for i in schema.inputs}).result == (preset(),)


def test_memory_nodes_call_their_presets(memory_nodes):
    m = memory_nodes
    g = m.GFDualMemory.execute(4, 8, "every_frame", 0.6, 10).result[0]
    assert g == grounded(gcm_frames=4, ltm_frames=8, candidates="every_frame", alpha_max=0.6, proximity_window=10)
    assert m.GFDualMemory.execute(3, 8, "after_switch", 0.8, 0.0).result[0].window == 8  # D_window 0 = W
    ll = m.GFLongLiveMemory.execute(3, 15, False).result[0]
    assert (ll.region("local").frames, ll.recache.frames, ll.recache.global_sink) == (9, 15, False)
    assert m.GFSelfForcingMemory.execute(30).result[0].max_frames == 30
    ir = m.GFInfinityRoPEMemory.execute(2, 10, 3, 40).result[0]
    assert ([r.frames for r in ir.regions], ir.flush_keep, ir.cut.index) == ([2, 5], 3, 40)
    cf = m.GFContextForcingMemory.execute(2, 8, 9, 0.9, 1).result[0]
    assert ([r.frames for r in cf.regions], cf.rope_range, cf.promotion.tau, cf.promotion.every) == ([2, 8, 6], 19, 0.9, 1)
    af = m.GFAnchorForcingMemory.execute(2, 15).result[0]
    assert ([r.frames for r in af.regions], af.junction.index, af.recache.frames) == ([2, 3, 10], 3, 15)


@pytest.mark.parametrize("node_id, args, message", [
    ("GFDualMemory", (12, 8, "after_switch", 0.8, 0.0), "gcm 12 \\+ ltm 8 \\+ chunk 3 = 23 frames do not fit the RoPE range of 21"),
    ("GFDualMemory", (3, 6, "after_switch", 0.8, 0.5), "D_window 0.5 is below 1 frame"),
    ("GFLongLiveMemory", (3, 6, True), "memory region 'local' of the 'longlive' policy holds 0 frames"),
    ("GFInfinityRoPEMemory", (2, 5, 2, 45), "memory region 'window' of the 'infinity_rope' policy holds 0 frames"),
    ("GFContextForcingMemory", (3, 12, 3, 0.95, 2), "memory region 'fast' of the 'context_forcing' policy holds 0"),
    ("GFContextForcingMemory", (3, 12, 6, 2.0, 2), "tau 2.0 is outside"),
    ("GFAnchorForcingMemory", (3, 19), "the junction at temporal indices -1..1 leaves the RoPE range of 21"),
])
def test_memory_nodes_refuse_through_the_policys_validation(memory_nodes, node_id, args, message):
    with pytest.raises(ValueError, match=message):
        getattr(memory_nodes, node_id).execute(*args)


def test_rope_patch_applies_to_the_policy():
    memory = gf.grounded()
    assert policy.apply_rope(memory, None) == (memory, "float32")
    absolute, kind = policy.apply_rope(memory, policy.RopeOptions(mode="absolute", precision="complex128"))
    assert (absolute.index_rule, absolute.rope_range, kind) == ("absolute", None, "complex128")
    wide, _ = policy.apply_rope(memory, policy.RopeOptions(rope_range=30, layout="after_gcm"))
    assert (wide.index_rule, wide.rope_range) == ("after_gcm", 30)
    dr, _ = policy.apply_rope(gf.longlive(), policy.RopeOptions())
    assert (dr.index_rule, dr.rope_range) == ("pinned_end", 21)
    with pytest.raises(ValueError, match="do not fit the RoPE range of 10"):
        policy.apply_rope(memory, policy.RopeOptions(rope_range=10))
    with pytest.raises(ValueError, match="unknown RoPE mode"):
        policy.RopeOptions(mode="yarn")
    with pytest.raises(ValueError, match="unknown DR-RoPE layout"):
        policy.RopeOptions(layout="middle")


def test_rope_patch_travels_in_model_options():
    options = {"transformer_options": {"other": 1}}
    assert policy.rope_options(options) is None
    rope = policy.RopeOptions(rope_range=24)
    policy.with_rope(options, rope)
    assert policy.rope_options(options) == rope and options["transformer_options"]["other"] == 1
    empty: dict = {}
    policy.with_rope(empty, rope)
    assert policy.rope_options(empty) == rope


# ---------------------------------------------------------------------------------------------
# Loading


def test_loader_options():
    assert loading.model_options("default") == {}
    assert loading.model_options("bf16") == {"dtype": torch.bfloat16}
    assert loading.model_options("fp16") == {"dtype": torch.float16}
    assert "fp8_e4m3fn" in loading.weight_dtypes()
    with pytest.raises(ValueError, match="unknown weight dtype 'int4'"):
        loading.model_options("int4")


def test_loader_reads_a_checkpoint_and_merges_a_lora(tmp_path):
    cfg = gf.WanConfig.tiny(layers=1, text_dim=TEXT_DIM)
    sd = gf.random_state_dict(cfg)
    model_file = tmp_path / "model.pt"
    torch.save({"generator": {"model." + k: v + 1 for k, v in sd.items()},
                "generator_ema": {"model." + k: v for k, v in sd.items()}}, model_file)
    a, b = torch.randn(4, cfg.dim), torch.randn(cfg.dim, 4)
    lora_file = tmp_path / "lora.safetensors"
    save_file({"base_model.model.blocks.0.self_attn.q.lora_A.weight": a,
               "base_model.model.blocks.0.self_attn.q.lora_B.weight": b}, lora_file)

    ema = loading.read_state_dict(str(model_file), "ema")
    assert torch.equal(ema["head.modulation"], sd["head.modulation"])
    generator = loading.read_state_dict(str(model_file), "generator")
    assert torch.equal(generator["head.modulation"], sd["head.modulation"] + 1)
    merged = loading.read_state_dict(str(model_file), "ema", str(lora_file), 0.5)
    key = "blocks.0.self_attn.q.weight"
    assert torch.allclose(merged[key], sd[key] + 0.5 * b @ a, atol=1e-5)
    assert torch.equal(loading.read_state_dict(str(model_file), "ema", str(lora_file), 0.0)[key], sd[key])
    with pytest.raises(CheckpointError, match="lora.safetensors"):
        loading.read_state_dict(str(lora_file))
    with pytest.raises(ValueError, match="unknown weights"):
        loading.read_state_dict(str(model_file), "critic")


# ---------------------------------------------------------------------------------------------
# Sampler logic on a tiny gf_core.WanModel


@pytest.fixture(scope="module")
def tiny_model():
    cfg = gf.WanConfig.tiny(text_dim=TEXT_DIM)
    return gf.WanModel.from_state_dict(gf.random_state_dict(cfg, seed=3))


def story(frames=(6, 6, 6)) -> tuple:
    g = torch.Generator().manual_seed(0)
    segments = None
    transitions = (None, prompts.make_transition("apr", 0.8, 0), prompts.cut())
    for n, t in zip(frames, transitions):
        emb = prompts.prompt_embedding([[torch.randn(1, 8, TEXT_DIM, generator=g), {}]])
        segments = prompts.add_segment(segments, emb, n, t)
    return segments


def test_sampler_logic_makes_raw_latents_and_an_event_log(tiny_model):
    segments = story()
    memory = gf.grounded()
    progress, checks = [], []
    result = sampling.sample(tiny_model, segments, memory, sampling.run_config(32, 48, 5, 1),
                             on_chunk=lambda i, total, chunk: progress.append((i, total, chunk.latents.shape[2])),
                             between_chunks=lambda: checks.append(1))
    assert result.latents.shape == (1, 16, 18, 6, 4) and result.latents.dtype == torch.float32
    assert progress == [(i, 6, 3) for i in range(6)] and len(checks) == 5
    # LATENT holds raw Wan latents: normalising them gives exactly what the engine made
    reference = gf.generate(tiny_model, list(segments), memory, width=32, height=48, seed=5)
    assert torch.allclose(to_normalised(result.latents), reference.latents, atol=1e-5)
    lines = [json.loads(line) for line in result.log.splitlines()]
    assert len(lines) == 7
    run = lines[0]["run"]
    assert (run["memory"], run["chunks"], run["latent_frames"], run["pixel_frames"]) == ("grounded", 6, 18, 69)
    assert [s["transition"] for s in run["segments"]] == ["default", "apr", "cut"]
    switches = [e["switch"]["kind"] for e in lines[1:] if e["switch"]]
    assert switches == ["apr", "cut"]
    assert lines[1:] == json.loads(json.dumps(result.events))


def test_raw_and_normalised_latents_round_trip():
    x = torch.randn(2, 16, 3, 4, 5)
    assert torch.allclose(to_normalised(to_raw(x)), x, atol=1e-6)
    assert not torch.allclose(to_raw(x), x)


def test_sampler_applies_the_rope_patch(tiny_model):
    segments = story((18, 6, 6))
    bounded, kind = policy.apply_rope(gf.grounded(), policy.RopeOptions(rope_range=14))
    absolute, _ = policy.apply_rope(gf.grounded(), policy.RopeOptions(mode="absolute"))
    run = sampling.sample(tiny_model, segments[:1], bounded, sampling.run_config(32, 32, 0, 1, rope_kind=kind))
    queries = [e["rope"]["query"] for e in run.events]
    assert max(max(q) for q in queries) == 13  # the chunk pinned to the end of the range of 14
    run = sampling.sample(tiny_model, segments[:1], absolute, sampling.run_config(32, 32, 0, 1))
    assert [e["rope"]["query"] for e in run.events][-1] == [15, 16, 17]


def test_sampler_checks_before_running(tiny_model):
    segments = story()
    memory = gf.grounded()
    def config(width=32, height=32, batch=1, noise_order="reference"):
        return sampling.run_config(width, height, 0, batch, noise_order)

    with pytest.raises(ValueError, match="width 830 is not a multiple of 16; use 832"):
        sampling.check(tiny_model, segments, memory, config(830, 480))
    with pytest.raises(ValueError, match="batch size 2 with the GCM diversity update"):
        sampling.check(tiny_model, segments, memory, config(batch=2))
    sampling.check(tiny_model, segments, gf.grounded(candidates="frozen"), config(batch=2))
    with pytest.raises(ValueError, match="unknown noise order"):
        sampling.check(tiny_model, segments, memory, config(noise_order="random"))
    with pytest.raises(ValueError, match="holds at most 21 latent frames"):
        sampling.check(tiny_model, story((12, 6, 6)), gf.self_forcing(), config())
    wrong_text = prompts.add_segment(None, torch.zeros(1, 8, 4096), 6)
    with pytest.raises(ValueError, match="segment 1: prompt embedding of shape"):
        sampling.check(tiny_model, wrong_text, memory, config())
    i2v = gf.WanModel(gf.WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, text_dim=TEXT_DIM, in_dim=36))
    with pytest.raises(ValueError, match="takes 36 latent channels"):
        sampling.check(i2v, segments, memory, config())
    with pytest.raises(ValueError, match="not a Wan2.1 DiT"):
        sampling.check(torch.nn.Linear(2, 2), segments, memory, config())


def test_interrupted_run_keeps_the_finished_chunks(tiny_model, tmp_path):
    class Stop(Exception):
        pass

    calls = []

    def between():
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    saved = {}

    def keep(latents, events):
        saved["path"] = sampling.write_partial(str(tmp_path), latents, events)
        saved["latents"] = latents
        return saved["path"]

    with pytest.raises(Stop):
        sampling.sample(tiny_model, story(), gf.grounded(), sampling.run_config(32, 32, 0, 1),
                        between_chunks=between, keep_partial=keep)
    assert saved["latents"].shape[2] == 6  # two finished chunks
    with safe_open(saved["path"], "pt") as f:
        assert torch.equal(f.get_tensor("latent_tensor"), saved["latents"])
        assert "latent_format_version_0" in set(f.keys())  # core's Load Latent reads it unscaled
        events = [json.loads(x) for x in f.metadata()["grounded_forcing_events"].splitlines()]
    assert [e["chunk"] for e in events] == [0, 1]


@pytest.mark.parametrize("stop_in", ["between_chunks", "on_chunk"])
def test_a_cancel_with_overlap_keeps_every_finished_chunk(tiny_model, tmp_path, stop_in):
    """Handed out one chunk late (overlap, as on a GPU), a stop from either callback still keeps the
    chunk the GPU finished meanwhile: every chunk made is saved."""
    import dataclasses

    class Stop(Exception):
        pass

    made, seen = [], []
    hook = tiny_model.head.head.register_forward_hook(lambda *_: made.append(1))  # once per denoising step

    def stop_at_second(*_):
        seen.append(1)
        if len(seen) == 2:
            raise Stop

    saved = {}

    def keep(latents, events):
        saved["latents"], saved["events"] = latents, events
        return sampling.write_partial(str(tmp_path), latents, events)

    config = dataclasses.replace(sampling.run_config(32, 32, 0, 1), overlap=True)
    callbacks = {"between_chunks": stop_at_second} if stop_in == "between_chunks" else {"on_chunk": stop_at_second}
    try:
        with pytest.raises(Stop):
            sampling.sample(tiny_model, story(), gf.grounded(), config, keep_partial=keep, **callbacks)
    finally:
        hook.remove()
    chunks_made = len(made) // 4
    assert chunks_made == 3 and saved["latents"].shape[2] == 3 * chunks_made
    assert [e["chunk"] for e in saved["events"]] == [0, 1, 2]


def test_partial_files_never_overwrite_each_other(tmp_path):
    latents = torch.zeros(1, 16, 3, 4, 4)
    paths = {sampling.write_partial(str(tmp_path), latents + i, [{"chunk": i}]) for i in range(3)}
    assert len(paths) == 3 and len(list(tmp_path.iterdir())) == 3  # the same second, three files
    with safe_open(sorted(paths)[-1], "pt") as f:
        assert f.get_tensor("latent_tensor").shape == (1, 16, 3, 4, 4)


def test_a_failure_while_saving_is_reported_with_the_original_cause(tiny_model, caplog):
    class Stop(Exception):
        pass

    def between():
        raise Stop("cancelled")

    def full_disk(latents, events):
        raise OSError(28, "No space left on device")

    with pytest.raises(Stop) as info, caplog.at_level("ERROR"):
        sampling.sample(tiny_model, story(), gf.grounded(), sampling.run_config(32, 32, 0, 1),
                        between_chunks=between, keep_partial=full_disk)
    assert any("saving the 3 finished latent frames failed too: OSError" in n for n in info.value.__notes__)
    assert "No space left on device" in caplog.text


# ---------------------------------------------------------------------------------------------
# Workflows (structure; the ComfyUI host tests convert and validate them)


def pack_node_ids() -> set[str]:
    return {m for p in (REPO / "nodes").glob("*_nodes.py") for m in re.findall(r'node_id="(GF\w+)"', p.read_text())}


def test_pack_declares_every_node():
    assert pack_node_ids() == {"GFLoadCausalWanModel", "GFDualMemory", "GFLongLiveMemory", "GFSelfForcingMemory",
                               "GFInfinityRoPEMemory", "GFAnchorForcingMemory", "GFContextForcingMemory", "GFDRRoPE",
                               "GFPromptSegment", "GFAPRTransition", "GFCut", "GFPromptTimeline", "GFSampler", "GFStreamDecode",
                               "GFEventTimeline", "GFToyWorldModel", "GFToyWorldPrompt", "GFToyWorldTimeline",
                               "GFToyWorldDecode", "GFToyWorldTextEncoder", "GFLiveSampler"}


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_workflow_links_are_consistent(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id and kind == nodes[src]["outputs"][src_slot]["type"]
        assert target["type"] in (kind, "*")
    gf_types = {n["type"] for n in wf["nodes"] if n["type"].startswith("GF")}
    assert gf_types and gf_types <= pack_node_ids()
    notes = " ".join(" ".join(map(str, n.get("widgets_values", []))) for n in wf["nodes"] if "Note" in n["type"])
    for loader in (n for n in wf["nodes"] if n["type"] in ("GFLoadCausalWanModel", "CLIPLoader", "VAELoader")):
        assert loader["widgets_values"][0] in notes  # the Note says which file and where to get it


def test_memory_estimate_counts_the_in_place_value_slots():
    from grounded_forcing.gf_core.config import parameter_count

    cfg = gf.WanConfig()
    memory = gf.grounded()
    config = sampling.run_config(832, 480, 0, 1)
    plain = gf.estimate_memory(cfg, memory, config, torch.bfloat16)
    in_place = gf.estimate_memory(cfg, memory, config, torch.bfloat16, read_in_place=True)
    # three frames of values in every block: 30 x 3 x 1560 tokens x 1536 x 2 bytes
    assert in_place.cache - plain.cache == 30 * 3 * 1560 * 1536 * 2
    params = parameter_count(cfg)
    assert 1.3e9 < params < 1.5e9 and plain.weights == 2 * params  # the 1.3B model in bf16
    assert gf.estimate_memory(cfg, memory, config, torch.bfloat16, weight_bytes=7).weights == 7


def test_fused_auto_is_on_only_where_it_can_run(monkeypatch):
    import importlib.util

    from grounded_forcing.gf_core.kernels import resolve

    real = importlib.util.find_spec
    assert resolve("auto", torch.device("cpu"), "float32") == "eager"
    assert resolve("fused", torch.device("cpu"), "float32") == "fused"
    assert resolve("eager", torch.device("cuda"), "float32") == "eager"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    assert resolve("auto", torch.device("cuda"), "float32") == "fused"
    assert resolve("auto", torch.device("cuda"), "complex128") == "eager"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert resolve("auto", torch.device("cuda"), "float32") == "eager"
    with pytest.raises(ValueError, match="unknown fused setting 'yes'; use one of auto, on, off"):
        sampling.run_config(32, 32, 0, 1, fused="yes")


def test_fused_auto_samples_uncompiled_where_compiling_fails(tiny_model, monkeypatch, caplog):
    """"auto" never costs a run: when the blocks cannot be compiled, the same blocks run uncompiled."""
    import grounded_forcing.gf_core.kernels as kernels

    fail_compiling(monkeypatch, kernels, "torch._inductor.exc")
    monkeypatch.setattr(kernels, "resolve", lambda setting, device, rope_kind: "eager" if setting == "eager" else "fused")
    segments, memory = story(), gf.grounded()
    plain = sampling.sample(tiny_model, segments, memory, sampling.run_config(32, 32, 2, 1, fused="off"))
    with caplog.at_level("WARNING"):
        auto = sampling.sample(tiny_model, segments, memory, sampling.run_config(32, 32, 2, 1, fused="auto"))
    assert "could not be compiled here (BackendCompilerFailed)" in caplog.text
    torch.testing.assert_close(auto.latents, plain.latents, atol=1e-4, rtol=1e-4)
    assert auto.header["run"]["fused"] is False
    with pytest.raises(kernels.CompileError):
        sampling.sample(tiny_model, segments, memory, sampling.run_config(32, 32, 2, 1, fused="on"))
