"""gf_core.convert: research checkpoints written in their exact layouts, converted to one safetensors
file and read back bit for bit; refusals; and (with ``GF_COMFYUI_PATH``) core's Load Diffusion Model
reading a converted file, as ``CausalWanModel`` where the ComfyUI has one and the file asks for it::

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_convert.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gf_core import convert as gfc
from gf_core.checkpoints import load_lora, load_wan_state_dict, merge_lora
from gf_core.errors import BadInput
from gf_core.wan import WanConfig, WanModel, random_state_dict

COMFY = os.environ.get("GF_COMFYUI_PATH")
REPO = Path(__file__).resolve().parent.parent
CFG = WanConfig.tiny()
# ComfyUI's Wan detection fixes heads of 128 and reads text_dim 4096 from nowhere: the host tests need them.
HOST_CFG = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096)
RANK = 4


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same(loaded: dict, ref: dict) -> None:
    assert loaded.keys() == ref.keys()
    for k, v in ref.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        assert torch.equal(bits(loaded[k]), bits(v)), k


def model_prefixed(sd: dict) -> dict:
    """Keys as the research generators save them: ``model.`` + Wan key."""
    return {"model." + k: v for k, v in sd.items()}


def fsdp_wrapped(sd: dict) -> dict:
    """Keys as an FSDP + activation-checkpointing + torch.compile generator saves them."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            k = f"blocks.{i}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
        out["model._fsdp_wrapped_module._orig_mod." + k] = v
    return out


def peft_lora(cfg: WanConfig = CFG, seed: int = 5) -> dict:
    """LongLive's ``lora.pt`` keys: ``base_model.model.<module>.lora_{A,B}.weight`` on attention and FFN."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanModel(cfg).state_dict().items()}
    out = {}
    for i in range(cfg.num_layers):
        for m in [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]:
            rows, cols = shapes[f"blocks.{i}.{m}.weight"]
            out[f"base_model.model.blocks.{i}.{m}.lora_A.weight"] = torch.randn(RANK, cols, generator=g) / cols**0.5
            out[f"base_model.model.blocks.{i}.{m}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One file per research layout (tiny weights), plus a LongLive LoRA."""
    root = tmp_path_factory.mktemp("research")
    ema = random_state_dict(CFG, seed=1)  # the EMA copy is float32, the generator bf16 (as Self-Forcing ships them)
    gen = random_state_dict(CFG, seed=2, dtype=torch.bfloat16)
    critic = random_state_dict(CFG, seed=3, dtype=torch.bfloat16)
    files = {
        "self_forcing": (root / "self_forcing_dmd.pt",
                         {"generator": model_prefixed(gen), "critic": model_prefixed(critic),
                          "generator_ema": model_prefixed(ema)}),
        "causvid": (root / "model.pt", {"model": model_prefixed(random_state_dict(CFG, seed=4))}),
        "longlive": (root / "longlive_base.pt", {"generator": model_prefixed(gen)}),
        "fsdp": (root / "fsdp_generator.pt", {"generator": fsdp_wrapped(ema)}),
        "lora": (root / "lora.pt", {"generator_lora": peft_lora(), "critic_lora": peft_lora(seed=6), "step": 600}),
    }
    for path, content in files.values():
        torch.save(content, path)
    return {name: path for name, (path, _) in files.items()}


