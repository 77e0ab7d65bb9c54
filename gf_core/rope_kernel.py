"""One Triton kernel for fused runs on a GPU: a chunk's keys after its context's, all rotated.

A fused block that reads the memory in place (:func:`~gf_core.wan.block_step`) attends to every
stored raw context key and to its own raw keys, each rotated at its frame's temporal index. As
Inductor compiles that rotate-and-concatenate, it also reads a per-token float32 table a third
the size of the keys. :func:`rotate_cat` reads
each head's row once, takes its rotation from the three axes' small tables (time per frame,
height, width; :meth:`~gf_core.rope.RopeTable.axis_rotations`) and writes the rotated rows
straight into the concatenated keys. Same arithmetic as :func:`~gf_core.rope.rotate_real`:
float32, rounded once.

Only defined where Triton is installed; :func:`available` says whether this process can use it.
:func:`rotate_cat_reference` is the same operation in PyTorch (for machines without Triton and
for tests).
"""

from __future__ import annotations

import torch

from .rope import per_token, real_freqs, rotate_real

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the fused path rotates with PyTorch
    triton = None

BLOCK_ROWS = 32  # token rows per program; each program rotates one head of them
enabled = True  # False: fused blocks rotate with PyTorch even where the kernel could run (for comparisons)


def rotate_cat_reference(context: torch.Tensor, own: torch.Tensor, t_rot: torch.Tensor, h_rot: torch.Tensor,
                         w_rot: torch.Tensor) -> torch.Tensor:
    """The context's raw keys [B, S, T, H, D] then the chunk's own [B, F*T, H, D], rotated and
    concatenated: [B, (S+F)*T, H, D]. Frame j of the result (context slots first, then the chunk's
    frames) turns its time pairs by ``t_rot[j]``; the token at (row, column) of every frame's
    ``h_rot.shape[0]`` x ``w_rot.shape[0]`` grid turns its height and width pairs by ``h_rot[row]``
    and ``w_rot[column]`` ((cos, sin) per pair, :meth:`~gf_core.rope.RopeTable.axis_rotations`)."""
    freqs = per_token(*(torch.view_as_complex(a) for a in (t_rot, h_rot, w_rot)))
    return rotate_real(torch.cat([context.flatten(1, 2), own], dim=1), real_freqs(freqs))


def available(device: torch.device | str) -> bool:
    """Whether :func:`rotate_cat` runs its Triton kernel on ``device`` (a CUDA device with Triton)."""
    return enabled and triton is not None and torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _rotate_rows(src, dst, t_rot, h_rot, w_rot, rows, frames, tokens, width, src_stride_b, src_stride_f,
                     dst_stride_b, frame0, HEADS: tl.constexpr, D: tl.constexpr, TP: tl.constexpr,
                     HP: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr):
        """Rotate one head of BLOCK token rows of ``src`` [B, frames, tokens, HEADS, D] into ``dst``
        [B, L, HEADS, D] at frame ``frame0`` on; their time rotations are rows ``frame0 + f`` of ``t_rot``."""
        P: tl.constexpr = D // 2
        head = tl.program_id(1)
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = r < rows
        tok = r % tokens
        f = (r // tokens) % frames
        b = r // (tokens * frames)
        ch = tl.arange(0, D)
        src_row = b * src_stride_b + f * src_stride_f + tok * (HEADS * D) + head * D
        x = tl.load(src + src_row[:, None] + ch[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        a, c = tl.split(tl.reshape(x, (BLOCK, P, 2)))

        # each pair's (cos, sin) from the small table of its axis (they stay in the processor's cache)
        p = tl.arange(0, P)[None, :]
        in_t = live[:, None] & (p < TP)
        in_h = live[:, None] & (p >= TP) & (p < TP + HP)
        in_w = live[:, None] & (p >= TP + HP)
        t_at = ((frame0 + f)[:, None] * TP + p) * 2
        h_at = ((tok // width)[:, None] * HP + p - TP) * 2
        w_at = ((tok % width)[:, None] * WP + p - TP - HP) * 2
        cos = (tl.load(t_rot + t_at, mask=in_t, other=0.0) + tl.load(h_rot + h_at, mask=in_h, other=0.0)
               + tl.load(w_rot + w_at, mask=in_w, other=0.0))
        sin = (tl.load(t_rot + t_at + 1, mask=in_t, other=0.0) + tl.load(h_rot + h_at + 1, mask=in_h, other=0.0)
               + tl.load(w_rot + w_at + 1, mask=in_w, other=0.0))

        out = tl.reshape(tl.join(a * cos - c * sin, c * cos + a * sin), (BLOCK, D))
        dst_row = b * dst_stride_b + ((frame0 + f) * tokens + tok) * (HEADS * D) + head * D
        tl.store(dst + dst_row[:, None] + ch[None, :], out.to(dst.dtype.element_ty), mask=live[:, None])

    def _launch(src: torch.Tensor, dst: torch.Tensor, frame0: int, t_rot: torch.Tensor, h_rot: torch.Tensor,
                w_rot: torch.Tensor) -> None:
        b, frames, tokens, heads, d = src.shape
        rows = b * frames * tokens
        grid = (triton.cdiv(rows, BLOCK_ROWS), heads)
        torch.library.wrap_triton(_rotate_rows)[grid](
            src, dst, t_rot, h_rot, w_rot, rows, frames, tokens, w_rot.shape[0], src.stride(0), src.stride(1),
            dst.stride(0), frame0, HEADS=heads, D=d, TP=t_rot.shape[1], HP=h_rot.shape[1], WP=w_rot.shape[1],
            BLOCK=BLOCK_ROWS, num_warps=4,
        )

    @torch.library.triton_op("grounded_forcing::rotate_cat", mutates_args=())
    def rotate_cat(context: torch.Tensor, own: torch.Tensor, t_rot: torch.Tensor, h_rot: torch.Tensor,
                   w_rot: torch.Tensor) -> torch.Tensor:
        """:func:`rotate_cat_reference` as two launches of one Triton kernel (context, then the chunk)."""
        b, s, t, h, d = context.shape
        frames = own.shape[1] // t
        out = context.new_empty(b, (s + frames) * t, h, d)
        if context.stride(2) != h * d or context.stride(3) != d or context.stride(4) != 1:
            context = context.contiguous()
        own = own.contiguous().view(b, frames, t, h, d)
        _launch(context, out, 0, t_rot, h_rot, w_rot)
        _launch(own, out, s, t_rot, h_rot, w_rot)
        return out

else:
    rotate_cat = rotate_cat_reference
