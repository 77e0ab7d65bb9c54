"""Wan latent space helpers: normalisation and a cheap RGB preview.

The research models work in the normalised Wan latent space (``(raw - mean) / std``);
ComfyUI's VAE decodes raw latents. The 16 -> RGB factors are the Wan2.1 preview projection.
"""

from __future__ import annotations

import torch

WAN_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420), (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975), (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def _stat(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)


def to_raw(latents: torch.Tensor) -> torch.Tensor:
    """Normalised [B, 16, F, H, W] -> raw Wan VAE latents (what ComfyUI's VAE Decode takes)."""
    return latents * _stat(WAN_STD, latents) + _stat(WAN_MEAN, latents)


def to_normalised(latents: torch.Tensor) -> torch.Tensor:
    """Raw Wan VAE latents -> the normalised space the research models use."""
    return (latents - _stat(WAN_MEAN, latents)) / _stat(WAN_STD, latents)


def preview_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, 16, F, H, W] -> uint8 RGB frames [B, F, H, W, 3] (latent resolution)."""
    factors = torch.tensor(RGB_FACTORS, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bcfhw,cr->bfhwr", latents.float(), factors) + bias
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)
