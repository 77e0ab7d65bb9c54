"""Segments -> chunks -> latents: the public generation API.

``stream`` yields every chunk as soon as its clean latents exist; ``generate`` collects them.
Latents are in the normalised Wan latent space of the research models ([B, 16, F, H/8, W/8]).

Random draws, in order (``noise_order="reference"``, the research code's order): the initial
noise of the whole video as one tensor [B, F, 16, H/8, W/8] in the run dtype, then for every
chunk, for every denoising step but the last, one re-noise tensor [B * frames, 16, H/8, W/8].
With a CUDA generator seeded like the reference's global seed this reproduces its noise.
The drawn noise is then kept in host memory (about 200 KB per latent frame at 832x480 in bf16)
and each chunk's part copied to the device. ``noise_order="chunk"`` draws each chunk's initial
noise just before the chunk instead, so nothing at all grows with the length of the video.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import torch
from torch import nn

from .memory import ContextSource, Memory
from .policies import MemoryPolicy, preset
from .recache import Transition, apply_switch, resolve
from .rope import RopeTable
from .sampler import Schedule, renoise, to_x0
from .transfer import start_download, upload
from .wan import (
    AttentionFn,
    TextContext,
    WanConfig,
    encode_text,
    forward_chunk,
    fused_attention,
    padding_start,
    sdpa_attention,
)

LATENT_CHANNELS = 16
SPATIAL_DOWNSCALE = 8  # Wan VAE: 8 pixels per latent pixel


@dataclass
class Segment:
    """A prompt held for ``frames`` latent frames; ``transition`` says how the segment starts."""

    prompt: torch.Tensor  # [1 or B, L, text_dim]
    frames: int
    transition: Transition = field(default_factory=Transition)


@dataclass
class ChunkResult:
    index: int
    start: int
    segment: int
    latents: torch.Tensor  # [B, 16, frames, H/8, W/8]
    event: dict


@dataclass
class GenerationResult:
    latents: torch.Tensor  # [B, 16, F, H/8, W/8]
    events: list[dict]


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames the Wan VAE decodes from ``latent_frames`` latent frames (1 + 4 (F - 1))."""
    return 1 + 4 * (latent_frames - 1) if latent_frames > 0 else 0


def chunk_plan(segments: list[Segment], chunk_frames: int) -> list[tuple[int, int]]:
    """(start frame, segment) of every chunk. A segment boundary takes effect at the first chunk
    boundary at or after the requested frame, as in LongLive's interactive pipeline."""
    bounds, total = [], 0
    for s in segments:
        total += s.frames
        bounds.append(math.ceil(total / chunk_frames) * chunk_frames)
    plan, start = [], 0
    for k, end in enumerate(bounds):
        while start < end:
            plan.append((start, k))
            start += chunk_frames
    return plan


