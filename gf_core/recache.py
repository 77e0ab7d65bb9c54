"""What happens to the cache at a segment boundary: APR, hard recache, text-only, LongLive recache,
Infinity-RoPE's KV flush, Anchor Forcing's anchor-guided re-cache, and a shot cut (the policy's cut rule).

Every rule re-encodes cached frames through one ``encode`` call: a forward of clean latents at
the cache-pass timestep under the new prompt that returns their raw K/V without running the
head. ``encode(latents [B, C, N, H, W], query_index [N], context, own_keys_from=0, on_kv=None)``, where
``context`` is a :class:`~gf_core.memory.ContextSource` of frames that keep their K/V (or None) and
``on_kv`` stores each block's new K/V as the forward runs (see ``FrameStore.writer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch

from .errors import BadInput
from .memory import ContextSource, Memory, Write
from .policies import FILL_FIRST, FILL_JUNCTION, MemoryPolicy, check_apr
from .transfer import index_tensor

Encode = Callable[..., object]
SourceFor = Callable[[list[int], list[int]], ContextSource]

TransitionKind = Literal["default", "apr", "hard", "none", "flush", "cut"]
TRANSITIONS: tuple[str, ...] = get_args(TransitionKind)


@dataclass(frozen=True)
class Transition:
    """How a segment starts. ``default`` uses the policy's switch rule.

    alpha_max / proximity_window override the policy's APR parameters for this switch only.
    """

    kind: TransitionKind = "default"
    alpha_max: float | None = None
    proximity_window: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in TRANSITIONS:
            raise BadInput(f"unknown transition '{self.kind}'; use one of {', '.join(TRANSITIONS)}")
        check_apr(self.alpha_max, self.proximity_window)


@dataclass
class SwitchEvent:
    """What a segment boundary did to the cache: the event log's ``switch`` record (fields that
    do not apply to the rule are None and left out of the JSON)."""

    kind: str
    frame: int
    junction_dropped: list[int] | None = None  # a junction the rule dropped (non-"anchor" rules)
    dropped: list[int] | None = None  # frames a cut or flush dropped
    query: list[int] | None = None  # a RoPE cut: the next chunk's temporal indices
    alpha: dict[str, float] | None = None  # APR / hard: the blend weight of every cached frame ("region:frame")
    recached: list[int] | None = None  # LongLive / anchor: the frames given new K/V
    sink: list[int] | None = None  # LongLive: the sink's frames afterwards
    junction: list[int] | None = None  # anchor: the junction frames the re-cache attended to
    anchor_junction_dropped: list[int] | None = None  # anchor: the junction dropped after the re-cache

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if "anchor_junction_dropped" in out:
            out["junction_dropped"] = out.pop("anchor_junction_dropped")
        return out


def proximity_alpha(distance: float, alpha_max: float, window: float) -> float:
    """Eq. 12: alpha = clamp(min(alpha_max, 1 - d / D_window), 0, alpha_max)."""
    return max(0.0, min(alpha_max, 1.0 - distance / window))


def resolve(policy: MemoryPolicy, transition: Transition) -> str:
    """The switch rule a transition means under ``policy``; raises for rules the policy cannot run."""
    kind = policy.switch if transition.kind == "default" else transition.kind
    window = policy.window if transition.proximity_window is None else transition.proximity_window
    if kind == "apr" and not window > 0:
        raise BadInput(f"an APR switch weighs frames by their distance within D_window, but the '{policy.name}' "
                       "memory has no sliding window to default to; give the transition a D_window "
                       "(proximity_window) or use a 'hard' switch")
    return kind


def apply_switch(memory: Memory, transition: Transition, switch_frame: int, encode: Encode,
                 source_for: SourceFor) -> SwitchEvent:
    """Rewrite the cache for a prompt switch at absolute frame ``switch_frame``; returns the event."""
    kind = resolve(memory.policy, transition)
    event = SwitchEvent(kind, switch_frame)
    if kind != "anchor":
        dropped = memory.drop_junction()  # a junction is kept until the next switch; the other rules ignore it
        if dropped:
            event.junction_dropped = dropped
    if kind == "cut" and memory.policy.cut.rule == "rope_cut":
        event.dropped = memory.rope_cut(switch_frame)
        event.query = memory.plan(switch_frame, memory.chunk_frames).query_index
    elif kind == "cut":
        event.dropped = memory.reset_recent(switch_frame)
    elif kind == "flush":
        event.dropped = memory.flush()
    elif kind in ("apr", "hard"):
        event.alpha = _proximity_recache(memory, transition, kind, switch_frame, encode)
    elif kind == "longlive":
        event.recached, event.sink = _longlive_recache(memory, switch_frame, encode, source_for)
    elif kind == "anchor":
        event.recached, event.junction, event.anchor_junction_dropped = _anchor_recache(
            memory, switch_frame, encode, source_for)
    memory.begin_turnover()
    memory.open_junction()
    return event


def _proximity_recache(memory: Memory, transition: Transition, kind: str, switch_frame: int, encode: Encode) -> dict:
    """APR (Eq. 11-12): one forward of every cached frame under the new prompt, then per-frame blend."""
    frames = memory.frames()
    if not frames:
        return {}
    plan = memory.plan(switch_frame, memory.chunk_frames)
    alpha_max = memory.policy.apr.alpha_max if transition.alpha_max is None else transition.alpha_max
    window = memory.policy.window if transition.proximity_window is None else transition.proximity_window
    alphas = []
    for _, f in frames:
        alphas.append(1.0 if kind == "hard" else proximity_alpha(switch_frame - f.index, alpha_max, window))
    report = {f"{name}:{f.index}": a for (name, f), a in zip(frames, alphas)}
    if not any(alphas):
        return report
    store = memory.store.latents
    latents = store.index_select(2, index_tensor([f.slot for _, f in frames], store.device))
    writes = [Write(j, f.slot, a) for j, ((_, f), a) in enumerate(zip(frames, alphas)) if a > 0]
    encode(latents, plan.key_index, None, on_kv=memory.store.writer(writes, len(frames)))
    return report


def _longlive_recache(memory: Memory, switch_frame: int, encode: Encode,
                      source_for: SourceFor) -> tuple[list[int], list[int]]:
    """LongLive's KV-recache: re-run the last ``recache.frames`` clean latents under the new prompt;
    returns the frames given new K/V and the sink's frames.

    The reference writes the recomputed K/V over its cache buffer; what ends up in the frames this
    memory still holds is reproduced here. With ``global_sink`` and more frames made than the
    window, the sink keeps its old-prompt K/V and the rest attends to it; otherwise every frame
    of the window is re-encoded with attention among them, and without ``global_sink`` the oldest
    frames of the window become the new sink. Under the absolute index rule (the reference's) the
    window's frames sit at their frame indices, and frames no longer held are re-run too (their
    keys left out, as the reference does); under a bounded rule every held frame sits at the index
    the next chunk's plan gives it and only held frames are re-run.
    """
    policy, history = memory.policy, memory.history
    n = min(policy.recache.frames, switch_frame, len(history))
    window = history[len(history) - n:]
    sink = memory.regions[policy.filled_by(FILL_FIRST)[0].name]
    keep_sink = policy.recache.global_sink and switch_frame - n > 0
    plan = memory.plan(switch_frame, memory.chunk_frames)
    index_of = {f.index: i for (_, f), i in zip(plan.keys, plan.key_index)}
    if policy.index_rule != "absolute":
        window = [(index, lat) for index, lat in window if index in index_of]
    else:
        index_of = {index: index for index, _ in window} | {f.index: f.index for f in sink}
    own_keys_from = 0
    context = None
    if keep_sink:
        # The reference runs the whole window but its keys are the old sink and the newest
        # (window - sink) frames; running the same frames keeps its kernels' shapes and rounding.
        own_keys_from = max(0, len(window) - (policy.recache.frames - len(sink)))
        context = source_for([f.slot for f in sink], [index_of[f.index] for f in sink])
    latents = torch.stack([lat for _, lat in window], dim=2)
    position = {index: j for j, (index, _) in enumerate(window)}
    query_index = [index_of[index] for index, _ in window]
    if not policy.recache.global_sink and switch_frame - n > 0:
        for f, (index, _) in zip(sink, window[: len(sink)]):
            f.index = index
    writes, rewritten = [], []
    for _, f in memory.frames():
        j = position.get(f.index)
        if j is None:
            continue
        memory.store.put_latent(f.slot, latents, j)
        writes.append(Write(j, f.slot))
        rewritten.append(f.index)
    encode(latents, query_index, context, own_keys_from=own_keys_from,
           on_kv=memory.store.writer(writes, len(window)))
    return rewritten, [f.index for f in sink]


def _anchor_recache(memory: Memory, switch_frame: int, encode: Encode,
                    source_for: SourceFor) -> tuple[list[int], list[int], list[int]]:
    """Anchor Forcing's anchor-guided re-cache (``_recache_after_switch`` with ``rope_enhance`` and the
    junction "prompt cache" of its interactive pipeline).

    The last ``recache.frames`` (12) clean latents are re-run in one forward at the cache-pass timestep
    under the new prompt, as a block at tri-region indices (ending at min(20, switch - 1)). When the
    block does not reach back to the sink, the sink keeps its old-prompt K/V and is context (0..2),
    and only the newest ``recache.frames - sink`` frames are keys; the junction of the previous
    prompt is context too (6..8) when it was active at the block's first frame: the warm start.
    Otherwise (a switch in the first ``recache.frames`` frames) the whole block is re-encoded, sink
    included, attending only to itself. Every frame the memory still holds in the block gets the new
    K/V; then the old junction is dropped and the next chunk fills it again. Returns the frames given
    new K/V, the junction frames attended to and the junction frames dropped.
    """
    policy = memory.policy
    history = memory.history
    n = min(policy.recache.frames, len(history))
    if n == 0:
        return [], [], memory.drop_junction()
    window = history[len(history) - n:]
    start = window[0][0]
    sink = [(name, f) for name, f in memory.frames()
            if memory.policy.region(name).fill == FILL_FIRST]
    keep = [(name, f) for name, f in sink if f.index < start]
    own_keys_from = max(0, n - (policy.recache.frames - len(keep))) if keep else 0
    plan = memory.recache_plan(start, n, keep)
    context = None
    if plan.keys:
        context = source_for([f.slot for _, f in plan.keys], plan.key_index)
    latents = torch.stack([lat for _, lat in window], dim=2)
    position = {index: j for j, (index, _) in enumerate(window)}
    writes, rewritten = [], []
    for name, f in memory.frames():
        j = position.get(f.index)
        if j is None or memory.policy.region(name).fill == FILL_JUNCTION:
            continue
        memory.store.put_latent(f.slot, latents, j)
        writes.append(Write(j, f.slot))
        rewritten.append(f.index)
    encode(latents, plan.query_index, context, own_keys_from=own_keys_from,
           on_kv=memory.store.writer(writes, n))
    junction = [f.index for name, f in plan.keys if memory.policy.region(name).fill == FILL_JUNCTION]
    return rewritten, junction, memory.drop_junction()
