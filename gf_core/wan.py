"""The Wan2.1 text-to-video DiT and a causal chunk forward over any module tree with Wan names.

Module names equal the checkpoint keys (``blocks.N.self_attn.q.weight`` ...), so a state dict of
Wan, Self-Forcing, LongLive or ComfyUI loads as it is. :func:`forward_chunk` only calls the
submodules (q, k, v, o, norms, ffn, modulation, head) and does attention and RoPE itself, so it
also drives ComfyUI's ``WanModel``, whose layers cast their weights on the fly.

Shapes: latents ``[B, C, F, H, W]`` (C = 16, H and W in latent pixels); tokens ``[B, L, dim]`` with
``L = F * h * w`` where ``h = H / 2`` and ``w = W / 2`` for the (1, 2, 2) patch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import rope_kernel
from .rope import RopeTable, apply_rope, real_freqs, rotate_real
from .transfer import upload

HEAD_DIM = 128


@dataclass(frozen=True)
class WanConfig:
    """Shapes of a Wan2.1 t2v DiT. Defaults are the 1.3B model."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def tiny(cls, layers: int = 2, text_dim: int = 64) -> WanConfig:
        """A small config for tests and the demo: dim 256, 2 heads of 128."""
        return cls(dim=256, ffn_dim=512, num_heads=2, num_layers=layers, text_dim=text_dim)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> WanConfig:
        """Read the config from tensor shapes of a Wan-keyed state dict."""
        patch = sd["patch_embedding.weight"]
        dim, in_dim = patch.shape[0], patch.shape[1]
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        patch_size = tuple(patch.shape[2:])
        head_rows = sd["head.head.weight"].shape[0]
        return cls(
            dim=dim,
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
            num_heads=dim // HEAD_DIM,
            num_layers=layers,
            freq_dim=sd["time_embedding.0.weight"].shape[1],
            text_dim=sd["text_embedding.0.weight"].shape[1],
            in_dim=in_dim,
            out_dim=head_rows // math.prod(patch_size),
            patch_size=patch_size,  # type: ignore[arg-type]
        )

    @classmethod
    def from_module(cls, model: nn.Module) -> WanConfig:
        """Read the config from the shapes of a module tree with Wan names (ours or ComfyUI's)."""
        patch = model.patch_embedding.weight
        dim = patch.shape[0]
        patch_size = tuple(patch.shape[2:])
        heads = getattr(model, "num_heads", dim // HEAD_DIM)
        return cls(
            dim=dim,
            ffn_dim=model.blocks[0].ffn[0].weight.shape[0],
            num_heads=heads,
            num_layers=len(model.blocks),
            freq_dim=model.time_embedding[0].weight.shape[1],
            text_dim=model.text_embedding[0].weight.shape[1],
            in_dim=patch.shape[1],
            out_dim=model.head.head.weight.shape[0] // math.prod(patch_size),
            patch_size=patch_size,  # type: ignore[arg-type]
        )


class RMSNorm(nn.Module):
    """RMS norm as Wan computes it: normalise in float32, round, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """q, k, v, o projections with RMS norms on q and k (self- and cross-attention alike)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class Block(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(cfg.dim, cfg.eps)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(cfg.dim, cfg.eps)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)


class WanModel(nn.Module):
    """Wan2.1 t2v DiT as plain modules; ``state_dict()`` keys are the Wan keys."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> WanModel:
        """Build the model for ``sd``'s shapes and load it (strict)."""
        cfg = WanConfig.from_state_dict(sd)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def random_state_dict(
    cfg: WanConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Random weights in Wan layout with activations that stay O(1) through every block.

    Used for tests, the demo and parity/speed runs (no real weights exist here); the values depend
    on ``seed`` and on the device they are drawn on. Linear layers
    get N(0, 1/fan_in), norms get weights near 1, modulations N(0, 1/dim) as Wan initialises them.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanModel(cfg).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, device=device)
        if name.endswith("bias"):
            t = t * 0.02
        elif "norm" in name:
            t = 1.0 + 0.1 * t
        elif name.endswith("modulation"):
            t = t / cfg.dim**0.5
        else:
            t = t / math.prod(shape[1:]) ** 0.5
        out[name] = t.to(dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------
# The causal chunk forward


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention over [B, L, H, D] tensors through PyTorch SDPA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [N, H, L, D] tensors that also returns each query's log-sum-exp [N, H, Lq] (float32):
    cuDNN's fused kernel on a GPU, PyTorch's flash kernel on a CPU."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, lse.reshape(q.shape[:3])


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: int) -> torch.Tensor:
    """:func:`sdpa_attention` with the keys split into ``parts`` equal runs that one batched kernel
    attends to side by side; the partial results are merged by their log-sum-exp in float32.

    Exact up to rounding (each part's output is rounded once before the merge). It gives the GPU
    ``parts`` times as many query tiles at once: a chunk of 4,680 queries over 12 heads fills 3.3
    waves of an H100/H200's 132 processors, so its last wave runs a third full. Falls back to one
    call when the keys do not divide evenly.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if parts <= 1 or lk % parts:
        return sdpa_attention(q, k, v)
    qs = q.unsqueeze(1).expand(b, parts, lq, h, d).reshape(b * parts, lq, h, d)
    ks = k.reshape(b * parts, lk // parts, h, d)
    vs = v.reshape(b * parts, lk // parts, h, d)
    out, lse = attention_with_lse(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2))
    weight = torch.softmax(lse.unflatten(0, (b, parts)), dim=1).unsqueeze(-1)  # [B, parts, H, Lq, 1]
    merged = (out.unflatten(0, (b, parts)).float() * weight).sum(dim=1)  # [B, H, Lq, D]
    return merged.to(q.dtype).transpose(1, 2)


SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
SPLIT_PREFIX = "split"


def attention_backend(name: str = "auto") -> AttentionFn:
    """SDPA pinned to one kernel family ("auto" lets PyTorch choose), or "splitN": attention to at least
    twice as many keys as queries (a chunk reading its context) split into N runs of keys attended
    side by side (:func:`split_attention`); other calls run as one."""
    if name == "auto":
        return sdpa_attention
    if name.startswith(SPLIT_PREFIX) and name[len(SPLIT_PREFIX):].isdigit() and int(name[len(SPLIT_PREFIX):]) >= 1:
        parts = int(name[len(SPLIT_PREFIX):])

        def split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if k.shape[1] < 2 * q.shape[1]:  # self-attention without context, cross-attention: one call
                return sdpa_attention(q, k, v)
            return split_attention(q, k, v, parts)

        return split
    if name not in SDPA_BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; use one of {', '.join(SDPA_BACKENDS)} or splitN (N >= 1)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]

    def pinned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return sdpa_attention(q, k, v)

    return pinned


def fused_attention(device: torch.device | str) -> AttentionFn:
    """The attention fused runs use: on a Hopper GPU (an H100/H200, where PyTorch picks cuDNN's
    kernel) a chunk's attention to its context is split in two runs of keys ("split2", measured on
    an H200: 1.01 -> 0.95 ms per call, docs/PERF.md); elsewhere plain SDPA, as nothing was measured there."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return attention_backend("split2")
    return sdpa_attention


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`sdpa_attention` with ``bias`` [Lk] (in q's dtype) added to every query's logits."""
    b, lq, h, _ = q.shape
    mask = bias.view(1, 1, 1, -1).expand(b, h, lq, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def padding_start(embeds: torch.Tensor) -> int:
    """The row of prompt embeddings [B, L, text_dim] from which every row is zero (L if the last is not)."""
    rows = embeds.ne(0).any(dim=2).any(dim=0).nonzero()
    return int(rows[-1]) + 1 if len(rows) else 0


def fold_bias(kept: int, pad_from: int, text_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Logit offsets [kept] that make ``kept - pad_from`` rows of padding weigh as ``text_len - pad_from``.

    The rows before ``pad_from`` get 0; the padding rows get log(total / rows), split between its two
    neighbours in ``dtype`` so that the weights e^bias sum to the total (to ~1e-4 in bfloat16, where
    one value alone could be off by 1.5%).
    """
    rows, total = kept - pad_from, text_len - pad_from
    beta = math.log(total / rows)
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(beta))
    lo = math.floor(beta / ulp) * ulp
    hi = lo + ulp
    at_lo = min(max(round((rows * math.exp(hi) - total) / (math.exp(hi) - math.exp(lo))), 0), rows)
    bias = torch.zeros(kept, dtype=torch.float64)
    bias[pad_from:pad_from + at_lo] = lo
    bias[pad_from + at_lo:] = hi
    return bias.to(dtype)


