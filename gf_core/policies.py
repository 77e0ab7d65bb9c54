"""Memory policies as data: regions, an index rule, admission, switch and cut rules, and the presets.

A policy names its regions (with capacities and a fill rule), an index rule that gives every
key frame and the query chunk a temporal RoPE index, an admission rule for anchors and the
default prompt-switch rule. Self-Forcing, LongLive, Grounded Forcing, Infinity-RoPE, Context
Forcing and Anchor Forcing are configurations of :class:`MemoryPolicy`; the one interpreter that
runs them all is :class:`gf_core.memory.Memory`.

Units: every count here is in latent frames.
"""

from __future__ import annotations

from dataclasses import dataclass

FILL_FIRST = "first"  # takes the first frames committed and is never evicted (sink, GCM)
FILL_FIFO = "fifo"  # sliding window of the most recent frames (local window, LTM)
FILL_PROMOTED = "promoted"  # only frames leaving a sliding region and promoted (Context Forcing's slow memory)
FILL_JUNCTION = "junction"  # the first chunk committed after each prompt switch, kept until the next (Anchor Forcing)

INDEX_RULES = ("absolute", "pinned_end", "after_gcm", "block_relative", "bounded", "tri_region")
CANDIDATE_RULES = ("after_switch", "every_frame", "frozen")
CUT_RULES = ("reset", "rope_cut")


@dataclass(frozen=True)
class Region:
    name: str
    frames: int
    fill: str


