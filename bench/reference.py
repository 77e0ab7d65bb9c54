"""Run the public research pipelines (Self-Forcing, LongLive 1.0, Infinity-RoPE, Anchor Forcing)
from a checkout, unchanged.

The checkouts are never part of this repository: point ``GF_SELF_FORCING_PATH`` /
``GF_LONGLIVE_PATH`` / ``GF_INFINITY_ROPE_PATH`` / ``GF_ANCHOR_FORCING_PATH`` (or
``--self-forcing`` / ``--longlive`` / ``--infinity-rope`` / ``--anchor-forcing``) at them. Only plumbing around the
reference math is replaced, identically for both sides of every comparison:
- ``diffusers``' ModelMixin/ConfigMixin (config registry only) by ``nn.Module`` and a no-op
  decorator, so no diffusers install is needed;
- ``from_pretrained`` by the 1.3B constructor (weights come from the caller's state dict);
- the umT5 text encoder (and its tokenizer module) and the VAE by pass-throughs (prompt embeddings in, latents out);
- flash-attn (not installed) by PyTorch SDPA in the input dtype (``attention_fn``), the same
  kernel the engine under test uses;
- on a machine without CUDA, the GPU-memory helper modules (import-time ``cuda`` calls);
- Anchor Forcing imports ``matplotlib`` and ``torchvision.io.write_video`` (plots and debug video
  dumps, unused at inference): stubbed when they are not installed (or, for ``write_video``,
  no longer in the installed torchvision).
Each reference runs in a fresh interpreter (all repos use the package names ``wan``/``utils``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch
import torch.nn.functional as F

WAN_13B = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=1536, ffn_dim=8960,
               freq_dim=256, text_dim=4096, out_dim=16, num_heads=12, num_layers=30)


class AttrDict(dict):
    """A config object that works with both ``cfg.key`` and ``**cfg`` (the references use both)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


