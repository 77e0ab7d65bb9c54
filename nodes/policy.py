"""Memory policy options of the nodes: building a ``gf_core.MemoryPolicy`` and the RoPE patch.

The Dual Memory node makes a policy; the DR-RoPE node stores a :class:`RopeOptions` in the
MODEL's ``model_options["transformer_options"]`` (as core patches do), and the sampler applies
it to the policy with :func:`apply_rope`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..gf_core import MemoryPolicy, grounded, longlive, self_forcing
from ..gf_core.policies import Apr, anchor_forcing, context_forcing, infinity_rope

CHUNK_FRAMES = 3  # the chunk size the causal Wan models were trained with
POLICIES = ("grounded", "longlive", "self_forcing", "infinity_rope", "context_forcing", "anchor_forcing")
OWN_INDEX_RULES = ("infinity_rope", "context_forcing", "anchor_forcing")  # policies whose RoPE indices are part of the method
GCM_UPDATES = ("after_switch", "every_frame", "frozen")

ROPE_KEY = "grounded_forcing_rope"  # key in model_options["transformer_options"]
ROPE_MODES = ("dr_rope", "absolute")
ROPE_LAYOUTS = ("pinned_end", "after_gcm")
ROPE_PRECISIONS = ("float32", "complex128")


def build_memory(
    policy: str = "grounded",
    gcm_frames: int = 3,
    ltm_frames: int = 6,
    gcm_update: str = "after_switch",
    alpha_max: float = 0.8,
    d_window: float = 0.0,
    sink_frames: int = 3,
    window_frames: int = 12,
    global_sink: bool = True,
    irope_sink_frames: int = 1,
    irope_window_frames: int = 6,
    flush_keep: int = 2,
    cut_index: int = 45,
    cf_sink_frames: int = 3,
    slow_frames: int = 12,
    fast_frames: int = 6,
    tau: float = 0.95,
    promote_every: int = 2,
    af_sink_frames: int = 3,
    af_window_frames: int = 12,
) -> MemoryPolicy:
    """A memory policy from the Dual Memory node's options; raises ValueError with one sentence.

    ``d_window`` 0 means the LTM size. ``alpha_max`` / ``d_window`` also apply to explicit
    ``apr`` transitions under the other policies; the GCM and LTM sizes only to ``grounded``,
    sink / window / global_sink only to ``longlive``, the ``irope_*`` / flush / cut options only
    to ``infinity_rope``, the ``cf_*`` / slow / fast / tau / promotion options only to ``context_forcing``,
    the ``af_*`` options only to ``anchor_forcing``.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown memory policy '{policy}'; use one of {', '.join(POLICIES)}")
    if gcm_update not in GCM_UPDATES:
        raise ValueError(f"unknown GCM update rule '{gcm_update}'; use one of {', '.join(GCM_UPDATES)}")
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f"APR alpha_max {alpha_max} is outside [0, 1]; 0.8 is the paper's value")
    if d_window < 0 or 0 < d_window < 1:
        raise ValueError(f"APR D_window {d_window} is below 1 frame; use 0 (the LTM size) or 1 or more")
    window = d_window if d_window > 0 else None
    if policy == "grounded":
        if gcm_frames < 1:
            raise ValueError(f"GCM size K {gcm_frames} is below 1 frame; use 3 (the default)")
        if ltm_frames < 1:
            raise ValueError(f"LTM window W {ltm_frames} is below 1 frame; use 6 (the default)")
        memory = grounded(gcm_frames=gcm_frames, ltm_frames=ltm_frames, candidates=gcm_update,
                          alpha_max=alpha_max, proximity_window=window)
    elif policy == "longlive":
        _check_sink_window("LongLive", sink_frames, window_frames, 3, 12)
        memory = dataclasses.replace(
            longlive(sink_frames=sink_frames, window_frames=window_frames, global_sink=global_sink),
            apr=Apr(alpha_max, window),
        )
    elif policy == "infinity_rope":
        _check_sink_window("Infinity-RoPE", irope_sink_frames, irope_window_frames, 1, 6)
        memory = dataclasses.replace(
            infinity_rope(sink_frames=irope_sink_frames, window_frames=irope_window_frames,
                          chunk_frames=CHUNK_FRAMES, flush_keep=flush_keep, cut_index=cut_index),
            apr=Apr(alpha_max, window),
        )
    elif policy == "context_forcing":
        if cf_sink_frames < 1 or slow_frames < 1:
            raise ValueError(f"Context Forcing sink ({cf_sink_frames}) and slow memory ({slow_frames}) need at least "
                             "1 frame each; use 3 and 12 (the paper's)")
        if fast_frames - CHUNK_FRAMES < 1:
            raise ValueError(f"Context Forcing fast memory of {fast_frames} frames leaves no room after the chunk "
                             f"({CHUNK_FRAMES}); use at least {CHUNK_FRAMES + 1}, 6 is the paper's")
        memory = dataclasses.replace(
            context_forcing(sink_frames=cf_sink_frames, slow_frames=slow_frames, fast_frames=fast_frames,
                            chunk_frames=CHUNK_FRAMES, tau=tau, promote_every=promote_every),
            apr=Apr(alpha_max, window),
        )
    elif policy == "anchor_forcing":
        _check_sink_window("Anchor Forcing", af_sink_frames, af_window_frames, 3, 12)
        memory = dataclasses.replace(
            anchor_forcing(sink_frames=af_sink_frames, window_frames=af_window_frames, chunk_frames=CHUNK_FRAMES),
            apr=Apr(alpha_max, window),
        )
    else:
        memory = dataclasses.replace(self_forcing(), apr=Apr(alpha_max, window))
    memory.validate(CHUNK_FRAMES)
    return memory


