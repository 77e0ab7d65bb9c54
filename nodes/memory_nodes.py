"""The Dual Memory node: which long-video memory the sampler runs, as a GF_MEMORY value."""

from __future__ import annotations

from comfy_api.latest import io

from .policy import GCM_UPDATES, POLICIES, build_memory
from .sockets import CATEGORY, Memory


class GFDualMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFDualMemory",
            display_name="GF Dual Memory",
            category=CATEGORY,
            description="The memory the GF Sampler keeps while streaming: Grounded Forcing's Global Consistency "
                        "Memory + Local Temporal Memory, LongLive's sink + window, or plain Self-Forcing.",
            inputs=[
                io.Combo.Input("policy", options=list(POLICIES), default="grounded",
                               tooltip="grounded: anchors (GCM) + recent frames (LTM) with DR-RoPE and APR. "
                                       "longlive: sink + sliding window, absolute RoPE, KV recache on a switch. "
                                       "self_forcing: everything cached, stops at 21 latent frames (~5 s)."),
                io.Int.Input("gcm_frames", default=3, min=1, max=18,
                             tooltip="grounded: K, latent frames in the Global Consistency Memory (the anchors)."),
                io.Int.Input("ltm_frames", default=6, min=1, max=18,
                             tooltip="grounded: W, latent frames in the Local Temporal Memory (the recent window)."),
                io.Combo.Input("gcm_update", options=list(GCM_UPDATES), default="after_switch",
                               tooltip="grounded: which new frames may replace a redundant anchor: those made during "
                                       "one LTM turnover after each prompt switch, every frame, or none (frozen)."),
                io.Float.Input("alpha_max", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="APR: the largest blend toward the new prompt's keys/values at a switch "
                                       "(1 with a huge D_window = hard recache, 0 = keep the old cache)."),
                io.Float.Input("d_window", default=0.0, min=0.0, max=1024.0, step=1.0,
                               tooltip="APR: D_window in latent frames; frames this far before the switch are not "
                                       "recached. 0 = the LTM size W."),
                io.Int.Input("sink_frames", default=3, min=1, max=18,
                             tooltip="longlive: latent frames of the attention sink (the first chunk)."),
                io.Int.Input("window_frames", default=12, min=5, max=60,
                             tooltip="longlive: the attention window in latent frames, counting the sink and the "
                                     "current chunk (LongLive's local_attn_size, 12)."),
                io.Boolean.Input("global_sink", default=True,
                                 tooltip="longlive: at a prompt switch the sink keeps its old-prompt keys/values "
                                         "(LongLive's default)."),
            ],
            outputs=[Memory.Output(display_name="memory")],
        )

    @classmethod
    def execute(cls, policy: str, gcm_frames: int, ltm_frames: int, gcm_update: str, alpha_max: float,
                d_window: float, sink_frames: int, window_frames: int, global_sink: bool) -> io.NodeOutput:
        memory = build_memory(policy, gcm_frames, ltm_frames, gcm_update, alpha_max, d_window,
                              sink_frames, window_frames, global_sink)
        return io.NodeOutput(memory)
