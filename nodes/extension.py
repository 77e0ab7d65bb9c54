"""The pack's ComfyExtension: every node it registers."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .decode_nodes import GFStreamDecode
from .live_nodes import GFLiveSampler
from .memory_nodes import (
    GFAnchorForcingMemory,
    GFContextForcingMemory,
    GFDualMemory,
    GFInfinityRoPEMemory,
    GFLongLiveMemory,
    GFSelfForcingMemory,
)
from .model_nodes import GFDRRoPE, GFLoadCausalWanModel
from .prompt_nodes import GFAPRTransition, GFCut, GFPromptSegment, GFPromptTimeline
from .sampler_nodes import GFSampler
from .timeline_nodes import GFEventTimeline
from .toy_nodes import (
    GFToyWorldDecode,
    GFToyWorldModel,
    GFToyWorldPrompt,
    GFToyWorldTextEncoder,
    GFToyWorldTimeline,
)

NODES: list[type[io.ComfyNode]] = [
    GFLoadCausalWanModel,
    GFDualMemory,
    GFLongLiveMemory,
    GFSelfForcingMemory,
    GFInfinityRoPEMemory,
    GFAnchorForcingMemory,
    GFContextForcingMemory,
    GFDRRoPE,
    GFPromptSegment,
    GFAPRTransition,
    GFCut,
    GFPromptTimeline,
    GFSampler,
    GFStreamDecode,
    GFEventTimeline,
    GFToyWorldModel,
    GFToyWorldPrompt,
    GFToyWorldTextEncoder,
    GFToyWorldTimeline,
    GFToyWorldDecode,
    GFLiveSampler,
]


class GroundedForcingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