@dataclass
class TextContext:
    """Cross-attention keys and values of one prompt, per block: [B, L, H, D] each. L = text_len,
    or fewer with ``bias`` [L]: the logit offsets of a prompt whose padding is folded (:func:`encode_text`)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    bias: torch.Tensor | None = None


class KeyValueSource(Protocol):
    """What the memory gives attention: the raw context keys and values of one block, and their RoPE."""

    def context(self, block: int) -> Context | None:
        """The block's stored raw K/V, which slots to attend to, and their rotations; or None."""
        ...


@dataclass
class Context:
    """Context of one block: stored raw K/V [B, slots, T, H, D], the slots [N] to read, in order, and
    the rotations of their N*T tokens (as :meth:`RopeTable.frequencies` gives them). ``values`` may
    have scratch slots after the memory's (see :class:`~gf_core.memory.FrameStore`)."""

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    freqs: torch.Tensor
    whole_freqs: torch.Tensor | None = None  # set when ``slots`` are every memory slot: rotations in slot order
    whole_index: list[int] | None = None  # with ``whole_freqs``: the slots' temporal indices, in slot order


@dataclass
class ChunkKV:
    """Raw (pre-RoPE) keys and values of the frames a forward computed, per block: [B, L, H, D]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def sinusoid(freq_dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep sinusoid in float64: [N] -> [N, freq_dim] (cos first, then sin)."""
    half = freq_dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    arg = torch.outer(pos, freqs)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def _param(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return p.to(dtype=like.dtype, device=like.device)


FOLD_MULTIPLE = 64  # a folded prompt keeps a multiple of this many rows


def folded_rows(pad_from: int) -> int:
    """Rows a prompt whose padding starts at row ``pad_from`` keeps when folded: the first multiple of
    ``FOLD_MULTIPLE`` past it, so at least one row of padding stands for the rest."""
    return -(-(pad_from + 1) // FOLD_MULTIPLE) * FOLD_MULTIPLE


def encode_text(model: nn.Module, embeds: torch.Tensor, text_len: int = 512, fold_from: int | None = None) -> TextContext:
    """Project prompt embeddings [B, L, text_dim] once into every block's cross-attention K/V.

    Rows past ``text_len`` are dropped and shorter prompts are zero-padded, as the references do.
    With ``fold_from`` (the row from which every row is zero, :func:`padding_start`) the padding is
    folded: zero rows all project to one key and value, so attention to n of them equals
    attention to fewer with their logits raised to keep the same total weight. The rows up to the
    first multiple of ``FOLD_MULTIPLE`` past ``fold_from`` are kept, with :func:`fold_bias`; a
    24-token prompt attends to 64 rows instead of 512. Exact up to rounding.
    """
    cfg = WanConfig.from_module(model)
    b, length, _ = embeds.shape
    if length >= text_len:
        embeds = embeds[:, :text_len]
    else:
        embeds = torch.cat([embeds, embeds.new_zeros(b, text_len - length, embeds.shape[2])], dim=1)
    ctx = model.text_embedding(embeds)
    keys, values = [], []
    for block in model.blocks:
        attn = block.cross_attn
        keys.append(attn.norm_k(attn.k(ctx)).view(b, -1, cfg.num_heads, cfg.head_dim))
        values.append(attn.v(ctx).view(b, -1, cfg.num_heads, cfg.head_dim))
    kept = text_len if fold_from is None else folded_rows(fold_from)
    if kept >= text_len:
        return TextContext(keys, values)
    text = TextContext([k[:, :kept] for k in keys], [v[:, :kept] for v in values],
                       upload(fold_bias(kept, fold_from, text_len, ctx.dtype), ctx.device))
    for t in (*text.keys, *text.values):  # prompts of other lengths then reuse the compiled blocks
        torch._dynamo.maybe_mark_dynamic(t, 1)
    torch._dynamo.maybe_mark_dynamic(text.bias, 0)
    return text


def forward_chunk(
    model: nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    text: TextContext,
    memory: KeyValueSource | None,
    query_index: list[int] | torch.Tensor,
    rope: RopeTable,
    rope_kind: str = "complex128",
    attention: AttentionFn = sdpa_attention,
    capture_kv: bool = False,
    compute_output: bool = True,
    own_keys_from: int = 0,
    on_kv: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    fused: bool = False,
) -> tuple[torch.Tensor | None, ChunkKV | None]:
    """One causal forward of a chunk of latent frames.

    Args:
        x: latents [B, C, F, H, W] in the run dtype.
        timestep: [B] diffusion timesteps (fractional; every frame of the chunk shares it).
        text: the prompt's cross-attention K/V from :func:`encode_text`.
        memory: rotated context K/V per block, attended to before the chunk itself.
        query_index: temporal RoPE index of each frame of the chunk ([F] list or tensor).
        capture_kv: return the chunk's raw keys and values of every block.
        compute_output: run the head (a cache-writing pass can skip it).
        own_keys_from: the chunk attends to its own frames from this one on (LongLive's recache
            runs frames whose keys it then leaves out).
        on_kv: called as ``on_kv(block, k, v)`` with the chunk's raw K/V [B, L, H, D] of every block,
            after that block has read its context (so it may overwrite context slots).
        fused: run each block as one ``torch.compile``'d graph (:func:`fused_block_step`): the same
            function, with float32 RoPE in real arithmetic and the elementwise work fused.

    Returns:
        The velocity prediction [B, C, F, H, W] (or None) and the captured K/V (or None).
    """
    cfg = WanConfig.from_module(model)
    b, _, frames, height, width = x.shape
    pt, ph, pw = cfg.patch_size
    heads = cfg.num_heads
    if fused and rope_kind == "complex128":
        raise ValueError("fused blocks rotate in float32; use rope_kind 'float32' with fused=True")
    grid = (frames // pt, height // ph, width // pw)
    tokens_per_frame = grid[1] * grid[2]

    patch = model.patch_embedding
    if patch.weight.dtype == torch.float32 and x.dtype != torch.float32:
        h = patch(x.float()).to(x.dtype)  # ComfyUI keeps this layer in float32 and runs it so
    else:
        h = patch(x)
    # [B, L, dim], made token-major: as a view of the conv output it is channel-major, and the
    # compiled blocks keep that layout, so every norm would read its rows with a stride
    h = h.flatten(2).transpose(1, 2).contiguous()
    t = timestep.reshape(b, 1).expand(b, grid[0]).reshape(-1)
    e = model.time_embedding(sinusoid(cfg.freq_dim, t).type_as(h))  # [B*F, dim]
    e0 = model.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, (b, grid[0]))  # [B, F, 6, dim]

    freqs = rope.frequencies(query_index, grid[1], grid[2], rope_kind, x.device)
    step, rotate = (fused_block_step(), rotate_real) if fused else (block_step, apply_rope)
    gelu_in_product = fused and product_gelu_is_tanh(x.device)
    converted: dict[int, torch.Tensor] = {}

    def rotations(f: torch.Tensor) -> torch.Tensor:
        if not fused:
            return f
        if id(f) not in converted:  # the memory gives every block the same table
            converted[id(f)] = real_freqs(f)
        return converted[id(f)]

    freqs = rotations(freqs)
    kernel = fused and rope_kernel.available(x.device)
    axes: list[tuple[torch.Tensor, ...]] = []

    def context_rotations(ctx: Context) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What a block reading the store in place rotates its keys with: on a GPU with Triton, the
        axis tables of the context's frames and then the chunk's (:func:`rope_kernel.rotate_cat`)."""
        if not kernel or ctx.whole_index is None:
            return rotations(ctx.whole_freqs)
        if not axes:  # the memory gives every block the same frames
            own = query_index.tolist() if isinstance(query_index, torch.Tensor) else list(query_index)
            axes.append(rope.axis_rotations(ctx.whole_index + own, grid[1], grid[2], x.device))
        return axes[0]

    captured_k: list[torch.Tensor] = []
    captured_v: list[torch.Tensor] = []
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        ctx = memory.context(i) if memory is not None else None
        if ctx is None:
            ctx_parts = (None,) * 4
        elif fused and ctx.whole_freqs is not None and not own_keys_from \
                and ctx.values.shape[1] - ctx.keys.shape[1] == grid[0]:
            # every memory slot, read in place; the chunk's values go to the scratch slots
            ctx_parts = (ctx.keys, ctx.values, None, context_rotations(ctx))
        else:
            ctx_parts = (ctx.keys, ctx.values, ctx.slots, rotations(ctx.freqs))
        keys_only = not compute_output and i == last
        out, k, v = step(block, h, e0, grid[0], heads, freqs, text.keys[i], text.values[i], *ctx_parts, rotate,
                         attention, own_keys_from * tokens_per_frame, keys_only, gelu_in_product, text.bias)
        if capture_kv:
            captured_k.append(k)
            captured_v.append(v)
        if on_kv is not None:
            on_kv(i, k, v)  # after the block has read its context, so context slots may be overwritten
        if keys_only:
            break
        h = out

    kv = ChunkKV(captured_k, captured_v) if capture_kv else None
    if not compute_output:
        return None, kv

    head = model.head
    hmod = (_param(head.modulation, h).unsqueeze(1) + e.unflatten(0, (b, grid[0])).unsqueeze(2)).chunk(2, dim=2)
    out = head.head(head.norm(h).unflatten(1, (grid[0], tokens_per_frame)) * (1 + hmod[1]) + hmod[0])
    return unpatchify(out, grid, cfg.patch_size, cfg.out_dim), kv


def block_step(
    block: nn.Module,
    h: torch.Tensor,
    e0: torch.Tensor,
    frames: int,
    heads: int,
    freqs: torch.Tensor,
    text_keys: torch.Tensor,
    text_values: torch.Tensor,
    context_keys: torch.Tensor | None,
    context_values: torch.Tensor | None,
    context_slots: torch.Tensor | None,
    context_freqs: torch.Tensor | tuple[torch.Tensor, ...] | None,
    rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    attention: AttentionFn,
    own_from: int = 0,
    keys_only: bool = False,
    gelu_in_product: bool = False,
    text_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One DiT block over a chunk's tokens h [B, L, dim]; returns (new h or None, raw k, v [B, L, H, D]).

    ``e0`` [B, frames, 6, dim] is the time projection; ``freqs`` the chunk's rotations; the chunk
    attends to the context (the parts of a :class:`Context`, or four Nones) and then to its own
    tokens from ``own_from`` on. Without ``context_slots`` the context is every stored slot in
    order, and ``context_values`` has ``frames`` scratch slots after them for the chunk's values;
    ``context_freqs`` is then either per-token rotations or the axis tables of
    :meth:`~gf_core.rope.RopeTable.axis_rotations` for the context's frames and the chunk's
    (:func:`~gf_core.rope_kernel.rotate_cat`).
    ``keys_only`` stops once the raw K/V are known (the last block of a cache-writing pass).
    ``gelu_in_product`` applies the FFN's GELU in its first product (:func:`feed_forward`);
    ``text_bias`` is a folded prompt's logit offsets (:class:`TextContext`).
    """
    b, length, dim = h.shape
    tokens = length // frames
    hd = dim // heads
    mod = (_param(block.modulation, h).unsqueeze(1) + e0).chunk(6, dim=2)  # each [B, F, 1, dim]
    shift, scale, gate, c_shift, c_scale, c_gate = mod

    y = (block.norm1(h).unflatten(1, (frames, tokens)) * (1 + scale) + shift).flatten(1, 2)
    sa = block.self_attn
    q = sa.norm_q(sa.q(y)).view(b, -1, heads, hd)
    k = sa.norm_k(sa.k(y)).view(b, -1, heads, hd)
    v = sa.v(y).view(b, -1, heads, hd)
    if keys_only:
        return None, k, v
    q_rot = rotate(q, freqs)
    if context_keys is not None and context_slots is None:  # (own_from is 0 here)
        context_values[:, context_keys.shape[1]:] = v.view(b, frames, tokens, heads, hd)
        if isinstance(context_freqs, tuple):  # axis tables: one kernel rotates and concatenates
            cat = rope_kernel.rotate_cat if k.is_cuda else rope_kernel.rotate_cat_reference
            k_all = cat(context_keys, k, *context_freqs)
        else:
            k_all = torch.cat([rotate(context_keys.flatten(1, 2), context_freqs), rotate(k, freqs)], dim=1)
        v_all = context_values.flatten(1, 2)
    else:
        k_own, v_own = rotate(k, freqs)[:, own_from:], v[:, own_from:]
        if context_keys is not None:
            ck = context_keys.index_select(1, context_slots).flatten(1, 2)
            cv = context_values.index_select(1, context_slots).flatten(1, 2)
            k_all = torch.cat([rotate(ck, context_freqs), k_own], dim=1)
            v_all = torch.cat([cv, v_own], dim=1)
        else:
            k_all, v_all = k_own, v_own
    y = sa.o(attention(q_rot, k_all, v_all).flatten(2))
    del k_all, v_all
    h = h + (y.unflatten(1, (frames, tokens)) * gate).flatten(1, 2)

    ca = block.cross_attn
    qc = ca.norm_q(ca.q(block.norm3(h))).view(b, -1, heads, hd)
    if text_bias is None:
        yc = attention(qc, text_keys, text_values)
    else:
        yc = biased_attention(qc, text_keys, text_values, text_bias)
    h = h + ca.o(yc.flatten(2))

    x = (block.norm2(h).unflatten(1, (frames, tokens)) * (1 + c_scale) + c_shift).flatten(1, 2)
    y = feed_forward(block.ffn, x, gelu_in_product)
    h = h + (y.unflatten(1, (frames, tokens)) * c_gate).flatten(1, 2)
    return h, k, v


def feed_forward(ffn: nn.Module, x: torch.Tensor, gelu_in_product: bool = False) -> torch.Tensor:
    """The block's FFN (Linear, tanh-GELU, Linear) on x [B, L, dim].

    With ``gelu_in_product`` and a plain linear layer in the input's dtype, the GELU is applied by
    the first matrix product itself (``torch._addmm_activation``: on a GPU an epilogue of the
    product, before its result is rounded), which saves one pass over the widest activation. Only
    where :func:`product_gelu_is_tanh` holds: on a CPU that op applies the exact (erf) GELU.
    """
    up, act, down = ffn[0], ffn[1], ffn[2]
    plain = (isinstance(up, nn.Linear) and not getattr(up, "comfy_cast_weights", False)
             and up.bias is not None and up.weight.dtype == x.dtype)
    if gelu_in_product and plain and getattr(act, "approximate", None) == "tanh":
        hidden = torch._addmm_activation(up.bias, x.flatten(0, 1), up.weight.t(), use_gelu=True)
        return down(hidden.unflatten(0, x.shape[:2]))
    return ffn(x)


_TANH_EPILOGUE: dict[torch.device, bool] = {}


def product_gelu_is_tanh(device: torch.device) -> bool:
    """Whether ``torch._addmm_activation(..., use_gelu=True)`` applies Wan's tanh GELU on ``device``
    (checked once per device on a small float32 product, where tanh and erf GELU differ by ~1e-4)."""
    device = torch.device(device)
    if device not in _TANH_EPILOGUE:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=g).to(device) for shape in ((64, 64), (64, 64), (64,)))
        with torch.inference_mode():
            product = torch._addmm_activation(b, x, w.t(), use_gelu=True)
            tanh = F.gelu(torch.addmm(b, x, w.t()), approximate="tanh")
            erf = F.gelu(torch.addmm(b, x, w.t()))
        err_tanh, err_erf = float((product - tanh).abs().max()), float((product - erf).abs().max())
        _TANH_EPILOGUE[device] = err_tanh < 1e-4 < err_erf
    return _TANH_EPILOGUE[device]


