"""What every bench script's JSON result starts with, writing it, and the random Wan VAE the decode benches share."""

from __future__ import annotations

import json
import sys

import torch


def run_header(**extra) -> dict:
    """The device and PyTorch a result was measured with, then ``extra``."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, **extra}


def write_json(result: dict, path: str | None) -> None:
    """Write ``result`` as indented JSON to ``path`` (nothing without a path)."""
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)


def model_label(folder: str | None) -> str:
    """A toy model's name in a bench's output: "shipped" or its folder's name."""
    import os

    from gf_core import toyworld as tw

    if folder is None or os.path.samefile(folder, tw.TOY_DIR):
        return "shipped"
    return os.path.basename(os.path.normpath(folder))


def random_wan_vae(comfyui: str, device: str, dtype: torch.dtype):
    """ComfyUI's Wan2.1 VAE module (``comfy.ldm.wan.vae.WanVAE``) at the shape core builds for
    wan_2.1_vae.safetensors, with random weights."""
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    from comfy.ldm.wan.vae import WanVAE

    g = torch.Generator().manual_seed(0)
    vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    with torch.no_grad():
        for name, p in vae.named_parameters():  # ComfyUI's layers skip weight init
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.zero_()
    return vae.to(device=device, dtype=dtype).eval()
