"""A ComfyUI MODEL's Wan weights as plain modules, for runs with fused (compiled) blocks.

ComfyUI's layers (``comfy.ops``) fetch their weights on every call: cast to the compute dtype,
patched (LoRA, fp8 storage) and, where ComfyUI loads models for dynamic VRAM (comfy-aimdo, its
default on NVIDIA GPUs in 0.33), paged in through calls into a C library that
``torch.compile`` cannot trace (dynamo raises ``Unsupported``), so compiled blocks over those
layers never build. A fused run therefore takes every weight once, as the layer would compute
with it, into a plain :class:`gf_core.WanModel` on the device and compiles that.
"""

from __future__ import annotations

import comfy.ops
import torch
from torch import nn

from ..gf_core import WanConfig, WanModel


def _weights(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a ``comfy.ops`` layer computes with in a run of ``dtype`` on ``device``,
    through core's own cast (its patches included); held by the caller after the cast is released."""
    if hasattr(comfy.ops, "CastBiasWeightContext"):  # casts that hand back a buffer to release
        with comfy.ops.CastBiasWeightContext(layer, dtype=dtype, device=device, bias_dtype=dtype,
                                             offloadable=True) as (weight, bias):
            return _owned(weight, layer.weight), _owned(bias, layer.bias)
    weight, bias = comfy.ops.cast_bias_weight(layer, dtype=dtype, device=device, bias_dtype=dtype)
    return _owned(weight, layer.weight), _owned(bias, layer.bias)


def _owned(t: torch.Tensor | None, held: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself where the cast handed back the tensor the layer holds (a weight already on the
    device in the run dtype: shared, not copied), else a copy (a cast may live in a buffer that the
    next cast reuses)."""
    return t if t is None or t is held else t.clone()


@torch.no_grad()
def plain_wan(patcher, device: torch.device | str, dtype: torch.dtype) -> WanModel:
    """The MODEL's Wan DiT as a :class:`gf_core.WanModel` on ``device`` whose weights are those its
    layers compute with in a run of ``dtype``, once (call after ``load_models_gpu([patcher])``).

    Every weight is in ``dtype`` except a float32 patch embedding, which ComfyUI keeps and runs in
    float32 (the chunk forward then does so too). Weights already on the device in their dtype are
    shared with the MODEL; others (offloaded, stored in fp8, loaded for dynamic VRAM) become one copy.
    """
    device = torch.device(device)
    module = patcher.model.diffusion_model
    cfg = WanConfig.from_module(module)
    with torch.device("meta"):
        needed = set(WanModel(cfg).state_dict())
    sd: dict[str, torch.Tensor] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, comfy.ops.CastWeightBiasOp) or f"{name}.weight" not in needed:
            continue
        keep_float32 = name == "patch_embedding" and layer.weight.dtype == torch.float32
        weight, bias = _weights(layer, torch.float32 if keep_float32 else dtype, device)
        sd[f"{name}.weight"] = weight
        if bias is not None:
            sd[f"{name}.bias"] = bias
    for name, p in module.named_parameters():  # what no cast layer owns (the modulations)
        if name in needed and name not in sd:
            sd[name] = p.to(device=device, dtype=dtype)
    return WanModel.from_state_dict(sd, device=device)
