"""Grounded Forcing core: a streaming causal Wan engine with pluggable long-video memory.

Pure torch; never imports ComfyUI. Public API: :func:`generate`, :func:`stream`, :class:`Session`,
:class:`RunConfig`, :class:`Segment`, :class:`Transition`, the memory presets and
:mod:`gf_core.checkpoints`.
"""

from . import latents
from .config import RunConfig, estimate_memory
from .errors import BadInput
from .policies import (
    MemoryPolicy,
    anchor_forcing,
    context_forcing,
    grounded,
    infinity_rope,
    longlive,
    preset,
    self_forcing,
)
from .recache import Transition
from .sampler import Schedule
from .stream import (
    ChunkResult,
    GenerationResult,
    Segment,
    Session,
    generate,
    pixel_frames,
    stream,
    warm_up,
    write_events,
)
from .wan import WanConfig, WanModel, random_state_dict

__all__ = [
    "BadInput",
    "ChunkResult",
    "GenerationResult",
    "MemoryPolicy",
    "RunConfig",
    "Schedule",
    "Segment",
    "Session",
    "Transition",
    "WanConfig",
    "WanModel",
    "anchor_forcing",
    "context_forcing",
    "estimate_memory",
    "generate",
    "grounded",
    "infinity_rope",
    "latents",
    "longlive",
    "pixel_frames",
    "preset",
    "random_state_dict",
    "self_forcing",
    "stream",
    "warm_up",
    "write_events",
]