def validate(
    model_cfg: WanConfig,
    segments: list[Segment],
    policy: MemoryPolicy,
    height: int,
    width: int,
    batch_size: int,
    chunk_frames: int,
) -> None:
    """Raise ValueError with one sentence for anything that cannot run, before any GPU work."""
    step = SPATIAL_DOWNSCALE * model_cfg.patch_size[1]
    for name, value, default in (("height", height, 480), ("width", width, 832)):
        if value < step or value % step:
            near = max(step, round(value / step) * step)
            raise ValueError(f"{name} {value} is not a multiple of {step}; use {near} (default {default})")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} is below 1; use 1 or more")
    if chunk_frames < 1:
        raise ValueError(f"chunk size {chunk_frames} is below 1 latent frame; the models were trained with 3")
    if not segments:
        raise ValueError("no prompt segments were given; add at least one segment")
    policy.validate(chunk_frames)
    for k, seg in enumerate(segments):
        p = seg.prompt
        if p.ndim != 3 or p.shape[2] != model_cfg.text_dim or p.shape[0] not in (1, batch_size):
            raise ValueError(
                f"segment {k + 1}: prompt embedding of shape {tuple(p.shape)} does not fit; "
                f"expected [1, L, {model_cfg.text_dim}] (umT5 output for this model)"
            )
        if seg.frames < chunk_frames:
            raise ValueError(
                f"segment {k + 1} is {seg.frames} latent frames, shorter than one chunk of {chunk_frames}; "
                f"make it at least {chunk_frames} frames"
            )
        if k == 0 and seg.transition.kind == "cut":
            raise ValueError("the first segment starts with a cut, but there is nothing to cut from; remove that cut")
        try:
            resolve(policy, seg.transition)
        except ValueError as e:
            raise ValueError(f"segment {k + 1}: {e}") from None
    if batch_size > 1 and policy.anchor_region and policy.candidates != "frozen":
        raise ValueError(
            f"batch size {batch_size} with the GCM diversity update would let the videos of the batch choose "
            "each other's anchors; use batch size 1 (queue several runs) or set the GCM update rule to 'frozen'"
        )
    total = chunk_plan(segments, chunk_frames)[-1][0] + chunk_frames
    if policy.max_frames is not None and total > policy.max_frames:
        raise ValueError(
            f"the '{policy.name}' memory holds at most {policy.max_frames} latent frames but the segments ask for "
            f"{total}; shorten the video or use a windowed policy such as 'grounded' or 'longlive'"
        )


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = model.patch_embedding.weight
    return p.dtype, p.device


def check_fused(rope_kind: str, device: torch.device) -> None:
    """What fused blocks need, checked before any work: float32 RoPE and, on a GPU, Triton."""
    if rope_kind != "float32":
        raise ValueError("fused blocks rotate in float32; use rope_kind='float32' or fused=False")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ValueError("fused blocks are compiled with Triton, which this PyTorch install lacks; install "
                         "triton (triton-windows on Windows) or turn fused off")


