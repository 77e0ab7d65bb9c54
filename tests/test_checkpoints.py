"""gf_core.checkpoints: every checkpoint format written to disk in its exact layout, read back
bit-exactly into Wan keys; LoRA merging against the low-rank forward; one test per error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gf_core.checkpoints import (
    CheckpointError,
    describe,
    load_lora,
    load_wan_state_dict,
    lora_module,
    merge_lora,
    normalize_key,
    normalize_keys,
)
from gf_core.wan import WanConfig, WanModel, random_state_dict

CFG = WanConfig.tiny()
RANK = 8
LORA_MODULES = [
    f"blocks.{i}.{m}"
    for i in range(CFG.num_layers)
    for m in [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]
]


class NotATensor:
    """A custom class in a pickle: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.lr = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tensors here are tiny; on a busy 2-core box intra-op threads made this file 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return random_state_dict(CFG, seed=0)


def prefixed(sd: dict, prefix: str = "model.") -> dict:
    return {prefix + k: v for k, v in sd.items()}


def fsdp_wrapped(sd: dict) -> dict:
    """Keys as FSDP + activation checkpointing + torch.compile write them inside a generator."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^blocks\.(\d+)\.", r"blocks.\1._fsdp_wrapped_module._checkpoint_wrapped_module.", k)
        out["model._fsdp_wrapped_module._orig_mod." + k] = v
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    # Bit-exact comparison; also much faster than torch.equal on bf16 CPU tensors.
    return t.contiguous().view(torch.uint8)


def assert_same(loaded: dict, ref: dict) -> None:
    assert loaded.keys() == ref.keys()
    for k, v in ref.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        assert torch.equal(bits(loaded[k]), bits(v)), k


def assert_loads(sd: dict) -> None:
    model = WanModel.from_state_dict(sd)
    assert model.config == CFG
    assert_same(model.state_dict(), sd)


def peft_lora(cfg: WanConfig = CFG, seed: int = 5, modules: list[str] = LORA_MODULES) -> dict:
    """PEFT keys as LongLive's lora.pt has them: base_model.model.<module>.lora_{A,B}.weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        ref = {k: v.shape for k, v in WanModel(cfg).state_dict().items()}
    out = {}
    for m in modules:
        rows, cols = ref[f"{m}.weight"]
        out[f"base_model.model.{m}.lora_A.weight"] = torch.randn(RANK, cols, generator=g) / cols**0.5
        out[f"base_model.model.{m}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.1
    return out


# ---------------------------------------------------------------------------------------------
# Model formats


def test_self_forcing_prefers_ema_and_falls_back(tmp_path: Path) -> None:
    ema = random_state_dict(CFG, seed=1)
    gen = random_state_dict(CFG, seed=2, dtype=torch.bfloat16)
    critic = random_state_dict(CFG, seed=3)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": prefixed(gen), "critic": prefixed(critic), "generator_ema": prefixed(ema)}, path)

    loaded = load_wan_state_dict(path)
    assert_same(loaded, ema)
    assert_loads(loaded)
    assert_same(load_wan_state_dict(path, prefer="generator"), gen)

    no_ema = tmp_path / "no_ema.pt"
    torch.save({"generator": prefixed(gen), "critic": prefixed(critic), "generator_ema": None}, no_ema)
    assert_same(load_wan_state_dict(no_ema), gen)
    assert_same(load_wan_state_dict(str(no_ema), prefer="ema"), gen)


def test_prefer_must_be_known(base: dict) -> None:
    with pytest.raises(CheckpointError, match="prefer must be"):
        load_wan_state_dict(base, prefer="critic")


def test_causvid(tmp_path: Path, base: dict) -> None:
    path = tmp_path / "model.pt"
    torch.save({"model": prefixed(base)}, path)
    loaded = load_wan_state_dict(path)
    assert_same(loaded, base)
    assert_loads(loaded)


def test_longlive_base_and_legacy_pickle(tmp_path: Path, base: dict) -> None:
    path = tmp_path / "longlive_base.pt"
    torch.save({"generator": prefixed(base)}, path)
    assert_same(load_wan_state_dict(path), base)
    legacy = tmp_path / "legacy.pt"
    torch.save({"generator": prefixed(base)}, legacy, _use_new_zipfile_serialization=False)
    assert_same(load_wan_state_dict(legacy), base)


def test_fsdp_wrapped_keys(tmp_path: Path, base: dict) -> None:
    assert (
        normalize_key("model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.self_attn.q.weight")
        == "blocks.0.self_attn.q.weight"
    )
    path = tmp_path / "fsdp.pt"
    torch.save({"generator_ema": fsdp_wrapped(base), "step": 1000}, path)
    loaded = load_wan_state_dict(path)
    assert_same(loaded, base)
    assert_loads(loaded)


def test_already_loaded_dict(base: dict) -> None:
    assert_same(load_wan_state_dict({"generator": fsdp_wrapped(base)}), base)
    assert_same(load_wan_state_dict(base), base)


def test_normalize_keys_refuses_two_models_in_one(base: dict) -> None:
    w = base["head.modulation"]
    with pytest.raises(CheckpointError, match="more than one model"):
        normalize_keys({"model.head.modulation": w, "_orig_mod.head.modulation": w})


def test_comfyui_safetensors(tmp_path: Path, base: dict) -> None:
    path = tmp_path / "wan2.1_t2v_1.3B_fp16.safetensors"
    save_file(prefixed(base, "model.diffusion_model."), str(path))
    loaded = load_wan_state_dict(path)
    assert_same(loaded, base)
    assert_loads(loaded)


def test_plain_safetensors(tmp_path: Path, base: dict) -> None:
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(base, str(path))
    assert_same(load_wan_state_dict(path), base)
    assert_same(load_wan_state_dict(tmp_path), base)  # a directory with one safetensors file


def test_sharded_safetensors(tmp_path: Path, base: dict) -> None:
    keys = sorted(base)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for name, part in zip(names, halves):
        save_file({k: base[k] for k in part}, str(tmp_path / name))
        weight_map.update(dict.fromkeys(part, name))
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    for source in (tmp_path, index, [tmp_path / n for n in names]):
        loaded = load_wan_state_dict(source)
        assert_same(loaded, base)
    assert_loads(loaded)

    (tmp_path / names[1]).unlink()
    with pytest.raises(CheckpointError, match="download every shard"):
        load_wan_state_dict(tmp_path)


def test_14b_t2v_is_valid() -> None:
    # Meta tensors: the real 14B shapes without the 57 GB.
    cfg = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
    with torch.device("meta"):
        sd = WanModel(cfg).state_dict()
    loaded = load_wan_state_dict(prefixed(sd, "model.diffusion_model."))
    assert loaded.keys() == sd.keys()
    assert describe(loaded) == "Wan2.1 T2V 14B (dim 5120, 40 blocks, float32)"


def test_describe(base: dict) -> None:
    assert re.fullmatch(r"Wan2\.1 T2V [\d.]+M \(dim 256, 2 blocks, float32\)", describe(base))
    with torch.device("meta"):
        sd = WanModel(WanConfig()).to(torch.bfloat16).state_dict()
    assert describe(sd) == "Wan2.1 T2V 1.3B (dim 1536, 30 blocks, bfloat16)"


# ---------------------------------------------------------------------------------------------
# LoRA


def low_rank_forward(x, w, b, a, bb, scale):
    return x @ w.T + b + scale * (x @ a.T) @ bb.T


def test_longlive_lora_merge_matches_low_rank_forward(tmp_path: Path, base: dict) -> None:
    raw = peft_lora()
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": raw, "critic_lora": peft_lora(seed=9), "step": 1200}, path)

    lora = load_lora(path)
    assert sorted(lora) == sorted(LORA_MODULES)
    a, b, alpha = lora["blocks.0.self_attn.q"]
    assert alpha is None and a.shape == (RANK, CFG.dim) and b.shape == (CFG.dim, RANK)
    assert torch.equal(a, raw["base_model.model.blocks.0.self_attn.q.lora_A.weight"])
    assert describe(lora) == f"LoRA rank {RANK} on {len(LORA_MODULES)} modules"

    merged = merge_lora(base, lora)  # alpha = rank: scale 1
    assert merged is not base and merged["blocks.0.self_attn.q.weight"] is not base["blocks.0.self_attn.q.weight"]
    g = torch.Generator().manual_seed(0)
    for module, (a, b, _) in lora.items():
        w, bias = base[f"{module}.weight"], base[f"{module}.bias"]
        assert torch.equal(merged[f"{module}.weight"], w + b @ a)
        x = torch.randn(4, a.shape[1], generator=g)
        torch.testing.assert_close(
            F.linear(x, merged[f"{module}.weight"], bias), low_rank_forward(x, w, bias, a, b, 1.0)
        )
    untouched = set(base) - {f"{m}.weight" for m in LORA_MODULES}
    assert all(merged[k] is base[k] for k in untouched)
    assert_loads(merged)

    # alpha and strength: W + strength * alpha / r * B @ A
    half = merge_lora(base, lora, strength=0.5, alpha=4 * RANK)
    a, b, _ = lora["blocks.1.ffn.2"]
    w = base["blocks.1.ffn.2.weight"]
    torch.testing.assert_close(half["blocks.1.ffn.2.weight"], w + 2.0 * (b @ a))
    xr = torch.randn(3, a.shape[1])
    torch.testing.assert_close(
        F.linear(xr, half["blocks.1.ffn.2.weight"], base["blocks.1.ffn.2.bias"]),
        low_rank_forward(xr, w, base["blocks.1.ffn.2.bias"], a, b, 2.0),
    )


def test_bare_lora_dict_and_bf16_base(tmp_path: Path, base: dict) -> None:
    path = tmp_path / "anchor_forcing_lora.pt"
    torch.save(peft_lora(), path)
    lora = load_lora(path)
    assert sorted(lora) == sorted(LORA_MODULES)
    bf16 = {k: v.to(torch.bfloat16) for k, v in base.items()}
    merged = merge_lora(bf16, lora)
    a, b, _ = lora["blocks.0.cross_attn.v"]
    expected = (bf16["blocks.0.cross_attn.v.weight"].float() + b @ a).to(torch.bfloat16)
    assert merged["blocks.0.cross_attn.v.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["blocks.0.cross_attn.v.weight"], expected)


def test_anchor_forcing_lora_final_pt(tmp_path: Path, base: dict) -> None:
    # Anchor Forcing's trainer saves exactly LongLive's layout (same _gather_lora_state_dict and
    # lora_utils): {"generator_lora", "critic_lora", "step"}, PEFT names without the adapter name,
    # every Linear of every block (q, k, v, o of self- and cross-attention, ffn.0, ffn.2); its
    # configs/interactive_inference.yaml sets rank = alpha = 256, so the merge scale is 1.
    raw = peft_lora(seed=21)
    path = tmp_path / "final.pt"
    torch.save({"generator_lora": raw, "critic_lora": peft_lora(seed=22), "step": 3000}, path)
    lora = load_lora(path)
    assert sorted(lora) == sorted(LORA_MODULES) and len(lora) == 10 * CFG.num_layers
    assert all(alpha is None for _, _, alpha in lora.values())
    merged = merge_lora(base, lora)
    a, b, _ = lora["blocks.1.cross_attn.k"]
    assert torch.equal(a, raw["base_model.model.blocks.1.cross_attn.k.lora_A.weight"])
    assert torch.equal(merged["blocks.1.cross_attn.k.weight"], base["blocks.1.cross_attn.k.weight"] + b @ a)
    assert torch.equal(merge_lora(base, lora, alpha=RANK)["blocks.0.ffn.0.weight"], merged["blocks.0.ffn.0.weight"])
    assert_loads(merged)


def test_peft_adapter_names_and_base_layer_weights(base: dict) -> None:
    # A whole PEFT model's state_dict(): adapter name in the key, frozen base weights alongside.
    raw = {k.replace(".weight", ".default.weight"): v for k, v in peft_lora().items()}
    raw["base_model.model.blocks.0.self_attn.q.base_layer.weight"] = base["blocks.0.self_attn.q.weight"]
    lora = load_lora(raw)
    assert sorted(lora) == sorted(LORA_MODULES)
    assert torch.equal(lora["blocks.0.ffn.2"][1], raw["base_model.model.blocks.0.ffn.2.lora_B.default.weight"])
    with pytest.raises(CheckpointError, match=r"not LoRA pairs \(first: blocks\.0\.norm3\.diff\)"):
        load_lora(dict(raw, **{"blocks.0.norm3.diff": torch.zeros(CFG.dim)}))


def test_kohya_lora_with_alpha(tmp_path: Path, base: dict) -> None:
    raw = peft_lora()
    kohya = {}
    for k, v in raw.items():
        k = k.replace("base_model.model.", "diffusion_model.")
        kohya[k.replace("lora_A", "lora_down").replace("lora_B", "lora_up")] = v
    for m in LORA_MODULES:
        kohya[f"diffusion_model.{m}.alpha"] = torch.tensor(RANK / 2)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(path))

    lora = load_lora(path)
    assert lora["blocks.1.ffn.0"][2] == RANK / 2
    a, b, _ = lora["blocks.1.ffn.0"]
    w = base["blocks.1.ffn.0.weight"]
    torch.testing.assert_close(merge_lora(base, lora)["blocks.1.ffn.0.weight"], w + 0.5 * (b @ a))
    torch.testing.assert_close(merge_lora(base, lora, alpha=RANK)["blocks.1.ffn.0.weight"], w + b @ a)


def musubi_lora(prefix: str = "lora_unet_", alpha: float = RANK / 2, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A Wan LoRA as musubi-tuner (and kohya's sd-scripts) save it for ComfyUI: the module name with
    dots as underscores after ``lora_unet_``, ``lora_down`` [r, in] / ``lora_up`` [out, r] and a
    0-d ``alpha`` for every Linear of every block, all in the save dtype."""
    out = {}
    for k, v in peft_lora().items():
        module, kind = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", k).groups()
        name = prefix + module.replace(".", "_")  # blocks_0_self_attn_q, blocks_1_ffn_2
        out[f"{name}.lora_{'down' if kind == 'A' else 'up'}.weight"] = v.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_unet__"], ids=["musubi", "wan-fun"])
def test_musubi_kohya_wan_lora_merges_like_core(tmp_path: Path, base: dict, prefix: str) -> None:
    raw = musubi_lora(prefix)
    assert f"{prefix}blocks_0_self_attn_q.lora_down.weight" in raw and f"{prefix}blocks_1_ffn_2.alpha" in raw
    path = tmp_path / "wan_style_musubi.safetensors"
    save_file(raw, str(path))

    lora = load_lora(path)
    assert sorted(lora) == sorted(LORA_MODULES)
    strength = 0.7
    merged = merge_lora(base, lora, strength=strength)
    for module in LORA_MODULES:
        name = prefix + module.replace(".", "_")
        down = raw[f"{name}.lora_down.weight"].float()
        up = raw[f"{name}.lora_up.weight"].float()
        alpha = float(raw[f"{name}.alpha"])
        expected = base[f"{module}.weight"] + strength * alpha / RANK * (up @ down)
        torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=0, atol=1e-6)
    assert_loads(merged)


def test_diffusers_wan_lora_names(base: dict) -> None:
    diffusers_names = {"self_attn.q": "attn1.to_q", "self_attn.o": "attn1.to_out.0", "cross_attn.v": "attn2.to_v",
                       "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
    raw = {}
    for k, v in peft_lora().items():
        for wan, diffusers in diffusers_names.items():
            k = k.replace(f".{wan}.", f".{diffusers}.")
        raw[k.replace("base_model.model.", "transformer.")] = v
    assert "transformer.blocks.0.attn1.to_out.0.lora_A.weight" in raw
    lora = load_lora(raw)
    assert sorted(lora) == sorted(LORA_MODULES)
    a, b, _ = lora["blocks.1.ffn.0"]
    assert torch.equal(a, raw["transformer.blocks.1.ffn.net.0.proj.lora_A.weight"])
    torch.testing.assert_close(merge_lora(base, lora)["blocks.1.ffn.0.weight"], base["blocks.1.ffn.0.weight"] + b @ a)


def test_lora_module_names() -> None:
    assert lora_module("lora_unet_blocks_12_cross_attn_k_img") == "blocks.12.cross_attn.k_img"
    assert lora_module("lora_unet_text_embedding_0") == "text_embedding.0"
    assert lora_module("lora_unet_time_projection_1") == "time_projection.1"
    assert lora_module("lora_unet_head_head") == "head.head"
    assert lora_module("transformer.condition_embedder.time_embedder.linear_2") == "time_embedding.2"
    assert lora_module("transformer.proj_out") == "head.head"
    assert lora_module("blocks.3.self_attn.v") == "blocks.3.self_attn.v"


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_wan_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lora(tmp_path / "nope.pt")


def test_vae_is_refused(tmp_path: Path) -> None:
    vae = {
        "encoder.conv1.weight": torch.zeros(96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": torch.ones(96, 1, 1, 1),
        "decoder.head.0.gamma": torch.ones(96, 1, 1, 1),
        "conv1.weight": torch.zeros(32, 32, 1, 1, 1),
        "conv2.weight": torch.zeros(16, 16, 1, 1, 1),
    }
    path = tmp_path / "model.safetensors"
    save_file(vae, str(path))
    with pytest.raises(CheckpointError, match=r"model\.safetensors looks like a Wan VAE.*VAE loader"):
        load_wan_state_dict(path)


@pytest.mark.parametrize(
    "keys",
    [
        {"token_embedding.weight": (32, 64), "blocks.0.attn.q.weight": (64, 64)},
        {"shared.weight": (32, 64), "encoder.block.0.layer.0.SelfAttention.q.weight": (64, 64)},
    ],
    ids=["wan-umt5", "hf-umt5"],
)
def test_text_encoder_is_refused(tmp_path: Path, keys: dict) -> None:
    path = tmp_path / "umt5_xxl.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(CheckpointError, match="text encoder"):
        load_wan_state_dict(path)


@pytest.mark.parametrize("variant", ["img_emb", "in36"])
def test_i2v_is_refused(tmp_path: Path, base: dict, variant: str) -> None:
    sd = dict(base)
    if variant == "img_emb":
        sd["img_emb.proj.1.weight"] = torch.zeros(CFG.dim, 1280)
        sd["blocks.0.cross_attn.k_img.weight"] = torch.zeros(CFG.dim, CFG.dim)
    else:
        sd["patch_embedding.weight"] = torch.zeros(CFG.dim, 36, 1, 2, 2)
    path = tmp_path / "wan2.1_i2v_480p_14B.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="image-to-video.*needs a Wan2.1 text-to-video"):
        load_wan_state_dict(path)


def test_wan22_is_refused(base: dict) -> None:
    sd = dict(base, **{"patch_embedding.weight": torch.zeros(CFG.dim, 48, 1, 2, 2)})
    with pytest.raises(CheckpointError, match="not a Wan2.1 T2V diffusion model.*48"):
        load_wan_state_dict(sd)


def test_not_wan_is_refused(tmp_path: Path, base: dict) -> None:
    no_head_mod = {k: v for k, v in base.items() if k != "head.modulation"}
    with pytest.raises(CheckpointError, match="not a Wan2.1 diffusion model"):
        load_wan_state_dict(no_head_mod)
    path = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(10, 4)}}, path)
    with pytest.raises(CheckpointError, match="not a Wan2.1 diffusion model"):
        load_wan_state_dict(path)


def test_incomplete_and_extra_weights_are_refused(base: dict) -> None:
    missing = {k: v for k, v in base.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1 .*blocks\.1\.ffn\.2\.bias"):
        load_wan_state_dict(missing)
    vace = dict(base, **{"vace_blocks.0.before_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match="does not have.*vace_blocks"):
        load_wan_state_dict(vace)


def test_critic_only_is_refused(tmp_path: Path, base: dict) -> None:
    path = tmp_path / "critic.pt"
    torch.save({"critic": prefixed(base)}, path)
    with pytest.raises(CheckpointError, match="only critic"):
        load_wan_state_dict(path)


def test_lora_as_base_and_base_as_lora(tmp_path: Path, base: dict) -> None:
    lora_path = tmp_path / "lora.pt"
    torch.save({"generator_lora": peft_lora(), "critic_lora": peft_lora(seed=9), "step": 3}, lora_path)
    with pytest.raises(CheckpointError, match=r"lora\.pt is a LoRA, not a base model; load it as the LoRA"):
        load_wan_state_dict(lora_path)
    base_path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": prefixed(base), "critic": prefixed(base)}, base_path)
    with pytest.raises(CheckpointError, match="full model, not a LoRA; load it as the base model"):
        load_lora(base_path)


def test_lora_missing_half_is_refused() -> None:
    raw = peft_lora()
    del raw["base_model.model.blocks.1.self_attn.k.lora_B.weight"]
    with pytest.raises(CheckpointError, match=r"only one half of the LoRA pair for blocks\.1\.self_attn\.k"):
        load_lora(raw)


def test_lora_shape_mismatch_names_module_and_shapes(base: dict) -> None:
    big = WanConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=2, text_dim=64)
    lora = load_lora(peft_lora(big))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.cross_attn\.k has shape \[512, 512\].*\[256, 256\]"):
        merge_lora(base, lora)


def test_lora_target_missing(base: dict) -> None:
    deep = WanConfig.tiny(layers=4)
    lora = load_lora(peft_lora(deep, modules=["blocks.3.self_attn.q"]))
    with pytest.raises(CheckpointError, match=r"blocks\.3\.self_attn\.q, which the base model does not have"):
        merge_lora(base, lora)


def test_arbitrary_code_pickle_is_refused(tmp_path: Path, base: dict) -> None:
    path = tmp_path / "trainer_state.pt"
    torch.save({"generator": prefixed(base), "config": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="arbitrary code.*will not be unpickled"):
        load_wan_state_dict(path)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_lora(path)


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_truncated_file_is_refused(tmp_path: Path, base: dict, fmt: str) -> None:
    path = tmp_path / ("model.safetensors" if fmt == "safetensors" else "model.pt")
    if fmt == "safetensors":
        save_file(base, str(path))
    else:
        torch.save({"generator": prefixed(base)}, path, _use_new_zipfile_serialization=fmt == "zip")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="incomplete or corrupt; re-download it"):
        load_wan_state_dict(path)


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    html = tmp_path / "wan.safetensors"
    html.write_text("<!DOCTYPE html><html><body>Rate limited</body></html>")
    with pytest.raises(CheckpointError, match="neither a safetensors file nor a PyTorch checkpoint"):
        load_wan_state_dict(html)
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        load_wan_state_dict(lfs)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_wan_state_dict(empty)


def test_error_messages_are_one_sentence(tmp_path: Path, base: dict) -> None:
    cases = [
        lambda: load_wan_state_dict(tmp_path / "missing.pt"),
        lambda: load_wan_state_dict({k: v for k, v in base.items() if k != "head.modulation"}),
        lambda: load_wan_state_dict(dict(base, **{"img_emb.proj.1.weight": torch.zeros(1)})),
    ]
    for case in cases:
        with pytest.raises(CheckpointError) as info:
            case()
        message = str(info.value)
        assert "\n" not in message and not re.search(r"\.\s+[A-Z]", message), message
