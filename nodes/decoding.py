"""Stream decoding with the Wan2.1 VAE: latents pushed in any grouping, one causal cache throughout.

The Wan2.1 VAE decoder is causal in time: every causal 3D convolution keeps the last input frames
of the previous call in a feature cache; the first latent frame decodes to 1 pixel frame, every
later one to 4. ``VAE.decode`` starts a fresh cache on every call, so decoding a long video in
separate calls loses frames and leaves seams. :class:`StreamDecoder` keeps one cache across calls
instead and feeds the decoder the same groups of latent frames as ComfyUI's own whole-video
``WanVAE.decode``, so the frames are exactly that decode's, while only one group's activations
exist at a time.

ComfyUI's decoders differ here: one line feeds latent frames one by one and its cache keeps two
frames whatever a call holds (its decoder returns a tensor); a later line feeds 1, 2, 2, 2, ...
frames, its cache keeps only the last frames of each call, so another grouping gives other
pixels (its decoder returns a list of chunks). The grouping and the cache size are therefore read
off the installed VAE itself: :func:`read_schedule` runs its ``decode`` once on a tiny latent and
records what it passes to its decoder. No version string is consulted, and nothing here imports
ComfyUI: it drives the modules of ``comfy.ldm.wan.vae.WanVAE`` (``conv2`` and ``decoder`` with
``feat_cache`` / ``feat_idx``) the way their own ``decode`` loop does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

PROBE_FRAMES = 10
"""Latent frames of the schedule probe: enough for a first group, full groups and a short last one
for groups of 1 to 8 frames."""
PROBE_SIZE = 8
"""Latent pixels across the probe: the VAE's attention runs over one token per pixel, and CUDA's
attention kernels refuse a single token in half precision (an unaligned stride)."""


def is_wan21_vae(model: nn.Module) -> bool:
    """True for a Wan2.1 VAE module (16 latent channels, a causal ``Decoder3d`` behind ``conv2``)."""
    decoder = getattr(model, "decoder", None)
    return (
        type(model).__name__ == "WanVAE"
        and hasattr(model, "conv2")
        and type(decoder).__name__ == "Decoder3d"
        and getattr(model, "z_dim", None) == 16
    )


@dataclass(frozen=True)
class DecodeSchedule:
    """How a VAE's own ``decode`` feeds its decoder: a first group of ``first`` latent frames, then
    groups of ``group`` frames (the last one possibly shorter), through one feature cache of
    ``cache_slots`` entries. Pixels come out as ``channels`` x (``scale`` H) x (``scale`` W)."""

    first: int
    group: int
    cache_slots: int
    channels: int
    scale: int

    def groups(self, frames: int) -> list[int]:
        """Group sizes for a video of ``frames`` latent frames, e.g. 7 -> [1, 2, 2, 2]."""
        sizes = [min(self.first, frames)]
        left = frames - sizes[0]
        while left > 0:
            sizes.append(min(self.group, left))
            left -= sizes[-1]
        return sizes


def read_schedule(vae: nn.Module, like: torch.Tensor) -> DecodeSchedule:
    """Run ``vae.decode`` once on zeros [1, 16, PROBE_FRAMES, PROBE_SIZE, PROBE_SIZE] (device and dtype of ``like``)
    and record the temporal size of every decoder call and the cache it is given."""
    calls: list[tuple[int, int | None]] = []

    def record(_module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        cache = kwargs["feat_cache"] if "feat_cache" in kwargs else (args[1] if len(args) > 1 else None)
        calls.append((x.shape[2], None if cache is None else len(cache)))

    handle = vae.decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            pixels = vae.decode(like.new_zeros((1, like.shape[1], PROBE_FRAMES, PROBE_SIZE, PROBE_SIZE)))
    finally:
        handle.remove()
    sizes = [n for n, _ in calls]
    slots = {s for _, s in calls}
    schedule = None
    if len(sizes) > 1 and len(slots) == 1 and None not in slots:
        schedule = DecodeSchedule(first=sizes[0], group=sizes[1], cache_slots=slots.pop(),
                                  channels=pixels.shape[1], scale=pixels.shape[-1] // PROBE_SIZE)
    if schedule is None or schedule.groups(PROBE_FRAMES) != sizes:
        raise RuntimeError(
            f"this ComfyUI's Wan VAE decodes {PROBE_FRAMES} latent frames in decoder calls of {sizes} frames, a "
            "pattern GF Stream Decode does not know; decode with core's VAE Decode instead"
        )
    return schedule


class StreamDecoder:
    """Decode raw Wan latents [B, 16, F, H, W] pushed in any grouping, with one persistent cache.

    ``push(z)`` returns the pixel frames that are final so far, [B, C, T, 8H, 8W] (C = 3; T may
    be 0 while a group waits for its frames); ``flush()`` decodes what is left. Over all calls
    together T = 1 + 4 (F - 1), in the VAE's range ([-1, 1], before ComfyUI's ``process_output``).

    The decoder sees exactly the groups of core's whole-video decode, so the frames are that
    decode's. One step runs per push rather than per group: ``conv2``, a 1x1x1 convolution, over
    the pushed latents. Pushing a whole video at once therefore reproduces core's decode bit for
    bit; pushed in pieces, the result is the same wherever the convolution rounds a frame alike
    inside runs of any length (it did at the sizes tested; at a few positions per frame a CPU
    backend can differ in the last bit).
    """

    def __init__(self, vae: nn.Module):
        self.vae = vae
        self.schedule: DecodeSchedule | None = None  # read at the first push, on its device and dtype
        self.cache: list = []
        self.pending: torch.Tensor | None = None  # conv2 outputs [B, 16, n, H, W] waiting for their group
        self.groups_done = 0
        self.flushed = False

    def push(self, z: torch.Tensor) -> torch.Tensor:
        """Take the next latent frames [B, 16, n, H, W]; return the pixel frames now final."""
        return self._joined(list(self.push_groups(z)))

    @torch.no_grad()
    def push_groups(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """:meth:`push`, handing out each decoded group's pixels as soon as it is decoded (so a
        caller that pushes a whole video holds one group's pixels at a time)."""
        if self.flushed:
            raise RuntimeError("this StreamDecoder was flushed; make a new one for the next video")
        if self.schedule is None:
            self.schedule = read_schedule(self.vae, z)
            self.cache = [None] * self.schedule.cache_slots
        x = self.vae.conv2(z)
        self.pending = x if self.pending is None else torch.cat([self.pending, x], dim=2)
        while True:
            need = self.schedule.first if self.groups_done == 0 else self.schedule.group
            if self.pending.shape[2] < need:
                return
            group, self.pending = self.pending[:, :, :need], self.pending[:, :, need:]
            yield self._decode(group)

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """Decode the latent frames still waiting (the video's last, shorter group); returns their pixels."""
        if self.pending is None:
            raise RuntimeError("nothing was pushed to this StreamDecoder")
        out = [self._decode(self.pending)] if self.pending.shape[2] else []
        self.flushed = True
        self.cache = []
        return self._joined(out)

    def _decode(self, group: torch.Tensor) -> torch.Tensor:
        out = self.vae.decoder(group, feat_cache=self.cache, feat_idx=[0])
        self.groups_done += 1
        return torch.cat(out, dim=2) if isinstance(out, (list, tuple)) else out

    def _joined(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        if pieces:
            return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
        b, _, _, h, w = self.pending.shape
        s = self.schedule
        return self.pending.new_empty((b, s.channels, 0, h * s.scale, w * s.scale))


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
