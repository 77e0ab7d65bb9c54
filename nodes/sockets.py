"""The pack's custom socket types and its node category."""

from comfy_api.latest import io

CATEGORY = "Grounded Forcing"

Memory = io.Custom("GF_MEMORY")  # a gf_core.MemoryPolicy
Segments = io.Custom("GF_SEGMENTS")  # a tuple of gf_core.Segment
Transition = io.Custom("GF_TRANSITION")  # a gf_core.Transition
