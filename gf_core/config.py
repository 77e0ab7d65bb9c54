"""The run configuration, its limits and every check made before any work, and the GPU-memory estimate.

:class:`RunConfig` holds what a run is (size, batch, seed, chunking, draw order, precision, kernels);
:func:`validate` checks it together with the model, the memory policy and the segments, and raises
:class:`~gf_core.errors.BadInput` with one sentence before any model forward, weight upload or large
allocation. :func:`estimate_memory` is the GPU memory a run needs, for callers that compare it with
what the device has free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal, get_args

import torch

from .errors import BadInput
from .kernels import KERNEL_SETTINGS, KernelSetting
from .policies import MemoryPolicy
from .recache import resolve
from .rope import ROPE_POSITIONS
from .sampler import Schedule
from .wan import WanConfig, WanModel

if TYPE_CHECKING:
    from .stream import Segment

LATENT_CHANNELS = 16
SPATIAL_DOWNSCALE = 8  # Wan VAE: 8 pixels per latent pixel
MAX_SIDE = 4096  # the largest frame width or height accepted, in pixels
MAX_LATENT_FRAMES = 20_000  # the longest video accepted, in latent frames
MAX_BATCH = 64  # the most videos made side by side
MAX_REFERENCE_NOISE_BYTES = 4 * 2**30  # host memory the "reference" draw order may hold for the initial noise
SEED_RANGE = (0, 2**64 - 1)  # a seed outside would alias another one (PyTorch wraps it)

NoiseOrder = Literal["reference", "chunk"]
RopeKind = Literal["float32", "complex128"]
NOISE_ORDERS: tuple[str, ...] = get_args(NoiseOrder)
ROPE_KINDS: tuple[str, ...] = get_args(RopeKind)
PROMPT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class RunConfig:
    """What a run is, apart from the model, the memory and the prompts.

    Attributes:
        height, width: pixels (multiples of 16, at most :data:`MAX_SIDE`).
        batch_size: videos made side by side with the same prompts.
        seed: seeds the default noise generator (``[0, 2**64 - 1]``).
        chunk_frames: latent frames per chunk (the models were trained with 3).
        noise_order: "reference" (the whole video's initial noise first, as the research code
            draws it) or "chunk" (each chunk's initial noise just before it: nothing grows with the
            length, and a session needs no total length).
        rope_kind: "float32" (fast) or "complex128" (the references' float64 rotation).
        kernels: "eager", "fused" (each DiT block compiled into one graph) or "auto" (fused on a
            CUDA device where it can run); see :mod:`gf_core.kernels`.
        dtype, device: the run's dtype and device (None: the model's).
        output_device: where handed-out latents live (None: the run device).
        overlap: hand out each chunk once the next one is queued, so the GPU never waits for the
            host between chunks (None: on a CUDA device).
        schedule: the denoising schedule (None: :meth:`Schedule.few_step`).
    """

    height: int = 480
    width: int = 832
    batch_size: int = 1
    seed: int = 0
    chunk_frames: int = 3
    noise_order: NoiseOrder = "reference"
    rope_kind: RopeKind = "float32"
    kernels: KernelSetting = "eager"
    dtype: torch.dtype | None = None
    device: str | torch.device | None = None
    output_device: str | torch.device | None = "cpu"
    overlap: bool | None = None
    schedule: Schedule | None = None

    @classmethod
    def build(cls, config: RunConfig | None = None, **options) -> RunConfig:
        """``config`` (or the defaults) with ``options`` replaced; an unknown option is one sentence."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise BadInput(f"unknown run option '{unknown[0]}'; use one of {', '.join(sorted(names))}")
        return replace(config or cls(), **options)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // SPATIAL_DOWNSCALE, self.width // SPATIAL_DOWNSCALE

    def validate(self, model_cfg: WanConfig) -> None:
        """Raise :class:`BadInput` for a setting that cannot run with this model."""
        step = SPATIAL_DOWNSCALE * model_cfg.patch_size[1]
        for name, value, default in (("height", self.height, 480), ("width", self.width, 832)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadInput(f"{name} {value!r} is not a whole number of pixels; use {default} (the default)")
            if value < step or value % step:
                near = max(step, round(value / step) * step)
                raise BadInput(f"{name} {value} is not a multiple of {step}; use {near} (default {default})")
            if value > MAX_SIDE:
                raise BadInput(f"{name} {value} is above the largest size of {MAX_SIDE} pixels; use at most "
                               f"{MAX_SIDE} (the models were trained at 832 x 480)")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= MAX_BATCH:
            raise BadInput(f"batch size {self.batch_size} is outside 1 to {MAX_BATCH}; use 1 or more, "
                           "or queue several runs")
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
            raise BadInput(f"chunk size {self.chunk_frames} is below 1 latent frame; the models were trained with 3")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise BadInput(f"seed {self.seed} is outside [0, 2**64 - 1], where it would alias another seed; "
                           "use a seed in that range")
        if self.noise_order not in NOISE_ORDERS:
            raise BadInput(f"unknown noise order '{self.noise_order}'; use one of {', '.join(NOISE_ORDERS)}")
        if self.rope_kind not in ROPE_KINDS:
            raise BadInput(f"unknown RoPE precision '{self.rope_kind}'; use one of {', '.join(ROPE_KINDS)}")
        if self.kernels not in KERNEL_SETTINGS:
            raise BadInput(f"unknown kernel setting '{self.kernels}'; use one of {', '.join(KERNEL_SETTINGS)}")
        if self.dtype is not None and self.dtype not in PROMPT_DTYPES:
            raise BadInput(f"run dtype {self.dtype} is not a floating-point type the model computes in; use "
                           "torch.bfloat16, torch.float16 or torch.float32")


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


def planned_frames(segments: list[Segment], chunk_frames: int) -> int:
    """Latent frames the plan of ``segments`` makes: their sum, rounded up to whole chunks."""
    return math.ceil(sum(s.frames for s in segments) / chunk_frames) * chunk_frames


def check_prompt(prompt: object, model_cfg: WanConfig, batch_size: int, where: str) -> None:
    """A prompt embedding [1 or B, L >= 1, text_dim] of finite floats, or one sentence naming ``where`` it is."""
    if not isinstance(prompt, torch.Tensor):
        raise BadInput(f"{where}: the prompt is a {type(prompt).__name__}, not an embedding tensor; "
                       "encode it first (umT5 output [1, L, 4096])")
    if prompt.dtype not in PROMPT_DTYPES:
        raise BadInput(f"{where}: prompt embedding of dtype {prompt.dtype} is not a float tensor; "
                       "pass the text encoder's output (float32, float16 or bfloat16)")
    if prompt.ndim != 3 or prompt.shape[2] != model_cfg.text_dim or prompt.shape[0] not in (1, batch_size):
        raise BadInput(f"{where}: prompt embedding of shape {tuple(prompt.shape)} does not fit; "
                       f"expected [1, L, {model_cfg.text_dim}] (umT5 output for this model)")
    if prompt.shape[1] == 0:
        raise BadInput(f"{where}: prompt embedding has 0 tokens; encode a prompt (an empty prompt still "
                       "gives its end-of-text token)")
    if not bool(torch.isfinite(prompt).all()):
        raise BadInput(f"{where}: prompt embedding holds NaN or infinite values (a corrupt text encoder or an "
                       "fp16 overflow); re-encode the prompt, with the text encoder in bf16 or fp32")


def check_frames(segment: Segment, k: int, config: RunConfig) -> None:
    """A segment's length: a whole number of latent frames, at least one chunk."""
    frames = segment.frames
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise BadInput(f"segment {k + 1} is {frames!r} latent frames, not a whole number; give its length in "
                       "latent frames (4 pixel frames each)")
    if frames < config.chunk_frames:
        raise BadInput(f"segment {k + 1} is {frames} latent frames, shorter than one chunk of {config.chunk_frames}; "
                       f"make it at least {config.chunk_frames} frames")


def check_segment(segment: Segment, k: int, policy: MemoryPolicy, model_cfg: WanConfig, config: RunConfig) -> None:
    """One segment of a plan (``k`` counts from 0): its prompt, its length and its transition."""
    where = f"segment {k + 1}"
    check_frames(segment, k, config)
    check_prompt(segment.prompt, model_cfg, config.batch_size, where)
    if k == 0 and segment.transition.kind == "cut":
        raise BadInput("the first segment starts with a cut, but there is nothing to cut from; remove that cut")
    try:
        resolve(policy, segment.transition)
    except BadInput as e:
        raise BadInput(f"{where}: {e}") from None


def check_length(total: int, policy: MemoryPolicy) -> None:
    """A video of ``total`` latent frames: within :data:`MAX_LATENT_FRAMES` and what the policy can index."""
    if total > MAX_LATENT_FRAMES:
        raise BadInput(f"the segments ask for {total} latent frames, above the longest video of {MAX_LATENT_FRAMES}; "
                       "make it shorter or split it into several runs")
    if policy.max_frames is not None and total > policy.max_frames:
        raise BadInput(
            f"the '{policy.name}' memory holds at most {policy.max_frames} latent frames but the segments ask for "
            f"{total}; shorten the video or use a windowed policy such as 'grounded' or 'longlive'"
        )
    if policy.index_rule == "absolute" and total > ROPE_POSITIONS:
        raise BadInput(
            f"the '{policy.name}' memory numbers frames absolutely and its RoPE table has {ROPE_POSITIONS} positions, "
            f"but the segments ask for {total} latent frames; use a bounded-index policy (e.g. 'grounded', or "
            f"GF DR-RoPE on this one) or at most {ROPE_POSITIONS} frames"
        )


def validate(model_cfg: WanConfig, segments: list[Segment], policy: MemoryPolicy, config: RunConfig) -> None:
    """Every check of a run with a known segment plan, before any GPU work (:class:`BadInput`)."""
    config.validate(model_cfg)
    validate_memory(policy, config)
    if not segments:
        raise BadInput("no prompt segments were given; add at least one segment")
    for k, segment in enumerate(segments):
        check_frames(segment, k, config)
    check_length(planned_frames(segments, config.chunk_frames), policy)
    for k, segment in enumerate(segments):
        check_segment(segment, k, policy, model_cfg, config)


def validate_memory(policy: MemoryPolicy, config: RunConfig) -> None:
    """The policy itself and how it goes with the batch."""
    if not callable(getattr(policy, "validate", None)) or not hasattr(policy, "regions"):  # (any copy of the class)
        raise BadInput(f"memory {policy!r} is not a memory policy; use a preset name or a gf_core.MemoryPolicy")
    policy.validate(config.chunk_frames)
    if config.batch_size > 1 and policy.anchor_region and policy.candidates != "frozen":
        raise BadInput(
            f"batch size {config.batch_size} with the GCM diversity update would let the videos of the batch choose "
            "each other's anchors; use batch size 1 (queue several runs) or set the GCM update rule to 'frozen'"
        )


# ---------------------------------------------------------------------------------------------
# GPU memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of GPU memory a run needs: its weights, its K/V cache and its largest forward's activations."""

    weights: int
    cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.activations


def parameter_count(model_cfg: WanConfig) -> int:
    """Parameters of a Wan DiT of this config (counted on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in WanModel(model_cfg).parameters())


def estimate_memory(model_cfg: WanConfig, policy: MemoryPolicy, config: RunConfig, dtype: torch.dtype,
                    weight_bytes: int | None = None, read_in_place: bool = False) -> MemoryEstimate:
    """The GPU memory of a run (an estimate that errs high).

    weights: ``weight_bytes`` or every parameter in ``dtype``. cache: the raw K/V of every cached
    frame in every block (with ``read_in_place`` kernels a chunk of value slots more), the cached
    latents and every prompt's cross-attention K/V. activations: the largest forward (a chunk, or a
    switch re-encoding the cached frames or a re-cache window), a few rows of width ``ffn_dim`` and
    ``dim`` per token, plus the keys and values attention reads.
    """
    item = torch.empty((), dtype=dtype).element_size()
    lat_h, lat_w = config.latent_hw
    tokens = (lat_h // model_cfg.patch_size[1]) * (lat_w // model_cfg.patch_size[2])
    b, chunk = config.batch_size, config.chunk_frames
    cached = sum(r.frames for r in policy.regions)
    slots = 2 * cached + (chunk if read_in_place else 0)
    store = model_cfg.num_layers * b * slots * tokens * model_cfg.dim * item
    latents = b * LATENT_CHANNELS * (cached + (policy.recache.frames if policy.recache else 0)) * lat_h * lat_w * item
    text = 2 * 2 * model_cfg.num_layers * b * model_cfg.text_len * model_cfg.dim * item  # this prompt and the next
    forward_frames = max(chunk, cached, policy.recache.frames if policy.recache else 0)
    forward_tokens = b * forward_frames * tokens
    attended = b * (cached + forward_frames) * tokens
    activations = ((4 * model_cfg.ffn_dim + 8 * model_cfg.dim) * forward_tokens + 2 * attended * model_cfg.dim) * item
    weights = weight_bytes if weight_bytes is not None else parameter_count(model_cfg) * item
    return MemoryEstimate(weights, store + latents + text, activations)


def check_fits(estimate: MemoryEstimate, available: int, offloadable_weights: bool = False) -> None:
    """Refuse a run that cannot fit ``available`` bytes of GPU memory, with the numbers. With
    ``offloadable_weights`` (a host that can stream weights from CPU memory) only the cache and the
    activations must fit."""
    need = estimate.cache + estimate.activations + (0 if offloadable_weights else estimate.weights)
    if need > available:
        gib = 2**30
        raise BadInput(
            f"this run needs about {need / gib:.1f} GiB of GPU memory (weights {estimate.weights / gib:.1f}, K/V cache "
            f"{estimate.cache / gib:.1f}, activations {estimate.activations / gib:.1f} GiB) but only "
            f"{available / gib:.1f} GiB are free; lower the size or the batch, or use a memory with fewer frames"
        )
