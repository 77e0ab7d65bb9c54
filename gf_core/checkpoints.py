"""Research and ComfyUI checkpoint formats -> one Wan-keyed state dict, plus LoRA merging.

Every loader returns bare Wan keys (``blocks.0.self_attn.q.weight`` ...), the parameter names of
:class:`gf_core.wan.WanModel`. Model formats read:

* Self-Forcing ``self_forcing_dmd.pt``: ``{"generator": sd, "critic": sd, "generator_ema": sd}``
  with keys ``"model." + wan_key``. The EMA generator is preferred (``prefer="ema"``).
* CausVid ``model.pt``: ``{"model": {"model." + wan_key: tensor}}``.
* LongLive ``longlive_base.pt``: ``generator`` (or ``generator_ema`` / ``model``) as above.
* ComfyUI-repackaged ``*.safetensors``: bare Wan keys or ``model.diffusion_model.`` + key.
* Official Wan ``diffusion_pytorch_model*.safetensors``: bare keys, possibly sharded with a
  ``*.safetensors.index.json`` (pass the directory, the index file or a list of shards).
* Training wrappers, stripped wherever they appear: FSDP ``_fsdp_wrapped_module.`` (also in the
  middle of keys, before every block), ``_checkpoint_wrapped_module.``, ``torch.compile``'s
  ``_orig_mod.``, DDP's leading ``module.``.

LoRA formats (LongLive ``lora.pt``, Anchor Forcing): PEFT keys
``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r], bare or
under ``{"generator_lora": ..., "critic_lora": ..., "step": ...}``; kohya-style ``lora_down`` /
``lora_up`` / ``alpha`` names and a ``diffusion_model.`` prefix work too. Merging computes
``W + strength * alpha / r * B @ A`` in float32.

Pickles are only ever opened with ``weights_only=True``; a file that needs more is refused.
Every problem is reported as one :class:`CheckpointError` sentence naming the problem and the fix.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import BadInput
from .wan import WanConfig, WanModel

Source = str | os.PathLike | list | tuple
Lora = dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]


class CheckpointError(BadInput):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


# Wrapper module names that training code inserts anywhere in a key (FSDP puts one before every
# block). No Wan parameter name contains them.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Prefixes in front of the Wan key, stripped repeatedly ("model.diffusion_model." is two of them).
# No Wan key starts with any of these, so stripping never eats a real name.
_PREFIXES = ("base_model.model.", "diffusion_model.", "model.", "module.")

# Entries of a training pickle that may hold the weights, best first. The LoRA entries are listed
# for the base model too (and vice versa) so that a swapped file is recognised by its keys and
# reported as such, instead of as "no weights".
_MODEL_ENTRIES = {
    "ema": ("generator_ema", "generator", "model", "state_dict", "generator_lora"),
    "generator": ("generator", "generator_ema", "model", "state_dict", "generator_lora"),
}
_LORA_ENTRIES = ("generator_lora", "lora", "state_dict", "generator_ema", "generator", "model")

# PEFT "<module>.lora_A[.<adapter>].weight" and kohya "<module>.lora_down.weight".
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")

# umT5 in Wan's naming (models_t5_umt5-xxl-enc) and in Hugging Face's (ComfyUI's umt5_xxl files).
# The DiT has "blocks.N.self_attn", never "blocks.N.attn".
_TEXT_ENCODER_KEYS = {
    "token_embedding.weight",
    "blocks.0.attn.q.weight",
    "shared.weight",
    "encoder.embed_tokens.weight",
}

# Names used when describing a model: the published sizes of the Wan2.1 T2V models.
_SIZE_NAMES = {1536: "1.3B", 5120: "14B"}


# ---------------------------------------------------------------------------------------------
# Key names


def normalize_key(key: str) -> str:
    """Strip training wrappers and container prefixes: ``model._fsdp_wrapped_module.blocks.0``
    -> ``blocks.0``."""
    for segment in _WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def normalize_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`normalize_key` on every key of ``sd`` (values untouched, a new dict)."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in sd.items():
        new = normalize_key(key)
        if new in out:
            # Two copies of one weight (e.g. a flattened generator and EMA): picking one silently
            # could load the wrong network.
            raise CheckpointError(
                f"keys {origin[new]!r} and {key!r} both become {new!r} once wrapper prefixes are "
                "stripped, so the file holds more than one model; save just the one you want"
            )
        out[new], origin[new] = value, key
    return out


# ---------------------------------------------------------------------------------------------
# Files


def _corrupt(name: str) -> CheckpointError:
    return CheckpointError(f"{name} is incomplete or corrupt; re-download it")


def _resolve_files(source: Source) -> list[Path]:
    """The files to read: one file, the shards of an index or directory, or a list of shards."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise CheckpointError("the list of checkpoint files is empty; pass at least one file")
        return [f for item in source for f in _resolve_files(item)]
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; check the path")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if len(indexes) == 1:
            return _index_shards(indexes[0])
        if not indexes and len(singles) == 1:
            return singles
        raise CheckpointError(
            f"{path} is a directory without exactly one *.safetensors.index.json or *.safetensors "
            "file; pass the model file (or its index) itself"
        )
    if path.name.endswith(".index.json"):
        return _index_shards(path)
    return [path]