@dataclass(frozen=True)
class MemoryPolicy:
    """A long-video memory policy, as data.

    Attributes:
        name: the preset name ("grounded", "longlive", "self_forcing").
        regions: key regions in attention order.
        index_rule: "absolute" (frame index), "pinned_end" / "after_gcm" (Dual-Reference RoPE),
            "block_relative" (Infinity-RoPE: keys 0..n-1 in cache order, the chunk right after them),
            "bounded" (Context Forcing: first-filled and promoted regions numbered from 0 in order,
            the sliding region and the chunk pinned to end at ``rope_range - 1``),
            "tri_region" (Anchor Forcing: "bounded" for the first-filled and sliding regions, a junction
            region at ``junction_index``.. once its frames have left the sliding region).
        rope_range: every temporal index stays below this (bounded rules only).
        max_frames: the longest video the policy can make (None: unlimited).
        anchor_region: the region the diversity-aware update may rewrite (None: no update).
        candidates: which committed frames may replace an anchor ("after_switch", "every_frame", "frozen").
        switch: the default prompt-switch rule ("apr", "hard", "none", "longlive", "flush", "anchor").
        alpha_max, proximity_window: APR parameters (Eq. 12); window None means the LTM size.
        global_sink: LongLive's recache keeps the sink's old-prompt K/V.
        recache_frames: the recache window of "longlive" and "anchor" (the references' ``local_attn_size``).
        flush_keep: a "flush" switch keeps the first-filled regions and this many newest sliding frames.
        cut: what a shot cut does: "reset" (drop the sliding regions, restart indices after the
            anchors) or "rope_cut" (a flush, then the first chunk after the cut sits at temporal
            indices ``cut_index``.. far from the retained context: Infinity-RoPE's RoPE Cut).
        promote_to: the FILL_PROMOTED region that frames leaving the sliding region may enter.
        tau: a frame is promoted when the cosine similarity of its key to the previous frame's key is below this.
        promote_every: only the first frame of every ``promote_every``-th chunk is a promotion candidate.
        junction_index: the temporal index of the first junction frame ("tri_region" only).
    """

    name: str
    regions: tuple[Region, ...]
    index_rule: str = "absolute"
    rope_range: int | None = None
    max_frames: int | None = None
    anchor_region: str | None = None
    candidates: str = "frozen"
    switch: str = "none"
    alpha_max: float = 0.8
    proximity_window: float | None = None
    global_sink: bool = True
    recache_frames: int = 0
    flush_keep: int = 2
    cut: str = "reset"
    cut_index: int = 45
    promote_to: str | None = None
    tau: float = 0.95
    promote_every: int = 2
    junction_index: int = 6

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def window(self) -> float:
        """APR's D_window (defaults to the capacity of the sliding region)."""
        if self.proximity_window is not None:
            return self.proximity_window
        return float(sum(r.frames for r in self.regions if r.fill == FILL_FIFO))

    def validate(self, chunk_frames: int) -> None:
        """Raise ValueError with one sentence if the configuration cannot run."""
        for r in self.regions:
            if r.frames < 1:
                raise ValueError(f"memory region '{r.name}' of the '{self.name}' policy holds {r.frames} frames; it needs at least 1")
        if self.index_rule not in INDEX_RULES:
            raise ValueError(f"unknown RoPE index rule '{self.index_rule}'; use one of {', '.join(INDEX_RULES)}")
        if self.candidates not in CANDIDATE_RULES:
            raise ValueError(f"unknown GCM update rule '{self.candidates}'; use one of {', '.join(CANDIDATE_RULES)}")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise ValueError(f"alpha_max {self.alpha_max} is outside [0, 1]; 0.8 is the paper's value")
        if self.proximity_window is not None and self.proximity_window < 1:
            raise ValueError(f"D_window {self.proximity_window} is below 1 frame; use the LTM size (6) or more")
        if self.cut not in CUT_RULES:
            raise ValueError(f"unknown cut rule '{self.cut}'; use one of {', '.join(CUT_RULES)}")
        if self.flush_keep < 0:
            raise ValueError(f"a flush keeping {self.flush_keep} frames is impossible; use 0 or more (2 is Infinity-RoPE's)")
        if self.cut_index < 0:
            raise ValueError(f"RoPE cut index {self.cut_index} is negative; use 45 (Infinity-RoPE's)")
        promoted = [r.name for r in self.regions if r.fill == FILL_PROMOTED]
        if promoted != ([self.promote_to] if self.promote_to else []):
            raise ValueError(
                f"the '{self.name}' policy promotes into {self.promote_to!r} but its promoted regions are {promoted}; "
                "name exactly one region filled by promotion"
            )
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"similarity threshold tau {self.tau} is outside [-1, 1]; 0.95 is Context Forcing's value")
        if self.promote_every < 1:
            raise ValueError(f"promotion every {self.promote_every} chunks is impossible; use 1 or more (2 is the paper's)")
        if self.index_rule in ("bounded", "tri_region") and self.rope_range is None:
            raise ValueError(f"the '{self.index_rule}' RoPE index rule needs a RoPE range; "
                             "set rope_range (21 is the trained length)")
        junctions = [r for r in self.regions if r.fill == FILL_JUNCTION]
        if len(junctions) > 1:
            raise ValueError(f"the '{self.name}' policy has {len(junctions)} junction regions; use at most one")
        if junctions and self.index_rule != "tri_region":
            raise ValueError(f"a junction region needs the 'tri_region' RoPE index rule, not '{self.index_rule}'")
        if self.switch == "anchor" and self.recache_frames < 1:
            raise ValueError("the anchor-guided re-cache needs a recache window; set recache_frames (12 is Anchor Forcing's)")
        if self.index_rule == "tri_region" and junctions:
            end = self.junction_index + junctions[0].frames
            if self.junction_index < 0 or end > self.rope_range:
                raise ValueError(
                    f"the junction at temporal indices {self.junction_index}..{end - 1} leaves the RoPE range of "
                    f"{self.rope_range}; use a junction index from 0 to {self.rope_range - junctions[0].frames}"
                )
        if self.rope_range is not None:
            need = sum(r.frames for r in self.regions) + chunk_frames
            if self.index_rule != "absolute" and need > self.rope_range:
                raise ValueError(
                    f"{' + '.join(f'{r.name} {r.frames}' for r in self.regions)} + chunk {chunk_frames} = {need} frames "
                    f"do not fit the RoPE range of {self.rope_range}; shrink the memory or raise the range"
                )


def self_forcing(cache_frames: int = 21, chunk_frames: int = 3) -> MemoryPolicy:
    """Self-Forcing: every committed frame stays; the video ends when the cache is full."""
    return MemoryPolicy(
        name="self_forcing",
        regions=(Region("context", cache_frames, FILL_FIRST),),
        max_frames=cache_frames,
        switch="none",
    )


def longlive(sink_frames: int = 3, window_frames: int = 12, chunk_frames: int = 3, global_sink: bool = True) -> MemoryPolicy:
    """LongLive 1.0: a sink (the first chunk) plus the newest frames, window counted with the chunk."""
    return MemoryPolicy(
        name="longlive",
        regions=(
            Region("sink", sink_frames, FILL_FIRST),
            Region("local", window_frames - sink_frames - chunk_frames, FILL_FIFO),
        ),
        switch="longlive",
        global_sink=global_sink,
        recache_frames=window_frames,
    )


