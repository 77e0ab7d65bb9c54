"""Live steering speed: GF Live Sampler's loop (generation + Wan VAE decode + JPEG for the page),
unpaced, against 16 frames/s of playback, and the latency from a prompt sent mid-run to its first frame.

Random full-size Wan2.1-1.3B weights, 832x480, bf16, the grounded memory, a random-weight Wan2.1 VAE
(ComfyUI's module at the Wan2.1 shape) decoding every chunk as it is made. A second thread plays
the page: it sends ``--prompts`` prompts at random moments of the run (APR switches). One command:

    python bench/live_speed.py --comfyui PATH/TO/ComfyUI --out docs/results/live_speed_h200.json

Reported: pixel frames decoded per second over the whole take and after the first chunks
(``steady_fps``, the figure to hold against 16), per chunk the diffusion and the decode time, and per
prompt the seconds from its arrival to its first decoded frame, with the bound they are held to:
two chunk times (generation + decode) plus one chunk's decode. Per chunk too, where anything changed:
graphs compiled, torch.compile's counters and the CUDA allocator's counts, the garbage collector's
seconds, the GCM's replacements and the frames each switch recached; ``--stacks`` adds where the
slowest chunks spent their time (the main thread's Python stack, sampled every 10 ms). ``--tiny``
runs the same logic on a tiny model on the CPU (decode only with ``--comfyui``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import random
import statistics
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import random_wan_vae, run_header, write_json  # noqa: E402

PACKAGE = "grounded_forcing"
PLAYBACK_FPS = 16
WARM_CHUNKS = 4  # chunks left out of the steady rate (first chunks fill the memory; fused ones compile)


def load_pack():
    """The repository as the package ``grounded_forcing`` (nodes/live.py uses relative imports)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    from grounded_forcing import gf_core
    from grounded_forcing.nodes import live

    return gf_core, live


def fake_prompts(count: int, rows: int, text_dim: int) -> list[torch.Tensor]:
    """umT5-like embeddings [1, rows, text_dim]: random rows up to a prompt length, zeros after."""
    out = []
    for i in range(count):
        e = torch.randn(1, rows, text_dim, generator=torch.Generator().manual_seed(100 + i)) * 0.2
        e[:, min(rows, 24 + 16 * i):] = 0
        out.append(e)
    return out


def build(args, gf):
    """(model, size, dtype, device, VAE module or None, decoding module or None)."""
    if args.tiny:
        cfg, dtype, device, size = gf.WanConfig.tiny(), torch.float32, "cpu", (32, 32)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        cfg, dtype, device, size = gf.WanConfig(), torch.bfloat16, "cuda", (480, 832)
    sd = gf.random_state_dict(cfg, seed=1234, dtype=dtype, device=device)
    model = gf.WanModel.from_state_dict(sd, dtype=dtype, device=device)
    del sd
    vae = decoding = None
    if args.comfyui:
        from grounded_forcing.nodes import decoding

        vae = random_wan_vae(args.comfyui, device, dtype)
    return model, cfg, size, dtype, device, vae, decoding


