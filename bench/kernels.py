"""Candidate kernels for a steady-state chunk, timed alone on one GPU.

Prints, in one run, milliseconds and TFLOP/s of:
- self-attention at the engine's shapes (a steady chunk: 4,680 queries x 18,720 keys; an APR
  recache: 14,040 x 14,040; a first chunk: 4,680 x 4,680), as one cuDNN call and split over the
  keys into S parts that run as one batched cuDNN call and are merged by their log-sum-exp
  (``gf_core.kernels.split_attention``), with the error of the split against the single call;
- cross-attention of a chunk to a prompt of 24 and 104 tokens: over all 512 rows, and with the
  zero padding folded (``gf_core.wan.biased_attention``: 64 or 128 rows kept), with its error;
- the block's products at 4,680 and 14,040 tokens: q, k, v as three products and as one;
- float8 (e4m3, row-wise scales) products of the same shapes, with and without quantizing the
  activations, and their error against bf16.

    python bench/kernels.py --out docs/results/kernels_h200.json [--only attention,cross,products]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_chunk import bench  # noqa: E402
from report import run_header, write_json  # noqa: E402

from gf_core.kernels import split_attention  # noqa: E402
from gf_core.wan import biased_attention, fold_bias, folded_rows, sdpa_attention  # noqa: E402

HEADS, HEAD_DIM, DIM, FFN = 12, 128, 1536, 8960


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def attention_rows(splits: list[int]) -> list[dict]:
    rows = []
    for name, lq, lk in (("steady", 4680, 18720), ("recache", 14040, 14040), ("first", 4680, 4680)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
                   for n in (lq, lk, lk))
        flops = 4 * lq * lk * HEADS * HEAD_DIM
        single = sdpa_attention(q, k, v)
        ms = bench(lambda q=q, k=k, v=v: sdpa_attention(q, k, v))
        rows.append({"shape": name, "queries": lq, "keys": lk, "parts": 1, "ms": ms, "tflops": flops / ms / 1e9})
        for parts in splits:
            if lk % parts:
                continue
            fn = torch.compile(lambda q, k, v, p=parts: split_attention(q, k, v, p), fullgraph=True)
            out = fn(q, k, v)
            ms = bench(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v))
            rows.append({"shape": name, "queries": lq, "keys": lk, "parts": parts, "ms": ms,
                         "tflops": flops / ms / 1e9, "rel_l2_vs_single": rel(out, single)})
        for r in rows[-1 - len(splits):]:
            print(json.dumps(r), flush=True)
    return rows


def cross_rows(text_len: int = 512, queries: int = 4680) -> list[dict]:
    """Cross-attention to a prompt of 24 / 104 tokens: over all 512 rows; over the kept rows alone
    (a lower bound, not the same result); and with the padding folded into the kept rows by logit
    offsets (``gf_core.wan.biased_attention`` with ``fold_bias``), as PyTorch picks the kernel and
    pinned to cuDNN's and to the memory-efficient one. Each call is short, so its time may
    include the host's launch time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pinned(backend, fn, *args):
        with sdpa_kernel(backend):
            return fn(*args)

    rows = []
    for length in (24, 104):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, queries, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(1, text_len, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
                for _ in range(2))
        k[:, length:], v[:, length:] = k[:, length:length + 1].clone(), v[:, length:length + 1].clone()  # padding
        whole = sdpa_attention(q, k, v)
        flops = 4 * queries * text_len * HEADS * HEAD_DIM
        kept = folded_rows(length)
        bias = fold_bias(kept, length, text_len, torch.bfloat16).cuda()
        folded = (q, k[:, :kept], v[:, :kept], bias)
        calls = [("whole", text_len, partial(sdpa_attention, q, k, v)),
                 ("kept rows only", kept, partial(sdpa_attention, *folded[:3])),
                 ("folded", kept, partial(biased_attention, *folded)),
                 ("folded, cudnn", kept, partial(pinned, SDPBackend.CUDNN_ATTENTION, biased_attention, *folded)),
                 ("folded, efficient", kept, partial(pinned, SDPBackend.EFFICIENT_ATTENTION, biased_attention, *folded))]
        for name, keys, call in calls:
            row = {"prompt_tokens": length, "mode": name, "keys": keys}
            try:
                out = call()
                row.update(ms=(ms := bench(call)), tflops_of_whole=flops / ms / 1e9, rel_l2_vs_whole=rel(out, whole))
            except Exception as e:  # report, do not stop the other rows
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def product_rows() -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    w = {n: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
         for n, s in (("q", (DIM, DIM)), ("k", (DIM, DIM)), ("v", (DIM, DIM)), ("up", (FFN, DIM)), ("down", (DIM, FFN)))}
    qkv = torch.cat([w["q"], w["k"], w["v"]])
    for tokens in (4680, 14040):
        x = torch.randn(tokens, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        hid = torch.randn(tokens, FFN, device="cuda", dtype=torch.bfloat16, generator=g)
        three = bench(lambda x=x: (F.linear(x, w["q"]), F.linear(x, w["k"]), F.linear(x, w["v"])))
        one = bench(lambda x=x: F.linear(x, qkv))
        flops = 2 * tokens * DIM * 3 * DIM
        rows.append({"tokens": tokens, "op": "qkv as 3 products", "ms": three, "tflops": flops / three / 1e9})
        rows.append({"tokens": tokens, "op": "qkv as 1 product", "ms": one, "tflops": flops / one / 1e9})
        for name, a, wt in (("o 1536x1536", x, w["q"]), ("qkv 1536x4608", x, qkv), ("ffn up", x, w["up"]),
                            ("ffn down", hid, w["down"])):
            flops = 2 * tokens * wt.shape[0] * wt.shape[1]
            ref = F.linear(a, wt)
            ms = bench(lambda a=a, wt=wt: F.linear(a, wt))
            rows.append({"tokens": tokens, "op": f"{name} bf16", "ms": ms, "tflops": flops / ms / 1e9})
            rows.extend(fp8_rows(tokens, name, a, wt, ref, flops))
        for r in rows[-14:]:
            print(json.dumps(r), flush=True)
    return rows


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization: x [M, K] -> (fp8 [M, K], float32 scales [M, 1])."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_rows(tokens: int, name: str, a: torch.Tensor, wt: torch.Tensor, ref: torch.Tensor, flops: float) -> list[dict]:
    try:
        wq, ws = quantize_rows(wt)  # weights [N, K]: one scale per output channel
        quant = torch.compile(quantize_rows, fullgraph=True)
        aq, as_ = quant(a)

        def mm(aq=aq, as_=as_):
            return torch._scaled_mm(aq, wq.t(), scale_a=as_, scale_b=ws.t(), out_dtype=torch.bfloat16)

        def with_quant():
            q, s = quant(a)
            return mm(q, s)

        out = with_quant()
        return [{"tokens": tokens, "op": f"{name} fp8", "ms": (ms := bench(mm)), "tflops": flops / ms / 1e9},
                {"tokens": tokens, "op": f"{name} fp8 + quantize", "ms": (mq := bench(with_quant)),
                 "tflops": flops / mq / 1e9, "rel_l2_vs_bf16": rel(out, ref)}]
    except Exception as e:  # report, do not stop the other rows
        return [{"tokens": tokens, "op": f"{name} fp8", "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", default="2,3,4,6")
    ap.add_argument("--only", default="attention,cross,products")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels.py times GPU kernels; run it on a machine with a CUDA GPU")
    parts = {"attention": lambda: attention_rows([int(s) for s in args.splits.split(",")]),
             "cross": cross_rows, "products": product_rows}
    unknown = set(args.only.split(",")) - set(parts)
    if unknown:
        raise SystemExit(f"unknown part '{sorted(unknown)[0]}' in --only; use {', '.join(parts)}")
    result = run_header(cudnn=torch.backends.cudnn.version())
    result.update({name: parts[name]() for name in args.only.split(",")})
    write_json(result, args.out)


if __name__ == "__main__":
    main()
