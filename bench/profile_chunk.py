"""Where the time of a steady-state chunk goes, on one GPU.

Prints, in one run: the device's measured ceilings (a bf16 matrix product, a device-to-device
copy); the attention of a steady-state chunk (4,680 queries, 18,720 keys, 12 heads of 128) per
SDPA backend; the matrix products of one block at 4,680 tokens; and a kernel profile of two
steady-state chunks of the engine (random full-size 1.3B weights, 832x480, bf16), grouped into
matrix products, attention and the rest, against the chunk's wall time, with the time the GPU
sat idle between kernels. Also (``--only graph``) a steady chunk's four denoising forwards as
launched and as replayed from one CUDA graph, and with ``--inductor NAME=VALUE`` any of it
compiled with other Inductor options.

    python bench/profile_chunk.py --policy grounded --fused both --out docs/results/profile.json
    python bench/profile_chunk.py --fused on --only engine --inductor triton.enable_pdl=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import run_header, write_json  # noqa: E402


def bench(fn, repeat: int = 20) -> float:
    """Median milliseconds of ``fn`` over ``repeat`` runs, timed with CUDA events after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = bench(lambda: a @ b)
    src = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    cp = bench(lambda: dst.copy_(src))
    return {"matmul_tflops": 2 * 8192**3 / mm / 1e9, "copy_tb_s": 2 * src.numel() * 2 / cp / 1e9}


def attention_kernels(queries: int = 4680, keys: int = 18720) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 12, queries, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 12, keys, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    flops = 4 * queries * keys * 12 * 128
    out = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            out[name] = {"ms": ms, "tflops": flops / ms / 1e9}
        except RuntimeError as e:
            out[name] = {"error": str(e).splitlines()[0]}
    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    out["auto"] = {"ms": ms, "tflops": flops / ms / 1e9}
    return out


