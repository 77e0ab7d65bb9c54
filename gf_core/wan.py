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
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .rope import RopeTable, apply_rope
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
    b, length, _ = embeds.shape
    heads = WanConfig.from_module(model).num_heads
    if length >= text_len:
        embeds = embeds[:, :text_len]
    else:
        embeds = torch.cat([embeds, embeds.new_zeros(b, text_len - length, embeds.shape[2])], dim=1)
    ctx = model.text_embedding(embeds)
    keys, values = [], []
    for block in model.blocks:
        attn = block.cross_attn
        keys.append(rearrange(attn.norm_k(attn.k(ctx)), "b l (h d) -> b l h d", h=heads))
        values.append(rearrange(attn.v(ctx), "b l (h d) -> b l h d", h=heads))
    kept = text_len if fold_from is None else folded_rows(fold_from)
    if kept >= text_len:
        return TextContext(keys, values)
    text = TextContext([k[:, :kept] for k in keys], [v[:, :kept] for v in values],
                       upload(fold_bias(kept, fold_from, text_len, ctx.dtype), ctx.device))
    for t in (*text.keys, *text.values):  # prompts of other lengths then reuse the compiled blocks
        torch._dynamo.maybe_mark_dynamic(t, 1)
    torch._dynamo.maybe_mark_dynamic(text.bias, 0)
    return text


class TextKV(NamedTuple):
    """One block's prompt keys and values [B, L, H, D] and a folded prompt's logit offsets [L] (or None)."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None


class BlockContext(NamedTuple):
    """What a block attends to before its own tokens: stored raw keys [B, S, T, H, D] and values
    [B, S (+ F), T, H, D], the ``slots`` [N] to gather in order, and the rotations of the N*T keys.
    ``slots`` None reads every stored slot in place: ``values`` then has F scratch slots after
    the store's for the chunk's own values, and the rotations cover the S*T keys in slot order."""

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor | None
    freqs: torch.Tensor


class BlockOps(NamedTuple):
    """The kernels a block calls: the rotation, the attention and whether the FFN's GELU is the
    epilogue of its first product (:class:`Kernels`)."""

    rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    attention: AttentionFn
    gelu_in_product: bool


def patchify(patch: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, F, H, W] -> tokens [B, F*h*w, dim] through the patch embedding, token-major
    (as a view of the conv output they would be channel-major, and every norm would then read its
    rows with a stride)."""
    if patch.weight.dtype == torch.float32 and x.dtype != torch.float32:
        h = patch(x.float()).to(x.dtype)  # ComfyUI keeps this layer in float32 and runs it so
    else:
        h = patch(x)
    return rearrange(h, "b c f h w -> b (f h w) c").contiguous()


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, ...], channels: int) -> torch.Tensor:
    """[B, F, h*w, C*pt*ph*pw] tokens -> latents [B, C, F*pt, h*ph, w*pw]."""
    pt, ph, pw = patch
    return rearrange(x, "b f (h w) (p q r c) -> b c (f p) (h q) (w r)", h=grid[1], p=pt, q=ph, r=pw, c=channels)


