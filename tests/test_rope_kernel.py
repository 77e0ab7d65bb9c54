"""The rotate-and-concatenate of fused blocks on a GPU (gf_core.rope_kernel) against the PyTorch path."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gf_core import rope_kernel
from gf_core.memory import ContextSource, FrameStore
from gf_core.rope import RopeTable, real_freqs, rotate_real

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def case(seed: int = 0, slots: int = 4, frames: int = 2, rows: int = 3, cols: int = 5, heads: int = 2,
         head_dim: int = 128, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    tokens = rows * cols
    context = torch.randn(1, slots + 1, tokens, heads, head_dim, generator=g).to(dtype)[:, :slots]  # a store view
    own = torch.randn(1, frames * tokens, heads, head_dim, generator=g).to(dtype)
    ctx_index = [0, 0, 12, 13][:slots]
    own_index = list(range(18, 18 + frames))
    return context, own, ctx_index, own_index, (rows, cols)


def torch_path(context, own, ctx_index, own_index, grid):
    """What a fused block computes without the kernel: per-token tables, rotate_real, cat."""
    rope = RopeTable(context.shape[-1])
    ctx_freqs = real_freqs(rope.frequencies(ctx_index, *grid, "float32"))
    own_freqs = real_freqs(rope.frequencies(own_index, *grid, "float32"))
    return torch.cat([rotate_real(context.flatten(1, 2), ctx_freqs), rotate_real(own, own_freqs)], dim=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_equals_the_torch_path(dtype):
    context, own, ctx_index, own_index, grid = case(dtype=dtype)
    tables = RopeTable(context.shape[-1]).axis_rotations(ctx_index + own_index, *grid, "cpu")
    out = rope_kernel.rotate_cat_reference(context, own, *tables)
    assert out.dtype == dtype
    assert torch.equal(out, torch_path(context, own, ctx_index, own_index, grid))


def test_axis_tables_match_the_per_token_table():
    rope = RopeTable(128)
    t, h, w = rope.axis_rotations([3, 0, 20], 4, 6, "cpu")
    assert t.shape == (3, 22, 2) and h.shape == (4, 21, 2) and w.shape == (6, 21, 2)
    full = torch.view_as_real(rope.frequencies([3, 0, 20], 4, 6, "float32")).view(3, 4, 6, 64, 2)
    assert torch.equal(full[1, 2, 5, :22], t[1])
    assert torch.equal(full[1, 2, 5, 22:43], h[2])
    assert torch.equal(full[1, 2, 5, 43:], w[5])
    with pytest.raises(ValueError, match="outside the table"):
        rope.axis_rotations([1024], 4, 6, "cpu")


def test_context_source_gives_indices_in_slot_order():
    store = FrameStore(slots=3, layers=1, scratch=1)
    store.write_block(0, 0, torch.zeros(1, 6, 2, 8), torch.zeros(1, 6, 2, 8), 0, 3)
    rope = RopeTable(8)
    slots, index = [2, 0, 1], [12, 0, 13]  # plan order: the frame at 12 sits in slot 2
    source = ContextSource(store, slots, rope.frequencies(index, 1, 2, "float32"), index)
    ctx = source.context(0)
    assert ctx.whole_index == [0, 13, 12]
    expected = rope.frequencies([0, 13, 12], 1, 2, "float32")
    assert torch.equal(ctx.whole_freqs, expected)


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from gf_core import rope_kernel
    from gf_core.rope import RopeTable
    from tests.test_rope_kernel import case
    assert rope_kernel.triton is not None
    for seed, kw in enumerate([{"dtype": torch.float32}, {"slots": 3, "frames": 3, "rows": 7, "cols": 9, "heads": 3},
                               {"dtype": torch.float32, "head_dim": 64}, {}]):
        context, own, ctx_index, own_index, grid = case(seed, **kw)
        tables = RopeTable(context.shape[-1]).axis_rotations(ctx_index + own_index, *grid, "cpu")
        out = rope_kernel.rotate_cat(context, own, *tables)
        ref32 = rope_kernel.rotate_cat_reference(context.float(), own.float(), *tables)
        assert out.shape == ref32.shape and out.dtype == context.dtype
        if context.dtype == torch.float32:
            assert torch.equal(out, ref32), float((out - ref32).abs().max())
        else:  # the interpreter rounds to bfloat16 toward zero, a GPU to nearest: within one step
            assert ((out.float() - ref32).abs() <= ref32.abs() * 2.0 ** -7).all()
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (pip install triton) to run the kernel in its interpreter")
def test_triton_kernel_in_the_interpreter():
    """The Triton kernel, run by Triton's CPU interpreter, against the reference."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "ok"
