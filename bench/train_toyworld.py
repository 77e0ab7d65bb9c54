"""Train the toy-world model: a small Wan2.1 DiT of this pack's architecture, chunk-wise causal.

Every step takes a batch of 21-frame windows (7 chunks of 3 latent frames) of random toy-world
stories (gf_core.toyworld) and runs ONE forward over [clean frames | noisy frames] with a
block-causal mask: clean chunk c attends to the clean context frames chunk c may see and to
itself, noisy chunk c to the same context and to itself. Temporal RoPE indices stay within 0-20
(the range the real models were trained on); each chunk has its own prompt in
cross-attention and its own noise level, one of the four sigmas of the sampler's schedule
(gf_core.sampler.Schedule.few_step), and the model predicts the flow-matching velocity
v = eps - x0 of x = (1 - sigma) x0 + sigma eps. The forward is built from gf_core.wan's own
block function (block_step), so it is exactly forward_chunk with a cache holding the clean
context encoded at the cache-pass timestep (tests/test_toyworld.py checks this to 1e-5).

The context a chunk may see, and at which indices, is drawn per step as the memories lay it out
(:func:`draw_context`): every earlier frame, a sink plus the newest frames, or three anchors (at
one index, as Dual-Reference RoPE's global memory, or at 0-2) plus the newest frames, the anchors
possibly held from earlier in the story. ``--init`` goes on from a trained (or shipped) model.
``--frames 3 --story-starts 1`` trains the first chunk of a story alone: the picture drawn from the
prompt with nothing before it, which a sampled video copies from then on (``--prompt-weight``
weighs such chunks inside longer windows). ``--self-context P`` gives a share P of the steps the
model's own pictures as context (:func:`own_context`), as a sampled video has them;
``--self-context-passes N`` makes them from its own pictures N deep, as after N sampled chunks.
``--relative P`` lays a share P of the steps out as Infinity-RoPE does (:func:`block_relative_layout`);
with ``--relative-frames F`` those steps take F-frame windows (batch ``--relative-batch``), the
others stay at ``--frames``.
A chunk's loss counts only where its picture is determined: every subject it shows is
named by its prompt or visible in a frame it attends to, and a window that starts mid-story
does not train its first chunk. Pixels at and around a subject weigh ``1 + --subject-weight``
in the loss, the background 1: the subjects are a small part of each frame, and what they are
and where they go is what the model must get right.

    python bench/train_toyworld.py --minutes 7 --out OUT           # on a GPU: trains, then --eval
    python bench/train_toyworld.py --device cpu --steps 2 --size 8 --frames 9 --layers 1 --out OUT
    python bench/train_toyworld.py --ship OUT --out gf_core/toy     # the shipped files (words at umT5's width)

Writes into --out: toyworld.safetensors (bf16 weights, Wan keys), toyworld_words.safetensors
(the word table), train.json (settings, loss curve, seconds), and with --eval eval.json and
eval.png (first frames of the evaluation clips, one row per policy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gf_core as gf  # noqa: E402
from gf_core import toyworld as tw  # noqa: E402
from gf_core.rope import RopeTable, apply_rope  # noqa: E402
from gf_core.sampler import Schedule  # noqa: E402
from gf_core.wan import BlockOps, TextKV, WanConfig, block_step, encode_text, sinusoid, unpatchify  # noqa: E402

CHUNK = tw.CHUNK_FRAMES
MAX_WORDS = 10  # the longest sentence of the toy world has 9 words
MAX_GAP = 9 * CHUNK  # story frames an anchor layout may leave out between its anchors and the rest


def model_config(layers: int = 4, ffn: int = 1024) -> WanConfig:
    """The toy model: dim 256 (2 heads of 128), ``layers`` blocks, word vectors of tw.TEXT_DIM."""
    return WanConfig(dim=256, ffn_dim=ffn, num_heads=2, num_layers=layers, text_dim=tw.TEXT_DIM)


# ---------------------------------------------------------------------------------------------
# The masked forward


class BlockCausalAttention:
    """The ``attention`` of :func:`gf_core.wan.block_step` for a [clean | noisy] forward of C chunks.

    Self-attention (queries and keys of the whole sequence) runs under the frame mask ``allowed``
    [2F, 2F] (True: attend; :func:`frame_mask`): through SDPA with the token mask, or through
    FlexAttention (``flex``: the compiled kernel; it skips the blocks the mask leaves out, most of
    them). Cross-attention gets every chunk's prompt K/V side by side ([B, C * text_len, H, D]) and
    lets the tokens of chunk c (its clean and its noisy copy) attend only to prompt c.
    """

    def __init__(self, allowed: torch.Tensor, chunks: int, tokens_per_frame: int, text_len: int,
                 flex=None, block_mask=None):
        if 2 * chunks * CHUNK * tokens_per_frame == chunks * text_len:
            raise ValueError("the sequence and the prompts have the same length; change text_len")
        self.chunks, self.chunk_tokens, self.text_len = chunks, CHUNK * tokens_per_frame, text_len
        self.flex, self.block_mask = flex, block_mask
        if flex is None:
            self.mask = allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, length, heads, dim = q.shape
        if k.shape[1] == length:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if self.flex is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask).transpose(1, 2)
            if torch.is_autocast_enabled(q.device.type):  # FlexAttention is not an autocast op
                dtype = torch.get_autocast_dtype(q.device.type)
                q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            return self.flex(q, k, v, block_mask=self.block_mask).transpose(1, 2)
        c, t = self.chunks, self.chunk_tokens
        qc = q.view(b, 2, c, t, heads, dim).transpose(1, 2).reshape(b * c, 2 * t, heads, dim)
        kc = k.reshape(b * c, self.text_len, heads, dim)
        vc = v.reshape(b * c, self.text_len, heads, dim)
        out = F.scaled_dot_product_attention(qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2))
        return out.transpose(1, 2).reshape(b, c, 2, t, heads, dim).transpose(1, 2).reshape(b, length, heads, dim)


class FlexMasks:
    """FlexAttention block masks of frame masks [2F, 2F], one per context kind.

    One mask function reads one frame-mask buffer, refilled before each step, so the compiled
    kernel never sees a new function (which would compile it again).
    """

    def __init__(self, frames: int, tokens_per_frame: int, device: torch.device):
        self.allowed = allowed = torch.zeros(2 * frames, 2 * frames, dtype=torch.bool, device=device)
        self.tokens = tokens_per_frame
        self.masks: dict[str, object] = {}

        def mask_mod(b, h, q, kv):
            return allowed[q // tokens_per_frame, kv // tokens_per_frame]

        self.mask_mod = mask_mod

    def get(self, kind: str, allowed: torch.Tensor):
        from torch.nn.attention.flex_attention import create_block_mask

        self.allowed.copy_(allowed)
        if kind not in self.masks:
            length = self.allowed.shape[0] * self.tokens
            self.masks[kind] = create_block_mask(self.mask_mod, None, None, length, length, device=self.allowed.device)
        return self.masks[kind]


def frame_mask(context: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """[2F, 2F] bool (True: attend) over [clean frames | noisy frames] for chunks of CHUNK frames, where
    ``context[c]`` lists the frames before chunk c that chunk c (clean and noisy) attends to."""
    chunks = len(context)
    frames = chunks * CHUNK
    allowed = torch.zeros(2 * frames, 2 * frames, dtype=torch.bool)
    for c, ctx in enumerate(context):
        own = list(range(c * CHUNK, (c + 1) * CHUNK))
        for f in own:
            allowed[f, ctx + own] = True  # clean rows: context + own clean chunk
            allowed[frames + f, ctx] = True  # noisy rows: context (clean) + own noisy chunk
            allowed[frames + f, [frames + g for g in own]] = True
    return allowed.to(device)


def train_forward(
    model: torch.nn.Module,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    prompts: torch.Tensor,
    context: list[list[int]],
    rope: RopeTable,
    flex=None,
    block_mask=None,
    clean_index: list[int] | None = None,
) -> torch.Tensor:
    """Velocity of every noisy chunk, each attending to its context's clean frames and itself.

    Args:
        clean, noisy: latents [B, 16, F, H, W] (F = C * CHUNK frames; temporal RoPE index = frame index).
        timesteps: [B, C] the noisy chunks' timesteps (clean frames run at the cache-pass timestep 0).
        prompts: [B, C, words, text_dim] each chunk's prompt embedding (zero rows after the last word).
        context: per chunk, the earlier frames it attends to (:func:`frame_mask`).
        flex, block_mask: run self-attention through this FlexAttention function and the block mask
            of the context (:func:`flex_block_mask`) instead of SDPA with a token mask.
        clean_index: temporal RoPE indices of the clean frames (default: the frame index, as the noisy
            frames always have).

    Returns: the velocity [B, 16, F, H, W] of the noisy frames.
    """
    cfg = WanConfig.from_module(model)
    b, _, frames, height, width = clean.shape
    chunks = frames // CHUNK
    grid = (2 * frames, height // cfg.patch_size[1], width // cfg.patch_size[2])
    tokens = grid[1] * grid[2]
    h = model.patch_embedding(torch.cat([clean, noisy], dim=2)).flatten(2).transpose(1, 2).contiguous()
    t = torch.cat([torch.zeros(b, frames, device=clean.device), timesteps.repeat_interleave(CHUNK, dim=1)], dim=1)
    e = model.time_embedding(sinusoid(cfg.freq_dim, t.reshape(-1)).type_as(h))  # [B * 2F, dim]
    e0 = model.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, (b, 2 * frames))
    index = list(range(frames))
    freqs = rope.frequencies((clean_index or index) + index, grid[1], grid[2], "float32", clean.device)
    text = encode_text(model, prompts.flatten(0, 1), cfg.text_len)
    attention = BlockCausalAttention(frame_mask(context, clean.device), chunks, tokens, cfg.text_len, flex, block_mask)
    for i, block in enumerate(model.blocks):
        keys = text.keys[i].reshape(b, chunks * cfg.text_len, cfg.num_heads, cfg.head_dim)
        values = text.values[i].reshape(b, chunks * cfg.text_len, cfg.num_heads, cfg.head_dim)
        h, _, _ = block_step(block, h, e0, 2 * frames, cfg.num_heads, freqs, TextKV(keys, values, None), None,
                             BlockOps(apply_rope, attention, False))
    head = model.head
    h = h[:, frames * tokens:]
    e = e.unflatten(0, (b, 2 * frames))[:, frames:]
    mod = (head.modulation.to(h.dtype).unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
    out = head.head(head.norm(h).unflatten(1, (frames, tokens)) * (1 + mod[1]) + mod[0])
    return unpatchify(out, (frames, grid[1], grid[2]), cfg.patch_size, cfg.out_dim)


def own_context(model: torch.nn.Module, x0: torch.Tensor, eps: torch.Tensor, sigma: float, timestep: torch.Tensor,
                prompts: torch.Tensor, context: list[list[int]], rope: RopeTable, flex=None, block_mask=None,
                clean_index: list[int] | None = None, passes: int = 1) -> torch.Tensor:
    """The model's own pictures of a window, to stand in for its true frames as context: every chunk
    predicted in one step from its true picture noised to ``sigma`` (the sampler's last level), each
    chunk seeing the true frames of its context. No gradient. A sampled video's context is the model's
    output, not the truth; training on this teaches the next chunk to go on from an imperfect picture.

    With ``passes`` > 1 the pictures are made again, each pass seeing the previous pass's pictures as
    its context, so a chunk's picture carries the errors of up to ``passes`` chunks made one on
    another, as a sampled video's does after that many chunks. Every pass noises the truth with the
    same ``eps``: a chunk sees only earlier chunks, each made from its own noise, as in sampling."""
    with torch.no_grad():
        steps = timestep.view(1, 1).expand(x0.shape[0], x0.shape[2] // CHUNK)
        rough = (1 - sigma) * x0 + sigma * eps
        seen = x0
        for _ in range(passes):
            v = train_forward(model, seen, rough, steps, prompts, context, rope, flex, block_mask, clean_index)
            seen = (rough - sigma * v.float()).detach()
        return seen


# ---------------------------------------------------------------------------------------------
# Data


SENTENCES: list[str] = []


def sentence_id(text: str) -> int:
    if text not in SENTENCES:
        SENTENCES.append(text)
    return SENTENCES.index(text)


class Pool:
    """Random stories as drawing tables on the device, windows of them rendered per batch.

    Per story frame: subjects to draw [S, 6], scene, prompt id, each subject's visible share and
    whether its frame's prompt names it; ``start`` marks frames where a story (a new shot) begins.
    """

    def __init__(self, stories: int, frames: int, seed: int, device: torch.device):
        rng = random.Random(seed)
        tables, scenes, prompts, visible, named = [], [], [], [], []
        self.length = frames + 4 * CHUNK * 3 + MAX_GAP
        for _ in range(stories):
            story = tw.play(tw.random_script(rng, self.length))
            table, scene = tw.draw_table(story)
            n = self.length
            tables.append(table[:n])
            scenes.append(scene[:n])
            ids, vis, nam = [], [], []
            for t in story.truth[:n]:
                s = story.sentences[t.segment]
                ids.append(sentence_id(s.text))
                vis.append([a.visible() for a in t.actors] + [0.0] * (tw.SUBJECT_SLOTS - len(t.actors)))
                nam.append([s.kind in ("opening", "enter") and j == t.main for j in range(tw.SUBJECT_SLOTS)])
            prompts.append(ids)
            visible.append(vis)
            named.append(nam)
        self.tables = torch.stack(tables).to(device)  # [N, T, S, 6]
        self.scenes = torch.stack(scenes).to(device)  # [N, T]
        self.prompts = torch.tensor(prompts, device=device)  # [N, T]
        self.visible = torch.tensor(visible, device=device)  # [N, T, S]
        self.named = torch.tensor(named, device=device)  # [N, T, S]
        self.frames = frames
        self.device = device
        self._backgrounds: dict[int, torch.Tensor] = {}

    def batch(self, size: int, latent_size: int, g: torch.Generator, gap: int = 0, story_starts: float = 0.5):
        """(latents [B, 16, F, h, w], subject pixels [B, F, h, w] (bool, grown by 2 pixels), prompt ids
        per chunk [B, C], visible [B, F, S], named per chunk [B, C, S], first chunk trainable [B]) for
        ``size`` random windows, a share ``story_starts`` of them at the start of their story. With ``gap``
        (a multiple of CHUNK), a window is its first chunk, then ``gap`` story frames left out, then the
        rest: anchors held from earlier in the story."""
        n = self.tables.shape[0]
        story = torch.randint(n, (size,), generator=g, device="cpu")
        starts = torch.randint((self.length - self.frames - gap) // CHUNK + 1, (size,), generator=g, device="cpu") * CHUNK
        starts = torch.where(torch.rand(size, generator=g) < story_starts, torch.zeros_like(starts), starts)
        offset = torch.arange(self.frames) + gap * (torch.arange(self.frames) >= CHUNK)
        frame = (starts.view(-1, 1) + offset).to(self.device)
        story = story.to(self.device).view(-1, 1).expand_as(frame)
        table = self.tables[story, frame]  # [B, F, S, 6]
        scenes = self.scenes[story, frame].flatten()
        rgb = tw.render(table.flatten(0, 1), scenes, latent_size)
        if latent_size not in self._backgrounds:
            self._backgrounds[latent_size] = tw.backgrounds(latent_size, self.device)
        subject = ((rgb - self._backgrounds[latent_size][scenes]).abs().sum(1) > 0.05).float()
        subject = F.max_pool2d(subject.unsqueeze(1), 5, 1, 2)[:, 0] > 0
        latents = tw.to_latents(rgb)[0].unflatten(1, (size, self.frames)).transpose(0, 1)  # [B, 16, F, h, w]
        prompts = self.prompts[story, frame][:, ::CHUNK]
        named = self.named[story, frame][:, ::CHUNK]
        return (latents, subject.unflatten(0, (size, self.frames)), prompts, self.visible[story, frame], named,
                (starts == 0).to(self.device))


class Layout(NamedTuple):
    """What one training step's windows look like: which earlier frames each chunk attends to
    (``context``, keyed by ``kind`` for the attention mask), the story frames left out after the
    first chunk (``gap``), the temporal RoPE indices of the clean frames (None: frame indices, as the
    noisy frames always have), and the chunks that train (a chunk right after a gap does not: where
    the subject went is not shown)."""

    kind: str
    context: list[list[int]]
    gap: int = 0
    clean_index: list[int] | None = None
    untrained: tuple[int, ...] = ()


def sink_context(chunks: int, sink: int, recent: int) -> list[list[int]]:
    """Per chunk: the window's first ``sink`` frames and the newest ``recent`` frames before it."""
    out = []
    for c in range(chunks):
        start = c * CHUNK
        out.append(sorted(set(range(min(sink, start))) | set(range(max(0, start - recent), start))))
    return out


def draw_context(rng: random.Random, chunks: int, max_gap: int = 0, relative: float = 0.0) -> Layout:
    """This step's layout, as the memories lay a chunk's context out at sampling time:

    - every earlier frame at its frame index (Self-Forcing's whole cache);
    - a sink of the first 1 or 3 frames plus the newest 2, 6 or 9, at frame indices (the windowed
      memories inside the first 21 frames);
    - three anchor frames (the window's first chunk) plus the newest 6 or 9, the anchors either all
      at temporal index 0 (Dual-Reference RoPE's global memory) or at 0, 1, 2 (a sink), and, half of
      the time, held from up to ``max_gap`` frames earlier in the story: the context of a chunk
      long after its anchors, at the indices the bounded rules give it (the chunk ending at 20);
    - with ``relative`` (a share of the steps), Infinity-RoPE's block-relative layout for one chunk
      (:func:`block_relative_layout`).
    """
    u = rng.random()
    if relative and chunks > 2 and rng.random() < relative:
        gap = CHUNK * rng.randint(0, max_gap // CHUNK) if max_gap >= CHUNK and rng.random() < 0.5 else 0
        return block_relative_layout(chunks, rng.randint(2, chunks - 1), gap)
    if u < 0.3:
        return Layout("all", [list(range(c * CHUNK)) for c in range(chunks)])
    if u < 0.55:
        sink, recent = rng.choice([1, 3]), rng.choice([2, 6, 9])
        return Layout(f"sink{sink}+{recent}", sink_context(chunks, sink, recent))
    recent = rng.choice([6, 9])
    frames = chunks * CHUNK
    held = max_gap >= CHUNK and chunks > 1  # a one-chunk window has nothing after its anchors
    gap = CHUNK * rng.randint(1, max_gap // CHUNK) if held and rng.random() < 0.5 else 0
    shared = rng.random() < 0.6
    clean = [0] * CHUNK + list(range(CHUNK, frames)) if shared else list(range(frames))
    return Layout(f"anchors+{recent}", sink_context(chunks, CHUNK, recent), gap, clean, (1,) if gap else ())


def block_relative_layout(chunks: int, chunk: int, gap: int = 0) -> Layout:
    """Infinity-RoPE's context for window chunk ``chunk`` (>= 2): a sink (the first frame of the window's
    first chunk, a story's first) and the newest 2 frames, numbered 0, 1, 2 with the chunk at 3-5
    whatever its frame (gf_core.memory's "block_relative" rule). Indices count only as differences, so
    the first chunk's clean frames sit at 3 * chunk - 3 onwards, putting the sink 3 frames before the
    chunk as that rule does, while the newest two keep their frame indices. The other chunks see the
    frames after the first chunk at frame indices (a window from mid-story: the second chunk, seeing
    nothing, does not train); with ``gap``, story frames left out after the first chunk."""
    context = [[]] + [list(range(CHUNK, c * CHUNK)) for c in range(1, chunks)]
    start = chunk * CHUNK
    context[chunk] = [0, start - 2, start - 1]
    clean = list(range(start - CHUNK, start)) + list(range(CHUNK, chunks * CHUNK))
    return Layout(f"relative{chunk}", context, gap, clean, (1,))


def chunk_weights(context: list[list[int]], visible: torch.Tensor, named: torch.Tensor,
                  first_ok: torch.Tensor, prompt_weight: float = 1.0) -> torch.Tensor:
    """[B, C] loss weight per chunk: 0 where its picture is not determined by its prompt and the
    frames it attends to, ``prompt_weight`` where it shows a subject that only its prompt tells
    (named there and seen in no frame it attends to: the first chunk of a story, an entry), else 1."""
    shown = visible >= 0.4  # [B, F, S]
    weights = []
    for c, ctx in enumerate(context):
        own = shown[:, c * CHUNK:(c + 1) * CHUNK].any(dim=1)  # [B, S]
        seen = shown[:, ctx].any(dim=1) if ctx else torch.zeros_like(own)
        ok = (~own | seen | named[:, c]).all(dim=1)
        if c == 0:
            ok = ok & first_ok
        from_prompt = (own & ~seen & named[:, c]).any(dim=1)
        weights.append(ok.float() * torch.where(from_prompt, prompt_weight, 1.0))
    return torch.stack(weights, dim=1)


# ---------------------------------------------------------------------------------------------
# Training


ZERO_AT_GROWTH = ("self_attn.o.weight", "self_attn.o.bias", "cross_attn.o.weight", "cross_attn.o.bias",
                  "ffn.2.weight", "ffn.2.bias")


def grow_blocks(sd: dict[str, torch.Tensor], cfg: WanConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """``sd`` with blocks appended up to ``cfg.num_layers``, each new block an identity at first.

    A new block takes its weights from :func:`gf_core.random_state_dict` with its three residual
    outputs (self-attention, cross-attention, FFN) zero, so the grown model computes exactly what
    ``sd`` does and the new blocks learn from the first step (their outputs get gradients)."""
    have = WanConfig.from_state_dict(sd).num_layers
    if have == cfg.num_layers:
        return sd
    if have > cfg.num_layers:
        raise SystemExit(f"--layers {cfg.num_layers} is below the {have} blocks of the model given to --init; "
                         f"give --layers {have}, or more to grow it")
    fresh = gf.random_state_dict(cfg, seed=seed)
    out = dict(sd)
    for block in range(have, cfg.num_layers):
        for key, value in fresh.items():
            if key.startswith(f"blocks.{block}."):
                out[key] = value.zero_() if key.endswith(ZERO_AT_GROWTH) else value
    return out


def train(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)  # which windows
    noise = torch.Generator(device=device).manual_seed(args.seed)  # noise levels and noise
    cfg = model_config(args.layers, args.ffn)
    if args.init:  # a trained or shipped toy model, at the word width it trains at (a strict load checks it)
        from gf_core.checkpoints import load_wan_state_dict

        sd = tw.narrow_text({k: v.float() for k, v in load_wan_state_dict(os.path.join(args.init, tw.MODEL_FILE)).items()},
                            cfg.text_dim)
        sd = grow_blocks(sd, cfg, args.seed)  # --layers above the model's blocks: the new blocks start as identities
    else:
        sd = gf.random_state_dict(cfg, seed=args.seed)
        sd["head.head.weight"].zero_()
        sd["head.head.bias"].zero_()
    model = gf.WanModel(cfg)
    model.load_state_dict(sd)
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    words = tw.Words(tw.word_table(cfg.text_dim))
    began = time.perf_counter()
    pool = Pool(args.stories, args.frames, args.seed, device)
    # --relative-frames: the block-relative steps take windows of their own length from a pool of their own
    short = Pool(args.stories, args.relative_frames, args.seed, device) if args.relative_frames else None
    data_seconds = time.perf_counter() - began
    table = torch.zeros(len(SENTENCES), MAX_WORDS, cfg.text_dim)
    for i, text in enumerate(SENTENCES):
        e = words.embed(text)[0]
        table[i, : e.shape[0]] = e
    table = table.to(device)
    schedule = Schedule.few_step()
    sigmas, timesteps = schedule.sigmas.to(device), schedule.timesteps.to(device)
    rope = RopeTable(cfg.head_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    chunks = args.frames // CHUNK
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    flex = None
    if args.attention == "flex" or (args.attention == "auto" and device.type == "cuda"):
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
        tokens = (args.size // cfg.patch_size[1]) * (args.size // cfg.patch_size[2])
        flex_masks = {args.frames: FlexMasks(args.frames, tokens, device)}
        if short is not None:
            flex_masks[args.relative_frames] = FlexMasks(args.relative_frames, tokens, device)
    budget = args.minutes * 60
    curve, window, step, clips = [], [], 0, 0
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if (args.steps and step >= args.steps) or (not args.steps and elapsed >= budget):
            break
        progress = step / args.steps if args.steps else elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        if short is not None and rng.random() < args.relative:
            frames, size, source = args.relative_frames, args.relative_batch or args.batch, short
            layout = draw_context(rng, frames // CHUNK, MAX_GAP, 1.0)
        else:
            frames, size, source = args.frames, args.batch, pool
            layout = draw_context(rng, chunks, MAX_GAP, 0.0 if short is not None else args.relative)
        kind, context, n = layout.kind, layout.context, frames // CHUNK
        x0, subject, prompt_ids, visible, named, first_ok = source.batch(size, args.size, g, layout.gap, args.story_starts)
        pixel_weight = 1.0 + args.subject_weight * subject.float()  # [B, F, h, w]
        weights = chunk_weights(context, visible, named, first_ok, args.prompt_weight)  # [B, C]
        for c in layout.untrained:
            weights[:, c] = 0
        batch = x0.shape[0]
        level = torch.randint(len(schedule), (batch, n), generator=noise, device=device)
        sigma = sigmas[level].repeat_interleave(CHUNK, dim=1).view(batch, 1, frames, 1, 1)
        eps = torch.randn(x0.shape, generator=noise, device=device)
        noisy = (1 - sigma) * x0 + sigma * eps
        clean = x0 + args.context_noise * torch.randn(x0.shape, generator=noise, device=device)
        own = bool(args.self_context) and rng.random() < args.self_context
        opt.zero_grad(set_to_none=True)
        try:
            block_mask = flex_masks[frames].get(kind, frame_mask(context, device)) if flex is not None else None
            with autocast:
                if own:
                    clean = own_context(model, x0, torch.randn(x0.shape, generator=noise, device=device),
                                        float(sigmas[-1]), timesteps[-1], table[prompt_ids], context, rope, flex,
                                        block_mask, layout.clean_index, args.self_context_passes)
                v = train_forward(model, clean, noisy, timesteps[level], table[prompt_ids], context, rope,
                                  flex, block_mask, layout.clean_index)
            err = (v.float() - (eps - x0)).pow(2).mean(dim=1) * pixel_weight  # [B, F, h, w]
            err = err.unflatten(1, (n, CHUNK)).sum(dim=(2, 3, 4))
            err = err / pixel_weight.unflatten(1, (n, CHUNK)).sum(dim=(2, 3, 4))  # [B, C]
            loss = (err * weights).sum() / weights.sum().clamp_min(1)
            loss.backward()
        except torch.OutOfMemoryError:
            if step or size < 2:
                raise
            if source is short:  # the first step of its kind did not fit: halve that batch and go on
                args.relative_batch = size // 2
            else:
                args.batch //= 2
            print(f"out of memory at the first step; batch {size // 2}", flush=True)
            continue
        except Exception as e:
            if flex is None:
                raise
            flex = None  # FlexAttention failed here: SDPA with the token mask computes the same
            print(f"FlexAttention failed ({type(e).__name__}: {str(e)[:200]}); using SDPA", flush=True)
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(float(loss.detach()))
        step += 1
        clips += batch
        if step % args.log_every == 0 or step == 1:
            curve.append({"step": step, "seconds": round(time.perf_counter() - start, 1), "loss": sum(window) / len(window),
                          "lr": lr, "context": kind})
            print(f"step {step:6d} {curve[-1]['seconds']:7.1f}s loss {curve[-1]['loss']:.5f} lr {lr:.2e}", flush=True)
            window = []
    seconds = time.perf_counter() - start
    if window:
        curve.append({"step": step, "seconds": round(seconds, 1), "loss": sum(window) / len(window), "lr": lr})
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    save_file(state, os.path.join(args.out, tw.MODEL_FILE),
              metadata={"toyworld": json.dumps({"config": cfg.__dict__, "train": settings}, default=str)})
    words.save(os.path.join(args.out, tw.WORDS_FILE))
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": settings,
        "parameters": params,
        "weights_bytes": os.path.getsize(os.path.join(args.out, tw.MODEL_FILE)),
        "stories": args.stories,
        "sentences": len(SENTENCES),
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(seconds, 1),
        "steps": step,
        "attention": "flex" if flex is not None else "sdpa",
        "clips_seen": clips,
        "final_loss": curve[-1]["loss"] if curve else None,
        "loss_curve": curve,
    }
    with open(os.path.join(args.out, "train.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    return result


# ---------------------------------------------------------------------------------------------
# Evaluation through the public API

EVAL_SCRIPTS = (
    [("a big red circle moves right on the grass", 9), ("then it bounces", 12)],
    [("a small blue triangle bounces on the snow", 12), ("then it moves left", 9)],
    [("a big yellow square pulses on the night", 9), ("cut to the sand where it moves right", 12)],
)
POLICIES = ("grounded", "longlive", "self_forcing", "infinity_rope", "anchor_forcing", "context_forcing")


def evaluate(folder: str, device: torch.device, size: int, seeds: int = 2) -> dict:
    """Identity accuracy over the first 21 frames of a few scripts under every policy."""
    model = tw.load_model(folder, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    words = tw.load_words(folder)
    rows, pictures = {}, []
    began = time.perf_counter()
    for policy in POLICIES:
        scores = []
        for k, script in enumerate(EVAL_SCRIPTS):
            story = tw.play(script)
            for seed in range(seeds):
                out = gf.generate(model, story.segments(words), policy, height=size * 8, width=size * 8, seed=seed)
                m = tw.measure(story, out.latents[:, :, :21])
                scores.append(m["identity_first"])
                if seed == 0 and k == 0:
                    pictures.append(tw.to_rgb(out.latents)[0, :21:2])
        rows[policy] = {"identity_first21": [round(s, 4) for s in scores if s is not None],
                        "mean": round(sum(s for s in scores if s is not None) / max(1, len(scores)), 4)}
    truth = tw.to_rgb(tw.story_latents(tw.play(EVAL_SCRIPTS[0]), size))[0, :21:2]
    grid = torch.cat([torch.cat(list(p), dim=2) for p in [truth, *pictures]], dim=1)  # [3, rows*h, cols*w]
    write_png(grid.repeat_interleave(4, 1).repeat_interleave(4, 2), os.path.join(folder, "eval.png"))
    result = {"policies": rows, "scripts": [list(map(list, s)) for s in EVAL_SCRIPTS], "seeds": seeds,
              "seconds": round(time.perf_counter() - began, 1),
              "picture": "eval.png: the truth, then " + ", ".join(POLICIES) + " (script 1, seed 0, every other frame)"}
    with open(os.path.join(folder, "eval.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    return result


def write_png(rgb: torch.Tensor, path: str) -> None:
    """RGB [3, H, W] in [0, 1] as an 8-bit PNG (standard library only: the GPU host may lack Pillow)."""
    import struct
    import zlib

    img = (rgb.permute(1, 2, 0).cpu().clamp(0, 1) * 255).round().byte().numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in img)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, 2, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def ship(source: str, folder: str) -> str:
    """Write the trained model and word table of ``source`` into ``folder``, the files the pack ships
    in gf_core/toy/: the model at the word width it trained at, the word table at umT5's
    (gf_core.toyworld.widen_text), which the loader widens the model to (gf_core.toyworld.load_state_dict)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gf_core.checkpoints import load_wan_state_dict

    sd = load_wan_state_dict(os.path.join(source, tw.MODEL_FILE))
    with safe_open(os.path.join(source, tw.MODEL_FILE), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    words = tw.widen_words(tw.load_words(source), sd["text_embedding.0.weight"].shape[1])
    os.makedirs(folder, exist_ok=True)
    metadata["text_width"] = (f"word vectors {sd['text_embedding.0.weight'].shape[1]} wide, widened exactly to "
                              f"{words.table.shape[1]} on loading (gf_core.toyworld.widen_weights)")
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, tw.MODEL_FILE), metadata=metadata)
    words.save(os.path.join(folder, tw.WORDS_FILE))
    return (f"wrote {folder}/{tw.MODEL_FILE} ({os.path.getsize(os.path.join(folder, tw.MODEL_FILE)) / 1e6:.1f} MB) "
            f"and {tw.WORDS_FILE}, text width {words.table.shape[1]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for everything this writes")
    ap.add_argument("--minutes", type=float, default=7.0, help="training time budget (wall clock)")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    ap.add_argument("--init", metavar="FOLDER", help="start from the toy model in FOLDER (e.g. gf_core/toy) "
                    "instead of random weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--layers", type=int, default=4,
                    help="blocks; with --init, more than the model has appends blocks that start as identities")
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=21, help="latent frames per training window (multiple of 3)")
    ap.add_argument("--size", type=int, default=tw.WORLD, help="latent pixels across (the world is 32)")
    ap.add_argument("--stories", type=int, default=4000)
    ap.add_argument("--context-noise", type=float, default=0.03, help="std of noise added to the clean context")
    ap.add_argument("--subject-weight", type=float, default=9.0,
                    help="extra loss weight of the pixels at and around a subject (1 + this; background 1)")
    ap.add_argument("--prompt-weight", type=float, default=1.0,
                    help="loss weight of a chunk that shows a subject only its prompt names (the first chunk "
                         "of a story, an entry), against 1 for the others")
    ap.add_argument("--story-starts", type=float, default=0.5,
                    help="share of the training windows that begin where a story begins")
    ap.add_argument("--self-context", type=float, default=0.0, metavar="P",
                    help="share of the steps whose context frames are the model's own one-step pictures of the "
                         "window (own_context) instead of the true frames; the targets stay the truth")
    ap.add_argument("--self-context-passes", type=int, default=1, metavar="N",
                    help="with --self-context: make the own pictures N times, each pass from the previous one's, "
                         "so the context carries the errors of N chunks made one on another")
    ap.add_argument("--relative", type=float, default=0.0, metavar="P",
                    help="share of the steps laid out as Infinity-RoPE's block-relative rule lays one chunk out "
                         "(block_relative_layout)")
    ap.add_argument("--relative-frames", type=int, default=0, metavar="F",
                    help="with --relative: the block-relative steps take windows of F frames (a multiple of 3, "
                         "at least 9) instead of --frames, so they can be many and cheap beside full-length steps")
    ap.add_argument("--relative-batch", type=int, default=0, metavar="B",
                    help="with --relative-frames: the batch of those steps (default --batch)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--attention", choices=("auto", "sdpa", "flex"), default="auto",
                    help="self-attention kernel: flex (compiled FlexAttention, skips masked blocks), sdpa; "
                         "auto: flex on a GPU, falling back to sdpa")
    ap.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                    help="sample clips under every policy afterwards and report identity accuracy")
    ap.add_argument("--ship", metavar="TRAINED", help="instead of training: write the model trained into the folder "
                    "TRAINED into --out, its word table at umT5's text width (what gf_core/toy/ holds)")
    args = ap.parse_args(argv)
    if args.ship:
        print(ship(args.ship, args.out))
        return
    if args.frames % CHUNK or args.frames < CHUNK:
        ap.error(f"--frames {args.frames} is not a positive multiple of {CHUNK}")
    if args.relative_frames and (args.relative_frames % CHUNK or args.relative_frames < 3 * CHUNK):
        ap.error(f"--relative-frames {args.relative_frames} is not a multiple of {CHUNK} of at least {3 * CHUNK}: "
                 f"a block-relative window needs a chunk with a sink and two frames before it")
    if args.relative_frames and not args.relative:
        ap.error("--relative-frames sets the window of the block-relative steps; give their share with --relative P")
    if args.self_context_passes < 1:
        ap.error(f"--self-context-passes {args.self_context_passes} is below 1; give 1 or more passes")
    result = train(args)
    summary = (f"trained {result['parameters'] / 1e6:.2f}M parameters for {result['steps']} steps "
               f"({result['clips_seen']} clips) in {result['train_seconds']:.0f} s on {result['device']}; "
               f"final loss {result['final_loss']:.4f}; weights {result['weights_bytes'] / 1e6:.1f} MB")
    if args.eval:
        ev = evaluate(args.out, torch.device(args.device), args.size)
        summary += "\nidentity accuracy, first 21 frames: " + ", ".join(
            f"{p} {r['mean']:.3f}" for p, r in ev["policies"].items())
    print(summary)


if __name__ == "__main__":
    main()
