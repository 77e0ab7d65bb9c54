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
                        "Memory + Local Temporal Memory, LongLive's sink + window, plain Self-Forcing, "
                        "Infinity-RoPE's block-relative window, Context Forcing's slow-fast memory or Anchor "
                        "Forcing's sink + junction + local memory.",
            inputs=[
                io.Combo.Input("policy", options=list(POLICIES), default="grounded",
                               tooltip="grounded: anchors (GCM) + recent frames (LTM) with DR-RoPE and APR. "
                                       "longlive: sink + sliding window, absolute RoPE, KV recache on a switch. "
                                       "self_forcing: everything cached, stops at 21 latent frames (~5 s). "
                                       "infinity_rope: sink + window re-indexed every chunk, KV flush on a switch, "
                                       "RoPE cut on a shot cut (Self-Forcing weights, training-free). "
                                       "context_forcing: sink + slow memory of surprising frames + fast window, "
                                       "bounded RoPE (meant for Context Forcing weights). "
                                       "anchor_forcing: sink + junction (first chunk of each prompt) + local window, "
                                       "tri-region RoPE below 21, anchor-guided re-cache on a switch "
                                       "(LongLive base + the Anchor Forcing LoRA)."),
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
                io.Int.Input("irope_sink_frames", default=1, min=1, max=6, optional=True,
                             tooltip="infinity_rope: latent frames of the sink (rotated at temporal index 0)."),
                io.Int.Input("irope_window_frames", default=6, min=5, max=60, optional=True,
                             tooltip="infinity_rope: the attention window in latent frames, counting the sink and "
                                     "the current chunk (the reference's local_attn_size, 6)."),
                io.Int.Input("flush_keep", default=2, min=0, max=60, optional=True,
                             tooltip="infinity_rope: at a prompt switch (KV flush) keep the sink and this many "
                                     "newest frames (2 in the reference)."),
                io.Int.Input("cut_index", default=45, min=0, max=1000, optional=True,
                             tooltip="infinity_rope: at a shot cut the first chunk of the new shot sits at temporal "
                                     "indices from this one on, far from the kept context (RoPE cut, 45)."),
                io.Int.Input("cf_sink_frames", default=3, min=1, max=18, optional=True,
                             tooltip="context_forcing: N_s, latent frames of the attention sink (the first ones)."),
                io.Int.Input("slow_frames", default=12, min=1, max=60, optional=True,
                             tooltip="context_forcing: N_c, latent frames of the slow memory (surprising frames "
                                     "kept long after they leave the fast memory; oldest evicted)."),
                io.Int.Input("fast_frames", default=6, min=4, max=60, optional=True,
                             tooltip="context_forcing: N_l, the fast (sliding) memory in latent frames, counting "
                                     "the current chunk; N_s + N_c + N_l is the RoPE range (21)."),
                io.Float.Input("tau", default=0.95, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="context_forcing: a frame enters the slow memory when the cosine similarity "
                                       "of its key to the previous frame's key is below tau (0.95)."),
                io.Int.Input("promote_every", default=2, min=1, max=60, optional=True,
                             tooltip="context_forcing: only the first frame of every n-th chunk may enter the "
                                     "slow memory (2 in the paper)."),
                io.Int.Input("af_sink_frames", default=3, min=1, max=9, optional=True,
                             tooltip="anchor_forcing: latent frames of the attention sink (the first chunk, "
                                     "temporal indices 0..)."),
                io.Int.Input("af_window_frames", default=12, min=5, max=18, optional=True,
                             tooltip="anchor_forcing: the attention window in latent frames, counting the sink and "
                                     "the current chunk (the reference's local_attn_size, 12); the junction sits at "
                                     "21 - window - 3."),
            ],
            outputs=[Memory.Output(display_name="memory")],
        )

    @classmethod
    def execute(cls, policy: str, gcm_frames: int, ltm_frames: int, gcm_update: str, alpha_max: float,
                d_window: float, sink_frames: int, window_frames: int, global_sink: bool,
                irope_sink_frames: int = 1, irope_window_frames: int = 6, flush_keep: int = 2, cut_index: int = 45,
                cf_sink_frames: int = 3, slow_frames: int = 12, fast_frames: int = 6, tau: float = 0.95,
                promote_every: int = 2, af_sink_frames: int = 3, af_window_frames: int = 12) -> io.NodeOutput:
        memory = build_memory(policy, gcm_frames, ltm_frames, gcm_update, alpha_max, d_window,
                              sink_frames, window_frames, global_sink,
                              irope_sink_frames=irope_sink_frames, irope_window_frames=irope_window_frames,
                              flush_keep=flush_keep, cut_index=cut_index, cf_sink_frames=cf_sink_frames,
                              slow_frames=slow_frames, fast_frames=fast_frames, tau=tau, promote_every=promote_every,
                              af_sink_frames=af_sink_frames, af_window_frames=af_window_frames)
        return io.NodeOutput(memory)
