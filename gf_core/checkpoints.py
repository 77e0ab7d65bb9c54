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
``lora_up`` / ``alpha`` names and a ``diffusion_model.`` prefix work too, and so do the names
ComfyUI core maps for Wan: musubi-tuner / kohya ``lora_unet_blocks_0_self_attn_q.lora_down.weight``
(dots written as underscores; Wan Fun's ``lora_unet__`` as well) and diffusers'
``transformer.blocks.0.attn1.to_q.lora_A.weight``. Merging computes
``W + strength * alpha / r * B @ A`` in float32.

Safety: pickles are only ever opened with ``weights_only=True`` (a file that needs more is
refused); the shards of an index are read only from inside the index's folder; safetensors
files are classified from their header (names, shapes, dtypes) before any weight is read.
Every problem is reported as one :class:`CheckpointError` sentence naming the problem and the fix.
"""

from __future__ import annotations

import functools
import json
import math
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
from .wan import HEAD_DIM, WanConfig, WanModel

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

# Weight dtypes ComfyUI loads a Wan model from (fp8 as plain e4m3fn / e5m2 files).
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The tensors the config is read from, with their rank in a Wan2.1 DiT.
_CORE_RANKS = {
    "patch_embedding.weight": 5,  # [dim, in_channels, 1, 2, 2]
    "head.modulation": 3,  # [1, 2, dim]
    "head.head.weight": 2,  # [out_channels * 4, dim]
    "blocks.0.ffn.0.weight": 2,  # [ffn_dim, dim]
    "time_embedding.0.weight": 2,  # [dim, freq_dim]
    "text_embedding.0.weight": 2,  # [dim, text_dim]
}
_INDEX_BYTES = 64 * 2**20  # a real shard index is a few hundred KB of JSON

# LoRA module names as other trainers write them -> Wan module names.
# kohya / musubi-tuner write "lora_unet_" + the name with dots as underscores; Wan Fun's have two.
_KOHYA_PREFIXES = ("lora_unet__", "lora_unet_")
# Wan name parts that hold an underscore themselves (restored after dots became underscores).
_UNDERSCORE_NAMES = ("self_attn", "cross_attn", "k_img", "v_img", "text_embedding", "time_embedding",
                     "time_projection", "patch_embedding", "img_emb")
# diffusers' WanTransformer3DModel names (after "transformer.") -> Wan names.
_DIFFUSERS_NAMES = (
    (re.compile(r"\.attn1\."), ".self_attn."),
    (re.compile(r"\.attn2\."), ".cross_attn."),
    (re.compile(r"\.to_([qkv])$"), r".\1"),
    (re.compile(r"\.to_out\.0$"), ".o"),
    (re.compile(r"\.add_k_proj$"), ".k_img"),
    (re.compile(r"\.add_v_proj$"), ".v_img"),
    (re.compile(r"\.ffn\.net\.0\.proj$"), ".ffn.0"),
    (re.compile(r"\.ffn\.net\.2$"), ".ffn.2"),
    (re.compile(r"^condition_embedder\.text_embedder\.linear_([12])$"), lambda m: f"text_embedding.{2 * int(m[1]) - 2}"),
    (re.compile(r"^condition_embedder\.time_embedder\.linear_([12])$"), lambda m: f"time_embedding.{2 * int(m[1]) - 2}"),
    (re.compile(r"^condition_embedder\.time_proj$"), "time_projection.1"),
    (re.compile(r"^proj_out$"), "head.head"),
)


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
        for item in source:
            if not isinstance(item, (str, os.PathLike)):
                raise CheckpointError(
                    f"the list of checkpoint files holds a value of type {type(item).__name__}, not a file path; "
                    "pass the shard files"
                )
        return [f for item in source for f in _resolve_files(item)]
    path = Path(source)
    if "\0" in str(path):
        raise CheckpointError(f"the checkpoint path {str(path)[:60]!r} holds a NUL character; pick the file again")
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
    """Shard files named by a Hugging Face ``*.index.json`` (its ``weight_map`` values).

    Every shard must lie inside the index's folder once symlinks are followed: an index is
    downloaded text, and ``../../etc/hostname`` or an absolute path in it must open nothing.
    """
    if index.stat().st_size > _INDEX_BYTES:
        raise CheckpointError(
            f"{index.name} is {index.stat().st_size:,} bytes, far more than a shard index holds; "
            "the file is mislabeled or corrupt, re-download it"
        )
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _corrupt(index.name) from None
    if (
        not isinstance(weight_map, Mapping)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items())
    ):
        raise CheckpointError(
            f"{index.name} has a weight_map that is not a mapping of weight names to shard file names; "
            "the index is corrupt, re-download it"
        )
    folder = index.parent.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = index.parent / name
        outside = "\0" in name or Path(name).is_absolute() or not shard.resolve().is_relative_to(folder)
        if outside:
            raise CheckpointError(
                f"{index.name} names the shard {name[:60]!r}, which lies outside the index's folder; only shards "
                "beside the index are read, so re-download the index or copy the real shard files next to it"
            )
        if not shard.is_file():
            raise CheckpointError(f"shard {shard.name} listed in {index.name} does not exist; download every shard")
        shards.append(shard)
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
    if path.name.endswith(".safetensors"):
        # torch.load hands any path named *.safetensors to safetensors, and ComfyUI's own loader
        # does the same, so such a file cannot be read where it is.
        raise CheckpointError(
            f"{path.name} is a PyTorch pickle although its name ends in .safetensors; rename it to .pt "
            "(or convert it to safetensors)"
        )
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
    except (RuntimeError, OSError, EOFError, struct.error, ValueError, SafetensorError):
        raise _corrupt(path.name) from None


def _peek_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's names, shapes and dtypes as meta tensors: enough to classify it without reading weights."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # a safe_open handle is not iterable
            slices = {k: f.get_slice(k) for k in names}
            peeked = {}
            for key, part in slices.items():
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"{path.name} stores {key} as {part.get_dtype()}, which ComfyUI does not load Wan weights "
                        "from; pick the fp16, bf16, fp32 or plain fp8 file"
                    )
                peeked[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
            return peeked
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
    if not obj:
        raise CheckpointError(f"{name} is empty; pick a model checkpoint")
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
        part = normalize_keys(part)
        repeated = sd.keys() & part.keys()
        if repeated:
            # Shards split one model; a weight in two files means two models given as shards.
            raise CheckpointError(
                f"{path.name} repeats {len(repeated)} weights of another of the given files (first: {min(repeated)}), "
                "so they are not shards of one model; pass one model's files only"
            )
        sd.update(part)
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
    _check_core_shapes(sd, name)
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
    for key in expected:
        if sd[key].dtype not in _WEIGHT_DTYPES:
            dtype = str(sd[key].dtype).removeprefix("torch.")
            raise CheckpointError(
                f"{name} stores {key} as {dtype}, not as floating point weights (a quantized or corrupt file); "
                "pick the fp16, bf16, fp32 or plain fp8 file"
            )
    return cfg


def _check_core_shapes(sd: Mapping[str, torch.Tensor], name: str) -> None:
    """The tensors the config is read from have Wan's ranks and sizes, and the blocks are numbered
    0..n-1, so that building the expected shapes can neither fail nor make a huge meta model."""
    for key, rank in _CORE_RANKS.items():
        tensor = sd.get(key)
        if tensor is None:
            raise CheckpointError(
                f"{name} lacks {key}, a core Wan2.1 weight; the file is incomplete or another model, re-download it"
            )
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != rank or 0 in tensor.shape:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(
                f"{name} has {key} of shape {shape} where a Wan2.1 model has a non-empty {rank}-D tensor; "
                "the file is corrupt or another model, re-download it"
            )
    dim = sd["patch_embedding.weight"].shape[0]
    if dim % HEAD_DIM:
        raise CheckpointError(
            f"{name} has a patch_embedding with {dim} output channels, not a multiple of Wan's {HEAD_DIM}-wide "
            "attention heads; the file is corrupt or another model, re-download it"
        )
    patch = math.prod(sd["patch_embedding.weight"].shape[2:])
    if sd["head.head.weight"].shape[0] % patch:
        raise CheckpointError(
            f"{name} has head.head.weight of shape {list(sd['head.head.weight'].shape)}, whose rows do not split "
            f"into patches of {patch}; the file is corrupt or another model, re-download it"
        )
    numbers = {k.split(".", 2)[1] for k in sd if k.startswith("blocks.")}
    odd = sorted(n for n in numbers if not n.isdigit())
    if odd:
        raise CheckpointError(
            f"{name} has weights under blocks.{odd[0][:20]}, which is not a block number; the file is another "
            "model, pick a Wan2.1 T2V model"
        )
    blocks = {int(n) for n in numbers}
    gap = next(i for i in range(len(blocks) + 1) if i not in blocks)
    if gap < max(blocks):
        raise CheckpointError(
            f"{name} has blocks up to blocks.{max(blocks)} but no blocks.{gap}; the file is incomplete, re-download it"
        )


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


def lora_module(name: str) -> str:
    """The Wan module a LoRA key's module part names, from any naming core ComfyUI maps for Wan.

    ``blocks.0.self_attn.q`` (PEFT, kohya with dots) stays; ``lora_unet_blocks_0_self_attn_q``
    (musubi-tuner / kohya) and ``transformer.blocks.0.attn1.to_q`` (diffusers) become it.
    """
    for prefix in _KOHYA_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            for part in _UNDERSCORE_NAMES:  # protect the underscores that belong to the name
                name = name.replace(part, part.replace("_", "\0"))
            return name.replace("_", ".").replace("\0", "_")
    name = name.removeprefix("transformer.")
    for pattern, replacement in _DIFFUSERS_NAMES:
        name = pattern.sub(replacement, name)
    return name


def _lora_alpha(tensor: Any, key: str, name: str) -> float:
    if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1:
        shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise CheckpointError(
            f"{name} has {key} of shape {shape} where a LoRA alpha is one number; the file is corrupt, re-download it"
        )
    alpha = float(tensor.item())
    if not math.isfinite(alpha):
        raise CheckpointError(f"{name} has {key} = {alpha}, not a finite number; the file is corrupt, re-download it")
    return alpha


def load_lora(path: Source | Mapping) -> Lora:
    """Read a LoRA into ``{wan module name: (A [r, in], B [out, r], alpha or None)}``.

    Accepts PEFT (``lora_A`` / ``lora_B``, optionally with an adapter name such as ``default``)
    and kohya (``lora_down`` / ``lora_up`` / ``alpha``) names, with any wrapper prefix, bare or
    under ``generator_lora``, and the module names of :func:`lora_module`. PEFT files carry no
    alpha, so it is None there (merge then uses the rank, LongLive's and Anchor Forcing's alpha = r).
    Factors must be finite floating point matrices of one rank, alphas single finite numbers.
    """
    sd, name, _ = _read(path, _LORA_ENTRIES, lazy=False)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, tensor in sd.items():
        match = _LORA_KEY.match(key)
        if match:
            side = "A" if match["kind"] in ("lora_A", "lora_down") else "B"
            module = lora_module(match["module"])
            if side in pairs.setdefault(module, {}):
                raise CheckpointError(
                    f"{name} has two LoRA weights for {module} (one is {key}), written in two namings; "
                    "the file mixes two LoRAs, pick one of them"
                )
            pairs[module][side] = tensor
        elif key.endswith(".alpha"):
            alphas[lora_module(key[: -len(".alpha")])] = _lora_alpha(tensor, key, name)
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
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise CheckpointError(
                f"{name} has LoRA factors of shapes A {list(a.shape)} and B {list(b.shape)} for {module}, "
                "which do not form a rank-r pair; the file is corrupt or not a linear-layer LoRA"
            )
        for side, factor in (("A", a), ("B", b)):
            if not factor.is_floating_point():
                raise CheckpointError(
                    f"{name} stores the LoRA factor {side} of {module} as {str(factor.dtype).removeprefix('torch.')}, "
                    "not floating point; the file is corrupt or quantized, pick an fp16, bf16 or fp32 LoRA"
                )
            if not _all_finite(factor):
                raise CheckpointError(
                    f"{name} has NaN or infinite values in the LoRA factor {side} of {module}; the file is corrupt "
                    "(or was saved from a diverged training run), re-download it"
                )
        lora[module] = (a, b, alphas.get(module))
    return lora


def check_strength(strength: float) -> None:
    """Refuse a LoRA strength that is not a finite number (it would turn every merged weight NaN)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise CheckpointError(f"LoRA strength {strength!r} is not a finite number; use e.g. 1.0 (0 = no LoRA)")


def merge_lora(
    sd: Mapping[str, torch.Tensor], lora: Lora, strength: float = 1.0, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """A new state dict with ``W + strength * (alpha / r) * B @ A`` for every LoRA module.

    The product and sum run in float32 (bf16 would round the small update away), then the
    result is cast back to W's dtype. ``alpha`` overrides the file's; without either it is the
    rank (scale 1). ``sd`` and its tensors are left unchanged. Every module is checked against
    the base before anything is computed, and every merged weight is checked to be finite.
    """
    check_strength(strength)
    if alpha is not None and not math.isfinite(alpha):
        raise CheckpointError(f"LoRA alpha {alpha!r} is not a finite number; leave it unset to use the file's")
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
        merged = (w.float() + scale * delta).to(w.dtype)
        if not _all_finite(merged):
            raise CheckpointError(_not_finite(module, w, delta, strength))
        out[key] = merged
    return out


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype.itemsize == 1:  # isfinite has no fp8 kernels
        t = t.float()
    return bool(torch.isfinite(t).all())


def _not_finite(module: str, w: torch.Tensor, delta: torch.Tensor, strength: float) -> str:
    """Why ``module``'s merged weight holds NaN or inf (called only when it does)."""
    if not _all_finite(w):
        return f"the base model's {module}.weight already holds NaN or infinite values; the model file is corrupt, re-download it"
    if not bool(torch.isfinite(delta).all()):
        return f"the LoRA update of {module} overflows float32; the LoRA is corrupt or its alpha far too large, re-download it"
    dtype = str(w.dtype).removeprefix("torch.")
    return (
        f"merging the LoRA into {module} at strength {strength:g} overflows the weights' {dtype}; "
        "lower the strength or load the model in bf16 or fp32"
    )


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
