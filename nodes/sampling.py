"""The sampler's logic: checks before any GPU work, the chunk loop, the event log, partial saves.

``sample`` drives ``gf_core.stream`` over any module tree with Wan names (ComfyUI's WanModel or
``gf_core.WanModel``) and returns raw Wan latents, the space ComfyUI's VAE Decode takes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from ..gf_core import ChunkResult, MemoryPolicy, WanConfig, pixel_frames, stream
from ..gf_core.latents import to_raw
from ..gf_core.stream import LATENT_CHANNELS, check_fused, chunk_plan, validate
from ..gf_core.wan import CompileError
from .policy import CHUNK_FRAMES
from .prompts import FPS, Segments

NOISE_ORDERS = ("reference", "chunk")

log = logging.getLogger(__name__)


@dataclass
class SampleResult:
    """Raw Wan latents [B, 16, F, H/8, W/8] (float32, CPU), the run header and one event per chunk."""

    latents: torch.Tensor
    header: dict
    events: list[dict]

    @property
    def log(self) -> str:
        """JSON lines: the run header, then one line per chunk."""
        return "\n".join(json.dumps(e) for e in [self.header, *self.events])


def check_model(module: nn.Module) -> WanConfig:
    """The config of a Wan2.1 text-to-video module tree; raises for anything else."""
    needed = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head")
    missing = [name for name in needed if not hasattr(module, name)]
    if missing:
        raise ValueError(
            f"this MODEL is not a Wan2.1 DiT (it has no {missing[0]}); load a causal Wan2.1 T2V model "
            "(Self-Forcing, LongLive, ...) with GF Load Causal Wan Model or Load Diffusion Model"
        )
    cfg = WanConfig.from_module(module)
    if cfg.in_dim != LATENT_CHANNELS or cfg.out_dim != LATENT_CHANNELS:
        raise ValueError(
            f"this MODEL takes {cfg.in_dim} latent channels, not {LATENT_CHANNELS}, so it is an image-to-video or "
            "Wan2.2 model; load a Wan2.1 text-to-video model"
        )
    return cfg


def check(
    module: nn.Module, segments: Segments, memory: MemoryPolicy, width: int, height: int, batch_size: int,
    noise_order: str = "reference", fused: str = "off", rope_kind: str = "float32",
    device: torch.device | None = None,
) -> WanConfig:
    """Every check that can fail before the model is loaded; one-sentence ValueErrors."""
    cfg = check_model(module)
    if noise_order not in NOISE_ORDERS:
        raise ValueError(f"unknown noise order '{noise_order}'; use one of {', '.join(NOISE_ORDERS)}")
    if fused not in FUSED_CHOICES:
        raise ValueError(f"unknown fused setting '{fused}'; use one of {', '.join(FUSED_CHOICES)}")
    if fused == "on" and rope_kind != "float32":
        raise ValueError(f"fused blocks rotate in float32, but GF DR-RoPE asks for {rope_kind}; set its "
                         "precision to float32 or set fused to auto or off")
    if fused == "on" and device is not None:
        check_fused(rope_kind, torch.device(device))
    validate(cfg, list(segments), memory, height, width, batch_size, CHUNK_FRAMES)
    return cfg


FUSED_CHOICES = ("auto", "on", "off")


def resolve_fused(choice: str, rope_kind: str, device: torch.device | str | None) -> bool:
    """Whether a run uses fused blocks: "on" and "off" as asked; "auto" where they can run (a CUDA
    device with Triton, float32 RoPE)."""
    if choice == "auto":
        return (device is not None and torch.device(device).type == "cuda" and rope_kind == "float32"
                and importlib.util.find_spec("triton") is not None)
    return choice == "on"


def chunk_count(segments: Segments) -> int:
    return len(chunk_plan(list(segments), CHUNK_FRAMES))


def working_bytes(cfg: WanConfig, memory: MemoryPolicy, width: int, height: int, batch_size: int,
                  dtype: torch.dtype, fused: bool = False) -> int:
    """A rough budget of the GPU memory a run needs besides the weights (for model offloading).

    The K/V store of every cached frame in every block (fused: plus a chunk of value slots),
    plus the largest chunk forward (a context of every cached frame and the chunk, a few
    activations of width ``ffn_dim``).
    """
    tokens = (height // 16) * (width // 16)
    cached = sum(r.frames for r in memory.regions)
    itemsize = torch.empty((), dtype=dtype).element_size()
    slots = 2 * cached + (CHUNK_FRAMES if fused else 0)  # keys, values (+ scratch values)
    store = cfg.num_layers * batch_size * slots * tokens * cfg.dim * itemsize
    chunk_tokens = batch_size * CHUNK_FRAMES * tokens
    forward = (4 * cfg.ffn_dim + 8 * cfg.dim) * chunk_tokens * itemsize + 2 * (cached + CHUNK_FRAMES) * tokens * cfg.dim * itemsize
    return store + forward


def write_partial(folder: str, latents: torch.Tensor, events: list[dict]) -> str:
    """Save finished raw latents in core's Save Latent format (``.latent``); returns the path.

    Core's Load Latent reads it from ComfyUI's input folder; VAE Decode then shows the frames.
    """
    os.makedirs(folder, exist_ok=True)
    name = f"partial_{time.strftime('%Y%m%d-%H%M%S')}_{latents.shape[2]}f.latent"
    path = os.path.join(folder, name)
    tensors = {"latent_tensor": latents.contiguous(), "latent_format_version_0": torch.tensor([])}
    save_file(tensors, path, metadata={"grounded_forcing_events": "\n".join(json.dumps(e) for e in events)})
    return path


def sample(
    module: nn.Module,
    segments: Segments,
    memory: MemoryPolicy,
    *,
    width: int = 832,
    height: int = 480,
    seed: int = 0,
    batch_size: int = 1,
    noise_order: str = "reference",
    rope_kind: str = "float32",
    fused: str = "off",
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    on_chunk: Callable[[int, int, ChunkResult], None] | None = None,
    between_chunks: Callable[[], None] | None = None,
    keep_partial: Callable[[torch.Tensor, list[dict]], str] | None = None,
) -> SampleResult:
    """Generate the whole video chunk by chunk.

    Args:
        on_chunk: called with (chunk index, chunk count, chunk) after every chunk (progress, preview).
        between_chunks: called before every chunk but the first (interruption checks).
        keep_partial: called with the finished raw latents and events when the run stops early
            (interrupted or failed after at least one chunk); returns where they were saved.
        fused: "on", "off" or "auto" (:func:`resolve_fused`); with "auto", a machine where the blocks
            cannot be compiled samples unfused instead (the first chunk has not been made then).
    """
    check(module, segments, memory, width, height, batch_size, noise_order, fused, rope_kind, device)
    use_fused = resolve_fused(fused, rope_kind, device)
    total = chunk_count(segments)
    latent_frames = total * CHUNK_FRAMES
    header = {
        "run": {
            "memory": memory.name,
            "index_rule": memory.index_rule,
            "rope_range": memory.rope_range,
            "rope_precision": rope_kind,
            "fused": use_fused,
            "width": width,
            "height": height,
            "seed": seed,
            "batch_size": batch_size,
            "noise_order": noise_order,
            "chunks": total,
            "latent_frames": latent_frames,
            "pixel_frames": pixel_frames(latent_frames),
            "fps": FPS,
            "segments": [{"frames": s.frames, "transition": s.transition.kind} for s in segments],
        }
    }
    chunks: list[torch.Tensor] = []
    events: list[dict] = []

    def stop(run) -> None:
        run.close()  # drops the K/V store before anything else happens
        if chunks and keep_partial is not None:
            where = keep_partial(to_raw(torch.cat(chunks, dim=2)), events)
            log.warning(
                "Grounded Forcing: stopped after %d of %d chunks; the %d finished latent frames were saved to %s "
                "(move it to ComfyUI's input folder and open it with Load Latent, then VAE Decode)",
                len(chunks), total, len(chunks) * CHUNK_FRAMES, where,
            )

    while True:
        run = stream(module, list(segments), memory, height=height, width=width, batch_size=batch_size, seed=seed,
                     chunk_frames=CHUNK_FRAMES, dtype=dtype, device=device, noise_order=noise_order,
                     rope_kind=rope_kind, output_device="cpu", fused=use_fused)
        try:
            for chunk in run:
                chunks.append(chunk.latents.float())
                events.append(chunk.event)
                if on_chunk is not None:
                    on_chunk(chunk.index, total, chunk)
                if between_chunks is not None and chunk.index + 1 < total:
                    between_chunks()
            break
        except CompileError as e:
            if fused != "auto" or chunks or not use_fused:
                stop(run)
                raise
            run.close()
            log.warning("Grounded Forcing: %s; sampling without fused blocks", e)
            use_fused = header["run"]["fused"] = False
        except BaseException:
            stop(run)
            raise
    return SampleResult(to_raw(torch.cat(chunks, dim=2)), header, events)
