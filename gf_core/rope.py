"""3-axis rotary position embedding of the Wan DiT, applied at explicit temporal indices.

Every head of dimension D holds D/2 complex pairs, split between time, height and width
(for D = 128: 22 / 21 / 21). Height and width positions always start at 0; the temporal
position of every latent frame is an input, so a memory policy decides it.

Two numerically different ways to rotate are offered:
- ``exact``: float64 rotation, cast back, as the reference implementations do;
- ``fast``: float32 cos/sin tables, rotation in float32 (no float64 on the hot path).
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (time, height, width) for a head of ``head_dim`` channels."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def _axis_angles(max_positions: int, pairs: int, theta: float) -> torch.Tensor:
    """Rotation angles [max_positions, pairs] in float64 for one axis of ``2 * pairs`` channels."""
    dim = 2 * pairs
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim))
    return torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)


class RopeTable:
    """Precomputed rotations for all three axes; ``max_positions`` bounds every index."""

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0):
        if head_dim % 2:
            raise ValueError(f"head dimension {head_dim} is odd; RoPE needs an even head dimension")
        self.head_dim = head_dim
        self.max_positions = max_positions
        t, h, w = axis_dims(head_dim)
        self._angles = [_axis_angles(max_positions, n, theta) for n in (t, h, w)]
        self._cache: dict[tuple, torch.Tensor] = {}

    def _axis(self, axis: int, kind: str, device: torch.device) -> torch.Tensor:
        key = (axis, kind, device)
        table = self._cache.get(key)
        if table is None:
            angles = self._angles[axis]
            if kind == "complex128":
                table = torch.polar(torch.ones_like(angles), angles).to(device)
            else:  # float32 [positions, pairs, 2] holding cos, sin
                table = torch.stack([angles.cos(), angles.sin()], dim=-1).float().to(device)
            self._cache[key] = table
        return table

    def frequencies(self, frame_index: torch.Tensor, height: int, width: int, kind: str) -> torch.Tensor:
        """Per-token rotations for frames at temporal ``frame_index`` [F] on an h x w grid.

        Returns [F*h*w, 1, D/2] complex128 (``kind="complex128"``) or [F*h*w, 1, D/2, 2]
        float32 cos/sin (``kind="float32"``), tokens in frame-major, row-major order.
        """
        index = frame_index.to(torch.long)
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= self.max_positions:
            raise ValueError(
                f"temporal RoPE index {lo if lo < 0 else hi} is outside the table of "
                f"{self.max_positions} positions; shorten the video or use a bounded-index memory policy"
            )
        device = index.device
        frames = index.numel()
        t = self._axis(0, kind, device)[index]
        h = self._axis(1, kind, device)[:height]
        w = self._axis(2, kind, device)[:width]
        shape = (frames, height, width)
        parts = [
            t.view(frames, 1, 1, *t.shape[1:]).expand(*shape, *t.shape[1:]),
            h.view(1, height, 1, *h.shape[1:]).expand(*shape, *h.shape[1:]),
            w.view(1, 1, width, *w.shape[1:]).expand(*shape, *w.shape[1:]),
        ]
        freqs = torch.cat(parts, dim=3)
        return freqs.reshape(frames * height * width, 1, *freqs.shape[3:])


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, L, H, D] by per-token ``freqs`` from :meth:`RopeTable.frequencies`.

    Adjacent channel pairs (0, 1), (2, 3), ... are the complex numbers, as in Wan. The result
    has the dtype of ``x``.
    """
    b, length, heads, dim = x.shape
    if freqs.is_complex():
        z = torch.view_as_complex(x.to(torch.float64).reshape(b, length, heads, dim // 2, 2))
        return torch.view_as_real(z * freqs).flatten(3).type_as(x)
    pairs = x.float().reshape(b, length, heads, dim // 2, 2)
    re, im = pairs.unbind(-1)
    cos, sin = freqs.unbind(-1)
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(3).type_as(x)
