"""GF Sampler and core's own AR video sampler, same weights, same run, on each ComfyUI tree given.

Random full-size Wan2.1-T2V-1.3B weights are written once as a safetensors file whose metadata
carries ``causal_ar`` (so a core that has it loads them as its ``CausalWanModel``). Then, for
every tree, in a process of its own started the way the tree's main.py starts (on a GPU:
comfy-aimdo initialised before torch is imported and models loaded for dynamic VRAM, where the
tree does so by default), the file is loaded with core's loader as Load Diffusion Model loads it
and two samplers make the same number of latent frames of one prompt:

- ``gf_sampler_grounded``: GF Sampler with the grounded memory, DR-RoPE and fused blocks "on";
- ``core_ar_video``: core's SamplerARVideo (3 frames per block) through its custom-sampler path
  (SamplerCustom, cfg 1), at the same four sigmas; skipped where core has no ``ar_video`` sampler.

Each is timed after a short warm-up run (compiling, for the fused blocks). Neither goes through
``comfy_api`` (the node schemas), which needs PyAV: GF Sampler's steps are taken one by one, as its
``execute`` takes them (the host tests check that the latents are the node's), and core's AR nodes
are the ``ksampler("ar_video")`` and ``sample_custom`` calls they make.

    python bench/comfy_versions.py --comfyui /path/ComfyUI-0.33.0 --comfyui /path/ComfyUI-0.3.64 --out result.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Only the standard library at import time: a tree's main.py initialises comfy-aimdo before torch
# is imported, and a tree's process here does the same (torch is imported after boot()).

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "grounded_forcing"
CAUSAL_AR_METADATA = {"config": json.dumps({"transformer": {"causal_ar": True}})}
SIZES = {  # Wan2.1-T2V-1.3B, and a tiny model of the same layout for checking the logic on a CPU
    "full": {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30, "text_dim": 4096},
    "tiny": {"dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2, "text_dim": 4096},
}
AR_FRAMES_PER_BLOCK = 3


def boot(tree: str, cpu: bool) -> bool:
    """Import ``tree`` as its main.py starts (``--cpu`` where asked, its other options at their
    defaults); returns whether models load for dynamic VRAM. Call before torch is imported."""
    sys.path.insert(0, tree)
    import comfy.cli_args as cli

    cli.args.cpu = cpu
    import utils.extra_config  # noqa: F401  (the tree's utils package, before comfy/ shadows it)

    args = cli.args
    if not (hasattr(cli, "enables_dynamic_vram") and cli.enables_dynamic_vram()):
        return False
    import comfy_aimdo.control

    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024**3)
    try:
        comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
    except TypeError:  # an older comfy-aimdo
        comfy_aimdo.control.init()
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not mm.is_nvidia():
        return False
    extra = int(args.vram_headroom * 1024**3)
    try:
        ready = comfy_aimdo.control.init_devices((d.index, extra) for d in mm.get_all_torch_devices())
    except TypeError:  # an older comfy-aimdo
        ready = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
    if ready:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return bool(ready)


def load_pack():
    """This repository as the package ``grounded_forcing``, as ComfyUI loads a custom node folder."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def write_weights(path: str, size: str, seed: int = 0) -> None:
    """Random Wan2.1-T2V weights of ``size`` (bf16, drawn on the CPU) with ``causal_ar`` metadata."""
    import torch
    from safetensors.torch import save_file

    load_pack()
    from grounded_forcing import gf_core as gf

    sd = gf.random_state_dict(gf.WanConfig(**SIZES[size]), seed=seed, dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=CAUSAL_AR_METADATA)


def prompt_embedding(tokens: int = 24, seed: int = 1):
    """A fixed umT5-like embedding [1, 512, 4096]: ``tokens`` rows, zeros after (as umT5 pads)."""
    import torch

    rows = torch.zeros(1, 512, 4096)
    rows[0, :tokens] = torch.randn(tokens, 4096, generator=torch.Generator().manual_seed(seed))
    return rows


def gf_sampler(model, embedding, frames: int, width: int, height: int, seed: int, fused: str):
    """GF Sampler's ``execute`` (nodes/sampler_nodes.py) step by step, less its check that the run
    fits the GPU, for one prompt of ``frames`` latent frames, grounded memory, DR-RoPE as the MODEL
    carries it (default: dr_rope, float32). Returns (raw latents [1, 16, F, H/8, W/8], whether fused
    blocks ran)."""
    import comfy.model_management as mm

    load_pack()
    from grounded_forcing.gf_core import grounded
    from grounded_forcing.gf_core.kernels import resolve
    from grounded_forcing.nodes import comfy_model, policy, prompts, sampling

    segments = prompts.add_segment(None, embedding, frames)
    module = model.model.diffusion_model
    memory, rope_kind = policy.apply_rope(grounded(), policy.rope_options(model.model_options))
    device, dtype = model.load_device, model.model.manual_cast_dtype or model.model.get_dtype()
    config = sampling.run_config(width, height, seed, 1, "reference", fused, rope_kind, device, dtype)
    cfg = sampling.check(module, segments, memory, config)
    need = sampling.memory_estimate(cfg, memory, config, dtype, weight_bytes=model.model_size())
    mm.load_models_gpu([model], memory_required=need.cache + need.activations)
    if resolve(config.kernels, device, rope_kind) == "fused":
        module = comfy_model.plain_wan(model, device, dtype)
    try:
        result = sampling.sample(module, segments, memory, config)
    finally:
        mm.soft_empty_cache()
    return result.latents, result.header["run"]["fused"]


def has_core_ar_sampler() -> bool:
    import comfy.k_diffusion.sampling

    return hasattr(comfy.k_diffusion.sampling, "sample_ar_video")