def stream(
    model: nn.Module,
    segments: list[Segment],
    memory: str | MemoryPolicy = "grounded",
    *,
    height: int = 480,
    width: int = 832,
    batch_size: int = 1,
    seed: int = 0,
    generator: torch.Generator | None = None,
    chunk_frames: int = 3,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    schedule: Schedule | None = None,
    noise_order: str = "reference",
    noise: torch.Tensor | None = None,
    attention: AttentionFn = sdpa_attention,
    rope_kind: str = "float32",
    output_device: str | torch.device | None = "cpu",
    fused: bool = False,
    overlap: bool | None = None,
) -> Iterator[ChunkResult]:
    """Generate a latent video chunk by chunk; see the module docstring for the draw order.

    Args:
        model: a module tree with Wan names (``gf_core.wan.WanModel`` or ComfyUI's ``WanModel``).
        segments: the prompts in order, with their lengths in latent frames and transitions.
        memory: a preset name (``gf_core.policies.PRESETS``: "grounded", "longlive", "self_forcing",
            "anchor_forcing", "infinity_rope", "context_forcing") or a :class:`MemoryPolicy`.
        height, width: pixels (multiples of 16).
        generator: the noise source; default a generator on ``device`` seeded with ``seed``.
        noise: optional initial noise [B, F, 16, H/8, W/8] (reference layout) instead of drawing it.
        rope_kind: "float32" (fast) or "complex128" (the references' float64 rotation).
        output_device: where yielded latents live (None: the run device).
        fused: run each DiT block as one ``torch.compile``'d graph (faster on a GPU; the first chunks
            and the first switch compile: 9-35 s in all on an H200, docs/PERF.md). Needs
            ``rope_kind="float32"``. With the default ``attention`` it also picks
            :func:`~gf_core.wan.fused_attention` and folds each prompt's zero padding
            (:func:`~gf_core.wan.encode_text`: a short prompt attends to 64 rows, not 512).
        overlap: hand out each chunk once the next one is queued, so the GPU never waits for the
            host between chunks (None: on a CUDA device). A chunk's ``event["seconds"]`` is then
            the GPU's time from the end of the previous chunk to the end of this one.
    """
    policy = preset(memory, chunk_frames) if isinstance(memory, str) else memory
    cfg = WanConfig.from_module(model)
    model_dtype, model_device = _model_dtype_device(model)
    dtype = dtype or model_dtype
    device = torch.device(device) if device is not None else model_device
    validate(cfg, segments, policy, height, width, batch_size, chunk_frames)
    if noise_order not in ("reference", "chunk"):
        raise ValueError(f"unknown noise order '{noise_order}'; use 'reference' or 'chunk'")
    if rope_kind not in ("float32", "complex128"):
        raise ValueError(f"unknown RoPE precision '{rope_kind}'; use 'float32' or 'complex128'")
    fold_text = False  # a fused run with the default attention folds each prompt's padding (encode_text)
    if fused:
        check_fused(rope_kind, device)
        if attention is sdpa_attention:
            attention = fused_attention(device)
            fold_text = True

    plan = chunk_plan(segments, chunk_frames)
    total = plan[-1][0] + chunk_frames
    lat_h, lat_w = height // SPATIAL_DOWNSCALE, width // SPATIAL_DOWNSCALE
    grid_hw = (lat_h // cfg.patch_size[1], lat_w // cfg.patch_size[2])
    schedule = schedule or Schedule.few_step()
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    gen_device = generator.device
    out_device = torch.device(output_device) if output_device is not None else device
    overlap = device.type == "cuda" if overlap is None else overlap
    timed = device.type == "cuda"

    if noise is not None:
        expected = (batch_size, total, LATENT_CHANNELS, lat_h, lat_w)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise of shape {tuple(noise.shape)} does not fit; expected {expected}")
        initial = noise
        # draw (and drop) the initial noise anyway, so the re-noise draws stay those of the seed
        torch.randn(expected, generator=generator, device=gen_device, dtype=dtype)
    elif noise_order == "reference":
        initial = torch.randn(
            (batch_size, total, LATENT_CHANNELS, lat_h, lat_w), generator=generator, device=gen_device, dtype=dtype
        )
        # kept on the host: the device then holds nothing that grows with the video's length
        initial = initial.cpu()
    else:
        initial = None

    rope = RopeTable(cfg.head_dim)
    mem = Memory(policy, chunk_frames, cfg.num_layers, scratch=chunk_frames if fused else 0)
    timesteps = schedule.timesteps.to(device)
    sigmas = schedule.sigmas.to(device)
    text: TextContext | None = None
    text_segment = -1

    def prompt_text(k: int) -> TextContext:
        prompt = segments[k].prompt
        p = upload(prompt, device).to(dtype)
        return encode_text(model, p.expand(batch_size, -1, -1), cfg.text_len,
                           fold_from=padding_start(prompt) if fold_text else None)

    def encode_frames(latents: torch.Tensor, query_index: list[int], context: ContextSource | None,
                      own_keys_from: int = 0, on_kv=None) -> None:
        t = torch.full((batch_size,), schedule.context_timestep, device=device, dtype=torch.float32)
        forward_chunk(model, latents, t, text, context, query_index, rope, rope_kind, attention,
                      compute_output=False, own_keys_from=own_keys_from, on_kv=on_kv, fused=fused)

    def source_for(slots: list[int], indices: list[int]) -> ContextSource:
        return ContextSource(mem.store, slots, rope.frequencies(indices, *grid_hw, rope_kind, device))

    pending: list[tuple[ChunkResult, torch.cuda.Event | None, float]] = []
    last_done = torch.cuda.Event(enable_timing=True) if timed else None
    if last_done is not None:
        last_done.record()

    def finish() -> ChunkResult:
        """The oldest queued chunk, once its latents are on the output device."""
        nonlocal last_done
        result, done, began = pending.pop(0)
        if done is not None:
            done.synchronize()
            result.event["seconds"] = round(last_done.elapsed_time(done) / 1e3, 4)
            last_done = done
        else:
            result.event["seconds"] = round(time.perf_counter() - began, 4)
        if result.latents.is_pinned():
            result.latents = result.latents.clone()  # the pinned staging buffer goes back to the cache
        return result

    with torch.inference_mode():
        for c, (start, k) in enumerate(plan):
            try:
                began = time.perf_counter()
                switch = None
                if k != text_segment:
                    text = prompt_text(k)
                    if text_segment >= 0:
                        switch = apply_switch(mem, segments[k].transition, start, encode_frames, source_for)
                    text_segment = k
                attend = mem.plan(start, chunk_frames)
                source = mem.source(attend, rope, rope_kind, grid_hw) if attend.keys else None
                query = attend.query_index

                if initial is not None:
                    x = upload(initial[:, start:start + chunk_frames], device).to(dtype)
                else:
                    x = upload(torch.randn((batch_size, chunk_frames, LATENT_CHANNELS, lat_h, lat_w),
                                           generator=generator, device=gen_device, dtype=dtype), device)
                x = x.permute(0, 2, 1, 3, 4)  # -> [B, C, F, h, w]
                for i in range(len(schedule)):
                    t = timesteps[i].expand(batch_size)
                    velocity, _ = forward_chunk(model, x, t, text, source, query, rope, rope_kind, attention,
                                                fused=fused)
                    x0 = to_x0(x, velocity, sigmas[i])
                    if i + 1 < len(schedule):
                        eps = upload(torch.randn((batch_size * chunk_frames, LATENT_CHANNELS, lat_h, lat_w),
                                                 generator=generator, device=gen_device, dtype=dtype), device)
                        eps = eps.view(batch_size, chunk_frames, LATENT_CHANNELS, lat_h, lat_w).permute(0, 2, 1, 3, 4)
                        x = renoise(x0, eps, sigmas[i + 1])
                attended = {}
                for (name, f), index in zip(attend.keys, attend.key_index):
                    attended.setdefault(name, []).append([f.index, index])
                changes, writes = mem.admit(start, x0, k)
                t = torch.full((batch_size,), schedule.context_timestep, device=device, dtype=torch.float32)
                forward_chunk(model, x0, t, text, source, query, rope, rope_kind, attention,
                              compute_output=False, on_kv=mem.store.writer(writes, chunk_frames), fused=fused)
                out = start_download(x0, out_device)
                done = None
                if timed:
                    done = torch.cuda.Event(enable_timing=True)
                    done.record()
                event = {
                    "chunk": c,
                    "frames": [start, start + chunk_frames],
                    "segment": k,
                    "switch": switch,
                    "rope": {"keys": attended, "query": attend.query_index},
                    "memory": mem.snapshot(),
                    **changes,
                }
            except Exception:
                if pending:  # what was finished is handed out before the error
                    yield finish()
                raise
            pending.append((ChunkResult(c, start, k, out, event), done, began))
            if not overlap or len(pending) > 1:
                yield finish()
        while pending:
            yield finish()


def generate(model: nn.Module, segments: list[Segment], memory: str | MemoryPolicy = "grounded", **options) -> GenerationResult:
    """Run :func:`stream` to the end; returns all latents [B, 16, F, H/8, W/8] and the events."""
    chunks, events = [], []
    for chunk in stream(model, segments, memory, **options):
        chunks.append(chunk.latents)
        events.append(chunk.event)
    return GenerationResult(torch.cat(chunks, dim=2), events)


def write_events(events: list[dict], target: str | IO[str]) -> None:
    """Write events as JSON lines to a path or an open text file."""
    if isinstance(target, str):
        with open(target, "w", encoding="utf-8") as fh:
            write_events(events, fh)
        return
    for e in events:
        target.write(json.dumps(e) + "\n")
