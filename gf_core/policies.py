"""Memory policies as data: regions, an index rule, admission, switch and cut rules, and the presets.

A policy names its regions (with capacities and a fill rule), an index rule that gives every
key frame and the query chunk a temporal RoPE index, an admission rule for anchors and the
default prompt-switch rule; the parameters a single rule needs sit in its own small record
(:class:`Apr`, :class:`Recache`, :class:`Cut`, :class:`Promotion`, :class:`Junction`).
Self-Forcing, LongLive, Grounded Forcing, Infinity-RoPE, Context Forcing and Anchor Forcing are
configurations of :class:`MemoryPolicy`; the one interpreter that runs them all is
:class:`gf_core.memory.Memory`. Every rule is a ``Literal`` checked by :meth:`MemoryPolicy.validate`.

Units: every count here is in latent frames.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from .errors import BadInput
from .rope import ROPE_POSITIONS

Fill = Literal["first", "fifo", "promoted", "junction"]
FILL_FIRST = "first"  # takes the first frames committed and is never evicted (sink, GCM)
FILL_FIFO = "fifo"  # sliding window of the most recent frames (local window, LTM)
FILL_PROMOTED = "promoted"  # only frames leaving a sliding region and promoted (Context Forcing's slow memory)
FILL_JUNCTION = "junction"  # the first chunk committed after each prompt switch, kept until the next (Anchor Forcing)

IndexRule = Literal["absolute", "pinned_end", "after_gcm", "block_relative", "bounded", "tri_region"]
CandidateRule = Literal["after_switch", "every_frame", "frozen"]
SwitchRule = Literal["apr", "hard", "none", "longlive", "flush", "anchor"]
CutRule = Literal["reset", "rope_cut"]

FILLS: tuple[str, ...] = get_args(Fill)
INDEX_RULES: tuple[str, ...] = get_args(IndexRule)
CANDIDATE_RULES: tuple[str, ...] = get_args(CandidateRule)
SWITCH_RULES: tuple[str, ...] = get_args(SwitchRule)
CUT_RULES: tuple[str, ...] = get_args(CutRule)
BOUNDED_RULES = ("pinned_end", "bounded", "tri_region")  # rules that need a rope_range


def _one_of(what: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise BadInput(f"unknown {what} {value!r}; use one of {', '.join(valid)}")


def check_apr(alpha_max: float | None, proximity_window: float | None) -> None:
    """APR's parameters (Eq. 12): alpha_max in [0, 1], D_window at least 1 frame (None: the default)."""
    if alpha_max is not None and not 0.0 <= alpha_max <= 1.0:  # (NaN fails this too)
        raise BadInput(f"alpha_max {alpha_max} is outside [0, 1]; 0.8 is the paper's value")
    if proximity_window is not None and not proximity_window >= 1:
        raise BadInput(f"D_window {proximity_window} is below 1 frame; use the LTM size (6) or more")


@dataclass(frozen=True)
class Region:
    name: str
    frames: int
    fill: Fill


@dataclass(frozen=True)
class Apr:
    """Asymmetric Proximity Recache (Eq. 11-12): alpha_j = clamp(min(alpha_max, 1 - d_j / D_window), 0, alpha_max).
    ``proximity_window`` None means the capacity of the sliding regions."""

    alpha_max: float = 0.8
    proximity_window: float | None = None


@dataclass(frozen=True)
class Recache:
    """The re-cache window of the "longlive" and "anchor" switch rules (the references' ``local_attn_size``);
    with ``global_sink`` LongLive's recache keeps the sink's old-prompt K/V."""

    frames: int = 12
    global_sink: bool = True


@dataclass(frozen=True)
class Cut:
    """What a shot cut does: "reset" (drop the sliding regions, restart indices after the anchors) or
    "rope_cut" (a flush, then the first chunk after the cut at temporal indices ``index``.., far from
    the retained context: Infinity-RoPE's RoPE Cut)."""

    rule: CutRule = "reset"
    index: int = 45


@dataclass(frozen=True)
class Promotion:
    """Context Forcing's surprisal consolidation: a frame leaving the sliding region enters region ``into``
    when the cosine similarity of its key to the previous frame's key is below ``tau``; only the first
    frame of every ``every``-th chunk is a candidate."""

    into: str
    tau: float = 0.95
    every: int = 2


@dataclass(frozen=True)
class Junction:
    """Anchor Forcing's junction region sits at temporal indices ``index``.. ("tri_region" only)."""

    index: int = 6


