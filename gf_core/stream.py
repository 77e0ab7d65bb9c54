"""Segments -> chunks -> latents: the public generation API.

A :class:`Session` makes one chunk per :meth:`~Session.step` under the segment it is given;
``stream`` is a session played over a segment plan, yielding every chunk as soon as its clean
latents exist, and ``generate`` collects them. Latents are in the normalised Wan latent space of
the research models ([B, 16, F, H/8, W/8]).

Random draws, in order (``noise_order="reference"``, the research code's order): the initial
noise of the whole video as one tensor [B, F, 16, H/8, W/8] in the run dtype, then for every
chunk, for every denoising step but the last, one re-noise tensor [B * frames, 16, H/8, W/8].
With a CUDA generator seeded like the reference's global seed this reproduces its noise. The
drawn initial noise is kept in host memory and each chunk's part copied to the device.
``noise_order="chunk"`` draws each chunk's initial noise just before the chunk instead, so
nothing grows with the length of the video and a session needs no total length: a session
stepped chunk by chunk makes exactly what ``generate`` makes with the same segments and seed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import IO

import torch
from einops import rearrange
from torch import nn

from .config import (
    LATENT_CHANNELS,
    MAX_REFERENCE_NOISE_BYTES,
    RunConfig,
    check_length,
    check_segment,
    chunk_plan,
    planned_frames,
    validate,
    validate_memory,
)
from .errors import BadInput
from .kernels import choose, compiled
from .memory import Admission, ContextSource, Memory
from .policies import MemoryPolicy, preset
from .recache import SwitchEvent, Transition, apply_switch
from .rope import RopeTable
from .sampler import Schedule, denoise_chunk
from .transfer import start_download, upload
from .wan import (
    FOLD_MULTIPLE,
    AttentionFn,
    TextContext,
    WanConfig,
    encode_text,
    folded_rows,
    forward_chunk,
    padding_start,
)


@dataclass
class Segment:
    """A prompt held for ``frames`` latent frames; ``transition`` says how the segment starts."""

    prompt: torch.Tensor  # [1 or B, L, text_dim]
    frames: int
    transition: Transition = field(default_factory=Transition)


@dataclass
class ChunkEvent:
    """The event record of one chunk; :meth:`to_json` is its line of the event log."""

    chunk: int
    frames: list[int]  # [start, end) absolute latent frames
    segment: int
    switch: SwitchEvent | None
    keys: dict[str, list[list[int]]]  # per region, [absolute frame, temporal index] of every key frame
    query: list[int]  # the chunk's temporal indices
    memory: dict[str, list[int]]  # per region, the frames held after the chunk
    admission: Admission
    seconds: float | None = None  # time from the end of the previous chunk (GPU time on CUDA)

    def to_json(self) -> dict:
        out = {"chunk": self.chunk, "frames": self.frames, "segment": self.segment,
               "switch": self.switch.to_json() if self.switch else None,
               "rope": {"keys": self.keys, "query": self.query}, "memory": self.memory, **self.admission.to_json()}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out


@dataclass
class ChunkResult:
    index: int
    start: int
    segment: int
    latents: torch.Tensor  # [B, 16, frames, H/8, W/8]
    event: dict  # the chunk's event-log line (ChunkEvent.to_json)


@dataclass
class GenerationResult:
    latents: torch.Tensor  # [B, 16, F, H/8, W/8]
    events: list[dict]


class NonFiniteOutput(RuntimeError):
    """The model's output holds NaN or infinite values."""


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames the Wan VAE decodes from ``latent_frames`` latent frames (1 + 4 (F - 1))."""
    return 1 + 4 * (latent_frames - 1) if latent_frames > 0 else 0


class NoiseSource:
    """The run's random draws in its draw order (module docstring), in the run dtype on the run device.

    ``noise`` [B, F, 16, H/8, W/8] replaces the initial noise; the generator then still draws
    (and drops) it, so the re-noise draws stay those of the seed.
    """

    def __init__(self, config: RunConfig, generator: torch.Generator, device: torch.device, dtype: torch.dtype,
                 total_frames: int | None, noise: torch.Tensor | None = None):
        self.config, self.generator, self.device, self.dtype = config, generator, device, dtype
        self.total_frames = total_frames
        self._initial = noise
        self._drawn = False
        if noise is not None:
            if total_frames is None:
                raise BadInput("given noise covers a whole video, so it needs the segments up front; pass segments=")
            expected = self._shape(total_frames)
            if tuple(noise.shape) != expected:
                raise BadInput(f"noise of shape {tuple(noise.shape)} does not fit; expected {expected}")
            if not bool(torch.isfinite(noise).all()):
                raise BadInput("the given noise holds NaN or infinite values; pass finite Gaussian noise")
        elif config.noise_order == "reference" and total_frames is None:
            raise BadInput("the 'reference' noise order draws the whole video's noise first, so it needs the "
                           "segments up front; pass segments=, or use noise_order='chunk'")
        elif config.noise_order == "reference":
            held = math.prod(self._shape(total_frames)) * torch.empty((), dtype=dtype).element_size()
            if held > MAX_REFERENCE_NOISE_BYTES:
                raise BadInput(f"the 'reference' noise order would hold {held / 2**30:.1f} GiB of initial noise for "
                               f"this video; use noise_order='chunk' (nothing grows with the length) or a shorter video")

    def _shape(self, frames: int) -> tuple[int, ...]:
        return (self.config.batch_size, frames, LATENT_CHANNELS, *self.config.latent_hw)

    def _randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=self.dtype)

    def initial(self, start: int) -> torch.Tensor:
        """The initial noise [B, 16, F, H/8, W/8] of the chunk starting at frame ``start``."""
        frames = self.config.chunk_frames
        if not self._drawn and (self._initial is not None or self.config.noise_order == "reference"):
            drawn = self._randn(self._shape(self.total_frames))  # the whole video's, once, at the first chunk
            if self._initial is None:
                # kept on the host: the device then holds nothing that grows with the video's length
                self._initial = drawn.cpu()
        self._drawn = True
        if self._initial is not None:
            if start + frames > self._initial.shape[1]:
                raise BadInput(f"the chunk at frame {start} is past the {self._initial.shape[1]} frames of noise "
                               "drawn for the plan; use noise_order='chunk' for an open-ended session")
            x = upload(self._initial[:, start:start + frames], self.device).to(self.dtype)
        else:
            x = upload(self._randn(self._shape(frames)), self.device)
        return rearrange(x, "b f c h w -> b c f h w")

    def renoise(self) -> torch.Tensor:
        """The next re-noise draw, as [B, 16, F, H/8, W/8]."""
        b, f = self.config.batch_size, self.config.chunk_frames
        eps = upload(self._randn((b * f, LATENT_CHANNELS, *self.config.latent_hw)), self.device)
        return rearrange(eps, "(b f) c h w -> b c f h w", b=b)


@dataclass
class _Queued:
    """A chunk whose work is queued: its result, the event its download completes at, when it began."""

    index: int
    start: int
    segment: int
    latents: torch.Tensor
    record: ChunkEvent
    done: torch.cuda.Event | None
    began: float


class Session:
    """One run, made chunk by chunk: each :meth:`step` makes the next chunk under the segment it is given.

    ``Session(model, memory, config)`` validates everything it can and does no GPU work. ``memory``
    is a preset name (``gf_core.policies.PRESETS``) or a :class:`MemoryPolicy`; ``config`` a
    :class:`RunConfig` (``options`` replace its fields). With ``segments`` (the whole plan, validated
    now) :meth:`play` makes all of it; the "reference" noise order needs them. ``generator`` is the
    noise source (default: a generator on the run device seeded with ``config.seed``); ``noise``
    replaces the initial noise ([B, F, 16, H/8, W/8]); ``attention`` replaces the kernels' attention.
    """

    def __init__(self, model: nn.Module, memory: str | MemoryPolicy = "grounded", config: RunConfig | None = None, *,
                 segments: list[Segment] | None = None, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, attention: AttentionFn | None = None, **options):
        self.config = config = RunConfig.build(config, **options)
        self.policy = preset(memory, config.chunk_frames) if isinstance(memory, str) else memory
        self.model, self.model_cfg = model, WanConfig.from_module(model)
        if segments is not None:
            validate(self.model_cfg, segments, self.policy, config)
            self.segments = [replace(s) for s in segments]  # distinct objects: each starts its own segment
        else:
            config.validate(self.model_cfg)
            validate_memory(self.policy, config)
            self.segments = None
        weight = model.patch_embedding.weight
        self.dtype = config.dtype or weight.dtype
        self.device = torch.device(config.device) if config.device is not None else weight.device
        self.kernels = choose(config.kernels, self.device, config.rope_kind, attention)
        total = planned_frames(self.segments, config.chunk_frames) if segments else None
        generator = generator or torch.Generator(device=self.device).manual_seed(config.seed)
        self.noise = NoiseSource(config, generator, self.device, self.dtype, total, noise)
        scratch = config.chunk_frames if self.kernels.read_in_place else 0
        self.memory = Memory(self.policy, config.chunk_frames, self.model_cfg.num_layers, scratch=scratch)
        self.rope = RopeTable(self.model_cfg.head_dim)
        self.schedule = config.schedule or Schedule.few_step()
        lat_h, lat_w = config.latent_hw
        self.grid_hw = (lat_h // self.model_cfg.patch_size[1], lat_w // self.model_cfg.patch_size[2])
        self.out_device = torch.device(config.output_device) if config.output_device is not None else self.device
        self.overlap = self.device.type == "cuda" if config.overlap is None else config.overlap
        self.frames = 0  # latent frames made so far
        self.pending: list[_Queued] = []
        self._segment: Segment | None = None
        self._segment_index = -1
        self._chunks = 0
        self._text: TextContext | None = None
        self._last_done: torch.cuda.Event | None = None
        self._steps: tuple[torch.Tensor, torch.Tensor] | None = None  # timesteps, sigmas on the device
        self._closed = False

    # -- the chunk loop ------------------------------------------------------------------------

    def play(self) -> Iterator[ChunkResult]:
        """Every chunk of the segment plan, each handed out once final (with overlap, once the next
        one is queued); closes the session at the end. When a chunk fails, the chunks finished before
        it are handed out first; when the consumer stops early, the chunks made but not yet handed
        out stay in :meth:`flush`."""
        if self.segments is None:
            raise BadInput("this session was made without segments; pass segments= to play them, or step it")
        try:
            for _, k in chunk_plan(self.segments, self.config.chunk_frames):
                yield from self.submit(self.segments[k])
            yield from self.flush()
        except Exception:
            yield from self.flush()
            raise
        finally:
            self.close()

    def step(self, segment: Segment) -> ChunkResult:
        """Make the next chunk under ``segment`` and return it once final. When ``segment`` is not the
        previous step's segment object, its transition is applied first."""
        if self.pending:
            raise RuntimeError("chunks submitted earlier are still queued; take them with flush() first")
        return [*self.submit(segment), *self.flush()][-1]

    def submit(self, segment: Segment) -> list[ChunkResult]:
        """Queue the next chunk under ``segment``; returns the chunks final by now (with overlap the
        one before it, else this one)."""
        self._queue(segment)
        if not self.overlap or len(self.pending) > 1:
            return [self._finish()]
        return []

    def flush(self) -> list[ChunkResult]:
        """Every queued chunk, once final."""
        return [self._finish() for _ in range(len(self.pending))]

    def close(self) -> None:
        """Drop the K/V store and the prompt (queued chunks stay available to :meth:`flush`)."""
        self._closed = True
        self._text = None
        self.memory.history.clear()
        self.memory.store.keys = self.memory.store.values = self.memory.store.latents = None

    # -- one chunk -----------------------------------------------------------------------------

    def _queue(self, segment: Segment) -> None:
        if self._closed:
            raise RuntimeError("this session is closed; start a new one")
        cfg, start, began = self.config, self.frames, time.perf_counter()
        check_length(start + cfg.chunk_frames, self.policy)
        if self._steps is None:  # (the first chunk: the device's queue is still empty)
            self._steps = self.schedule.timesteps.to(self.device), self.schedule.sigmas.to(self.device)
            if self.device.type == "cuda":
                self._last_done = torch.cuda.Event(enable_timing=True)
                self._last_done.record()
        with torch.inference_mode():
            switch = self._begin_segment(segment, start) if segment is not self._segment else None
            attend = self.memory.plan(start, cfg.chunk_frames)
            source = self.memory.source(attend, self.rope, cfg.rope_kind, self.grid_hw) if attend.keys else None
            batch = cfg.batch_size

            def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return forward_chunk(self.model, x, t.expand(batch), self._text, source, attend.query_index,
                                     self.rope, cfg.rope_kind, self.kernels)

            x0 = denoise_chunk(velocity, self.noise.initial(start), *self._steps, self.noise.renoise)
            if self._chunks == 0:
                self._check_finite(x0)
            admission = self.memory.admit(start, x0, self._segment_index)
            self._encode(x0, attend.query_index, source, on_kv=self.memory.store.writer(admission.writes, cfg.chunk_frames))
            out = start_download(x0, self.out_device)
        record = ChunkEvent(self._chunks, [start, start + cfg.chunk_frames], self._segment_index, switch,
                            attend.attended(), attend.query_index, self.memory.snapshot(), admission)
        self.pending.append(_Queued(self._chunks, start, self._segment_index, out, record, self._record_done(), began))
        self._chunks += 1
        self.frames += cfg.chunk_frames

    def _begin_segment(self, segment: Segment, start: int) -> SwitchEvent | None:
        """A new segment: check it (a session without a plan), encode its prompt, apply its transition."""
        k = self._segment_index + 1
        if self.segments is None:
            check_segment(segment, k, self.policy, self.model_cfg, self.config)
        prompt = segment.prompt
        p = upload(prompt, self.device).to(self.dtype).expand(self.config.batch_size, -1, -1)
        fold_from = padding_start(prompt) if self.kernels.fold_text else None
        self._text = encode_text(self.model, p, self.model_cfg.text_len, fold_from=fold_from)
        switch = None
        if k > 0:
            switch = apply_switch(self.memory, segment.transition, start, self._encode, self._source_for)
        self._segment, self._segment_index = segment, k
        return switch

    def _encode(self, latents: torch.Tensor, query_index: list[int], context: ContextSource | None,
                own_keys_from: int = 0, on_kv=None) -> None:
        """A cache pass: a forward of clean ``latents`` at the context timestep that only writes K/V."""
        t = torch.full((self.config.batch_size,), self.schedule.context_timestep, device=self.device,
                       dtype=torch.float32)
        forward_chunk(self.model, latents, t, self._text, context, query_index, self.rope, self.config.rope_kind,
                      self.kernels, compute_output=False, own_keys_from=own_keys_from, on_kv=on_kv)

    def _source_for(self, slots: list[int], indices: list[int]) -> ContextSource:
        freqs = self.rope.frequencies(indices, *self.grid_hw, self.config.rope_kind, self.device)
        return ContextSource(self.memory.store, slots, freqs)

    def _check_finite(self, x0: torch.Tensor) -> None:
        if not bool(torch.isfinite(x0).all()):
            raise NonFiniteOutput(
                "the first chunk came out NaN or infinite: the checkpoint may be corrupt (NaN or infinite weights, "
                "a broken LoRA merge) or float16 overflowed; check the model file, or run in bfloat16 or float32"
            )

    def _record_done(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return done

    def _finish(self) -> ChunkResult:
        """The oldest queued chunk, once its latents are on the output device."""
        q = self.pending.pop(0)
        if q.done is not None:
            q.done.synchronize()
            q.record.seconds = round(self._last_done.elapsed_time(q.done) / 1e3, 4)
            self._last_done = q.done
        else:
            q.record.seconds = round(time.perf_counter() - q.began, 4)
        latents = q.latents.clone() if q.latents.is_pinned() else q.latents  # the pinned buffer goes back
        return ChunkResult(q.index, q.start, q.segment, latents, q.record.to_json())


def stream(model: nn.Module, segments: list[Segment], memory: str | MemoryPolicy = "grounded",
           config: RunConfig | None = None, *, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None, attention: AttentionFn | None = None,
           **options) -> Iterator[ChunkResult]:
    """Generate a latent video chunk by chunk: a :class:`Session` played over ``segments``.

    Args:
        model: a module tree with Wan names (``gf_core.wan.WanModel`` or ComfyUI's ``WanModel``).
        segments: the prompts in order, with their lengths in latent frames and transitions.
        memory: a preset name ("grounded", "longlive", "self_forcing", "anchor_forcing",
            "infinity_rope", "context_forcing") or a :class:`MemoryPolicy`.
        config, options: the :class:`RunConfig` (size, seed, draw order, kernels, ...); options
            replace its fields (``stream(model, segments, height=32, width=32)``).
        generator, noise, attention: see :class:`Session`.

    A chunk's ``event["seconds"]`` is, with overlap, the GPU's time from the end of the previous
    chunk to the end of this one.
    """
    session = Session(model, memory, config, segments=segments, generator=generator, noise=noise,
                      attention=attention, **options)
    yield from session.play()


def generate(model: nn.Module, segments: list[Segment], memory: str | MemoryPolicy = "grounded",
             config: RunConfig | None = None, **options) -> GenerationResult:
    """Run :func:`stream` to the end; returns all latents [B, 16, F, H/8, W/8] and the events."""
    chunks, events = [], []
    for chunk in stream(model, segments, memory, config, **options):
        chunks.append(chunk.latents)
        events.append(chunk.event)
    return GenerationResult(torch.cat(chunks, dim=2), events)


_WARMED: set[tuple] = set()  # the run shapes this process has warmed up


def other_fold_prompt(prompt: torch.Tensor, text_len: int) -> torch.Tensor | None:
    """A prompt like ``prompt`` [B, L, D] whose folded length (:func:`~gf_core.wan.folded_rows`) is the
    next one up, or the next one down where ``prompt`` is already at ``text_len``; its rows are copies
    of the prompt's (only its shapes matter). None where ``text_len`` allows one folded length only."""
    pad = padding_start(prompt)
    kept = min(folded_rows(pad), text_len)
    target = kept + FOLD_MULTIPLE if kept + FOLD_MULTIPLE <= text_len else kept - FOLD_MULTIPLE
    if target < FOLD_MULTIPLE or target == kept:
        return None
    rows = target - FOLD_MULTIPLE + 1  # the fewest rows of words that fold to ``target``
    used = max(pad, 1)
    words = prompt[:, :pad] if pad else torch.ones_like(prompt[:, :1])
    out = torch.zeros(prompt.shape[0], max(prompt.shape[1], rows), prompt.shape[2], dtype=prompt.dtype,
                      device=prompt.device)
    out[:, :rows] = words.repeat(1, -(-rows // used), 1)[:, :rows]
    return out


def warm_up(model: nn.Module, memory: str | MemoryPolicy, config: RunConfig, prompt: torch.Tensor) -> int:
    """Make, and throw away, a short run of ``model`` under ``memory`` and ``config`` that meets the
    shapes an interactive run meets: a switch (the policy's default) at every fill level of the
    memory, a cut and a switch right after it, then the chunks that refill the memory, under
    ``prompt``; then, where prompts are folded (:func:`~gf_core.wan.encode_text`), a switch to a prompt
    of another folded length and a chunk under it, as a typed prompt longer or shorter than the first
    brings. With compiled (fused) blocks this compiles the graphs (and builds the kernels) a later
    switch or cut needs, so a prompt typed during a live take does not wait for them; with eager
    kernels, or when this process has warmed the same shapes before, it does nothing. Returns the
    chunks made."""
    session = Session(model, memory, config, noise_order="chunk")
    key = (repr(session.model_cfg), repr(session.policy), session.config.latent_hw, session.config.batch_size,
           session.dtype, session.device)
    try:
        if not compiled(session.kernels) or key in _WARMED:
            return 0
        chunk = session.config.chunk_frames
        levels = -(-sum(r.frames for r in session.policy.regions) // chunk) + 1
        plan = ["default"] * levels + ["cut"] + ["default"] * levels + [None] * levels
        segment = Segment(prompt, chunk)
        session.step(segment)
        for kind in plan:
            if kind is not None:
                segment = Segment(prompt, chunk, Transition(kind))
            session.step(segment)
        made = len(plan) + 1
        other = other_fold_prompt(prompt, session.model_cfg.text_len) if session.kernels.fold_text else None
        if other is not None:
            segment = Segment(other, chunk, Transition("default"))
            session.step(segment)
            session.step(segment)
            made += 2
        _WARMED.add(key)
        return made
    finally:
        session.close()


def write_events(events: list[dict], target: str | IO[str]) -> None:
    """Write events as JSON lines to a path or an open text file."""
    if isinstance(target, str):
        with open(target, "w", encoding="utf-8") as fh:
            write_events(events, fh)
        return
    for e in events:
        target.write(json.dumps(e) + "\n")