def take(gf, live, model, cfg, size, dtype, device, vae, decoding, args, frames: int, prompt_times: list[float]):
    """One unpaced live take of ``frames`` latent frames; a thread sends a prompt at each fraction of
    ``prompt_times`` (of the expected run, in chunks). Returns the run, its per-chunk clock, the graphs
    compiled at each chunk, its start and end, the page's lag and the bytes sent."""
    height, width = size
    rows = 16 if args.tiny else 512
    embeddings = fake_prompts(len(prompt_times) + 1, rows, cfg.text_dim)
    texts = [f"prompt {i}" for i in range(len(embeddings))]
    session = live.LiveSession(node="bench")
    engine = gf.Session(model, "grounded", gf.RunConfig(height=height, width=width, batch_size=1, seed=0,
                                                        chunk_frames=3, noise_order="chunk", kernels=args.kernels,
                                                        dtype=dtype, device=device))
    decoder = None
    if vae is not None:
        decoder = live.PixelDecoder(decoding.StreamDecoder(vae), lambda x: (x + 1) / 2, torch.device(device), dtype)
    sent_bytes = [0]

    def send(event, data):  # the page: JPEGs are encoded (in the sink's thread) and counted
        sent_bytes[0] += sum(len(f) for f in data.get("frames", []))

    sink = live.FrameSink(send)
    clock: dict[int, float] = {}
    chunks = frames // 3
    rng = random.Random(0)

    def page():
        for k, at in enumerate(prompt_times):
            target = int(at * (chunks - 2))  # room left for the prompt to take effect
            while len(clock) <= target and session.state != "ended":
                time.sleep(0.002)
            if session.state == "ended":
                return
            gaps = sorted(clock.values())
            chunk_s = (gaps[-1] - gaps[-2]) if len(gaps) > 1 else 0.0
            time.sleep(rng.uniform(0, 0.8 * chunk_s))  # somewhere inside the chunk being made
            session.submit(live.parse_command({"session": session.id, "type": "prompt", "text": texts[k + 1]})[1])

    thread = threading.Thread(target=page, daemon=True)
    compiles: dict[int, int] = {}  # chunk -> graphs compiled while it was made (where any were)
    counted: dict[int, dict[str, int]] = {}  # chunk -> compiler and allocator counts that changed while it was made
    profiled: dict[str, list] = {}  # --profile: the profiled chunks' busiest operations
    graphs = [compiled_graphs()]

    collector: dict[int, float] = {}  # chunk -> seconds Python's garbage collector ran while it was made
    collecting = [0.0]

    def on_collect(phase: str, info: dict) -> None:
        if phase == "start":
            collecting[0] = time.perf_counter()
        else:
            collector[len(clock)] = collector.get(len(clock), 0.0) + time.perf_counter() - collecting[0]

    runtime = [runtime_counts()]

    profiler = [None]

    def on_chunk(index: int) -> None:
        clock[index] = time.perf_counter()
        if args.profile and index + 1 == args.profile[0]:  # profile the chunks from the next one on
            profiler[0] = torch.profiler.profile(activities=profile_activities())
            profiler[0].__enter__()
        elif args.profile and index == args.profile[1] and profiler[0] is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            profiler[0].__exit__(None, None, None)
            profiled.update({"chunks": list(args.profile), **profile_tables(profiler[0])})
            profiler[0] = None
        graphs.append(compiled_graphs())
        if graphs[-1] > graphs[-2]:
            compiles[index] = graphs[-1] - graphs[-2]
        runtime.append(runtime_counts())
        changed = {k: n - runtime[-2].get(k, 0) for k, n in runtime[-1].items() if n != runtime[-2].get(k, 0)}
        if changed:
            counted[index] = changed

    run = live.LiveRun(engine, session, lambda text: embeddings[texts.index(text)], frames, 3, decoder=decoder,
                       sink=sink, on_chunk=on_chunk)
    sampler = StackSampler(lambda: len(clock)) if args.stacks else contextlib.nullcontext()
    thread.start()
    gc.callbacks.append(on_collect)
    began = time.perf_counter()
    try:
        with sampler:
            reason = run.run(texts[0])
        run.finish(reason, run.take.script())
    finally:
        gc.callbacks.remove(on_collect)
    ended = time.perf_counter()
    error = sink.close()
    sink_done = time.perf_counter()
    thread.join()
    engine.close()
    if error is not None:
        raise error
    from grounded_forcing.gf_core.wan import folded_rows, padding_start

    folded = {t: folded_rows(padding_start(e)) for t, e in zip(texts, embeddings)}  # text rows each prompt attends
    probes = {"compiles": compiles, "counts": counted, "stacks": sampler if args.stacks else None, "profile": profiled,
              "folded": folded}
    return run, clock, probes, collector, began, ended, sink_done - ended, sent_bytes[0]