@dataclass(frozen=True)
class MemoryPolicy:
    """A long-video memory policy, as data.

    Attributes:
        name: a label for logs and messages (the preset's name); no behaviour depends on it.
        regions: key regions in attention order.
        index_rule: "absolute" (frame index), "pinned_end" / "after_gcm" (Dual-Reference RoPE),
            "block_relative" (Infinity-RoPE: keys 0..n-1 in cache order, the chunk right after them),
            "bounded" (Context Forcing: first-filled and promoted regions numbered from 0 in order,
            the sliding region and the chunk pinned to end at ``rope_range - 1``),
            "tri_region" (Anchor Forcing: "bounded" for the first-filled and sliding regions, a junction
            region at ``junction.index``.. once its frames have left the sliding region).
        fixed_index_rule: the index rule is part of the method (Infinity-RoPE, Context Forcing,
            Anchor Forcing): a RoPE patch may set only the precision.
        rope_range: every temporal index stays below this (bounded rules only).
        max_frames: the longest video the policy can make (None: unlimited).
        anchor_region: the region the diversity-aware update may rewrite (None: no update).
        candidates: which committed frames may replace an anchor.
        switch: the default prompt-switch rule.
        apr: APR's parameters (also used by explicit "apr" transitions under any policy).
        recache: the window of the "longlive" and "anchor" switch rules (None: the policy has none).
        flush_keep: a "flush" switch keeps the first-filled regions and this many newest sliding frames.
        cut: the shot-cut rule.
        promotion: surprisal promotion into a FILL_PROMOTED region (None: no promotion).
        junction: where the FILL_JUNCTION region sits (None: no junction).
    """

    name: str
    regions: tuple[Region, ...]
    index_rule: IndexRule = "absolute"
    fixed_index_rule: bool = False
    rope_range: int | None = None
    max_frames: int | None = None
    anchor_region: str | None = None
    candidates: CandidateRule = "frozen"
    switch: SwitchRule = "none"
    apr: Apr = field(default_factory=Apr)
    recache: Recache | None = None
    flush_keep: int = 2
    cut: Cut = field(default_factory=Cut)
    promotion: Promotion | None = None
    junction: Junction | None = None

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def filled_by(self, *fills: str) -> list[Region]:
        """The regions with one of the fill rules ``fills``, in attention order."""
        return [r for r in self.regions if r.fill in fills]

    @property
    def window(self) -> float:
        """APR's D_window (defaults to the capacity of the sliding regions)."""
        if self.apr.proximity_window is not None:
            return self.apr.proximity_window
        return float(sum(r.frames for r in self.filled_by(FILL_FIFO)))

    def validate(self, chunk_frames: int) -> None:
        """Raise :class:`BadInput` with one sentence if the configuration cannot run."""
        self._validate_rules()
        self._validate_regions()
        self._validate_parameters()
        self._validate_range(chunk_frames)

    def _validate_rules(self) -> None:
        _one_of("RoPE index rule", self.index_rule, INDEX_RULES)
        _one_of("GCM update rule", self.candidates, CANDIDATE_RULES)
        _one_of("switch rule", self.switch, SWITCH_RULES)
        _one_of("cut rule", self.cut.rule, CUT_RULES)
        for r in self.regions:
            _one_of(f"fill rule of memory region '{r.name}'", r.fill, FILLS)
        if self.switch in ("longlive", "anchor") and (self.recache is None or self.recache.frames < 1):
            raise BadInput(f"the '{self.switch}' switch rule re-runs a window of frames, but the '{self.name}' "
                           "policy has none; set recache=Recache(frames=12) (the references' window)")
        if self.switch == "longlive" and len(self.filled_by(FILL_FIRST)) != 1:
            raise BadInput("the LongLive recache keeps one sink region, but the "
                           f"'{self.name}' policy has {len(self.filled_by(FILL_FIRST))} first-filled regions; "
                           "use one (or the 'apr', 'hard' or 'none' switch)")

    def _validate_regions(self) -> None:
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise BadInput(f"the '{self.name}' policy names a memory region twice ({names}); give each its own name")
        for r in self.regions:
            if not isinstance(r.frames, int) or r.frames < 1:
                raise BadInput(f"memory region '{r.name}' of the '{self.name}' policy holds {r.frames} frames; "
                               "it needs at least 1")
        if self.anchor_region is not None and self.anchor_region not in names:
            raise BadInput(f"the anchor region '{self.anchor_region}' is not a region of the '{self.name}' policy; "
                           f"use one of {', '.join(names)}")
        promoted = [r.name for r in self.filled_by(FILL_PROMOTED)]
        if promoted != ([self.promotion.into] if self.promotion else []):
            into = self.promotion.into if self.promotion else None
            raise BadInput(f"the '{self.name}' policy promotes into {into!r} but its promoted regions are "
                           f"{promoted}; name exactly one region filled by promotion")
        junctions = self.filled_by(FILL_JUNCTION)
        if len(junctions) > 1:
            raise BadInput(f"the '{self.name}' policy has {len(junctions)} junction regions; use at most one")
        if junctions and (self.index_rule != "tri_region" or self.junction is None):
            raise BadInput(f"a junction region needs the 'tri_region' RoPE index rule and a junction index, "
                           f"not '{self.index_rule}'")

    def _validate_parameters(self) -> None:
        check_apr(self.apr.alpha_max, self.apr.proximity_window)
        if self.flush_keep < 0:
            raise BadInput(f"a flush keeping {self.flush_keep} frames is impossible; use 0 or more "
                           "(2 is Infinity-RoPE's)")
        if self.promotion is not None:
            if not -1.0 <= self.promotion.tau <= 1.0:
                raise BadInput(f"similarity threshold tau {self.promotion.tau} is outside [-1, 1]; "
                               "0.95 is Context Forcing's value")
            if self.promotion.every < 1:
                raise BadInput(f"promotion every {self.promotion.every} chunks is impossible; use 1 or more "
                               "(2 is the paper's)")
        if self.max_frames is not None and self.max_frames < 1:
            raise BadInput(f"the '{self.name}' policy holds at most {self.max_frames} frames; use 1 or more (or None)")

    def _validate_range(self, chunk_frames: int) -> None:
        """Every temporal index the policy can give must lie inside its range and the RoPE table."""
        if self.index_rule in BOUNDED_RULES and self.rope_range is None:
            raise BadInput(f"the '{self.index_rule}' RoPE index rule needs a RoPE range; "
                           "set rope_range (21 is the trained length)")
        if self.rope_range is not None and not 1 <= self.rope_range <= ROPE_POSITIONS:
            raise BadInput(f"RoPE range {self.rope_range} is outside the RoPE table of {ROPE_POSITIONS} positions; "
                           "use 21 (the trained length) or at most 1024")
        if self.cut.rule == "rope_cut" and not 0 <= self.cut.index <= ROPE_POSITIONS - chunk_frames:
            raise BadInput(f"RoPE cut index {self.cut.index} puts the chunk after a cut outside the RoPE table of "
                           f"{ROPE_POSITIONS} positions; use 0 to {ROPE_POSITIONS - chunk_frames} (45 is Infinity-RoPE's)")
        junctions = self.filled_by(FILL_JUNCTION)
        if self.index_rule == "tri_region" and junctions:
            end = self.junction.index + junctions[0].frames
            if self.junction.index < 0 or end > self.rope_range:
                raise BadInput(
                    f"the junction at temporal indices {self.junction.index}..{end - 1} leaves the RoPE range of "
                    f"{self.rope_range}; use a junction index from 0 to {self.rope_range - junctions[0].frames}"
                )
        if self.rope_range is not None and self.index_rule != "absolute":
            need = sum(r.frames for r in self.regions) + chunk_frames
            if need > self.rope_range:
                raise BadInput(
                    f"{' + '.join(f'{r.name} {r.frames}' for r in self.regions)} + chunk {chunk_frames} = {need} "
                    f"frames do not fit the RoPE range of {self.rope_range}; shrink the memory or raise the range"
                )

    def longest_video(self) -> float:
        """Latent frames the policy can make: ``max_frames``, the RoPE table for absolute indices, else unbounded."""
        limits = [self.max_frames or math.inf]
        if self.index_rule == "absolute":
            limits.append(ROPE_POSITIONS)
        return min(limits)