def stored(path: Path) -> tuple[list[str], dict[str, str]]:
    """The raw tensor names and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), f.metadata()


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name, weights", [("self_forcing", "ema"), ("self_forcing", "generator"),
                                           ("causvid", "ema"), ("longlive", "ema"), ("fsdp", "generator")])
def test_converted_file_reads_back_bit_for_bit(tmp_path, checkpoints, name, weights):
    out = tmp_path / "converted.safetensors"
    metadata = gfc.convert(checkpoints[name], out, weights=weights)
    expected = load_wan_state_dict(checkpoints[name], prefer=weights)
    assert_same(load_wan_state_dict(out), expected)  # the dtype kept: float32 EMA, bf16 generator
    keys, stored_metadata = stored(out)
    assert sorted(keys) == sorted(WanModel(CFG).state_dict())  # bare Wan keys, as ComfyUI's repacks
    assert stored_metadata == metadata
    assert metadata["source"] == checkpoints[name].name and metadata["weights"] == weights
    assert metadata["dtype"] == "as stored" and "config" not in metadata and "lora" not in metadata
    assert metadata["model"].startswith("Wan2.1 T2V") and metadata["model"].endswith(
        f"{str(expected['blocks.0.self_attn.q.weight'].dtype).removeprefix('torch.')})")
    assert_same(WanModel.from_state_dict(load_wan_state_dict(out)).state_dict(), expected)


def test_lora_is_merged_as_the_loader_merges_it(tmp_path, checkpoints):
    out = tmp_path / "longlive_merged.safetensors"
    metadata = gfc.convert(checkpoints["longlive"], out, lora=checkpoints["lora"], lora_strength=0.5)
    base = load_wan_state_dict(checkpoints["longlive"])
    expected = merge_lora(base, load_lora(checkpoints["lora"]), strength=0.5)
    assert_same(load_wan_state_dict(out), expected)
    assert not torch.equal(expected["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"])
    assert metadata["lora"] == "lora.pt" and metadata["lora_strength"] == "0.5"


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                ("fp32", torch.float32)])
def test_dtype_casts_every_tensor(tmp_path, checkpoints, dtype, torch_dtype):
    out = tmp_path / f"{dtype}.safetensors"
    gfc.convert(checkpoints["self_forcing"], out, dtype=dtype)
    expected = {k: v.to(torch_dtype) for k, v in load_wan_state_dict(checkpoints["self_forcing"]).items()}
    assert_same(load_wan_state_dict(out), expected)
    assert stored(out)[1]["dtype"] == dtype


def test_causal_ar_metadata(tmp_path, checkpoints):
    out = tmp_path / "causal.safetensors"
    gfc.convert(checkpoints["self_forcing"], out, causal_ar=True)
    assert json.loads(stored(out)[1]["config"]) == {"transformer": {"causal_ar": True}}
    assert_same(load_wan_state_dict(out), load_wan_state_dict(checkpoints["self_forcing"]))


def test_shared_tensors_are_written_once_each(tmp_path):
    sd = random_state_dict(CFG, seed=7)
    joined = torch.cat([sd["blocks.0.self_attn.q.weight"].flatten(), sd["blocks.0.self_attn.k.weight"].flatten()])
    rows = sd["blocks.0.self_attn.q.weight"].shape[0]
    sd["blocks.0.self_attn.q.weight"] = joined[: joined.numel() // 2].view(rows, -1)  # two views of one storage
    sd["blocks.0.self_attn.k.weight"] = joined[joined.numel() // 2:].view(rows, -1)
    source = tmp_path / "shared.pt"
    torch.save({"generator": model_prefixed(sd)}, source)
    out = tmp_path / "shared.safetensors"
    gfc.convert(source, out)
    assert_same(load_wan_state_dict(out), {k: v.contiguous() for k, v in sd.items()})


# ---------------------------------------------------------------------------------------------
# Refusals


def test_an_existing_file_is_never_overwritten(tmp_path, checkpoints):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"a user's file")
    with pytest.raises(BadInput, match="already exists and is never overwritten; pick another name") as info:
        gfc.convert(checkpoints["self_forcing"], out)
    assert "\n" not in str(info.value)
    assert out.read_bytes() == b"a user's file"
    with pytest.raises(BadInput, match="already exists"):  # refused before the source is even opened
        gfc.convert(tmp_path / "missing.pt", out)


def test_the_name_taken_while_converting_is_not_replaced(tmp_path, checkpoints, monkeypatch):
    out = tmp_path / "race.safetensors"
    real_save = gfc.save_file

    def save_then_someone_writes(sd, path, metadata):
        real_save(sd, path, metadata=metadata)
        out.write_bytes(b"written meanwhile")

    monkeypatch.setattr(gfc, "save_file", save_then_someone_writes)
    with pytest.raises(BadInput, match="appeared while converting"):
        gfc.convert(checkpoints["self_forcing"], out)
    assert out.read_bytes() == b"written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.safetensors"]  # no partial file left


@pytest.mark.parametrize("target, options, message", [
    ("model.pt", {}, "does not end in .safetensors; name it e.g. model.safetensors"),
    ("no_such_folder/model.safetensors", {}, "does not exist; create it"),
    ("model.safetensors", {"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ("model.safetensors", {"weights": "critic"}, "unknown weights 'critic'"),
])
def test_bad_options_are_one_sentence(tmp_path, checkpoints, target, options, message):
    with pytest.raises(BadInput, match=message):
        gfc.convert(checkpoints["self_forcing"], tmp_path / target, **options)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_source_writes_nothing(tmp_path, checkpoints):
    with pytest.raises(BadInput, match="is a LoRA, not a base model"):
        gfc.convert(checkpoints["lora"], tmp_path / "lora_as_model.safetensors")
    with pytest.raises(BadInput, match="is a full model, not a LoRA"):  # the LoRA is read before the base
        gfc.convert(tmp_path / "not_there.pt", tmp_path / "x.safetensors", lora=checkpoints["longlive"])
    with pytest.raises(BadInput, match="LoRA strength nan is not a finite number"):
        gfc.convert(checkpoints["longlive"], tmp_path / "x.safetensors", lora=checkpoints["lora"],
                    lora_strength=float("nan"))
    assert list(tmp_path.iterdir()) == []


def test_the_command(tmp_path, checkpoints):
    out = tmp_path / "longlive.safetensors"
    command = [sys.executable, "-m", "gf_core.convert", str(checkpoints["longlive"]), str(out),
               "--lora", str(checkpoints["lora"]), "--weights", "generator", "--dtype", "bf16", "--causal-ar"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: Wan2.1 T2V" in done.stdout and "lora.pt x 1.0" in done.stdout
    expected = merge_lora(load_wan_state_dict(checkpoints["longlive"], prefer="generator"),
                          load_lora(checkpoints["lora"]))
    assert_same(load_wan_state_dict(out), {k: v.to(torch.bfloat16) for k, v in expected.items()})
    with pytest.raises(SystemExit) as again:  # run again: refused in one sentence (SystemExit prints it, exit 1)
        gfc.main(command[3:])
    assert again.value.code == f"gf_core.convert: {out} already exists and is never overwritten; pick another " \
                               "name or delete it first"
    with pytest.raises(SystemExit, match="--lora-strength was given without --lora"):
        gfc.main([str(checkpoints["longlive"]), str(tmp_path / "y.safetensors"), "--lora-strength", "0.5"])


# ---------------------------------------------------------------------------------------------
# Core's Load Diffusion Model reads the file (inside ComfyUI)

host_only = pytest.mark.skipif(not COMFY, reason="set GF_COMFYUI_PATH to a ComfyUI checkout (and use its Python) "
                                                 "to load converted files with core's Load Diffusion Model")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI on CPU with a temporary diffusion_models folder holding converted tiny files, and this pack."""
    import asyncio

    root = tmp_path_factory.mktemp("comfy_models")
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args as cli
    import utils.extra_config  # noqa: F401  (before nodes.py puts comfy/ first on sys.path)

    cli.args.cpu = True
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(root), is_default=True)
    research = root / "research"
    research.mkdir()
    base = random_state_dict(HOST_CFG, seed=0, dtype=torch.bfloat16)
    torch.save({"generator": model_prefixed(base), "generator_ema": model_prefixed(random_state_dict(HOST_CFG))},
               research / "longlive_base.pt")
    torch.save({"generator_lora": peft_lora(HOST_CFG)}, research / "lora.pt")
    for name, causal_ar in (("gf_plain.safetensors", False), ("gf_causal_ar.safetensors", True)):
        gfc.convert(research / "longlive_base.pt", root / name, lora=research / "lora.pt", weights="generator",
                    causal_ar=causal_ar)
    import nodes

    if "GFSampler" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_builtin_extra_nodes())
        assert asyncio.run(nodes.load_custom_node(str(REPO)))
    expected = merge_lora(base, load_lora(research / "lora.pt"))
    return nodes, expected