def core_ar_sampler(model, embedding, frames: int, width: int, height: int, seed: int):
    """Core's EmptyARVideoLatent + SamplerARVideo (3 frames per block) + SamplerCustom (noise on,
    cfg 1), at the four sigmas of the few-step models. Returns raw latents [1, 16, F, H/8, W/8]."""
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import torch

    load_pack()
    from grounded_forcing.gf_core.sampler import Schedule

    latent = torch.zeros([1, 16, frames, height // 8, width // 8], device=mm.intermediate_device())
    sampler = comfy.samplers.ksampler("ar_video", {"num_frame_per_block": AR_FRAMES_PER_BLOCK})
    sigmas = torch.cat([Schedule.few_step().sigmas, torch.zeros(1)])
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = [[embedding, {}]]
    return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent,
                                      disable_pbar=True, seed=seed)


class DevicePeak:
    """The most device memory in use (every process, torch's allocator or not) while the block runs,
    polled every 20 ms; 0 without CUDA."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()
        if self.cuda:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.02)

    def __exit__(self, *_):
        self._stop.set()
        if self.cuda:
            self._thread.join()


def timed(run, *args) -> dict:
    """Run ``run(*args)`` once, synchronised: seconds, torch's peak allocation and the device peak (GiB)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with DevicePeak() as device:
        began = time.perf_counter()
        out = run(*args)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
    return {"out": out, "seconds": seconds,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "device_peak_gib": device.peak / 2**30}


def measure(model_path: str, frames: int, width: int, height: int, warmup_frames: int, fused: str,
            seed: int = 0) -> list[dict]:
    """Load the file with core's loader (Load Diffusion Model, weight dtype default) and time both
    samplers: one warm-up run of ``warmup_frames``, then ``frames`` latent frames."""
    import comfy.sd

    load_pack()
    from grounded_forcing.gf_core import pixel_frames

    model = comfy.sd.load_diffusion_model(model_path)
    embedding = prompt_embedding()
    rows = []
    samplers = {
        "gf_sampler_grounded": lambda n: gf_sampler(model, embedding, n, width, height, seed, fused),
        "core_ar_video": lambda n: (core_ar_sampler(model, embedding, n, width, height, seed), False),
    }
    for name, run in samplers.items():
        row = {"sampler": name, "model_class": type(model.model.diffusion_model).__name__, "latent_frames": frames,
               "pixel_frames": pixel_frames(frames), "width": width, "height": height}
        if name == "core_ar_video":
            row["frames_per_block"] = AR_FRAMES_PER_BLOCK
            if not has_core_ar_sampler():
                rows.append({**row, "skipped": "this ComfyUI has no ar_video sampler (SamplerARVideo)"})
                continue
        try:
            warm = timed(run, warmup_frames)
            result = timed(run, frames)
        except Exception as e:  # one failing sampler does not stop the other's row
            rows.append({**row, "error": f"{type(e).__name__}: {e}"})
            continue
        latents, ran_fused = result.pop("out")
        warm.pop("out")
        rows.append({**row, "fused": ran_fused, "warmup_latent_frames": warmup_frames,
                     "warmup_seconds": warm["seconds"], **result,
                     "pixel_fps": pixel_frames(frames) / result["seconds"], "latent_shape": list(latents.shape),
                     "finite": bool(latents.isfinite().all())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tree_version(tree: str) -> str | None:
    """The version a tree states in its comfyui_version.py, for the record only."""
    path = Path(tree) / "comfyui_version.py"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def run_one(args) -> dict:
    """Inside a tree's own process: boot it, measure, return its part of the result."""
    dynamic = boot(args.one, args.cpu)
    rows = measure(args.weights, args.frames, args.width, args.height, args.warmup_frames, args.fused)
    return {"comfyui": Path(args.one).name, "version": tree_version(args.one), "dynamic_vram": dynamic, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", action="append", default=[], help="a ComfyUI tree (repeat for several)")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--frames", type=int, default=120, help="latent frames of each timed run")
    ap.add_argument("--warmup-frames", type=int, default=12,
                    help="latent frames of the warm-up run: 4 chunks, by which the memory is full")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--fused", choices=["on", "off", "auto"], default="on")
    ap.add_argument("--out", help="JSON result file")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a tree's own process
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        part = run_one(args)
        Path(args.out).write_text(json.dumps(part))
        return
    if not args.comfyui:
        raise SystemExit("pass --comfyui PATH (once per ComfyUI tree)")
    import torch
    from report import run_header, write_json

    cpu = not torch.cuda.is_available()
    trees = []
    with tempfile.TemporaryDirectory(prefix="gf_comfy_versions_") as work:
        weights = os.path.join(work, "wan21_t2v_1.3b_random_causal_ar.safetensors")
        write_weights(weights, args.size)
        for i, tree in enumerate(os.path.abspath(t) for t in args.comfyui):
            part = os.path.join(work, f"tree_{i}.json")
            command = [sys.executable, str(Path(__file__).resolve()), "--one", tree, "--weights", weights, "--out", part,
                       "--size", args.size, "--frames", str(args.frames), "--warmup-frames", str(args.warmup_frames),
                       "--width", str(args.width), "--height", str(args.height), "--fused", args.fused]
            print(f"== {tree}", flush=True)
            done = subprocess.run(command + (["--cpu"] if cpu else []), cwd=tree)
            if done.returncode != 0:
                trees.append({"comfyui": Path(tree).name, "version": tree_version(tree),
                              "error": f"exit {done.returncode}"})
                continue
            trees.append(json.loads(Path(part).read_text()))
    result = run_header(size=args.size, trees=trees)
    print(json.dumps(result, indent=1))
    write_json(result, args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py
    main()