def forward_chunk(
    model: nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    text: TextContext,
    memory: KeyValueSource | None,
    query_index: list[int] | torch.Tensor,
    rope: RopeTable,
    rope_kind: str = "complex128",
    kernels: Kernels | None = None,
    compute_output: bool = True,
    own_keys_from: int = 0,
    on_kv: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """One causal forward of a chunk of latent frames.

    Args:
        x: latents [B, C, F, H, W] in the run dtype.
        timestep: [B] diffusion timesteps (fractional; every frame of the chunk shares it).
        text: the prompt's cross-attention K/V from :func:`encode_text`.
        memory: raw context K/V per block and their rotations, attended to before the chunk itself.
        query_index: temporal RoPE index of each frame of the chunk ([F] list or tensor).
        kernels: the run's kernel choices (default :data:`EAGER`).
        compute_output: run the head (a cache-writing pass can skip it).
        own_keys_from: the chunk attends to its own frames from this one on (LongLive's recache
            runs frames whose keys it then leaves out).
        on_kv: called as ``on_kv(block, k, v)`` with the chunk's raw K/V [B, L, H, D] of every block,
            after that block has read its context (so it may overwrite context slots).

    Returns:
        The velocity prediction [B, C, F, H, W], or None without ``compute_output``.
    """
    kernels = kernels or EAGER
    cfg = WanConfig.from_module(model)
    b, _, frames, height, width = x.shape
    grid = (frames // cfg.patch_size[0], height // cfg.patch_size[1], width // cfg.patch_size[2])
    tokens_per_frame = grid[1] * grid[2]

    h = patchify(model.patch_embedding, x)
    t = timestep.reshape(b, 1).expand(b, grid[0]).reshape(-1)
    e = model.time_embedding(sinusoid(cfg.freq_dim, t).type_as(h))  # [B*F, dim]
    e0 = model.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, (b, grid[0]))  # [B, F, 6, dim]

    tables = _table_converter(kernels.rotation_table)
    freqs = tables(rope.frequencies(query_index, grid[1], grid[2], rope_kind, x.device))
    ops = BlockOps(kernels.rotate, kernels.attention, kernels.gelu_in_product)
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        context = _block_context(memory, i, kernels.read_in_place and not own_keys_from, tables, grid[0])
        keys_only = not compute_output and i == last
        out, k, v = kernels.block(block, h, e0, grid[0], cfg.num_heads, freqs, TextKV(text.keys[i], text.values[i], text.bias),
                                  context, ops, own_keys_from * tokens_per_frame, keys_only)
        if on_kv is not None:
            on_kv(i, k, v)  # after the block has read its context, so context slots may be overwritten
        if keys_only:
            break
        h = out
    if not compute_output:
        return None

    head = model.head
    hmod = (_param(head.modulation, h).unsqueeze(1) + e.unflatten(0, (b, grid[0])).unsqueeze(2)).chunk(2, dim=2)
    out = head.head(head.norm(h).unflatten(1, (grid[0], tokens_per_frame)) * (1 + hmod[1]) + hmod[0])
    return unpatchify(out, grid, cfg.patch_size, cfg.out_dim)


def _table_converter(convert: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``convert`` applied once per rotation table of a forward (the memory gives every block the same)."""
    if convert is None:
        return lambda table: table
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def converted(table: torch.Tensor) -> torch.Tensor:
        if id(table) not in done:
            done[id(table)] = (table, convert(table))  # (holding the table keeps its id unique)
        return done[id(table)][1]

    return converted


def _block_context(memory: KeyValueSource | None, block: int, in_place: bool,
                   tables: Callable[[torch.Tensor], torch.Tensor], frames: int) -> BlockContext | None:
    """Block ``block``'s context: read in place where allowed and the memory offers every slot with room
    for the chunk's values, else gathered."""
    ctx = memory.context(block) if memory is not None else None
    if ctx is None:
        return None
    if in_place and ctx.whole_freqs is not None and ctx.values.shape[1] - ctx.keys.shape[1] == frames:
        return BlockContext(ctx.keys, ctx.values, None, tables(ctx.whole_freqs))
    return BlockContext(ctx.keys, ctx.values, ctx.slots, tables(ctx.freqs))


def block_step(
    block: nn.Module,
    h: torch.Tensor,
    e0: torch.Tensor,
    frames: int,
    heads: int,
    freqs: torch.Tensor,
    text: TextKV,
    context: BlockContext | None,
    ops: BlockOps,
    own_from: int = 0,
    keys_only: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One DiT block over a chunk's tokens h [B, L, dim]; returns (new h or None, raw k, v [B, L, H, D]).

    ``e0`` [B, frames, 6, dim] is the time projection; ``freqs`` the chunk's rotations; the chunk
    attends to ``context`` and then to its own tokens from token ``own_from`` on.
    ``keys_only`` stops once the raw K/V are known (the last block of a cache-writing pass).
    """
    b, length, dim = h.shape
    tokens = length // frames
    hd = dim // heads
    mod = (_param(block.modulation, h).unsqueeze(1) + e0).chunk(6, dim=2)  # each [B, F, 1, dim]
    shift, scale, gate, c_shift, c_scale, c_gate = mod
    rotate, attention = ops.rotate, ops.attention

    y = (block.norm1(h).unflatten(1, (frames, tokens)) * (1 + scale) + shift).flatten(1, 2)
    sa = block.self_attn
    q = sa.norm_q(sa.q(y)).view(b, -1, heads, hd)
    k = sa.norm_k(sa.k(y)).view(b, -1, heads, hd)
    v = sa.v(y).view(b, -1, heads, hd)
    if keys_only:
        return None, k, v
    q_rot = rotate(q, freqs)
    if context is not None and context.slots is None:  # every slot in place (own_from is 0 here)
        context.values[:, context.keys.shape[1]:] = v.view(b, frames, tokens, heads, hd)
        k_all = torch.cat([rotate(context.keys.flatten(1, 2), context.freqs), rotate(k, freqs)], dim=1)
        v_all = context.values.flatten(1, 2)
    else:
        k_own, v_own = rotate(k, freqs)[:, own_from:], v[:, own_from:]
        if context is not None:
            ck = context.keys.index_select(1, context.slots).flatten(1, 2)
            cv = context.values.index_select(1, context.slots).flatten(1, 2)
            k_all = torch.cat([rotate(ck, context.freqs), k_own], dim=1)
            v_all = torch.cat([cv, v_own], dim=1)
        else:
            k_all, v_all = k_own, v_own
    y = sa.o(attention(q_rot, k_all, v_all).flatten(2))
    del k_all, v_all
    h = h + (y.unflatten(1, (frames, tokens)) * gate).flatten(1, 2)

    ca = block.cross_attn
    qc = ca.norm_q(ca.q(block.norm3(h))).view(b, -1, heads, hd)
    if text.bias is None:
        yc = attention(qc, text.keys, text.values)
    else:
        yc = biased_attention(qc, text.keys, text.values, text.bias)
    h = h + ca.o(yc.flatten(2))

    x = (block.norm2(h).unflatten(1, (frames, tokens)) * (1 + c_scale) + c_shift).flatten(1, 2)
    y = feed_forward(block.ffn, x, ops.gelu_in_product)
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


@dataclass(frozen=True)
class Kernels:
    """The kernel choices of a run, made once (:func:`gf_core.kernels.choose`) and passed to every forward.

    Attributes:
        name: "eager" or "fused" (for logs).
        block: runs one DiT block: :func:`block_step`, or it compiled into one graph.
        attention: unmasked attention over [B, L, H, D] tensors.
        rotate: rotates [B, L, H, D] by per-token tables; ``rotation_table`` turns the complex
            tables of :class:`~gf_core.rope.RopeTable` into what ``rotate`` takes (None: as they are).
        gelu_in_product: the FFN's GELU is the epilogue of its first product (:func:`feed_forward`).
        read_in_place: a block attending to every memory slot reads the store in place, with the
            chunk's values in scratch slots after the store's (:class:`~gf_core.memory.FrameStore`).
        fold_text: each prompt's zero padding is folded (:func:`encode_text`).
    """

    name: str = "eager"
    block: Callable[..., tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = block_step
    attention: AttentionFn = sdpa_attention
    rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = apply_rope
    rotation_table: Callable[[torch.Tensor], torch.Tensor] | None = None
    gelu_in_product: bool = False
    read_in_place: bool = False
    fold_text: bool = False


EAGER = Kernels()