def diffusion_model_weights(patcher) -> dict[str, torch.Tensor]:
    return {k: v for k, v in patcher.model.diffusion_model.state_dict().items() if v.dtype != torch.float8_e4m3fn}


@host_only
@pytest.mark.parametrize("name", ["gf_plain.safetensors", "gf_causal_ar.safetensors"])
def test_core_load_diffusion_model_reads_a_converted_file(comfy, name):
    nodes, expected = comfy
    (patcher,) = nodes.UNETLoader().load_unet(name, "default")
    module = patcher.model.diffusion_model
    has_ar_model = _has_causal_wan()
    kind = "CausalWanModel" if name == "gf_causal_ar.safetensors" and has_ar_model else "WanModel"
    assert type(module).__name__ == kind
    loaded = diffusion_model_weights(patcher)
    for key, value in expected.items():
        assert torch.equal(loaded[key].to(value.dtype), value), key  # ComfyUI may store in its own dtype
    (ours,) = nodes.NODE_CLASS_MAPPINGS["GFLoadCausalWanModel"].execute(
        model_name=name, weights="ema", lora_name="none", lora_strength=1.0, weight_dtype="bf16").result
    ours_loaded = diffusion_model_weights(ours)
    for key, value in expected.items():
        assert torch.equal(ours_loaded[key].to(value.dtype), value), key


def _has_causal_wan() -> bool:
    """Whether this ComfyUI has an autoregressive Wan (comfy.ldm.wan.ar_model, ComfyUI 0.33+)."""
    import importlib.util

    return importlib.util.find_spec("comfy.ldm.wan.ar_model") is not None