class CompileError(RuntimeError):
    """Fused blocks could not be compiled on this machine (raised before any block has run fused)."""


_FUSED: list[Callable] = []


def fused_block_step() -> Callable:
    """:func:`block_step` compiled once per process with ``torch.compile`` (one graph per block call).

    Every block shares the compiled code (modules are inlined, their weights are inputs); a new
    shape (context size, frames, a keys-only pass) compiles once more, then recompiles with
    dynamic sizes, so a long run compiles a few times at its start and never after. Compiled with
    Inductor's ``multi_kernel`` where that works, else with the defaults; a :class:`CompileError`
    when neither does.
    """
    if not _FUSED:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # Tuned first: Inductor's multi_kernel compiles each reduction (the norms over rows of 1536,
        # which it otherwise loops over) both looped and persistent and runs the faster, picked on
        # its first run (an H200: 278.6 -> 274.5 ms per chunk, docs/PERF.md; a CPU ignores it). Its
        # on-disk cache of picks stays off: with PyTorch 2.11, reading it raised a TypeError inside
        # Triton once a run compiled a second prompt. Where the tuned compile fails, the default is used.
        os.environ.setdefault("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", "1")
        variants = [torch.compile(block_step, fullgraph=True, options={"triton.multi_kernel": 1}),
                    torch.compile(block_step, fullgraph=True)]

        def step(*args):
            while True:
                try:
                    return variants[0](*args)
                except Exception as e:
                    if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                        raise
                    if len(variants) > 1:
                        variants.pop(0)
                        continue
                    raise CompileError(
                        f"fused blocks could not be compiled here ({type(e).__name__}); turn fused off, or "
                        "install what torch.compile needs (Triton on a GPU, a C++ compiler on a CPU)"
                    ) from e

        _FUSED.append(step)
    return _FUSED[0]


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, ...], channels: int) -> torch.Tensor:
    """[B, F, h*w, C*pt*ph*pw] tokens -> latents [B, C, F*pt, h*ph, w*pw]."""
    b = x.shape[0]
    x = x.reshape(b, *grid, *patch, channels)
    x = torch.einsum("bfhwpqrc->bcfphqwr", x)
    return x.reshape(b, channels, *(g * p for g, p in zip(grid, patch)))

