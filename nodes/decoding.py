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


class OverlappedDecoder:
    """Decodes chunks on a second CUDA stream while the sampling stream goes on with the next chunk.

    :meth:`submit` takes a chunk's latents on the GPU as the sampling stream made them and returns
    at once: the decode waits on the GPU for them, not on the host. :meth:`collect` returns, in
    order, the host pixels of the chunks whose decode has finished (all of them with ``wait``).
    Without a CUDA device (or with ``overlap=False``) every chunk decodes in :meth:`submit`, on the
    caller's stream. Pixels as :class:`StreamDecoder` gives them.
    """

    def __init__(self, decoder: StreamDecoder, device: torch.device | str, overlap: bool = True):
        self.decoder = decoder
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
        self.pending: list[tuple[torch.cuda.Event | None, torch.Tensor]] = []

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self.decoder.frames(z)), dim=2)

    def submit(self, z: torch.Tensor) -> None:
        """Queue the decode of latents [B, 16, F, H, W] (raw Wan latents, on the VAE's device)."""
        if self.stream is None:
            self.pending.append((None, self._decode(z).cpu()))
            return
        ready = torch.cuda.current_stream(z.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            z.record_stream(self.stream)  # the sampling stream may not reuse its memory before this decode
            pixels = self._decode(z)
            host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            done = self.stream.record_event()
        self.pending.append((done, host))

    def collect(self, wait: bool = False) -> list[torch.Tensor]:
        """Pixels [B, 3, T, H, W] (host) of each finished chunk, oldest first."""
        out = []
        while self.pending:
            event, host = self.pending[0]
            if event is not None:
                if not wait and not event.query():
                    break
                event.synchronize()
            out.append(host)
            self.pending.pop(0)
        return out


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
