"""The run's kernel choices, made once: eager PyTorch, or each DiT block compiled into one graph.

:func:`choose` turns the user's setting ("eager", "fused" or "auto") and the device into one
:class:`~gf_core.wan.Kernels` object: the block function, the attention, the rotation, the FFN
epilogue, the context reader and prompt folding. Nothing below the stream tests the setting again.
A failed compile is handled here only (:class:`CompiledBlock`): "fused" stops with a
:class:`CompileError`, "auto" runs the same block function uncompiled.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from .errors import BadInput
from .rope import real_freqs, rotate_real
from .wan import EAGER, AttentionFn, Kernels, block_step, sdpa_attention

KernelSetting = Literal["eager", "fused", "auto"]
KERNEL_SETTINGS: tuple[str, ...] = get_args(KernelSetting)

log = logging.getLogger(__name__)


def fused_problem(device: torch.device | str, rope_kind: str) -> str | None:
    """Why compiled blocks cannot run here (one sentence), or None: they rotate in float32 and, on a
    GPU, are compiled with Triton."""
    if rope_kind != "float32":
        return (f"fused blocks rotate in float32, but the RoPE precision is {rope_kind}; use float32 "
                "or the eager kernels")
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is None:
        return ("fused blocks are compiled with Triton, which this PyTorch install lacks; install triton "
                "(triton-windows on Windows) or use the eager kernels")
    return None


def resolve(setting: str, device: torch.device | str, rope_kind: str) -> str:
    """"eager" or "fused" for ``setting``: "auto" is fused on a CUDA device where fused blocks can run."""
    if setting not in KERNEL_SETTINGS:
        raise BadInput(f"unknown kernel setting '{setting}'; use one of {', '.join(KERNEL_SETTINGS)}")
    if setting == "auto":
        usable = torch.device(device).type == "cuda" and fused_problem(device, rope_kind) is None
        return "fused" if usable else "eager"
    if setting == "fused" and (problem := fused_problem(device, rope_kind)):
        raise BadInput(problem)
    return setting


def choose(setting: str, device: torch.device | str, rope_kind: str = "float32",
           attention: AttentionFn | None = None) -> Kernels:
    """The kernels of a run for ``setting`` on ``device``; ``attention`` overrides the attention (a
    fused run then attends to the whole prompt, unfolded)."""
    device = torch.device(device)
    if resolve(setting, device, rope_kind) == "eager":
        return EAGER if attention is None else Kernels(attention=attention)
    return Kernels(
        name="fused",
        block=CompiledBlock(fallback=setting == "auto"),
        attention=tuned_attention(device) if attention is None else attention,
        rotate=rotate_real,
        rotation_table=real_freqs,
        gelu_in_product=product_gelu_is_tanh(device),
        read_in_place=True,
        fold_text=attention is None,
    )


# ---------------------------------------------------------------------------------------------
# compiled blocks


class CompileError(RuntimeError):
    """Fused blocks could not be compiled on this machine (raised before any block has run fused)."""


_COMPILED: dict[str, object] = {}  # the process's compiled variants of block_step, or the error


def _compiled_block(*args):
    """:func:`~gf_core.wan.block_step` compiled once per process with ``torch.compile`` (one graph per
    block call), run on ``args``.

    Every block shares the compiled code (modules are inlined, their weights are inputs); a new
    shape (context size, frames, a keys-only pass) compiles once more, then recompiles with
    dynamic sizes, so a long run compiles a few times at its start and never after. Compiled with
    Inductor's ``multi_kernel`` where that works, else with the defaults; a :class:`CompileError`
    when neither does.
    """
    if "variants" not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # Tuned first: Inductor's multi_kernel compiles each reduction (the norms over rows of the
        # model width, which it otherwise loops over) both looped and persistent and runs the faster,
        # picked on its first run (a CPU ignores it; docs/PERF.md). Its on-disk cache of picks stays
        # off: with PyTorch 2.11, reading it raised a TypeError inside Triton once a run compiled a
        # second prompt. Where the tuned compile fails, the default is used.
        os.environ.setdefault("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", "1")
        _COMPILED["variants"] = [torch.compile(block_step, fullgraph=True, options={"triton.multi_kernel": 1}),
                                 torch.compile(block_step, fullgraph=True)]
    variants = _COMPILED["variants"]
    while True:
        if "error" in _COMPILED:
            raise _COMPILED["error"]
        try:
            return variants[0](*args)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            if len(variants) > 1:
                variants.pop(0)
                continue
            error = CompileError(f"fused blocks could not be compiled here ({type(e).__name__}); use the eager "
                                 "kernels, or install what torch.compile needs (Triton on a GPU, a C++ compiler "
                                 "on a CPU)")
            error.__cause__ = e
            _COMPILED["error"] = error


class CompiledBlock:
    """The block function of fused kernels: :func:`~gf_core.wan.block_step` compiled. Where it cannot be
    compiled, a :class:`CompileError`, or with ``fallback`` (the "auto" setting) the same function run
    uncompiled, said once in the log; :attr:`compiled` tells which ran."""

    def __init__(self, fallback: bool):
        self.fallback = fallback
        self.compiled = True

    def __call__(self, *args):
        if self.compiled:
            try:
                return _compiled_block(*args)
            except CompileError as e:
                if not self.fallback:
                    raise
                log.warning("Grounded Forcing: %s; running the blocks uncompiled", e)
                self.compiled = False
        return block_step(*args)


def compiled(kernels: Kernels) -> bool:
    """Whether ``kernels`` ran their blocks compiled (False for eager kernels and after a fallback)."""
    return isinstance(kernels.block, CompiledBlock) and kernels.block.compiled


# ---------------------------------------------------------------------------------------------
# attention


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
    ``parts`` times as many query tiles at once, which fills the last wave of a large GPU's
    processors better. Falls back to one call when the keys do not divide evenly.
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
        raise BadInput(f"unknown attention backend '{name}'; use one of {', '.join(SDPA_BACKENDS)} or splitN (N >= 1)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]

    def pinned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return sdpa_attention(q, k, v)

    return pinned


def tuned_attention(device: torch.device | str) -> AttentionFn:
    """The attention a fused run uses unless the caller picks one: on a Hopper GPU (an H100/H200,
    where PyTorch picks cuDNN's kernel) a chunk's attention to its context is split in two runs of
    keys ("split2", docs/PERF.md); elsewhere plain SDPA, as nothing was measured there."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return attention_backend("split2")
    return sdpa_attention


# ---------------------------------------------------------------------------------------------
# the FFN epilogue


_TANH_EPILOGUE: dict[torch.device, bool] = {}


def product_gelu_is_tanh(device: torch.device | str) -> bool:
    """Whether ``torch._addmm_activation(..., use_gelu=True)`` applies Wan's tanh GELU on ``device``
    (checked once per device on a small float32 product, where tanh and erf GELU differ clearly)."""
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
