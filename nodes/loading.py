"""Reading a causal Wan checkpoint (+ optional LoRA) into the state dict ComfyUI builds a MODEL from."""

from __future__ import annotations

import torch

from ..gf_core.checkpoints import load_lora, load_wan_state_dict, merge_lora

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
        raise ValueError(f"unknown weight dtype '{weight_dtype}'; use one of {', '.join(choices)}")
    dtype = choices[weight_dtype]
    return {} if dtype is None else {"dtype": dtype}


def read_state_dict(
    model_path: str, weights: str = "ema", lora_path: str | None = None, lora_strength: float = 1.0
) -> dict[str, torch.Tensor]:
    """Bare Wan keys from any supported checkpoint, with a LoRA merged in (float32 merge).

    Raises ``gf_core.checkpoints.CheckpointError`` (one sentence) for files that cannot be used.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights '{weights}'; use 'ema' or 'generator'")
    sd = load_wan_state_dict(model_path, prefer=weights)
    if lora_path is not None and lora_strength != 0.0:
        sd = merge_lora(sd, load_lora(lora_path), strength=lora_strength)
    return sd