def sdpa(q, k, v, *args, **kwargs):
    """Unmasked attention over [B, L, H, D] in the input dtype (stands in for flash-attn)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _package(name: str, path: str) -> None:
    """Register ``name`` as a package at ``path`` without running its ``__init__`` (which imports training code)."""
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    sys.modules[name] = mod


def prepare_imports(checkout: str) -> None:
    if not os.path.isdir(os.path.join(checkout, "wan", "modules")):
        raise SystemExit(f"{checkout} is not a Self-Forcing-derived checkout (no wan/modules); fix the path")
    sys.path.insert(0, checkout)
    _package("wan", os.path.join(checkout, "wan"))
    _package("wan.modules", os.path.join(checkout, "wan", "modules"))
    _package("pipeline", os.path.join(checkout, "pipeline"))

    class ModelMixin(torch.nn.Module):
        pass

    class ConfigMixin:
        pass

    _stub("diffusers")
    _stub("diffusers.configuration_utils", ConfigMixin=ConfigMixin, register_to_config=lambda f: f)
    _stub("diffusers.models")
    _stub("diffusers.models.modeling_utils", ModelMixin=ModelMixin)
    # the umT5 encoder and its tokenizer are replaced by precomputed embeddings
    _stub("wan.modules.tokenizers", HuggingfaceTokenizer=None)
    _stub("wan.modules.t5", umt5_xxl=None)
    if not torch.cuda.is_available():
        helpers = dict(gpu=torch.device("cpu"), cpu=torch.device("cpu"), get_cuda_free_memory_gb=lambda *a: 0,
                       DynamicSwapInstaller=None, move_model_to_device_with_memory_preservation=None,
                       log_gpu_memory=lambda *a, **k: None)
        _stub("demo_utils.memory", **helpers)
        _stub("utils.memory", **helpers)
    if importlib.util.find_spec("matplotlib") is None:
        _stub("matplotlib")
        _stub("matplotlib.pyplot")
    if importlib.util.find_spec("torchvision") is None:
        _stub("torchvision")
        _stub("torchvision.io", write_video=None)
    else:
        import torchvision.io

        if not hasattr(torchvision.io, "write_video"):  # removed from recent torchvision releases
            torchvision.io.write_video = None

    attention = importlib.import_module("wan.modules.attention")
    attention.flash_attention = sdpa
    attention.attention = sdpa
    for name in ("wan.modules.model", "wan.modules.causal_model"):
        mod = importlib.import_module(name)
        for fn in ("flash_attention", "attention"):
            if hasattr(mod, fn):
                setattr(mod, fn, sdpa)
    causal = importlib.import_module("wan.modules.causal_model")
    config = dict(WAN_13B)

    def from_pretrained(cls, _path, **kwargs):
        for loader_option in ("low_cpu_mem_usage", "device_map", "ignore_mismatched_sizes"):  # diffusers', not the model's
            kwargs.pop(loader_option, None)
        return cls(**{**config, **kwargs})

    causal.CausalWanModel.from_pretrained = classmethod(from_pretrained)


def set_model_shape(**shape) -> None:
    """Override the constructor shape (the CPU smoke test of this harness uses a 2-block model)."""
    WAN_13B.update(shape)


class FakeTextEncoder(torch.nn.Module):
    """Maps a prompt string to its precomputed embedding [1, 512, 4096]."""

    def __init__(self, table: dict[str, torch.Tensor]):
        super().__init__()
        self.table = table

    def forward(self, text_prompts):
        return {"prompt_embeds": torch.cat([self.table[p] for p in text_prompts])}


class PassThroughVAE(torch.nn.Module):
    def decode_to_pixel(self, latent, use_cache=False):
        return latent


def base_args(**extra) -> AttrDict:
    args = AttrDict(denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True, num_frame_per_block=3,
                    independent_first_frame=False, context_noise=0, model_kwargs=AttrDict(timestep_shift=5.0))
    args.update(extra)
    return args


def build_pipeline(kind: str, state_dict: dict, dtype: torch.dtype, device: str, prompts: dict[str, torch.Tensor],
                   global_sink: bool = True):
    """kind: "self_forcing", "longlive", "longlive_interactive", "infinity_rope" or "anchor_interactive"."""
    wrapper = importlib.import_module("utils.wan_wrapper")
    if kind == "self_forcing":
        args = base_args()
        module = importlib.import_module("pipeline.causal_inference")
        cls = module.CausalInferencePipeline
    elif kind == "infinity_rope":
        # configs/self_forcing_dmd.yaml: local_attn_size 6, sink_size 1; context_noise 0, 3 frames per block
        args = base_args()
        args.model_kwargs.update(local_attn_size=6, sink_size=1)
        cls = importlib.import_module("pipeline.causal_inference").CausalInferencePipeline
    elif kind == "anchor_interactive":
        # configs/interactive_inference.yaml
        args = base_args(global_sink=global_sink, sink_update_ratio=0.0, rope_enhance=True, use_prompt_cache=True)
        args.model_kwargs.update(local_attn_size=12, sink_size=3)
        cls = importlib.import_module("pipeline.interactive_causal_inference").InteractiveCausalInferencePipeline
    else:
        args = base_args(global_sink=global_sink)
        args.model_kwargs.update(local_attn_size=12, sink_size=3)
        name = "pipeline.interactive_causal_inference" if kind == "longlive_interactive" else "pipeline.causal_inference"
        module = importlib.import_module(name)
        cls = module.InteractiveCausalInferencePipeline if kind == "longlive_interactive" else module.CausalInferencePipeline
    generator = wrapper.WanDiffusionWrapper(**args.model_kwargs, is_causal=True)
    missing, unexpected = generator.model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise SystemExit(f"reference model does not take the weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    kwargs = dict(generator=generator, text_encoder=FakeTextEncoder(prompts), vae=PassThroughVAE())
    pipe = cls(args, device, **kwargs)
    pipe.num_transformer_blocks = len(generator.model.blocks)
    return pipe.to(device=device, dtype=dtype)


def infinity_rope_prompt(pipe, prompt_names: list[str], switches: list[int], cuts: list[bool]) -> str:
    """Infinity-RoPE's scene syntax ``"p0[Ds] | p1[Ds#] | p2"`` for prompt switches at ``switches``.

    Durations are in seconds, ``blocks = int(seconds * 16 / (4 * 3))``, so a block is 0.75 s. Every
    boundary is a KV flush; a ``#`` makes it a RoPE cut as well. In ``_parse_scene_durations`` the
    ``#`` of scene i marks the boundary *after* scene i (the README puts it on the scene that starts
    with the cut; the code is what runs), so ``cuts[j]`` goes on scene j.
    """
    block = pipe.num_frame_per_block
    bounds = [0, *switches]
    parts = []
    for j, name in enumerate(prompt_names):
        if j == len(prompt_names) - 1:
            parts.append(name)  # the last scene runs to the end of the noise
            break
        frames = bounds[j + 1] - bounds[j]
        if frames % block:
            raise SystemExit(f"Infinity-RoPE switches only at block boundaries; {switches} are not multiples of {block}")
        seconds = frames // block * 4 * block / pipe.default_fps
        parts.append(f"{name}[{seconds:g}s{'#' if cuts[j] else ''}]")
    text = " | ".join(parts)
    names, blocks, flags = pipe._parse_scene_durations(text)
    expect = [(bounds[j + 1] - bounds[j]) // block for j in range(len(switches))]
    if names != prompt_names or blocks[:-1] != expect or flags[:-1] != list(cuts):
        raise SystemExit(f"scene string {text!r} parses to {names}, {blocks}, {flags}; expected {expect}, {cuts}")
    return text


def run(kind: str, pipe, noise: torch.Tensor, prompt_names: list[str], switches: list[int] | None = None,
        cuts: list[bool] | None = None):
    """Run a reference pipeline; returns latents [B, F, 16, H, W].

    ``cuts`` (Infinity-RoPE only): per switch, whether it is a RoPE cut (else a KV flush)."""
    with torch.no_grad():
        if kind in ("longlive_interactive", "anchor_interactive"):
            _, latents = pipe.inference(noise, text_prompts_list=[[p] for p in prompt_names],
                                        switch_frame_indices=switches, return_latents=True)
        elif kind == "infinity_rope":
            switches = switches or []
            text = infinity_rope_prompt(pipe, prompt_names[:len(switches) + 1], switches, cuts or [False] * len(switches))
            print(f"Infinity-RoPE scene prompt: {text!r}", flush=True)
            _, latents = pipe.inference(noise, text_prompts=[text], return_latents=True)
        else:
            _, latents = pipe.inference(noise, text_prompts=prompt_names[:1], return_latents=True)
    return latents
