"""Grounded Forcing core: a streaming causal Wan engine with pluggable long-video memory.

Pure torch; never imports ComfyUI. Public API: :func:`generate`, :func:`stream`,
:class:`Segment`, :class:`Transition`, the memory presets and :mod:`gf_core.checkpoints`.
"""

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
from .stream import ChunkResult, GenerationResult, Segment, generate, pixel_frames, stream, write_events
from .wan import WanConfig, WanModel, random_state_dict

__all__ = [
    "ChunkResult",
    "GenerationResult",
    "MemoryPolicy",
    "Schedule",
    "Segment",
    "Transition",
    "WanConfig",
    "WanModel",
    "anchor_forcing",
    "context_forcing",
    "generate",
    "grounded",
    "infinity_rope",
    "longlive",
    "pixel_frames",
    "preset",
    "random_state_dict",
    "self_forcing",
    "stream",
    "write_events",
]
