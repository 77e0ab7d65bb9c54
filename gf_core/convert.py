"""Research checkpoints -> one ComfyUI-style Wan2.1 safetensors file.

    python -m gf_core.convert IN.pt OUT.safetensors [--lora LORA.pt --lora-strength S]
                              [--weights ema|generator] [--dtype bf16|fp16|fp32] [--causal-ar]

Reads a Self-Forcing ``self_forcing_dmd.pt``, CausVid ``model.pt``, LongLive ``longlive_base.pt`` (or
any model :func:`gf_core.checkpoints.load_wan_state_dict` reads), merges a LoRA if given (LongLive's
``lora.pt``, Anchor Forcing's; :func:`~gf_core.checkpoints.merge_lora`, in float32), and writes the
bare Wan keys (``blocks.0.self_attn.q.weight`` ...) as ComfyUI's repackaged Wan2.1 files have them, so
that GF Load Causal Wan Model and core's Load Diffusion Model both read it from
``models/diffusion_models``. Every tensor keeps its dtype unless ``--dtype`` casts it, so loading the
file back gives the converted weights bit for bit.

The file's metadata records where it came from (``source``, ``weights``, ``lora``, ``lora_strength``,
``dtype``, ``model``). ``--causal-ar`` adds ``config = {"transformer": {"causal_ar": true}}``, which
ComfyUI's model detection merges into the Wan config: ComfyUI versions with an autoregressive Wan
(``comfy.ldm.wan.ar_model.CausalWanModel``, 0.33 and later) then build that model for their own AR
sampler, and versions without one build the plain WanModel as before.

An existing output file is never overwritten; the file appears only once it is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoints import check_strength, describe, load_lora, load_wan_state_dict, merge_lora
from .errors import BadInput

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHTS = ("ema", "generator")
SUFFIXES = (".safetensors", ".sft")  # what ComfyUI's frontend downloads and lists as diffusion models
CAUSAL_AR_CONFIG = {"transformer": {"causal_ar": True}}


def check_target(target: str | os.PathLike) -> Path:
    """The output path, refused (one sentence) if it exists, has another suffix or no folder."""
    path = Path(target)
    if path.suffix.lower() not in SUFFIXES:
        raise BadInput(f"the output {path.name} does not end in .safetensors; name it e.g. {path.stem}.safetensors")
    if path.exists():
        raise BadInput(f"{path} already exists and is never overwritten; pick another name or delete it first")
    if not path.parent.is_dir():
        raise BadInput(f"the folder {path.parent} does not exist; create it or write the file elsewhere")
    return path


def convert(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    lora: str | os.PathLike | None = None,
    lora_strength: float = 1.0,
    weights: str = "ema",
    dtype: str | None = None,
    causal_ar: bool = False,
) -> dict[str, str]:
    """Write ``source`` (+ ``lora`` merged at ``lora_strength``) as one safetensors file; returns its metadata.

    Args:
        source: a model checkpoint in any format :func:`~gf_core.checkpoints.load_wan_state_dict` reads.
        target: the new file (``.safetensors`` / ``.sft``); refused if it exists.
        weights: "ema" or "generator": which generator of a training checkpoint (falls back to what it has).
        dtype: "bf16", "fp16" or "fp32" to cast every tensor; None keeps each tensor's dtype.
        causal_ar: add the metadata that makes ComfyUI 0.33+ build its CausalWanModel.

    Raises:
        BadInput: one sentence, before anything is written, for an unusable input or output.
    """
    path = check_target(target)
    if weights not in WEIGHTS:
        raise BadInput(f"unknown weights '{weights}'; use 'ema' or 'generator'")
    if dtype is not None and dtype not in DTYPES:
        raise BadInput(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)} (or leave it out to keep the file's)")
    check_strength(lora_strength)
    lora_weights = load_lora(lora) if lora is not None else None  # small: read and checked before the base
    sd = load_wan_state_dict(source, prefer=weights)
    if lora_weights is not None:
        sd = merge_lora(sd, lora_weights, strength=lora_strength)
    if dtype is not None:
        sd = {k: v.to(DTYPES[dtype]) for k, v in sd.items()}
    metadata = {
        "source": Path(source).name,
        "weights": weights,
        "dtype": dtype or "as stored",
        "model": describe(sd),
    }
    if lora is not None:
        metadata.update(lora=Path(lora).name, lora_strength=repr(float(lora_strength)))
    if causal_ar:
        metadata["config"] = json.dumps(CAUSAL_AR_CONFIG)
    _write(_separate(sd), metadata, path)
    return metadata


def _separate(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses shared tensors): copies only where needed."""
    seen: set[int] = set()
    out = {}
    for key, tensor in sd.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _write(sd: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write into a temporary file beside ``path``, then give it its name without replacing anything."""
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file(sd, partial, metadata=metadata)
        try:
            os.link(partial, path)  # fails if the name was taken meanwhile, never replaces it
        except FileExistsError:
            raise BadInput(f"{path} appeared while converting and is never overwritten; "
                           "pick another name or delete it first") from None
        except OSError:  # a file system without hard links
            if path.exists():
                raise BadInput(f"{path} appeared while converting and is never overwritten; "
                               "pick another name or delete it first") from None
            os.rename(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m gf_core.convert",
        description="Convert a Self-Forcing / CausVid / LongLive checkpoint (with its LoRA merged, or not) into one "
                    "ComfyUI-style Wan2.1 safetensors file for models/diffusion_models.",
    )
    ap.add_argument("source", help="the checkpoint: self_forcing_dmd.pt, model.pt, longlive_base.pt, ...")
    ap.add_argument("target", help="the new .safetensors file (an existing file is never overwritten)")
    ap.add_argument("--lora", help="a LoRA to merge into the weights (LongLive's lora.pt, Anchor Forcing's)")
    ap.add_argument("--lora-strength", type=float, default=None, help="scale of the LoRA update (default 1)")
    ap.add_argument("--weights", choices=WEIGHTS, default="ema",
                    help="which generator of a training checkpoint: the EMA copy or the raw generator "
                         "(falls back to what the file has; default ema)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="cast every tensor (default: keep the file's dtypes; bf16 halves a float32 EMA file)")
    ap.add_argument("--causal-ar", action="store_true",
                    help="mark the file so that ComfyUI 0.33+ builds its CausalWanModel (core's AR video nodes)")
    args = ap.parse_args(argv)
    if args.lora_strength is not None and args.lora is None:
        raise SystemExit("gf_core.convert: --lora-strength was given without --lora; add the LoRA file or drop it")
    try:
        metadata = convert(args.source, args.target, lora=args.lora,
                           lora_strength=1.0 if args.lora_strength is None else args.lora_strength,
                           weights=args.weights, dtype=args.dtype, causal_ar=args.causal_ar)
    except BadInput as e:
        raise SystemExit(f"gf_core.convert: {e}") from None
    merged = f" + {metadata['lora']} x {metadata['lora_strength']}" if "lora" in metadata else ""
    marked = "; marked causal_ar for ComfyUI's CausalWanModel" if args.causal_ar else ""
    print(f"wrote {args.target}: {metadata['model']} from {metadata['source']}{merged}{marked}")


if __name__ == "__main__":
    main()
