"""The sampler's logic: checks before any GPU work, the chunk loop, the event log, partial saves.

``sample`` plays a ``gf_core.Session`` over any module tree with Wan names (ComfyUI's WanModel or
``gf_core.WanModel``) and returns raw Wan latents, the space ComfyUI's VAE Decode takes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from ..gf_core import ChunkResult, MemoryPolicy, RunConfig, Session, WanConfig, pixel_frames
from ..gf_core.config import LATENT_CHANNELS, MemoryEstimate, chunk_plan, estimate_memory, validate
from ..gf_core.errors import BadInput
from ..gf_core.kernels import compiled, resolve
from ..gf_core.latents import to_raw
from .policy import CHUNK_FRAMES
from .prompts import FPS, Segments

NOISE_ORDERS = ("reference", "chunk")
FUSED_CHOICES = ("auto", "on", "off")  # the node's words for the kernel settings
KERNELS = {"auto": "auto", "on": "fused", "off": "eager"}

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
        raise BadInput(
            f"this MODEL is not a Wan2.1 DiT (it has no {missing[0]}); load a causal Wan2.1 T2V model "
            "(Self-Forcing, LongLive, ...) with GF Load Causal Wan Model or Load Diffusion Model"
        )
    cfg = WanConfig.from_module(module)
    if cfg.in_dim != LATENT_CHANNELS or cfg.out_dim != LATENT_CHANNELS:
        raise BadInput(
            f"this MODEL takes {cfg.in_dim} latent channels, not {LATENT_CHANNELS}, so it is an image-to-video or "
            "Wan2.2 model; load a Wan2.1 text-to-video model"
        )
    return cfg


def run_config(width: int, height: int, seed: int, batch_size: int, noise_order: str = "reference",
               fused: str = "off", rope_kind: str = "float32", device: torch.device | None = None,
               dtype: torch.dtype | None = None) -> RunConfig:
    """The node's inputs as the engine's run configuration (``fused`` is the node's auto / on / off)."""
    if fused not in FUSED_CHOICES:
        raise BadInput(f"unknown fused setting '{fused}'; use one of {', '.join(FUSED_CHOICES)}")
    return RunConfig(height=height, width=width, batch_size=batch_size, seed=seed, chunk_frames=CHUNK_FRAMES,
                     noise_order=noise_order, rope_kind=rope_kind, kernels=KERNELS[fused], dtype=dtype,
                     device=device, output_device="cpu")


def check(module: nn.Module, segments: Segments, memory: MemoryPolicy, config: RunConfig) -> WanConfig:
    """Every check that can fail before the model is loaded; one-sentence :class:`BadInput`."""
    cfg = check_model(module)
    if config.kernels == "fused" and config.rope_kind != "float32":
        raise BadInput(f"fused blocks rotate in float32, but GF DR-RoPE asks for {config.rope_kind}; set its "
                       "precision to float32 or set fused to auto or off")
    if config.device is not None:
        resolve(config.kernels, config.device, config.rope_kind)  # "fused" where it cannot run is refused
    validate(cfg, list(segments), memory, config)
    return cfg


def chunk_count(segments: Segments) -> int:
    return len(chunk_plan(list(segments), CHUNK_FRAMES))


def memory_estimate(cfg: WanConfig, memory: MemoryPolicy, config: RunConfig, dtype: torch.dtype,
                    weight_bytes: int | None = None) -> MemoryEstimate:
    """The run's GPU memory (gf_core.config.estimate_memory) with the kernels it will use."""
    fused = config.device is not None and resolve(config.kernels, config.device, config.rope_kind) == "fused"
    return estimate_memory(cfg, memory, config, dtype, weight_bytes, read_in_place=fused)


def write_partial(folder: str, latents: torch.Tensor, events: list[dict]) -> str:
    """Save finished raw latents in core's Save Latent format (``.latent``); returns the path.

    Core's Load Latent reads it from ComfyUI's input folder; VAE Decode then shows the frames. Every
    call writes a new file: a name already taken (two runs stopped in the same second) gets a number.
    """
    os.makedirs(folder, exist_ok=True)
    stem = f"partial_{time.strftime('%Y%m%d-%H%M%S')}_{latents.shape[2]}f"
    for n in range(10_000):
        path = os.path.join(folder, f"{stem}{f'_{n}' if n else ''}.latent")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # reserves the name
            break
        except FileExistsError:
            continue
    tensors = {"latent_tensor": latents.contiguous(), "latent_format_version_0": torch.tensor([])}
    save_file(tensors, path, metadata={"grounded_forcing_events": "\n".join(json.dumps(e) for e in events)})
    return path


def sample(
    module: nn.Module,
    segments: Segments,
    memory: MemoryPolicy,
    config: RunConfig,
    *,
    on_chunk: Callable[[int, int, ChunkResult], None] | None = None,
    between_chunks: Callable[[], None] | None = None,
    keep_partial: Callable[[torch.Tensor, list[dict]], str] | None = None,
) -> SampleResult:
    """Generate the whole video chunk by chunk.

    Args:
        config: the run (:func:`run_config`); "auto" kernels run uncompiled where compiling fails.
        on_chunk: called with (chunk index, chunk count, chunk) after every chunk (progress, preview).
        between_chunks: called before every chunk but the first (interruption checks).
        keep_partial: called with the finished raw latents and events when the run stops early
            (interrupted or failed after at least one chunk); returns where they were saved. Every
            chunk the GPU finished is kept, also the one a stop finds queued.
    """
    check(module, segments, memory, config)
    total = chunk_count(segments)
    latent_frames = total * CHUNK_FRAMES
    session = Session(module, memory, config, segments=list(segments))
    header = {
        "run": {
            "memory": memory.name,
            "index_rule": memory.index_rule,
            "rope_range": memory.rope_range,
            "rope_precision": config.rope_kind,
            "fused": session.kernels.name == "fused",
            "width": config.width,
            "height": config.height,
            "seed": config.seed,
            "batch_size": config.batch_size,
            "noise_order": config.noise_order,
            "chunks": total,
            "latent_frames": latent_frames,
            "pixel_frames": pixel_frames(latent_frames),
            "fps": FPS,
            "segments": [{"frames": s.frames, "transition": s.transition.kind} for s in segments],
        }
    }
    chunks: list[torch.Tensor] = []
    events: list[dict] = []

    def take(chunk: ChunkResult) -> None:
        chunks.append(chunk.latents.float())
        events.append(chunk.event)

    run = session.play()
    try:
        for chunk in run:
            take(chunk)
            if on_chunk is not None:
                on_chunk(chunk.index, total, chunk)
            if between_chunks is not None and chunk.index + 1 < total:
                between_chunks()
    except BaseException as error:
        _stop(session, run, error, take, chunks, events, total, keep_partial)
        raise
    header["run"]["fused"] = compiled(session.kernels)
    return SampleResult(to_raw(torch.cat(chunks, dim=2)), header, events)


def _stop(session: Session, run, error: BaseException, take: Callable[[ChunkResult], None],
          chunks: list[torch.Tensor], events: list[dict], total: int,
          keep_partial: Callable[[torch.Tensor, list[dict]], str] | None) -> None:
    """After ``error``: take the chunks finished but not yet handed out, close the run, save the partial.
    A failure while saving is attached to ``error`` (which stays the one raised)."""
    try:
        for chunk in session.flush():
            take(chunk)
    except Exception as lost:  # (a device fault: the queued chunk is gone)
        _note(error, f"a queued chunk could not be kept: {type(lost).__name__}: {lost}")
    run.close()  # drops the K/V store before anything else happens
    if not chunks or keep_partial is None:
        return
    try:
        where = keep_partial(to_raw(torch.cat(chunks, dim=2)), events)
    except Exception as failed:
        _note(error, f"saving the {len(chunks) * CHUNK_FRAMES} finished latent frames failed too: "
                     f"{type(failed).__name__}: {failed}")
        log.error("Grounded Forcing: stopped after %d of %d chunks, and saving the finished frames failed: %s",
                  len(chunks), total, failed)
        return
    log.warning(
        "Grounded Forcing: stopped after %d of %d chunks; the %d finished latent frames were saved to %s "
        "(move it to ComfyUI's input folder and open it with Load Latent, then VAE Decode)",
        len(chunks), total, len(chunks) * CHUNK_FRAMES, where,
    )


def _note(error: BaseException, note: str) -> None:
    """Attach ``note`` to ``error`` (shown with its traceback)."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10
        error.__notes__ = [*getattr(error, "__notes__", []), note]