@dataclass(frozen=True)
class RopeOptions:
    """The DR-RoPE patch: ``dr_rope`` (bounded indices in ``layout`` below ``rope_range``) or
    ``absolute`` (frame indices grow with the video), and the rotation precision."""

    mode: str = "dr_rope"
    rope_range: int = 21
    layout: str = "pinned_end"
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.mode not in ROPE_MODES:
            raise ValueError(f"unknown RoPE mode '{self.mode}'; use one of {', '.join(ROPE_MODES)}")
        if self.layout not in ROPE_LAYOUTS:
            raise ValueError(f"unknown DR-RoPE layout '{self.layout}'; use one of {', '.join(ROPE_LAYOUTS)}")
        if self.precision not in ROPE_PRECISIONS:
            raise ValueError(f"unknown RoPE precision '{self.precision}'; use one of {', '.join(ROPE_PRECISIONS)}")
        if self.rope_range < 2:
            raise ValueError(f"RoPE range {self.rope_range} is below 2; use 21 (the trained length)")


def rope_options(model_options: dict) -> RopeOptions | None:
    """The RoPE patch a MODEL carries, if any."""
    return model_options.get("transformer_options", {}).get(ROPE_KEY)


def with_rope(model_options: dict, rope: RopeOptions) -> None:
    """Store ``rope`` in ``model_options`` (of a cloned MODEL)."""
    model_options.setdefault("transformer_options", {})[ROPE_KEY] = rope


def apply_rope(memory: MemoryPolicy, rope: RopeOptions | None) -> tuple[MemoryPolicy, str]:
    """The policy with the patch's index rule and range, and the RoPE precision for the run.

    Without a patch the policy keeps its own rule (DR-RoPE for ``grounded``, absolute for the
    others) and rotations run in float32. Infinity-RoPE, Context Forcing and Anchor Forcing place
    their own bounded indices (the method is its index rule): a ``dr_rope`` patch sets only the precision,
    an ``absolute`` one is refused.
    """
    if rope is None:
        return memory, "float32"
    if memory.name in OWN_INDEX_RULES:
        if rope.mode == "absolute":
            raise ValueError(
                f"the '{memory.name}' memory places its own bounded RoPE indices; set the GF DR-RoPE node's mode "
                "to dr_rope (only its precision is used) or remove the node"
            )
        return memory, rope.precision
    if rope.mode == "absolute":
        patched = dataclasses.replace(memory, index_rule="absolute", rope_range=None)
    else:
        patched = dataclasses.replace(memory, index_rule=rope.layout, rope_range=rope.rope_range)
    patched.validate(CHUNK_FRAMES)
    return patched, rope.precision


def _check_sink_window(method: str, sink: int, window: int, default_sink: int, default_window: int) -> None:
    """A sink of at least 1 frame and a window (counting sink and chunk) with room for 1 more frame."""
    if sink < 1:
        raise ValueError(f"{method} sink of {sink} frames is below 1; use {default_sink} (the default)")
    if window - sink - CHUNK_FRAMES < 1:
        raise ValueError(
            f"{method} window of {window} frames leaves no room after the sink ({sink}) and the chunk "
            f"({CHUNK_FRAMES}); use at least {sink + CHUNK_FRAMES + 1}, {default_window} is the default"
        )