def grounded(
    gcm_frames: int = 3,
    ltm_frames: int = 6,
    rope_range: int = 21,
    layout: str = "pinned_end",
    candidates: str = "after_switch",
    alpha_max: float = 0.8,
    proximity_window: float | None = None,
) -> MemoryPolicy:
    """Grounded Forcing: Global Consistency Memory + Local Temporal Memory with DR-RoPE and APR."""
    if layout not in ("pinned_end", "after_gcm"):
        raise ValueError(f"unknown DR-RoPE layout '{layout}'; use 'pinned_end' or 'after_gcm'")
    return MemoryPolicy(
        name="grounded",
        regions=(Region("gcm", gcm_frames, FILL_FIRST), Region("ltm", ltm_frames, FILL_FIFO)),
        index_rule=layout,
        rope_range=rope_range,
        anchor_region="gcm",
        candidates=candidates,
        switch="apr",
        alpha_max=alpha_max,
        proximity_window=proximity_window,
    )


def infinity_rope(
    sink_frames: int = 1,
    window_frames: int = 6,
    chunk_frames: int = 3,
    flush_keep: int = 2,
    cut_index: int = 45,
) -> MemoryPolicy:
    """Infinity-RoPE (training-free, on Self-Forcing weights): a sink plus a sliding window,
    re-indexed block-relatively every chunk; KV Flush at a prompt switch, RoPE Cut at a shot cut.

    ``window_frames`` counts the sink and the chunk, like the reference's ``local_attn_size`` (6):
    the sliding region holds ``window_frames - sink_frames - chunk_frames`` committed frames.
    """
    return MemoryPolicy(
        name="infinity_rope",
        regions=(
            Region("sink", sink_frames, FILL_FIRST),
            Region("window", window_frames - sink_frames - chunk_frames, FILL_FIFO),
        ),
        index_rule="block_relative",
        switch="flush",
        flush_keep=flush_keep,
        cut="rope_cut",
        cut_index=cut_index,
    )


def context_forcing(
    sink_frames: int = 3,
    slow_frames: int = 12,
    fast_frames: int = 6,
    chunk_frames: int = 3,
    tau: float = 0.95,
    promote_every: int = 2,
    rope_range: int | None = None,
) -> MemoryPolicy:
    """Context Forcing: attention sink N_s + slow memory N_c (surprisal-promoted keyframes) + fast memory N_l.

    ``fast_frames`` (N_l) counts the chunk being made, so N_s + N_c + N_l = 21 is the whole attention
    window and every temporal index stays in [0, N_s + N_c + N_l) (Eq. 8); ``rope_range`` defaults to that sum.
    """
    return MemoryPolicy(
        name="context_forcing",
        regions=(
            Region("sink", sink_frames, FILL_FIRST),
            Region("slow", slow_frames, FILL_PROMOTED),
            Region("fast", fast_frames - chunk_frames, FILL_FIFO),
        ),
        index_rule="bounded",
        rope_range=rope_range if rope_range is not None else sink_frames + slow_frames + fast_frames,
        switch="none",
        promote_to="slow",
        tau=tau,
        promote_every=promote_every,
    )


def anchor_forcing(
    sink_frames: int = 3,
    window_frames: int = 12,
    chunk_frames: int = 3,
    rope_range: int = 21,
) -> MemoryPolicy:
    """Anchor Forcing (LongLive weights + its LoRA): sink + junction + local with tri-region RoPE,
    and the anchor-guided re-cache at a prompt switch.

    ``window_frames`` counts the sink and the chunk, like the reference's ``local_attn_size`` (12):
    the local region holds ``window_frames - sink_frames - chunk_frames`` committed frames. The
    junction (the first chunk made under each new prompt) sits at ``rope_range - window_frames - chunk_frames``
    (6-8), where the reference's ``_apply_cache_updates`` puts it.
    """
    return MemoryPolicy(
        name="anchor_forcing",
        regions=(
            Region("sink", sink_frames, FILL_FIRST),
            Region("junction", chunk_frames, FILL_JUNCTION),
            Region("local", window_frames - sink_frames - chunk_frames, FILL_FIFO),
        ),
        index_rule="tri_region",
        rope_range=rope_range,
        switch="anchor",
        recache_frames=window_frames,
        junction_index=rope_range - window_frames - chunk_frames,
    )


PRESETS = {
    "grounded": grounded,
    "longlive": longlive,
    "self_forcing": self_forcing,
    "infinity_rope": infinity_rope,
    "context_forcing": context_forcing,
    "anchor_forcing": anchor_forcing,
}
CHUNK_SIZED = ("longlive", "infinity_rope", "context_forcing", "anchor_forcing")  # presets whose windows count the chunk


def preset(name: str, chunk_frames: int = 3, **kwargs) -> MemoryPolicy:
    """A policy by name; windowed presets are sized for ``chunk_frames``."""
    if name not in PRESETS:
        raise ValueError(f"unknown memory policy '{name}'; use one of {', '.join(PRESETS)}")
    if name in CHUNK_SIZED:
        kwargs["chunk_frames"] = chunk_frames
    return PRESETS[name](**kwargs)
