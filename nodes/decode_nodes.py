"""GF Stream Decode: a long Wan2.1 latent video decoded group by group into a VIDEO."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from fractions import Fraction

import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import InputImpl, Types, io
from PIL import Image

from ..gf_core import pixel_frames
from ..gf_core.errors import BadInput
from .decoding import Mp4Writer, StreamDecoder, is_wan21_vae
from .prompts import FPS
from .sockets import CATEGORY


class GFStreamDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFStreamDecode",
            display_name="GF Stream Decode",
            category=CATEGORY,
            description="Decodes a long Wan2.1 latent video piece by piece with the VAE's causal cache carried "
                        "throughout: the same frames as VAE Decode of the whole video, with the GPU memory of one "
                        "group of latent frames. Optionally writes every frame as a PNG while decoding.",
            inputs=[
                io.Latent.Input("samples", tooltip="Raw Wan latents [B, 16, F, H/8, W/8], e.g. from GF Sampler."),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE (wan_2.1_vae.safetensors)."),
                io.Float.Input("fps", default=float(FPS), min=1.0, max=120.0, step=1.0,
                               tooltip="Frame rate of the VIDEO; the Wan2.1 models make 16 fps."),
                io.Boolean.Input("save_frames", default=False,
                                 tooltip="Also write every frame as a PNG into the output folder as soon as it is "
                                         "decoded (kept even if the run is cancelled)."),
                io.String.Input("filename_prefix", default="grounded_forcing/frames",
                                tooltip="PNG names: <prefix>_<run>_<frame>.png under ComfyUI's output folder."),
                io.Combo.Input("keep_video_in", options=["file", "memory"], default="file",
                               tooltip="file: frames are encoded into an H.264 MP4 in ComfyUI's temp folder as they "
                                       "are decoded, so system RAM stays flat however long the video (Save Video "
                                       "copies it); memory: every frame stays in RAM as float32 (lossless, about "
                                       "4.6 GB per minute at 832x480)."),
            ],
            outputs=[io.Video.Output(display_name="video")],
        )

    @classmethod
    def execute(cls, samples, vae, fps: float, save_frames: bool, filename_prefix: str,
                keep_video_in: str = "file") -> io.NodeOutput:
        latents = samples["samples"]
        if latents.ndim != 5 or latents.shape[1] != 16 or latents.shape[2] < 1:
            raise BadInput(
                f"the latent has shape {list(latents.shape)}; GF Stream Decode takes Wan2.1 video latents [B, 16, F, H, W]"
            )
        model = vae.first_stage_model
        if not is_wan21_vae(model):
            raise BadInput("GF Stream Decode needs the Wan2.1 VAE (wan_2.1_vae.safetensors); "
                           "use VAE Decode for other VAEs")
        batch, _, frames, height, width = latents.shape
        mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode((1, 16, 1, height, width),
                                                                                  vae.vae_dtype),
                           force_full_load=vae.disable_offload)
        # core's VAE.decode hands out its intermediate dtype where it has one, float32 before
        out_dtype = vae.vae_output_dtype() if hasattr(vae, "vae_output_dtype") else torch.float32
        per_video = pixel_frames(frames)
        pbar = comfy.utils.ProgressBar(batch * per_video)
        writer = _FrameWriter(filename_prefix, width * 8, height * 8) if save_frames else None
        mp4 = None
        if keep_video_in == "file":
            mp4 = Mp4Writer(_temp_video_path(), width * 8, height * 8, fps)
        images = None
        written = 0
        try:
            for b in range(batch):
                # one push per video: the decoder's input convolution then runs on the tensor core's
                # whole-video decode gives it, and the pixels come out one group at a time
                z = latents[b:b + 1].to(device=vae.device, dtype=vae.vae_dtype)
                for decoded in _decoded_groups(StreamDecoder(model), z):
                    mm.throw_exception_if_processing_interrupted()
                    if not decoded.shape[2]:
                        continue
                    pixels = vae.process_output(decoded.to(device=vae.output_device, dtype=out_dtype, copy=True))
                    pixels = pixels[0].movedim(0, -1).float()  # [n, H, W, 3]
                    if mp4 is not None:
                        mp4.write(pixels)
                    else:
                        if images is None:
                            images = torch.empty((batch * per_video, *pixels.shape[1:]), dtype=torch.float32,
                                                 device=vae.output_device)
                        images[written:written + pixels.shape[0]] = pixels
                    if writer is not None:
                        writer.write(pixels, written)
                    written += pixels.shape[0]
                    pbar.update(pixels.shape[0])
        finally:
            if mp4 is not None:
                mp4.close()  # a cancelled run keeps the frames decoded so far in the file
        if mp4 is not None:
            return io.NodeOutput(InputImpl.VideoFromFile(mp4.path))
        video = InputImpl.VideoFromComponents(Types.VideoComponents(images=images, frame_rate=Fraction(fps)))
        return io.NodeOutput(video)


def _decoded_groups(decoder: StreamDecoder, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """Pixels [1, 3, T, H, W] of one whole video z [1, 16, F, h, w], group by group, then the rest."""
    yield from decoder.push_groups(z)
    yield decoder.flush()


def _temp_video_path() -> str:
    folder = os.path.join(folder_paths.get_temp_directory(), "grounded_forcing")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"stream_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}_{next(_COUNTER)}.mp4")


_COUNTER = itertools.count()


class _FrameWriter:
    """PNG frames <prefix>_<run>_<frame>.png, numbered like core's saved images."""

    def __init__(self, filename_prefix: str, width: int, height: int):
        folder, name, counter, _, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
        self.stem = os.path.join(folder, f"{name}_{counter:05}")

    def write(self, pixels: torch.Tensor, first: int) -> None:
        """Write frames [n, H, W, 3] in [0, 1] as frames first, first + 1, ..."""
        data = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for i, frame in enumerate(data):
            Image.fromarray(np.ascontiguousarray(frame)).save(f"{self.stem}_{first + i:05}.png", compress_level=4)