def self_forcing(cache_frames: int = 21) -> MemoryPolicy:
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
        recache=Recache(window_frames, global_sink),
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
        raise BadInput(f"unknown DR-RoPE layout '{layout}'; use 'pinned_end' or 'after_gcm'")
    return MemoryPolicy(
        name="grounded",
        regions=(Region("gcm", gcm_frames, FILL_FIRST), Region("ltm", ltm_frames, FILL_FIFO)),
        index_rule=layout,  # type: ignore[arg-type]
        rope_range=rope_range,
        anchor_region="gcm",
        candidates=candidates,  # type: ignore[arg-type]
        switch="apr",
        apr=Apr(alpha_max, proximity_window),
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
        fixed_index_rule=True,
        switch="flush",
        flush_keep=flush_keep,
        cut=Cut("rope_cut", cut_index),
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
        fixed_index_rule=True,
        rope_range=rope_range if rope_range is not None else sink_frames + slow_frames + fast_frames,
        switch="none",
        promotion=Promotion("slow", tau, promote_every),
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
        fixed_index_rule=True,
        rope_range=rope_range,
        switch="anchor",
        recache=Recache(window_frames),
        junction=Junction(rope_range - window_frames - chunk_frames),
    )


PRESETS = {
    "grounded": grounded,
    "longlive": longlive,
    "self_forcing": self_forcing,
    "infinity_rope": infinity_rope,
    "context_forcing": context_forcing,
    "anchor_forcing": anchor_forcing,
}


def preset(name: str, chunk_frames: int = 3, **kwargs) -> MemoryPolicy:
    """A policy by name; presets whose windows count the chunk are sized for ``chunk_frames``."""
    if name not in PRESETS:
        raise BadInput(f"unknown memory policy '{name}'; use one of {', '.join(PRESETS)}")
    if "chunk_frames" in inspect.signature(PRESETS[name]).parameters:
        kwargs["chunk_frames"] = chunk_frames
    return PRESETS[name](**kwargs)