def block_matmuls(tokens: int = 4680) -> dict:
    x = torch.randn(tokens, 1536, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(tokens, 8960, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1536, 1536, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(8960, 1536, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(1536, 8960, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, fn, flops in (("qkvo 1536x1536", lambda: F.linear(x, w), 2 * tokens * 1536 * 1536),
                            ("ffn up 1536x8960", lambda: F.linear(x, w1), 2 * tokens * 1536 * 8960),
                            ("ffn down 8960x1536", lambda: F.linear(h, w2), 2 * tokens * 1536 * 8960)):
        ms = bench(fn)
        out[name] = {"ms": ms, "tflops": flops / ms / 1e9}
    return out


def kernel_group(name: str) -> str:
    n = name.lower()
    if n.startswith("triton_"):  # compiled elementwise kernels name the ops they fused, SDPA's too
        return "other"
    if any(s in n for s in ("fmha", "flash", "attention", "attn", "cudnn")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul")):
        return "matmul"
    return "other"


def engine_profile(policy: str, compile_blocks: bool) -> dict:
    from parity import prompts

    import gf_core as gf

    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    model = _model()
    prompt = next(iter(prompts(1).values()))
    options = {"kernels": "fused"} if compile_blocks else {}
    began = time.perf_counter()
    list(gf.stream(model, [gf.Segment(prompt, 24)], policy, seed=0, dtype=dtype, **options))  # compiles, if fused
    warmup = time.perf_counter() - began
    run = gf.stream(model, [gf.Segment(prompt, 60)], policy, seed=0, dtype=dtype, **options)
    walls = []
    last = time.perf_counter()
    profiled = None
    for chunk in run:
        now = time.perf_counter()
        walls.append(now - last)
        if chunk.index == 9:
            torch.cuda.synchronize()
            profiled = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
            profiled.__enter__()
            began = time.perf_counter()
        if chunk.index == 11:
            torch.cuda.synchronize()
            profiled_wall = time.perf_counter() - began
            profiled.__exit__(None, None, None)
        last = time.perf_counter()
        if chunk.index == 15:
            break
    groups, kernels = _kernels(profiled, chunks=2)
    return {
        "idle": _idle(profiled, chunks=2),
        "policy": policy, "fused": compile_blocks, "warmup_s": warmup,
        "median_chunk_ms_6_15": 1e3 * statistics.median(walls[6:16]),
        "profiled_chunk_wall_ms": 1e3 * profiled_wall / 2,
        "device_ms_per_chunk": groups,
        "device_total_ms_per_chunk": sum(groups.values()),
        "top_kernels_ms_per_chunk": kernels[:30],
    }


def graph_profile(policy: str) -> dict:
    """A steady chunk's four denoising forwards (fused blocks), launched one kernel at a time as the
    engine does and replayed from one CUDA graph: GPU milliseconds of each (CUDA events around the
    four forwards, so a GPU waiting for the host counts), the memory the graph keeps, and whether
    its result is bit-equal to the launched one."""
    from parity import prompts

    import gf_core as gf
    from gf_core.sampler import Schedule, renoise, to_x0
    from gf_core.wan import forward_chunk

    model = _model()
    prompt = next(iter(prompts(1).values()))
    session = gf.Session(model, policy, segments=[gf.Segment(prompt, 60)], seed=0, dtype=torch.bfloat16,
                         kernels="fused")
    for chunk in session.play():
        if chunk.index == 8:
            break
    mem, text, rope, kernels = session.memory, session._text, session.rope, session.kernels
    plan = mem.plan(30, 3)
    source = mem.source(plan, rope, "float32", session.grid_hw)
    table = rope.frequencies
    memo = {}

    def frequencies(index, *args, **kwargs):  # built once, before capturing (a capture may not copy from the host)
        key = (tuple(index), args, tuple(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = table(index, *args, **kwargs)
        return memo[key]

    rope.frequencies = frequencies
    schedule = Schedule.few_step()
    timesteps, sigmas = schedule.timesteps.cuda(), schedule.sigmas.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    x_in = torch.randn(1, 16, 3, 60, 104, device="cuda", dtype=torch.bfloat16, generator=g)
    eps = [torch.randn_like(x_in) for _ in range(3)]

    def steps() -> torch.Tensor:
        x = x_in
        for i in range(len(schedule)):
            velocity = forward_chunk(model, x, timesteps[i].expand(1), text, source, plan.query_index, rope,
                                     "float32", kernels)
            x0 = to_x0(x, velocity, sigmas[i])
            if i + 1 < len(schedule):
                x = renoise(x0, eps[i], sigmas[i + 1])
        return x0

    with torch.inference_mode():
        ref = steps().clone()
        launched = bench(steps, repeat=10)
        result = {"policy": policy, "launched_ms": launched}
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                steps()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # as the capture does first, so the difference is the graph's pool
            reserved = torch.cuda.memory_reserved()
            with torch.cuda.graph(graph):
                out = steps()
            graph.replay()
            torch.cuda.synchronize()
            result.update(graph_ms=bench(graph.replay, repeat=10), bit_equal=bool(torch.equal(out, ref)),
                          graph_reserved_bytes=torch.cuda.memory_reserved() - reserved)
        except Exception as e:  # report why a capture failed
            result["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return result


def _model():
    import gf_core as gf

    sd = gf.random_state_dict(gf.WanConfig(), seed=1234, dtype=torch.bfloat16, device="cuda")
    model = gf.WanModel.from_state_dict(sd, dtype=torch.bfloat16, device="cuda")
    del sd
    return model


def _idle(profiled, chunks: int = 1) -> dict:
    """Where the GPU ran nothing between two kernels or copies of a profile: milliseconds per chunk
    by the length of the gap, and the longest gaps with the kernels on either side."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in profiled.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps = []
    end, before = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append((start - end, before[:60], name[:60]))
        if stop >= end:
            end, before = stop, name
    bins = {"under_2us": 0.0, "2_to_10us": 0.0, "10_to_100us": 0.0, "over_100us": 0.0}
    for us, *_ in gaps:
        key = "under_2us" if us < 2 else "2_to_10us" if us < 10 else "10_to_100us" if us < 100 else "over_100us"
        bins[key] += us / 1e3 / chunks
    gaps.sort(reverse=True)
    return {"ms_per_chunk": sum(g[0] for g in gaps) / 1e3 / chunks, "gaps_per_chunk": len(gaps) / chunks,
            "ms_per_chunk_by_gap": bins, "longest_us": [[round(g[0], 1), g[1], g[2]] for g in gaps[:12]]}


def _kernels(profiled, chunks: int = 1) -> tuple[dict[str, float], list[tuple[float, int, str]]]:
    """GPU milliseconds per chunk by kernel group, and (ms, calls, name) per kernel, largest first,
    of a profile that covered ``chunks`` chunks."""
    groups: dict[str, float] = {}
    kernels = []
    for evt in profiled.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        if evt.device_type == torch.autograd.DeviceType.CUDA and t > 0:
            ms = t / 1e3 / chunks
            groups[kernel_group(evt.key)] = groups.get(kernel_group(evt.key), 0.0) + ms
            kernels.append((ms, evt.count // chunks, evt.key[:110]))
    kernels.sort(reverse=True)
    return groups, kernels


def switch_profile(model, fused: bool) -> dict:
    """Kernel profile of the chunk before an APR switch and of the switch's chunk (``grounded``)."""
    from parity import prompts

    import gf_core as gf

    p = list(prompts(2).values())
    segs = [gf.Segment(p[0], 60), gf.Segment(p[1], 12, gf.Transition("apr"))]
    list(gf.stream(model, [gf.Segment(p[0], 24), gf.Segment(p[1], 6, gf.Transition("apr"))], "grounded",
                   seed=0, kernels="fused" if fused else "eager", overlap=False))  # compiles every shape
    out = {"fused": fused}
    run = gf.stream(model, segs, "grounded", seed=0, kernels="fused" if fused else "eager", overlap=False)
    profiled, began = None, 0.0
    for chunk in run:  # chunk 19 is the last of the first prompt, chunk 20 starts with the switch
        if profiled is not None:
            torch.cuda.synchronize()
            wall = 1e3 * (time.perf_counter() - began)
            profiled.__exit__(None, None, None)
            groups, kernels = _kernels(profiled)
            out["before" if chunk.index == 19 else "switch"] = {"wall_ms": wall, "device_ms": groups,
                                                                "top_kernels_ms": kernels[:40]}
            profiled = None
        if chunk.index == 20:
            break
        if chunk.index in (18, 19):
            torch.cuda.synchronize()
            profiled = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            profiled.__enter__()
            began = time.perf_counter()
    run.close()
    return out


def host_syncs(model, fused: bool) -> dict:
    """Where the host waits for the GPU in a warm ``grounded`` run with one APR switch: the lines of
    code that made PyTorch synchronise (its sync debug mode), with counts, over 20 chunks."""
    import warnings

    from parity import prompts

    import gf_core as gf

    p = list(prompts(2).values())
    segs = [gf.Segment(p[0], 30), gf.Segment(p[1], 30, gf.Transition("apr"))]
    list(gf.stream(model, segs, "grounded", seed=0, kernels="fused" if fused else "eager"))  # warm
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            chunks = sum(1 for _ in gf.stream(model, segs, "grounded", seed=0, kernels="fused" if fused else "eager"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}"
            counts[where] = counts.get(where, 0) + 1
    return {"fused": fused, "chunks": chunks, "syncs": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="grounded")
    ap.add_argument("--fused", default="off", help="engine with fused (torch.compile'd) blocks: off, on, or both")
    ap.add_argument("--only", default="all", help="all, or a comma list of: kernels, engine, switch, syncs, graph")
    ap.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                    help="an Inductor option to compile with, e.g. triton.multi_kernel=1 (repeatable)")
    ap.add_argument("--out")
    args = ap.parse_args()
    info = run_header(inductor=args.inductor)
    for option in args.inductor:
        from torch._inductor import config as inductor_config

        name, _, value = option.partition("=")
        *parents, leaf = name.split(".")
        section = inductor_config
        for part in parents:
            section = getattr(section, part)
        setattr(section, leaf, type(getattr(section, leaf))(int(value)))
    parts = {"kernels", "engine", "switch", "syncs", "graph"} if args.only == "all" else set(args.only.split(","))
    if "graph" in parts:
        info["graph"] = graph_profile(args.policy)
        print("graph", json.dumps(info["graph"]), flush=True)
        torch.cuda.empty_cache()
    flags = {"off": [False], "on": [True], "both": [False, True]}[args.fused]
    if parts & {"switch", "syncs"}:
        model = _model()
        for flag in flags:
            if "syncs" in parts:
                r = host_syncs(model, flag)
                info.setdefault("syncs", []).append(r)
                print("host syncs", json.dumps(r), flush=True)
            if "switch" in parts:
                r = switch_profile(model, flag)
                info.setdefault("switch", []).append(r)
                print("chunk before the switch", round(r["before"]["wall_ms"], 1), "ms wall",
                      json.dumps({k: round(v, 1) for k, v in r["before"]["device_ms"].items()}), flush=True)
                print("  switch chunk", round(r["switch"]["wall_ms"], 1), "ms wall",
                      json.dumps({k: round(v, 1) for k, v in r["switch"]["device_ms"].items()}), flush=True)
                for ms, count, name in r["switch"]["top_kernels_ms"][:30]:
                    print(f"  {ms:8.2f} ms {count:6d}x  {name}", flush=True)
        del model
        torch.cuda.empty_cache()
    if "kernels" not in parts and "engine" not in parts:
        write_json(info, args.out)
        return
    info["ceilings"] = ceilings()
    print("ceilings", json.dumps(info["ceilings"]), flush=True)
    info["attention"] = attention_kernels()
    print("attention 4680 x 18720", json.dumps(info["attention"]), flush=True)
    info["matmuls"] = block_matmuls()
    print("matmuls", json.dumps(info["matmuls"]), flush=True)
    torch.cuda.empty_cache()
    info["engine"] = []
    for flag in {"off": [False], "on": [True], "both": [False, True]}[args.fused]:
        r = engine_profile(args.policy, flag)
        info["engine"].append(r)
        print(f"engine {args.policy} fused={flag} (warm-up {r['warmup_s']:.0f} s): median chunk {r['median_chunk_ms_6_15']:.1f} ms, profiled wall "
              f"{r['profiled_chunk_wall_ms']:.1f} ms, device {r['device_total_ms_per_chunk']:.1f} ms "
              f"{json.dumps({k: round(v, 1) for k, v in r['device_ms_per_chunk'].items()})}", flush=True)
        for ms, count, name in r["top_kernels_ms_per_chunk"][:25]:
            print(f"  {ms:8.2f} ms {count:6d}x  {name}", flush=True)
    write_json(info, args.out)


if __name__ == "__main__":
    main()