def _index_shards(index: Path) -> list[Path]:
    """Shard files named by a Hugging Face ``*.index.json`` (its ``weight_map`` values)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise _corrupt(index.name) from None
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.exists():
            raise CheckpointError(f"shard {shard.name} listed in {index.name} does not exist; download every shard")
    return shards


def _sniff(path: Path) -> str:
    """``"safetensors"``, ``"torch-zip"`` or ``"torch-legacy"`` from the first bytes.

    File extensions lie (``.pt`` safetensors, ``.safetensors`` HTML error pages), magic bytes don't.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except PermissionError:
        raise CheckpointError(f"{path} cannot be read (permission denied); fix the file's permissions") from None
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"  # torch.save's default format is a zip archive
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    if head.startswith(b"\x80"):
        return "torch-legacy"  # a bare pickle (protocol 2+), torch.save(..., _use_new_zipfile_serialization=False)
    if head.startswith(b"GGUF"):
        raise CheckpointError(
            f"{path.name} is a GGUF file, which this pack does not read; pick the safetensors version"
        )
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path.name} is a Git LFS pointer, not the weights; download the real file (git lfs pull)"
        )
    if len(head) < 9:
        raise _corrupt(path.name)
    raise CheckpointError(
        f"{path.name} is neither a safetensors file nor a PyTorch checkpoint (perhaps an HTML error page "
        "from a failed download); re-download it"
    )


def _torch_load(path: Path, kind: str) -> Any:
    """``torch.load`` with ``weights_only=True``; memory-mapped for zip files so that unused
    entries (the critic, optimizer state) are never read into RAM."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "torch-zip")
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path.name} needs arbitrary code to load (it pickles more than tensors) and will not be "
                "unpickled; convert it to safetensors with the tool that made it"
            ) from None
        raise _corrupt(path.name) from e
    # What a cut-off file raises depends on where it was cut: zip errors, EOF, short struct reads.
    except (RuntimeError, OSError, EOFError, struct.error, ValueError):
        raise _corrupt(path.name) from None


def _peek_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's names and shapes as meta tensors: enough to classify it without reading weights."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # a safe_open handle is not iterable
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in names}
    except (SafetensorError, OSError):
        raise _corrupt(path.name) from None  # includes "file not fully covered" by the header


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError):
        raise _corrupt(path.name) from None


def _select(obj: Any, entries: tuple[str, ...], name: str) -> dict[str, torch.Tensor]:
    """Walk a training pickle's container dicts down to the first flat ``name -> tensor`` dict."""
    for _ in range(4):  # containers nest a level or two ({"model": {"state_dict": ...}})
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{name} holds a {type(obj).__name__}, not a state dict; pick a model checkpoint")
        found = next((obj[e] for e in entries if isinstance(obj.get(e), Mapping) and obj[e]), None)
        if found is None:
            break
        obj = found
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return tensors
    if "critic" in obj or "critic_lora" in obj:
        raise CheckpointError(f"{name} holds only critic weights, not a generator; pick the generator checkpoint")
    keys = ", ".join(sorted(map(str, obj))[:6])
    raise CheckpointError(
        f"{name} holds no weights (top-level entries: {keys}); expected a Wan state dict or a "
        "generator / generator_ema / model entry"
    )


def _read(
    source: Source | Mapping, entries: tuple[str, ...], lazy: bool
) -> tuple[dict[str, torch.Tensor], str, list[Path]]:
    """Normalized tensors of ``source``, a label for messages, and the safetensors files whose
    tensors were only peeked at (meta) when ``lazy``."""
    if isinstance(source, Mapping):
        return normalize_keys(_select(source, entries, "the given state dict")), "the given state dict", []
    files = _resolve_files(source)
    label = files[0].name if len(files) == 1 else f"{files[0].name} (+{len(files) - 1} shards)"
    sd: dict[str, torch.Tensor] = {}
    peeked = []
    for path in files:
        kind = _sniff(path)
        if kind != "safetensors":
            part = _select(_torch_load(path, kind), entries, path.name)
        elif lazy:
            part = _peek_safetensors(path)
            peeked.append(path)
        else:
            part = _load_safetensors(path)
        sd.update(normalize_keys(part))
    return sd, label, peeked


# ---------------------------------------------------------------------------------------------
# Validation


