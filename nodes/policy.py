"""The RoPE patch on a MODEL and how it changes a memory policy.

The memory nodes (memory_nodes.py) each make a ``gf_core.MemoryPolicy`` from its preset; the
DR-RoPE node stores a :class:`RopeOptions` in the MODEL's ``model_options["transformer_options"]``
(as core patches do), and the sampler applies it to the policy with :func:`apply_rope`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..gf_core import MemoryPolicy
from ..gf_core.errors import BadInput

CHUNK_FRAMES = 3  # the chunk size the causal Wan models were trained with

ROPE_KEY = "grounded_forcing_rope"  # key in model_options["transformer_options"]
ROPE_MODES = ("dr_rope", "absolute")
ROPE_LAYOUTS = ("pinned_end", "after_gcm")
ROPE_PRECISIONS = ("float32", "complex128")


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
            raise BadInput(f"unknown RoPE mode '{self.mode}'; use one of {', '.join(ROPE_MODES)}")
        if self.layout not in ROPE_LAYOUTS:
            raise BadInput(f"unknown DR-RoPE layout '{self.layout}'; use one of {', '.join(ROPE_LAYOUTS)}")
        if self.precision not in ROPE_PRECISIONS:
            raise BadInput(f"unknown RoPE precision '{self.precision}'; use one of {', '.join(ROPE_PRECISIONS)}")
        if self.rope_range < 2:
            raise BadInput(f"RoPE range {self.rope_range} is below 2; use 21 (the trained length)")


def rope_options(model_options: dict) -> RopeOptions | None:
    """The RoPE patch a MODEL carries, if any."""
    return model_options.get("transformer_options", {}).get(ROPE_KEY)


def with_rope(model_options: dict, rope: RopeOptions) -> None:
    """Store ``rope`` in ``model_options`` (of a cloned MODEL)."""
    model_options.setdefault("transformer_options", {})[ROPE_KEY] = rope


def apply_rope(memory: MemoryPolicy, rope: RopeOptions | None) -> tuple[MemoryPolicy, str]:
    """The policy with the patch's index rule and range, and the RoPE precision for the run.

    Without a patch the policy keeps its own rule (DR-RoPE for ``grounded``, absolute for
    LongLive and Self-Forcing) and rotations run in float32. A policy with ``fixed_index_rule``
    (Infinity-RoPE, Context Forcing, Anchor Forcing: the method is its index rule) keeps its
    indices: a ``dr_rope`` patch sets only the precision, an ``absolute`` one is refused.
    """
    if rope is None:
        return memory, "float32"
    if memory.fixed_index_rule:
        if rope.mode == "absolute":
            raise BadInput(
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
