"""The one interpreter of every memory policy: frames, their raw K/V and latents, index plans.

:class:`Memory` holds the frames of a run in the regions a :class:`~gf_core.policies.MemoryPolicy`
names, their raw (pre-RoPE) keys and values and their clean latents, gives each chunk its
temporal RoPE indices, and never knows which method it runs.

Units: every count here is in latent frames; ``tokens_per_frame`` is h * w of the patch grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from .policies import FILL_FIFO, FILL_FIRST, FILL_JUNCTION, FILL_PROMOTED, MemoryPolicy
from .rope import RopeTable
from .transfer import index_tensor, upload
from .wan import Context


@dataclass
class Frame:
    """One cached latent frame: its absolute index, its storage slot and the segment that made it."""

    index: int
    slot: int
    segment: int


@dataclass
class Plan:
    """What one chunk attends to: key frames in order, their temporal indices and the query's."""

    keys: list[tuple[str, Frame]]
    key_index: list[int]
    query_index: list[int]

    def attended(self) -> dict[str, list[list[int]]]:
        """The event log's view: per region, [absolute frame, temporal index] of every key frame."""
        out: dict[str, list[list[int]]] = {}
        for (name, f), index in zip(self.keys, self.key_index):
            out.setdefault(name, []).append([f.index, index])
        return out


class Write(NamedTuple):
    """Frame ``frame`` of a forward goes to ``slot``: stored (alpha 1) or blended in (alpha < 1)."""

    frame: int
    slot: int
    alpha: float = 1.0


@dataclass
class AnchorUpdate:
    """One diversity-aware GCM decision (Eq. 6-8) for a committed frame; ``replaced`` the anchor it replaced."""

    frame: int
    importance: float
    redundancy: float
    target: int
    replace: bool
    replaced: int | None


@dataclass
class PromotionEvent:
    """One promotion decision (Context Forcing Eq. 7) for a frame leaving the sliding region."""

    frame: int
    similarity: float
    promoted: bool


@dataclass
class Admission:
    """What admitting a finished chunk changed (the event log's part) and the writes its cache pass makes."""

    evicted: list[int]
    gcm_updates: list[AnchorUpdate]
    promotions: list[PromotionEvent] | None  # None: the policy does not promote
    writes: list[Write]

    def to_json(self) -> dict:
        out: dict = {"evicted": self.evicted, "gcm_updates": [asdict(u) for u in self.gcm_updates]}
        if self.promotions is not None:
            out["promotions"] = [asdict(p) for p in self.promotions]
        return out