@functools.lru_cache(maxsize=8)
def _expected_shapes(cfg: WanConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only, no memory
        return {k: v.shape for k, v in WanModel(cfg).state_dict().items()}


def _is_lora_key(key: str) -> bool:
    return bool(_LORA_KEY.match(key)) or key.endswith(".alpha")


def _check_wan_t2v(sd: Mapping[str, torch.Tensor], name: str) -> WanConfig:
    """Raise unless ``sd`` (normalized keys; real or meta tensors) is a complete Wan2.1 T2V DiT."""
    keys = set(sd)
    pick = " pick a Wan2.1 T2V diffusion model here"
    if not keys:
        raise CheckpointError(f"{name} holds no tensors;{pick}")
    if "patch_embedding.weight" not in keys and any(_is_lora_key(k) for k in keys):
        raise CheckpointError(f"{name} is a LoRA, not a base model; load it as the LoRA and{pick}")
    if keys & _TEXT_ENCODER_KEYS or any(k.startswith("encoder.block.") for k in keys):
        raise CheckpointError(
            f"{name} looks like the umT5 text encoder, not a diffusion model; "
            f"load it with a text-encoder loader and{pick}"
        )
    conv1 = sd.get("conv1.weight")
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) or (conv1 is not None and conv1.dim() == 5):
        raise CheckpointError(
            f"{name} looks like a Wan VAE, not a diffusion model; load it with a VAE loader and{pick}"
        )
    if "scale_shift_table" in keys or any(k.startswith("condition_embedder.") for k in keys):
        raise CheckpointError(
            f"{name} is a Wan model in diffusers format; pick the original or ComfyUI-repackaged Wan2.1 T2V file"
        )
    if "scaled_fp8" in keys or any(k.endswith(".scale_weight") for k in keys):
        raise CheckpointError(
            f"{name} is an fp8_scaled ComfyUI checkpoint; pick the fp16, bf16 or plain fp8_e4m3fn file"
        )
    if "patch_embedding.weight" not in keys or "head.modulation" not in keys:
        raise CheckpointError(f"{name} is not a Wan2.1 diffusion model (no patch_embedding / head.modulation);{pick}")
    in_channels = sd["patch_embedding.weight"].shape[1]
    if in_channels == 36 or any(k.startswith("img_emb.") or "k_img" in k for k in keys):
        raise CheckpointError(
            f"{name} is an image-to-video (i2v) model; this pack needs a Wan2.1 text-to-video (T2V) model"
        )
    if in_channels != 16:
        example = ", like Wan2.2 TI2V-5B," if in_channels == 48 else ""
        raise CheckpointError(
            f"{name} is not a Wan2.1 T2V diffusion model (its patch_embedding takes {in_channels} latent "
            f"channels{example} where Wan2.1 T2V takes 16);{pick}"
        )
    try:
        cfg = WanConfig.from_state_dict(sd)  # type: ignore[arg-type]
        expected = _expected_shapes(cfg)
    except (KeyError, ValueError, IndexError):
        raise CheckpointError(
            f"{name} lacks core Wan2.1 weights; the file is incomplete or another model, re-download it"
        ) from None
    missing = sorted(expected.keys() - keys)
    if missing:
        raise CheckpointError(
            f"{name} is missing {len(missing)} of the {len(expected)} Wan2.1 weights (first: {missing[0]}); "
            "the file is incomplete or another model, re-download it or pick a Wan2.1 T2V model"
        )
    extra = sorted(keys - expected.keys())
    if extra:
        raise CheckpointError(
            f"{name} has weights a Wan2.1 T2V model does not have (first: {extra[0]}), so it is another Wan "
            f"variant (VACE, Fun, ...);{pick}"
        )
    for key, shape in expected.items():
        if sd[key].shape != shape:
            raise CheckpointError(
                f"{name} has {key} of shape {list(sd[key].shape)} where its other weights imply {list(shape)}; "
                "the file is corrupt or another model, re-download it"
            )
    return cfg


# ---------------------------------------------------------------------------------------------
# Public API


