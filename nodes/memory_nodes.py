"""The memory nodes: one per long-video memory policy, each a GF_MEMORY value for the GF Sampler.

Each node has only the options of its own method and builds the policy with its gf_core preset;
the policy's own ``validate`` refuses settings that cannot run, before any model work.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..gf_core import MemoryPolicy
from ..gf_core.policies import (
    CANDIDATE_RULES,
    anchor_forcing,
    context_forcing,
    grounded,
    infinity_rope,
    longlive,
    self_forcing,
)
from .policy import CHUNK_FRAMES
from .sockets import CATEGORY, Memory


def checked(memory: MemoryPolicy) -> io.NodeOutput:
    """The node's output: ``memory`` once its own validation accepts it for the trained chunk size."""
    memory.validate(CHUNK_FRAMES)
    return io.NodeOutput(memory)


class GFDualMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFDualMemory",
            display_name="GF Dual Memory",
            category=CATEGORY,
            description="Grounded Forcing's dual-memory cache: a Global Consistency Memory of a few anchor frames "
                        "(kept for the whole video, refreshed by a diversity-aware update) plus a sliding Local "
                        "Temporal Memory of the newest frames, Dual-Reference RoPE indices inside the trained "
                        "range, and Asymmetric Proximity Recache (APR) at prompt switches.",
            inputs=[
                io.Int.Input("gcm_frames", default=3, min=1, max=18,
                             tooltip="K: latent frames in the Global Consistency Memory (the anchors)."),
                io.Int.Input("ltm_frames", default=6, min=1, max=18,
                             tooltip="W: latent frames in the Local Temporal Memory (the recent window). "
                                     "K + W + the 3-frame chunk must fit the RoPE range (21)."),
                io.Combo.Input("gcm_update", options=list(CANDIDATE_RULES), default="after_switch",
                               tooltip="Which new frames may replace a redundant anchor: those made during one LTM "
                                       "turnover after each prompt switch, every frame, or none (frozen)."),
                io.Float.Input("alpha_max", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="APR: the largest blend toward the new prompt's keys/values at a switch "
                                       "(1 with a huge D_window = hard recache, 0 = keep the old cache). "
                                       "A timeline's apr(ALPHA, WINDOW) overrides it for that switch."),
                io.Float.Input("d_window", default=0.0, min=0.0, max=1024.0, step=1.0,
                               tooltip="APR: D_window in latent frames; frames this far before the switch are not "
                                       "recached. 0 = the LTM size W."),
            ],
            outputs=[Memory.Output(display_name="memory")],
        )

    @classmethod
    def execute(cls, gcm_frames: int, ltm_frames: int, gcm_update: str, alpha_max: float,
                d_window: float) -> io.NodeOutput:
        return checked(grounded(gcm_frames=gcm_frames, ltm_frames=ltm_frames, candidates=gcm_update,
                                alpha_max=alpha_max, proximity_window=d_window or None))


class GFLongLiveMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFLongLiveMemory",
            display_name="GF LongLive Memory",
            category=CATEGORY,
            description="LongLive 1.0's memory: an attention sink (the first chunk) plus a sliding window of the "
                        "newest frames, absolute RoPE, and KV recache of the window at a prompt switch.",
            inputs=[
                io.Int.Input("sink_frames", default=3, min=1, max=18,
                             tooltip="Latent frames of the attention sink (the first chunk, never evicted)."),
                io.Int.Input("window_frames", default=12, min=5, max=60,
                             tooltip="The attention window in latent frames, counting the sink and the current "
                                     "chunk (LongLive's local_attn_size, 12); also the recache window."),
                io.Boolean.Input("global_sink", default=True,
                                 tooltip="At a prompt switch the sink keeps its old-prompt keys/values "
                                         "(LongLive's default); off re-encodes it too."),
            ],
            outputs=[Memory.Output(display_name="memory")],
        )

    @classmethod
    def execute(cls, sink_frames: int, window_frames: int, global_sink: bool) -> io.NodeOutput:
        return checked(longlive(sink_frames=sink_frames, window_frames=window_frames, chunk_frames=CHUNK_FRAMES,
                                global_sink=global_sink))


class GFSelfForcingMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFSelfForcingMemory",
            display_name="GF Self-Forcing Memory",
            category=CATEGORY,
            description="Plain Self-Forcing: every frame stays in the cache with absolute RoPE; the video ends "
                        "when the cache is full. The baseline the long-video memories are compared with.",
            inputs=[
                io.Int.Input("cache_frames", default=21, min=3, max=240,
                             tooltip="Latent frames the cache holds, which is also the longest video it makes "
                                     "(21 latent frames = 81 pixel frames, the trained length)."),
            ],
            outputs=[Memory.Output(display_name="memory")],
        )

    @classmethod
    def execute(cls, cache_frames: int) -> io.NodeOutput:
        return checked(self_forcing(cache_frames=cache_frames))


class GFInfinityRoPEMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFInfinityRoPEMemory",
            display_name="GF Infinity-RoPE Memory",
            category=CATEGORY,
            description="Infinity-RoPE (training-free, on Self-Forcing weights): a sink plus a sliding window "
                        "re-indexed block-relatively every chunk, KV Flush at a prompt switch and RoPE Cut at a "
                        "shot cut. Its index rule is the method: GF DR-RoPE sets only the precision.",
            inputs=[
                io.Int.Input("sink_frames", default=1, min=1, max=6,
                             tooltip="Latent frames of the sink (rotated at temporal index 0)."),
                io.Int.Input("window_frames", default=6, min=5, max=60,
                             tooltip="The attention window in latent frames, counting the sink and the current "
                                     "chunk (the reference's local_attn_size, 6)."),
                io.Int.Input("flush_keep", default=2, min=0, max=60,
                             tooltip="At a prompt switch (KV Flush) keep the sink and this many newest frames "
                                     "(2 in the reference)."),
                io.Int.Input("cut_index", default=45, min=0, max=1000,
                             tooltip="At a shot cut the first chunk of the new shot sits at temporal indices from "
                                     "this one on, far from the kept context (RoPE Cut, 45 in the reference)."),
            ],
            outputs=[Memory.Output(display_name="memory")],
        )

    @classmethod
    def execute(cls, sink_frames: int, window_frames: int, flush_keep: int, cut_index: int) -> io.NodeOutput:
        return checked(infinity_rope(sink_frames=sink_frames, window_frames=window_frames, chunk_frames=CHUNK_FRAMES,
                                     flush_keep=flush_keep, cut_index=cut_index))


class GFAnchorForcingMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFAnchorForcingMemory",
            display_name="GF Anchor Forcing Memory",
            category=CATEGORY,
            description="Anchor Forcing (LongLive base + the Anchor Forcing LoRA): sink + junction (the first "
                        "chunk of each prompt) + local window, tri-region RoPE below 21, and the anchor-guided "
                        "re-cache at a prompt switch. Its index rule is the method: GF DR-RoPE sets only the "
                        "precision.",
            inputs=[
                io.Int.Input("sink_frames", default=3, min=1, max=9,
                             tooltip="Latent frames of the attention sink (the first chunk, temporal indices 0..)."),
                io.Int.Input("window_frames", default=12, min=5, max=18,
                             tooltip="The attention window in latent frames, counting the sink and the current "
                                     "chunk (the reference's local_attn_size, 12); the junction sits at "
                                     "21 - window - 3."),
            ],
            outputs=[Memory.Output(display_name="memory")],
        )

    @classmethod
    def execute(cls, sink_frames: int, window_frames: int) -> io.NodeOutput:
        return checked(anchor_forcing(sink_frames=sink_frames, window_frames=window_frames, chunk_frames=CHUNK_FRAMES))


class GFContextForcingMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFContextForcingMemory",
            display_name="GF Context Forcing Memory",
            category=CATEGORY,
            description="Context Forcing's slow-fast memory (meant for Context Forcing weights): an attention sink, "
                        "a slow memory of surprising frames kept long after they leave the fast window, and the "
                        "fast window, with bounded RoPE. Its index rule is the method: GF DR-RoPE sets only the "
                        "precision.",
            inputs=[
                io.Int.Input("sink_frames", default=3, min=1, max=18,
                             tooltip="N_s: latent frames of the attention sink (the first ones)."),
                io.Int.Input("slow_frames", default=12, min=1, max=60,
                             tooltip="N_c: latent frames of the slow memory (surprising frames kept after they "
                                     "leave the fast memory; oldest evicted)."),
                io.Int.Input("fast_frames", default=6, min=4, max=60,
                             tooltip="N_l: the fast (sliding) memory in latent frames, counting the current chunk; "
                                     "N_s + N_c + N_l is the RoPE range (21)."),
                io.Float.Input("tau", default=0.95, min=-1.0, max=1.0, step=0.01,
                               tooltip="A frame enters the slow memory when the cosine similarity of its key to the "
                                       "previous frame's key is below tau (0.95)."),
                io.Int.Input("promote_every", default=2, min=1, max=60,
                             tooltip="Only the first frame of every n-th chunk may enter the slow memory "
                                     "(2 in the paper)."),
            ],
            outputs=[Memory.Output(display_name="memory")],
        )

    @classmethod
    def execute(cls, sink_frames: int, slow_frames: int, fast_frames: int, tau: float,
                promote_every: int) -> io.NodeOutput:
        return checked(context_forcing(sink_frames=sink_frames, slow_frames=slow_frames, fast_frames=fast_frames,
                                       chunk_frames=CHUNK_FRAMES, tau=tau, promote_every=promote_every))

