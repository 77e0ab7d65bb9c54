"""Shared tiny-model fixtures for the engine and memory tests.

Sizes: ``WanConfig.tiny()`` (dim 256, 2 heads of 128, 2 blocks) at 32 x 32 pixels, i.e. latents
[B, 16, F, 4, 4] and a 2 x 2 patch grid of 4 tokens per frame, so a chunk forward takes milliseconds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

import gf_core as gf
from gf_core.memory import Memory
from gf_core.wan import forward_chunk

CFG = gf.WanConfig.tiny()
SIZE = 32  # pixels; latent 4 x 4, patch grid 2 x 2
LATENT = SIZE // 8
GRID = (LATENT // 2, LATENT // 2)
RUN = {"height": SIZE, "width": SIZE}


def one_thread() -> Iterator[None]:
    """Body of a module fixture: tiny tensors run fastest on one thread (and do not spin-wait when
    other processes share the cores); restores the previous thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return gf.random_state_dict(CFG, seed=seed)


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> gf.WanModel:
    """A fresh tiny model (callers may not share mutable modules across dtypes)."""
    sd = {k: v.clone() for k, v in state_dict(seed).items()}
    return gf.WanModel.from_state_dict(sd, dtype=dtype)


def prompt(seed: int, batch: int = 1, length: int = 8) -> torch.Tensor:
    """A deterministic fake umT5 embedding [batch, length, text_dim]."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(batch, length, CFG.text_dim, generator=g)


def initial_noise(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    """Initial noise in the reference layout [B, F, 16, h, w]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 16, LATENT, LATENT, generator=g)


class ForwardCounter:
    """Counts calls of the model's patch embedding and text embedding (any forward or prompt encode)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self._handles = [
            model.patch_embedding.register_forward_hook(self._hook),
            model.text_embedding.register_forward_hook(self._hook),
        ]

    def _hook(self, *_args) -> None:
        self.calls += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def stream_memory(gen) -> Memory:
    """The :class:`Memory` of a suspended ``gf.stream`` generator (read-only inspection)."""
    return gen.gi_frame.f_locals["session"].memory


@dataclass
class ChunkKV:
    """Raw (pre-RoPE) keys and values of the frames a forward computed, per block: [B, L, H, D]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def capture_kv(*args, **kwargs) -> tuple[torch.Tensor | None, ChunkKV]:
    """:func:`gf_core.wan.forward_chunk` that also returns the raw K/V of every block it ran."""
    kv = ChunkKV([], [])

    def keep(block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kv.keys.append(k)
        kv.values.append(v)

    return forward_chunk(*args, on_kv=keep, **kwargs), kv


def commit(mem: Memory, start: int, latents: torch.Tensor, kv: ChunkKV, segment: int = 0) -> dict:
    """``mem.admit`` plus the writes from K/V captured by a forward; returns the event part (JSON)."""
    admission = mem.admit(start, latents, segment)
    on_kv = mem.store.writer(admission.writes, latents.shape[2])
    for block, (k, v) in enumerate(zip(kv.keys, kv.values)):
        on_kv(block, k, v)
    return admission.to_json()


# -- a model-free driver of Memory, for long runs ------------------------------------------------


class StubKV:
    """Random tiny K/V (1 block, 1 token per frame, 1 head, head dim 2) and latents [1, 16, n, 1, 1]."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)

    def kv(self, frames: int) -> ChunkKV:
        return ChunkKV([torch.randn(1, frames, 1, 2, generator=self.g)], [torch.randn(1, frames, 1, 2, generator=self.g)])

    def latents(self, frames: int) -> torch.Tensor:
        return torch.randn(1, 16, frames, 1, 1, generator=self.g)

    def encode(self, latents: torch.Tensor, query_index: list[int], context: object | None,
               own_keys_from: int = 0, on_kv=None) -> ChunkKV:
        """Stands in for the re-encoding forward of a switch: right shape, fresh values."""
        assert len(query_index) == latents.shape[2]
        kv = self.kv(latents.shape[2])
        if on_kv is not None:
            for block, (k, v) in enumerate(zip(kv.keys, kv.values)):
                on_kv(block, k, v)
        return kv


def no_source(slots: list[int], indices: list[int]):
    raise AssertionError("only the LongLive recache asks for a context source")


def fail_compiling(monkeypatch, kernels_module, error_module: str = "torch._dynamo.exc") -> None:
    """Make fused blocks fail to compile: ``torch.compile`` returns a function raising an error from
    ``error_module`` (where PyTorch's compile errors live), as on a machine without a compiler."""

    class BackendCompilerFailed(Exception):
        pass

    BackendCompilerFailed.__module__ = error_module

    def failing_compile(fn, **options):
        def run(*args):
            raise BackendCompilerFailed("no compiler")
        return run

    monkeypatch.setattr(kernels_module, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", failing_compile)