class StackSampler:
    """Samples the main thread's Python stack every ``period`` seconds from a second thread: per chunk
    being made, how often each innermost chain of frames was seen. A chunk that takes far longer than
    the others shows where its time went (a wait on the GPU, a kernel build, host work)."""

    def __init__(self, chunk_of, period: float = 0.01, depth: int = 6):
        self.chunk_of, self.period, self.depth = chunk_of, period, depth
        self.main = threading.main_thread().ident
        self.samples: dict[int, dict[str, int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.period):
            frame = sys._current_frames().get(self.main)
            chain = []
            while frame is not None and len(chain) < self.depth:
                code = frame.f_code
                chain.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
                frame = frame.f_back
            counts = self.samples.setdefault(self.chunk_of(), {})
            key = " < ".join(chain)
            counts[key] = counts.get(key, 0) + 1

    def __enter__(self) -> StackSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def top(self, chunk: int, n: int = 8) -> list[tuple[str, int]]:
        counts = self.samples.get(chunk, {})
        return sorted(counts.items(), key=lambda kv: -kv[1])[:n]


def profile_activities() -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def profile_tables(prof, n: int = 20) -> dict[str, list]:
    """The profiled operations with the most host time of their own and the most device time."""
    rows = prof.key_averages()

    def device_us(r) -> float:
        return float(getattr(r, "self_device_time_total", getattr(r, "self_cuda_time_total", 0.0)))

    def row(r) -> dict:
        return {"name": r.key[:120], "calls": r.count, "self_host_ms": round(r.self_cpu_time_total / 1e3, 3),
                "self_device_ms": round(device_us(r) / 1e3, 3)}

    return {"by_host_ms": [row(r) for r in sorted(rows, key=lambda r: -r.self_cpu_time_total)[:n]],
            "by_device_ms": [row(r) for r in sorted(rows, key=lambda r: -device_us(r))[:n]]}


def runtime_counts() -> dict[str, int]:
    """torch.compile's counters (every group) and the CUDA allocator's device allocations, retries and
    segments, flattened: a change while a chunk is made says what the chunk waited for."""
    import torch._dynamo.utils

    out = {f"{group}.{key}": int(n) for group, keys in torch._dynamo.utils.counters.items()
           for key, n in keys.items() if isinstance(n, (int, float))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats = torch.cuda.memory_stats()
        for key in ("num_device_alloc", "num_device_free", "num_alloc_retries", "segment.all.current"):
            out[f"cuda.{key}"] = int(stats.get(key, 0))
    return out


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    import torch._dynamo.utils

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def summarise(run, clock: dict[int, float], probes: dict,
              collector: dict[int, float], began: float, ended: float, sink_lag: float, sent_bytes: int, decode: bool) -> dict:
    events = run.events
    made = [e["live"]["made_s"] for e in events]
    busy = [e["live"]["busy_s"] for e in events]
    decode_s = [b - m for b, m in zip(busy, made)]
    switches = {i for i, e in enumerate(events) if e.get("switch")}
    plain = [i for i in range(WARM_CHUNKS, len(events)) if i not in switches] or list(range(len(events)))
    chunk_s = statistics.median(busy[i] for i in plain)
    chunk_decode_s = statistics.median(decode_s[i] for i in plain)
    pixel = run.pixel_frames_sent if decode else 4 * run.take.latent_frames
    steady = None
    if len(clock) > WARM_CHUNKS + 1:
        first, last = WARM_CHUNKS, max(clock)
        steady_frames = 4 * 3 * (last - first)  # 12 pixel frames per chunk after the first
        steady = steady_frames / (clock[last] - clock[first])
    latencies = [e["live"]["applied"]["latency_s"] for e in events if "applied" in e["live"]]
    bound = 2 * chunk_s + chunk_decode_s
    stacks = {}
    if probes["stacks"] is not None:  # the three slowest chunks to make, a median switch chunk and a median chunk
        slowest = sorted(range(len(made)), key=lambda i: -made[i])[:3]
        by_time = sorted(switches, key=made.__getitem__)
        typical = ([by_time[len(by_time) // 2]] if by_time else []) + [sorted(plain, key=made.__getitem__)[len(plain) // 2]]
        stacks = {str(i): probes["stacks"].top(i) for i in dict.fromkeys(slowest + typical)}
    return {
        "latent_frames": run.take.latent_frames, "chunks": len(events), "pixel_frames": pixel,
        "decode": decode, "seconds": round(ended - began, 3), "fps": round(pixel / (ended - began), 2),
        "steady_fps": None if steady is None else round(steady, 2),
        "steady_over_playback": None if steady is None else round(steady / PLAYBACK_FPS, 3),
        "median_chunk_s": round(chunk_s, 4), "median_diffusion_s": round(statistics.median(made[i] for i in plain), 4),
        "median_decode_s": round(chunk_decode_s, 4), "switch_chunks": sorted(switches),
        "switch_chunk_s": [round(busy[i], 4) for i in sorted(switches)],
        "chunk_diffusion_s": [round(m, 4) for m in made], "chunk_decode_s": [round(d, 4) for d in decode_s],
        "graphs_compiled_at_chunk": {str(i): n for i, n in sorted(probes["compiles"].items())},
        "counts_changed_at_chunk": {str(i): c for i, c in sorted(probes["counts"].items())},
        "gcm_replaced_at_chunk": [i for i, e in enumerate(events) if any(u.get("replace") for u in e.get("gcm_updates", []))],
        "folded_text_rows_at_switch": {str(i): probes["folded"][e["live"]["text"]]
                                       for i, e in enumerate(events) if e.get("switch")},
        "recached_frames_at_switch": {str(i): sum(1 for a in (e["switch"].get("alpha") or {}).values() if a > 0)
                                      for i, e in enumerate(events) if e.get("switch")},
        "garbage_collector_s_at_chunk": {str(i): round(t, 4) for i, t in sorted(collector.items()) if t >= 0.001},
        "prompt_latency_s": latencies, "latency_bound_s": round(bound, 4),
        "latency_within_bound": bool(latencies) and max(latencies) <= bound,
        **({"stacks_at_chunk": stacks} if stacks else {}),
        **({"profile": probes["profile"]} if probes["profile"] else {}),
        "page_bytes": sent_bytes, "page_lag_s": round(sink_lag, 3), "script": run.take.script(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("GF_COMFYUI_PATH"),
                    help="ComfyUI checkout for the Wan VAE module (without it: no decode)")
    ap.add_argument("--frames", type=int, default=240, help="latent frames of the timed take (240 = 60 s)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts the page thread sends during the take")
    ap.add_argument("--kernels", default="auto", choices=("auto", "fused", "eager"))
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (tests the script's logic)")
    ap.add_argument("--stacks", action="store_true",
                    help="sample the main thread's Python stack every 10 ms and report, for the slowest chunks "
                         "and a median one, where their time went")
    ap.add_argument("--profile", type=lambda t: tuple(int(x) for x in t.split(":")), metavar="FIRST:LAST",
                    help="run torch.profiler over chunks FIRST to LAST of the timed take and report their busiest "
                         "operations (the profiler slows those chunks)")
    ap.add_argument("--out", help="JSON file, or a folder to write live_speed.json into")
    args = ap.parse_args(argv)
    gf, live = load_pack()
    model, cfg, size, dtype, device, vae, decoding = build(args, gf)
    times = [(k + 1) / (args.prompts + 1) for k in range(args.prompts)]
    # warm-up: every shape of the take once (memory filling, a switch; fused blocks compile here)
    quiet = argparse.Namespace(**{**vars(args), "stacks": False, "profile": None})  # probes watch the timed take only
    take(gf, live, model, cfg, size, dtype, device, vae, decoding, quiet, min(36, args.frames), [0.5])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    run, clock, probes, collector, began, ended, lag, sent = take(gf, live, model, cfg, size, dtype, device, vae,
                                                                    decoding, args, args.frames, times)
    result = run_header(bench="live_speed", size=f"{size[1]}x{size[0]}", memory="grounded", kernels=args.kernels,
                        tiny=args.tiny, playback_fps=PLAYBACK_FPS,
                        **summarise(run, clock, probes, collector, began, ended, lag, sent, vae is not None))
    if device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out = args.out
    if out and (os.path.isdir(out) or out.endswith(os.sep)):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, "live_speed.json")
    write_json(result, out)
    print(f"{result['pixel_frames']} pixel frames in {result['seconds']:.1f} s: {result['fps']:.1f} fps overall, "
          f"steady {result['steady_fps']} fps against {PLAYBACK_FPS}; chunk {result['median_chunk_s'] * 1e3:.0f} ms "
          f"(decode {result['median_decode_s'] * 1e3:.0f} ms); prompt latency {result['prompt_latency_s']} s, "
          f"bound {result['latency_bound_s']:.3f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
