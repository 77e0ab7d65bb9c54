"""3-axis rotary position embedding of the Wan DiT, applied at explicit temporal indices.

Every head of dimension D holds D/2 complex pairs, split between time, height and width
(for D = 128: 22 / 21 / 21). Height and width positions always start at 0; the temporal
position of every latent frame is an input, so a memory policy decides it.

Two numerically different ways to rotate are offered:
- ``complex128``: float64 rotation, cast back, as the reference implementations do;
- ``float32``: complex64 tables and product (no float64 on the hot path).
"""

from __future__ import annotations

import torch

from .errors import BadInput
from .transfer import index_tensor

ROPE_POSITIONS = 1024  # temporal positions of the Wan RoPE table: absolute indices end here


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

    def __init__(self, head_dim: int, max_positions: int = ROPE_POSITIONS, theta: float = 10000.0):
        if head_dim % 2:
            raise BadInput(f"head dimension {head_dim} is odd; RoPE needs an even head dimension")
        self.head_dim = head_dim
        self.max_positions = max_positions
        t, h, w = axis_dims(head_dim)
        self._angles = [_axis_angles(max_positions, n, theta) for n in (t, h, w)]
        self._cache: dict[tuple, torch.Tensor] = {}

    def _check(self, frame_index: list[int]) -> None:
        bad = [i for i in frame_index if not 0 <= i < self.max_positions]
        if bad:
            raise BadInput(
                f"temporal RoPE index {bad[0]} is outside the table of "
                f"{self.max_positions} positions; shorten the video or use a bounded-index memory policy"
            )

    def _axis(self, axis: int, kind: str, device: torch.device) -> torch.Tensor:
        key = (axis, kind, device)
        table = self._cache.get(key)
        if table is None:
            angles = self._angles[axis]
            table = torch.polar(torch.ones_like(angles), angles)
            if kind == "float32":
                table = table.to(torch.complex64)
            table = self._cache[key] = table.to(device)
        return table

    def _axes(self, frame_index: list[int], height: int, width: int, kind: str,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each axis' rotations: time per frame [F, t], height [height, h], width [width, w]."""
        self._check(frame_index)
        index = index_tensor(frame_index, device)
        return (self._axis(0, kind, device)[index], self._axis(1, kind, device)[:height],
                self._axis(2, kind, device)[:width])

    def frequencies(
        self, frame_index: list[int] | torch.Tensor, height: int, width: int, kind: str,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Per-token rotations [F*h*w, 1, D/2] for frames at temporal ``frame_index`` on an h x w grid.

        ``kind`` "complex128" gives the references' float64 rotation, "float32" a complex64 one.
        Tokens are in frame-major, row-major order. A list of indices is checked on the host, so
        building the table never waits for the device.
        """
        if isinstance(frame_index, torch.Tensor):
            device = device or frame_index.device
            frame_index = frame_index.tolist()
        return per_token(*self._axes(frame_index, height, width, kind, torch.device(device or "cpu")))


def per_token(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each axis' complex rotations (time per frame [F, t], height [H, h], width [W, w]) as one per
    token [F*H*W, 1, t+h+w], tokens in frame-major, row-major order."""
    frames, height, width = t.shape[0], h.shape[0], w.shape[0]
    shape = (frames, height, width)
    freqs = torch.cat([
        t.view(frames, 1, 1, -1).expand(*shape, -1),
        h.view(1, height, 1, -1).expand(*shape, -1),
        w.view(1, 1, width, -1).expand(*shape, -1),
    ], dim=3)
    return freqs.reshape(frames * height * width, 1, -1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, L, H, D] by per-token complex ``freqs`` from :meth:`RopeTable.frequencies`.

    Adjacent channel pairs (0, 1), (2, 3), ... are the complex numbers, as in Wan. The product is
    taken in the precision of ``freqs`` (complex128 or complex64); the result has the dtype of ``x``.
    """
    b, length, heads, dim = x.shape
    real = torch.float64 if freqs.dtype == torch.complex128 else torch.float32
    z = torch.view_as_complex(x.to(real).reshape(b, length, heads, dim // 2, 2))
    return torch.view_as_real(z * freqs).flatten(3).type_as(x)


def real_freqs(freqs: torch.Tensor) -> torch.Tensor:
    """Complex64 rotations [L, 1, D/2] as a float32 table [2, L, 1, D] for :func:`rotate_real`:
    each pair's cosine twice, then its sine with the sign the pair's first channel needs."""
    cos = freqs.real.repeat_interleave(2, dim=-1)
    signed_sin = torch.stack((-freqs.imag, freqs.imag), dim=-1).flatten(-2)
    return torch.stack((cos, signed_sin)).contiguous()


def rotate_real(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` in float32 real arithmetic (no complex numbers, for torch.compile):
    (a, b) -> (a cos - b sin, b cos + a sin) as x * cos + swap_pairs(x) * signed sin."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * table[0] + swapped * table[1]).type_as(x)