class FrameStore:
    """Preallocated raw K/V of every slot and block, plus each slot's clean latent.

    keys: [layers, B, slots, tokens_per_frame, heads, head_dim]; values the same with ``scratch``
    more slots after the memory's, where a fused forward puts its chunk's own values so that
    attention reads every value in place (:func:`~gf_core.wan.block_step`); latents: [B, C, slots, H, W].
    Allocated on the first write, so batch, dtype and device come from the run. K/V are written
    block by block while a forward runs (:meth:`write_block`), so no forward ever holds the K/V
    of every block at once.
    """

    def __init__(self, slots: int, layers: int, scratch: int = 0):
        self.slots = slots
        self.layers = layers
        self.scratch = scratch
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.latents: torch.Tensor | None = None

    def put_latent(self, slot: int, latents: torch.Tensor, frame: int) -> None:
        if self.latents is None:
            b, c, _, h, w = latents.shape
            self.latents = latents.new_empty(b, c, self.slots, h, w)
        self.latents[:, :, slot] = latents[:, :, frame]

    def write_block(self, block: int, slot: int, k: torch.Tensor, v: torch.Tensor, frame: int, frames: int) -> None:
        """Store frame ``frame`` of a forward's raw K/V ([B, frames*T, H, D]) of one block in ``slot``."""
        if self.keys is None:
            b, length, heads, dim = k.shape
            shape = (self.layers, b, self.slots, length // frames, heads, dim)
            self.keys = k.new_empty(shape)
            self.values = k.new_empty(shape[:2] + (self.slots + self.scratch,) + shape[3:])
        t = self.keys.shape[3]
        for store, new in ((self.keys, k), (self.values, v)):
            store[block, :, slot] = new[:, frame * t:(frame + 1) * t]

    def writer(self, writes: list[Write], frames: int):
        """A forward's per-block K/V callback making ``writes`` (frame in the forward, slot, alpha).

        alpha 1 stores the frame; alpha < 1 blends it into the slot, K' = (1 - alpha) K_old +
        alpha K_new, same for V (Eq. 11): one in-place lerp per frame, which PyTorch computes in
        float32 and rounds once (bit-identical to a float32 lerp cast back; no gather, no copies).
        """
        plain = [(frame, slot) for frame, slot, alpha in writes if alpha == 1.0]
        blends = [(frame, slot, alpha) for frame, slot, alpha in writes if alpha != 1.0]

        def on_kv(block: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for frame, slot in plain:
                self.write_block(block, slot, k, v, frame, frames)
            t = k.shape[1] // frames
            for frame, slot, alpha in blends:  # blends re-weigh stored frames, so the store exists by now
                for store, new in ((self.keys, k), (self.values, v)):
                    store[block, :, slot].lerp_(new[:, frame * t:(frame + 1) * t], alpha)

        return on_kv


class ContextSource:
    """Raw K/V of a plan's key frames and their rotations, per block (wan.KeyValueSource).

    The block gathers and rotates them as it attends (:func:`~gf_core.wan.block_step`). When the
    plan attends to every memory slot and the store has scratch slots, the context also carries
    the rotations in slot order (``Context.whole_freqs``), so a block whose kernels read the
    context in place (``Kernels.read_in_place``) need not gather (the keys then come in slot
    order, which changes only the order of attention's sums).
    """

    def __init__(self, store: FrameStore, slots: list[int], freqs: torch.Tensor | None):
        self.store = store
        self.freqs = freqs
        self.slot_index = None
        self.whole_freqs = None
        if slots:
            self.slot_index = index_tensor(slots, store.keys.device)
            if store.scratch and sorted(slots) == list(range(store.slots)):
                tokens = freqs.shape[0] // len(slots)
                order = sorted(range(len(slots)), key=slots.__getitem__)
                rows = (torch.tensor(order)[:, None] * tokens + torch.arange(tokens)).flatten()
                self.whole_freqs = freqs.index_select(0, upload(rows, freqs.device))

    def context(self, block: int) -> Context | None:
        if self.slot_index is None:
            return None
        return Context(self.store.keys[block], self.store.values[block], self.slot_index, self.freqs,
                       self.whole_freqs)


@dataclass
class Memory:
    """The state of one run under a policy: regions of frames over a :class:`FrameStore`."""

    policy: MemoryPolicy
    chunk_frames: int = 3
    layers: int = 30
    scratch: int = 0  # value slots for a forward's own chunk, when its kernels read the context in place
    regions: dict[str, list[Frame]] = field(default_factory=dict)
    sealed: set[str] = field(default_factory=set)
    origin: int = 0  # absolute frame whose bounded index would be 0 (moves at a cut)
    candidates_left: int = 0  # frames still eligible for the anchor update
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    cut_at: int | None = None  # first frame of the chunk a RoPE cut moves to ``policy.cut.index``
    last_key: tuple[int, torch.Tensor] | None = None  # (frame, block-0 raw key) a promotion compares with
    junction_open: bool = False  # the next committed chunk fills the junction region

    def __post_init__(self) -> None:
        self.policy.validate(self.chunk_frames)
        self.regions = {r.name: [] for r in self.policy.regions}
        self._free: dict[str, list[int]] = {}
        slot = 0
        for r in self.policy.regions:
            self._free[r.name] = list(range(slot, slot + r.frames))
            slot += r.frames
        self.store = FrameStore(slot, self.layers, self.scratch)

    # -- reading -----------------------------------------------------------------------------

    def frames(self) -> list[tuple[str, Frame]]:
        """Every cached frame in attention order (region by region, oldest first)."""
        return [(r.name, f) for r in self.policy.regions for f in self.regions[r.name]]

    def plan(self, start: int, frames: int) -> Plan:
        """Temporal indices for a chunk of ``frames`` frames starting at absolute frame ``start``."""
        keys = self.frames()
        rule = self.policy.index_rule
        if rule == "absolute":
            return Plan(keys, [f.index for _, f in keys], list(range(start, start + frames)))
        if rule in ("block_relative", "bounded"):
            return self._relative_plan(keys, start, frames)
        if rule == "tri_region":
            return self._tri_region_plan(keys, start, frames)
        anchors = [(n, f) for n, f in keys if n == self.policy.anchor_region]
        recent = [(n, f) for n, f in keys if n != self.policy.anchor_region]
        count = len(recent) + frames
        if rule == "pinned_end":
            last = min(self.policy.rope_range - 1, start + frames - 1 - self.origin)
            first = last - count + 1
        else:  # after_gcm
            first = 1 if anchors else 0
        block = list(range(first, first + count))
        return Plan(anchors + recent, [0] * len(anchors) + block[: len(recent)], block[len(recent):])

    def _relative_plan(self, keys: list[tuple[str, Frame]], start: int, frames: int) -> Plan:
        """Indices of the "block_relative" and "bounded" rules, and of the chunk after a RoPE cut.

        block_relative: every key frame numbered 0..n-1 in attention order, the chunk at n..n+F-1.
        bounded: the first-filled and promoted regions numbered 0.. in order (sink [0, N_s), slow
        after it); the sliding region and the chunk consecutive, ending at the chunk's absolute
        frame while that is below ``rope_range`` and at ``rope_range - 1`` afterwards, but never
        before the fixed regions end.
        """
        if self.policy.index_rule == "block_relative":
            key_index = list(range(len(keys)))
            query = list(range(len(keys), len(keys) + frames))
        else:
            sliding = {r.name for r in self.policy.filled_by(FILL_FIFO)}
            fixed = [(n, f) for n, f in keys if n not in sliding]
            recent = [(n, f) for n, f in keys if n in sliding]
            count = len(recent) + frames
            last = max(len(fixed) + count - 1, min(self.policy.rope_range - 1, start + frames - 1 - self.origin))
            block = list(range(last - count + 1, last + 1))
            keys = fixed + recent
            key_index = list(range(len(fixed))) + block[: len(recent)]
            query = block[len(recent):]
        if start == self.cut_at:
            query = list(range(self.policy.cut.index, self.policy.cut.index + frames))
        return Plan(keys, key_index, query)

    def _tri_region_plan(self, keys: list[tuple[str, Frame]], start: int, frames: int, recent: bool = True) -> Plan:
        """Anchor Forcing's tri-region indices (its ``rope_enhance`` path) for a block of ``frames`` frames.

        First-filled (sink) frames at 0, 1, ...; the sliding region and the block consecutive, ending
        at the block's last absolute frame while that is below ``rope_range`` and at ``rope_range - 1``
        afterwards, never before the sink ends; the junction at ``junction.index``.. (attention order
        sink | junction | local | block), only once :meth:`junction_active`. ``recent=False`` leaves
        the sliding region out (a re-cache block that holds those frames itself).
        """
        fills = {r.name: r.fill for r in self.policy.regions}
        fixed = [(n, f) for n, f in keys if fills[n] not in (FILL_FIFO, FILL_JUNCTION)]
        sliding = [(n, f) for n, f in keys if fills[n] == FILL_FIFO] if recent else []
        junction = [(n, f) for n, f in keys if fills[n] == FILL_JUNCTION] if self.junction_active(start) else []
        count = len(sliding) + frames
        last = max(len(fixed) + count - 1, min(self.policy.rope_range - 1, start + frames - 1 - self.origin))
        block = list(range(last - count + 1, last + 1))
        key_index = (list(range(len(fixed))) + [self.policy.junction.index + j for j in range(len(junction))]
                     + block[: len(sliding)])
        return Plan(fixed + junction + sliding, key_index, block[len(sliding):])

    def recache_plan(self, start: int, frames: int, keep: list[tuple[str, Frame]]) -> Plan:
        """Indices of a re-cache block of ``frames`` frames from ``start`` attending to ``keep`` (the
        frames that keep their K/V) and, when active at ``start``, the junction ("tri_region" only)."""
        junction = {r.name for r in self.policy.regions if r.fill == FILL_JUNCTION}
        keys = keep + [(n, f) for n, f in self.frames() if n in junction]
        return self._tri_region_plan(keys, start, frames, recent=False)

    def junction_active(self, start: int) -> bool:
        """Whether a block starting at frame ``start`` attends to the junction: once its frames have
        left the sliding region (the reference's ``switch_frame + local_attn_size - sink_size < start``)."""
        held = [f for r in self.policy.regions if r.fill == FILL_JUNCTION for f in self.regions[r.name]]
        if not held:
            return False
        sliding = sum(r.frames for r in self.policy.regions if r.fill == FILL_FIFO)
        return start >= held[0].index + sliding + self.chunk_frames

    def drop_junction(self) -> list[int]:
        """Empty the junction region (a prompt switch); returns the dropped frames."""
        dropped = []
        for r in self.policy.regions:
            if r.fill == FILL_JUNCTION:
                dropped += [f.index for f in self.regions[r.name]]
                self._free[r.name] += [f.slot for f in self.regions[r.name]]
                self.regions[r.name] = []
        return dropped

    def open_junction(self) -> None:
        """The next committed chunk fills the junction region (if the policy has one)."""
        self.junction_open = any(r.fill == FILL_JUNCTION for r in self.policy.regions)

    def source(self, plan: Plan, rope: RopeTable, rope_kind: str, grid_hw: tuple[int, int]) -> ContextSource:
        if not plan.keys:
            return ContextSource(self.store, [], None)
        freqs = rope.frequencies(plan.key_index, grid_hw[0], grid_hw[1], rope_kind, self.store.keys.device)
        return ContextSource(self.store, [f.slot for _, f in plan.keys], freqs)

    # -- writing -----------------------------------------------------------------------------

    def admit(self, start: int, latents: torch.Tensor, segment: int) -> Admission:
        """Admit the clean frames ``latents`` [B, C, F, H, W] of a finished chunk into the regions.

        Returns what changed and the writes the chunk's cache pass must make (see
        :meth:`FrameStore.writer`). Slots freed here may still be read as context by that pass:
        each block writes only after its own attention has run.
        """
        promotes = self.policy.promotion is not None
        done = Admission([], [], [] if promotes else None, [])
        history = self.policy.recache.frames if self.policy.recache else 0
        for i in range(latents.shape[2]):
            index = start + i
            if history:
                self.history.append((index, latents[:, :, i].clone()))
                del self.history[: max(0, len(self.history) - history)]
            placed, slot = self._place(index, segment, done)
            if not placed:
                raise RuntimeError(
                    f"frame {index} does not fit the '{self.policy.name}' memory "
                    f"(at most {self.policy.max_frames} frames); make the video shorter or pick a windowed policy"
                )
            self.store.put_latent(slot, latents, i)
            done.writes.append(Write(i, slot))
            if self.junction_open:
                done.writes += self._fill_junction(index, i, latents, segment)
            if self.policy.anchor_region and placed != self.policy.anchor_region:
                update = self._anchor_update(index, i, latents, segment)
                if update is not None:
                    done.gcm_updates.append(update[0])
                    if update[1] is not None:
                        done.writes.append(Write(i, update[1]))
        self.junction_open = False
        return done

    def _fill_junction(self, index: int, i: int, latents: torch.Tensor, segment: int) -> list[Write]:
        """Also store frame ``index`` (frame ``i`` of the chunk) in the junction region while it has room;
        its K/V come from the same cache pass as its sliding-region copy."""
        writes = []
        for r in self.policy.regions:
            if r.fill == FILL_JUNCTION and self._free[r.name]:
                slot = self._free[r.name].pop(0)
                self.regions[r.name].append(Frame(index, slot, segment))
                self.store.put_latent(slot, latents, i)
                writes.append(Write(i, slot))
        return writes

    def _place(self, index: int, segment: int, done: Admission) -> tuple[str, int]:
        for r in self.policy.regions:
            held = self.regions[r.name]
            if r.fill in (FILL_PROMOTED, FILL_JUNCTION):
                continue
            if r.fill == FILL_FIRST:
                if r.name in self.sealed:
                    continue
                slot = self._free[r.name].pop(0)
                held.append(Frame(index, slot, segment))
                if not self._free[r.name]:
                    self.sealed.add(r.name)
            else:
                if len(held) >= r.frames:
                    old = held.pop(0)
                    if not (self.policy.promotion and self._promote(old, r.name, done)):
                        done.evicted.append(old.index)
                        self._free[r.name].append(old.slot)
                slot = self._free[r.name].pop(0)
                held.append(Frame(index, slot, segment))
            return r.name, slot
        return "", -1

    def _frame_key(self, slot: int) -> torch.Tensor:
        """The key a promotion compares: the frame's raw key of the first block, whole batch, float32."""
        return self.store.keys[0, :, slot].float().flatten()

    def _promote(self, old: Frame, source: str, done: Admission) -> bool:
        """Surprisal-based consolidation (Context Forcing Eq. 7) of a frame leaving ``source``.

        Candidates are the first frames of every ``promotion.every``-th chunk; a candidate moves to the
        promoted region (keeping its slot, so its K/V and latent stay in place) when the cosine
        similarity of its key to the previous frame's key is below ``promotion.tau``. A full promoted region
        evicts its oldest frame, whose slot goes to ``source``.
        """
        rule, chunk = self.policy.promotion, self.chunk_frames
        nxt = old.index + 1  # keep this frame's key if the next frame will be a candidate
        if nxt % chunk == 0 and (nxt // chunk) % rule.every == 0:
            self.last_key = (old.index, self._frame_key(old.slot).clone())  # its slot is about to be reused
        if old.index % chunk or (old.index // chunk) % rule.every:
            return False
        previous = None
        if self.last_key is not None and self.last_key[0] == old.index - 1:
            previous = self.last_key[1]
        else:
            held = [f for _, f in self.frames() if f.index == old.index - 1]
            if held:
                previous = self._frame_key(held[0].slot)
        if previous is None:  # the frame before it was dropped (a cut or flush): no surprisal to measure
            return False
        key = self._frame_key(old.slot)
        similarity = float(torch.nn.functional.cosine_similarity(key, previous, dim=0))
        promote = similarity < rule.tau
        done.promotions.append(PromotionEvent(old.index, similarity, promote))
        if not promote:
            return False
        target, capacity = self.regions[rule.into], self.policy.region(rule.into).frames
        if len(target) >= capacity:
            gone = target.pop(0)
            done.evicted.append(gone.index)
            spare = gone.slot
        else:
            spare = self._free[rule.into].pop(0)
        target.append(old)
        self._free[source].append(spare)
        return True

    def flush(self) -> list[int]:
        """Infinity-RoPE's KV Flush: keep the first-filled and promoted regions and the
        ``policy.flush_keep`` newest sliding frames; returns the dropped frames."""
        sliding = [r.name for r in self.policy.filled_by(FILL_FIFO)]
        newest = sorted((f.index for name in sliding for f in self.regions[name]), reverse=True)
        keep = set(newest[: self.policy.flush_keep])
        dropped = []
        for name in sliding:
            for f in self.regions[name]:
                if f.index not in keep:
                    dropped.append(f.index)
                    self._free[name].append(f.slot)
            self.regions[name] = [f for f in self.regions[name] if f.index in keep]
        return sorted(dropped)

    def rope_cut(self, at_frame: int) -> list[int]:
        """Infinity-RoPE's RoPE Cut: a flush, and the chunk at ``at_frame`` far from the kept context."""
        self.cut_at = at_frame
        return self.flush()

    def _anchor_update(self, index: int, i: int, latents: torch.Tensor,
                       segment: int) -> tuple[AnchorUpdate, int | None] | None:
        """Diversity-aware GCM update (Eq. 6-8) for one newly committed frame: the decision and the
        slot its K/V must be written to when it replaced an anchor (or None)."""
        rule = self.policy.candidates
        if rule == "frozen" or self.policy.anchor_region not in self.sealed:
            return None
        if rule == "after_switch":
            if self.candidates_left <= 0:
                return None
            self.candidates_left -= 1
        anchors = self.regions[self.policy.anchor_region]
        if len(anchors) < 2:
            return None
        z = latents[:, :, i].float().flatten()
        g = torch.stack([self.store.latents[:, :, f.slot].float().flatten() for f in anchors])
        decision = diversity_decision(z, g)
        if not decision["replace"]:
            return AnchorUpdate(index, **decision, replaced=None), None
        target = anchors[decision["target"]]
        self.store.put_latent(target.slot, latents, i)
        anchors[decision["target"]] = Frame(index, target.slot, segment)
        return AnchorUpdate(index, **decision, replaced=target.index), target.slot

    def begin_turnover(self) -> None:
        """A prompt switch or cut: the next LTM-turnover worth of frames may become anchors."""
        self.candidates_left = int(sum(r.frames for r in self.policy.filled_by(FILL_FIFO)))

    def reset_recent(self, at_frame: int) -> list[int]:
        """Shot cut: drop every sliding-window frame, keep anchors, restart indices after them."""
        dropped = []
        for r in self.policy.regions:
            if r.fill == FILL_FIFO:
                for f in self.regions[r.name]:
                    dropped.append(f.index)
                    self._free[r.name].append(f.slot)
                self.regions[r.name] = []
        anchors = sum(r.frames for r in self.policy.regions if r.fill == FILL_FIRST)
        self.origin = at_frame - anchors
        self.history.clear()
        self.last_key = None
        return dropped

    def snapshot(self) -> dict[str, list[int]]:
        return {name: [f.index for f in held] for name, held in self.regions.items()}


def diversity_decision(z: torch.Tensor, anchors: torch.Tensor) -> dict:
    """Eq. 6-8 on flattened latents: z [N], anchors [K, N] (K >= 2).

    importance I(z) = 1 - max_j cos(z, g_j); redundancy R(g_i) = max_{j != i} cos(g_i, g_j);
    the target is the most redundant anchor, replaced when I(z) > R(target).
    """
    zn = z / z.norm().clamp_min(1e-12)
    gn = anchors / anchors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = gn @ gn.T
    sim.fill_diagonal_(float("-inf"))
    redundancy = sim.max(dim=1).values
    # one copy to the host (each would make the host wait for the GPU)
    closest, *redundancy = torch.cat([(gn @ zn).max().view(1), redundancy]).tolist()
    importance = 1.0 - closest
    target = max(range(len(redundancy)), key=redundancy.__getitem__)  # the first maximum, as argmax
    r = redundancy[target]
    return {"importance": importance, "redundancy": r, "target": target, "replace": importance > r}