def load_wan_state_dict(path: Source | Mapping, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Read any supported model checkpoint into a dict of bare Wan keys, validated as Wan2.1 T2V.

    Args:
        path: a file (``.pt`` / ``.pth`` / ``.safetensors``), a directory or ``*.index.json`` of
            shards, a list of shard files, or an already loaded (possibly wrapped) dict.
        prefer: ``"ema"`` takes ``generator_ema`` over ``generator`` in training pickles,
            ``"generator"`` the reverse; either falls back to what the file has.

    Raises:
        CheckpointError: before reading any weights of a safetensors file that is not a Wan2.1
            T2V DiT (VAE, text encoder, i2v, Wan2.2, LoRA, ...), or for unreadable files.
    """
    if prefer not in _MODEL_ENTRIES:
        raise CheckpointError(f"prefer must be 'ema' or 'generator', not {prefer!r}")
    sd, name, peeked = _read(path, _MODEL_ENTRIES[prefer], lazy=True)
    _check_wan_t2v(sd, name)
    for file in peeked:  # validated on shapes alone; now read the weights
        sd.update(normalize_keys(_load_safetensors(file)))
    return sd


def load_lora(path: Source | Mapping) -> Lora:
    """Read a LoRA into ``{wan module name: (A [r, in], B [out, r], alpha or None)}``.

    Accepts PEFT (``lora_A`` / ``lora_B``, optionally with an adapter name such as ``default``)
    and kohya (``lora_down`` / ``lora_up`` / ``alpha``) names, with any wrapper prefix, bare or
    under ``generator_lora``. PEFT files carry no alpha, so it is None there (merge then uses
    the rank, LongLive's and Anchor Forcing's alpha = r).
    """
    sd, name, _ = _read(path, _LORA_ENTRIES, lazy=False)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, tensor in sd.items():
        match = _LORA_KEY.match(key)
        if match:
            side = "A" if match["kind"] in ("lora_A", "lora_down") else "B"
            pairs.setdefault(match["module"], {})[side] = tensor
        elif key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = float(tensor.item())
        elif ".base_layer." not in key:  # full PEFT state dicts also carry the frozen base weights
            unknown.append(key)
    if not pairs:
        if "patch_embedding.weight" in sd:
            raise CheckpointError(f"{name} is a full model, not a LoRA; load it as the base model and pick a LoRA here")
        raise CheckpointError(f"{name} holds no LoRA weights (lora_A/lora_B or lora_down/lora_up); pick a LoRA file")
    if unknown:
        raise CheckpointError(
            f"{name} has weights that are not LoRA pairs (first: {min(unknown)}); only lora_A/lora_B "
            "(or lora_down/lora_up) LoRAs are supported"
        )
    lora: Lora = {}
    for module in sorted(pairs):
        a, b = pairs[module].get("A"), pairs[module].get("B")
        if a is None or b is None:
            raise CheckpointError(
                f"{name} has only one half of the LoRA pair for {module}; the file is incomplete, re-download it"
            )
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{name} has LoRA factors of shapes A {list(a.shape)} and B {list(b.shape)} for {module}, "
                "which do not form a rank-r pair; the file is corrupt or not a linear-layer LoRA"
            )
        lora[module] = (a, b, alphas.get(module))
    return lora


def merge_lora(
    sd: Mapping[str, torch.Tensor], lora: Lora, strength: float = 1.0, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """A new state dict with ``W + strength * (alpha / r) * B @ A`` for every LoRA module.

    The product and sum run in float32 (bf16 would round the small update away), then the
    result is cast back to W's dtype. ``alpha`` overrides the file's; without either it is the
    rank (scale 1). ``sd`` and its tensors are left unchanged. Every module is checked against
    the base before anything is computed.
    """
    for module, (a, b, _) in lora.items():
        key = f"{module}.weight"
        if key not in sd:
            raise CheckpointError(
                f"the LoRA targets {module}, which the base model does not have; this LoRA was made for another model"
            )
        delta_shape = [b.shape[0], a.shape[1]]
        if list(sd[key].shape) != delta_shape:
            raise CheckpointError(
                f"the LoRA for {module} has shape {delta_shape} but the base weight is {list(sd[key].shape)}; "
                "this LoRA was made for another model size (e.g. 1.3B vs 14B)"
            )
    out = dict(sd)
    for module, (a, b, file_alpha) in lora.items():
        key = f"{module}.weight"
        w = sd[key]
        rank = a.shape[0]
        chosen = alpha if alpha is not None else file_alpha if file_alpha is not None else rank
        scale = strength * chosen / rank
        delta = b.to(device=w.device, dtype=torch.float32) @ a.to(device=w.device, dtype=torch.float32)
        out[key] = (w.float() + scale * delta).to(w.dtype)
    return out


def describe(sd: Mapping[str, Any]) -> str:
    """One line about a Wan state dict ("Wan2.1 T2V 1.3B (dim 1536, 30 blocks, bfloat16)") or a
    :func:`load_lora` result ("LoRA rank 256 on 300 modules")."""
    if sd and all(isinstance(v, tuple) for v in sd.values()):
        ranks = sorted({a.shape[0] for a, _, _ in sd.values()})
        rank = ranks[0] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        return f"LoRA rank {rank} on {len(sd)} modules"
    sd = normalize_keys(sd)
    cfg = _check_wan_t2v(sd, "the state dict")
    params = sum(t.numel() for t in sd.values())
    size = _SIZE_NAMES.get(cfg.dim) or (f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.1f}M")
    dtype = str(sd["blocks.0.self_attn.q.weight"].dtype).removeprefix("torch.")
    return f"Wan2.1 T2V {size} (dim {cfg.dim}, {cfg.num_layers} blocks, {dtype})"
