"""Reading a causal Wan checkpoint (+ optional LoRA) into the state dict ComfyUI builds a MODEL from."""

from __future__ import annotations

import torch

from ..gf_core.checkpoints import check_strength, load_lora, load_wan_state_dict, merge_lora
from ..gf_core.errors import BadInput

WEIGHTS = ("ema", "generator")
NO_LORA = "none"


def weight_dtypes() -> dict[str, torch.dtype | None]:
    """Weight dtype choices of the loader; None lets ComfyUI pick for the device."""
    choices: dict[str, torch.dtype | None] = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if hasattr(torch, "float8_e4m3fn"):
        choices["fp8_e4m3fn"] = torch.float8_e4m3fn
    return choices


def model_options(weight_dtype: str) -> dict:
    """``model_options`` for ``comfy.sd.load_diffusion_model_state_dict``."""
    choices = weight_dtypes()
    if weight_dtype not in choices:
        raise BadInput(f"unknown weight dtype {str(weight_dtype)[:40]!r}; use one of {', '.join(choices)}")
    dtype = choices[weight_dtype]
    return {} if dtype is None else {"dtype": dtype}


def read_state_dict(
    model_path: str, weights: str = "ema", lora_path: str | None = None, lora_strength: float = 1.0
) -> dict[str, torch.Tensor]:
    """Bare Wan keys from any supported checkpoint, with a LoRA merged in (float32 merge).

    Raises ``gf_core.checkpoints.CheckpointError`` (one sentence) for files that cannot be used;
    the options are checked before any file is read.
    """
    if weights not in WEIGHTS:
        raise BadInput(f"unknown weights {str(weights)[:40]!r}; use 'ema' or 'generator'")
    check_strength(lora_strength)
    # The LoRA is small: read and check it before the base model's gigabytes.
    lora = load_lora(lora_path) if lora_path is not None and lora_strength != 0.0 else None
    sd = load_wan_state_dict(model_path, prefer=weights)
    return sd if lora is None else merge_lora(sd, lora, strength=lora_strength)
