"""Stream decoding with the Wan2.1 VAE: latent frame by latent frame, one causal cache throughout.

The Wan2.1 VAE decoder is causal in time: every causal 3D convolution keeps the last two input
frames of the previous call in a feature cache, and the first latent frame decodes to 1 pixel
frame, every later one to 4. ``VAE.decode`` starts a fresh cache on every call, so decoding a
long video in separate calls loses frames and leaves seams. :class:`StreamDecoder` keeps the
cache across calls instead: feeding it the latent frames in any grouping gives exactly the
frames of one whole-video decode, while only one latent frame's activations exist at a time.

It drives the modules of ComfyUI's ``comfy.ldm.wan.vae.WanVAE`` (``conv2`` and ``decoder`` with
``feat_cache`` / ``feat_idx``) the way its own ``decode`` loop does, without importing ComfyUI.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import torch
from torch import nn


def is_wan21_vae(model: nn.Module) -> bool:
    """True for a Wan2.1 VAE module (16 latent channels, causal decoder with a feature cache)."""
    decoder = getattr(model, "decoder", None)
    return (
        type(model).__name__ == "WanVAE"
        and hasattr(model, "conv2")
        and decoder is not None
        and type(decoder).__name__ == "Decoder3d"
        and getattr(model, "z_dim", None) == 16
        and _cache_slots(decoder) > 0
    )


def _cache_slots(decoder: nn.Module) -> int:
    return sum(1 for m in decoder.modules() if type(m).__name__ == "CausalConv3d")


class StreamDecoder:
    """Decode raw Wan latents [B, 16, F, H, W] in pieces with one persistent causal cache.

    Returns pixels in the VAE's own range ([-1, 1], before ComfyUI's ``process_output``),
    [B, 3, T, 8H, 8W] with T = 1 + 4 (F - 1) over all calls together.
    """

    def __init__(self, vae: nn.Module):
        self.vae = vae
        self.cache: list = [None] * _cache_slots(vae.decoder)
        self.latent_frames = 0

    @torch.no_grad()
    def decode_frame(self, z: torch.Tensor) -> torch.Tensor:
        """One latent frame [B, 16, 1, H, W] -> 1 pixel frame (the first) or 4 (later ones)."""
        x = self.vae.conv2(z)
        out = self.vae.decoder(x, feat_cache=self.cache, feat_idx=[0])
        self.latent_frames += 1
        return out

    def frames(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decode every latent frame of ``z`` [B, 16, F, H, W] in order, yielding each one's pixels."""
        for i in range(z.shape[2]):
            yield self.decode_frame(z[:, :, i:i + 1])


class Mp4Writer:
    """Frames [n, H, W, 3] in [0, 1] appended to an H.264 MP4 as they come (PyAV, ComfyUI's own
    video library): host memory holds one frame, however long the video. Close it to finish the
    file; a file closed early (a cancelled run) keeps every frame written so far."""

    def __init__(self, path: str, width: int, height: int, fps: float, crf: int = 16):
        import av

        self.path = path
        self.container = av.open(path, mode="w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf)}
        self.frames = 0

    def write(self, pixels: torch.Tensor) -> None:
        import av

        data = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for frame in data:
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in self.stream.encode(video_frame):
                self.container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
