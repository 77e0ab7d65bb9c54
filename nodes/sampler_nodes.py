"""The GF Sampler node: streams a long video chunk by chunk through a MODEL's Wan module tree."""

from __future__ import annotations

import os

import comfy.model_management as mm
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io

from ..gf_core.config import check_fits
from ..gf_core.kernels import resolve
from . import comfy_model, sampling
from .policy import apply_rope, rope_options
from .sockets import CATEGORY, Memory, Segments

MAX_SIZE = 4096


def _compute_dtype(base_model):
    """The dtype the layers compute in: the manual-cast dtype for fp8 (or other stored) weights."""
    return base_model.manual_cast_dtype or base_model.get_dtype()


class GFSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFSampler",
            display_name="GF Sampler",
            category=CATEGORY,
            description="Generates the video chunk by chunk (3 latent frames, 4 steps each) under the chosen "
                        "memory, switching prompts at segment boundaries. Outputs raw Wan latents for VAE Decode "
                        "or GF Stream Decode, and a JSON-lines log of every chunk.",
            inputs=[
                io.Model.Input("model", tooltip="A causal Wan2.1 T2V MODEL (GF Load Causal Wan Model or Load "
                                                "Diffusion Model), optionally patched by GF DR-RoPE."),
                Memory.Input("memory", tooltip="The long-video memory: GF Dual Memory (Grounded Forcing) or any other GF memory node."),
                Segments.Input("segments", tooltip="The prompts in order, from GF Prompt Segment or GF Prompt "
                                                   "Timeline."),
                io.Int.Input("width", default=832, min=16, max=MAX_SIZE, step=16,
                             tooltip="Frame width in pixels, a multiple of 16 (the models were trained at 832)."),
                io.Int.Input("height", default=480, min=16, max=MAX_SIZE, step=16,
                             tooltip="Frame height in pixels, a multiple of 16 (the models were trained at 480)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of all the noise of the video."),
                io.Int.Input("batch_size", default=1, min=1, max=16,
                             tooltip="Videos made side by side with the same prompts (memory grows with it); "
                                     "above 1 the grounded memory needs gcm_update 'frozen'."),
                io.Combo.Input("noise_order", options=list(sampling.NOISE_ORDERS), default="reference",
                               tooltip="reference: draw the whole video's initial noise first, as the research code "
                                       "does (same seed, same video). chunk: draw it per chunk (nothing grows with "
                                       "the length; a different video for the same seed)."),
                io.Combo.Input("fused", options=list(sampling.FUSED_CHOICES), default="auto", optional=True,
                               tooltip="Compile each DiT block into one fused graph (torch.compile): faster on a "
                                       "GPU after some seconds of compiling in the first run (docs/PERF.md); the "
                                       "video differs by rounding only. auto: where it can run (an NVIDIA GPU with "
                                       "Triton, GF DR-RoPE precision float32), and uncompiled if compiling fails; "
                                       "on: always (an error says what is missing); off: never."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="Raw Wan latents [B, 16, F, H/8, W/8]."),
                io.String.Output(display_name="events", tooltip="JSON lines: the run, then one line per chunk "
                                                                "(memory, RoPE indices, switches, anchor updates)."),
            ],
        )

    @classmethod
    def execute(cls, model, memory, segments, width: int, height: int, seed: int, batch_size: int,
                noise_order: str, fused: str = "auto") -> io.NodeOutput:
        module = model.model.diffusion_model
        memory, rope_kind = apply_rope(memory, rope_options(model.model_options))
        device, dtype = model.load_device, _compute_dtype(model.model)
        config = sampling.run_config(width, height, seed, batch_size, noise_order, fused, rope_kind, device, dtype)
        cfg = sampling.check(module, segments, memory, config)
        need = sampling.memory_estimate(cfg, memory, config, dtype, weight_bytes=model.model_size())
        if device.type == "cuda":  # ComfyUI streams weights that do not fit, so they need not fit
            check_fits(need, _available_bytes(device), offloadable_weights=True)
        mm.load_models_gpu([model], memory_required=need.cache + need.activations)
        if resolve(config.kernels, device, rope_kind) == "fused":  # compiled blocks run plain modules:
            module = comfy_model.plain_wan(model, device, dtype)  # core's layers may not trace (comfy_model)
        previewer = latent_preview.get_previewer(device, model.model.latent_format)
        pbar = comfy.utils.ProgressBar(sampling.chunk_count(segments))

        def on_chunk(index, total, chunk):
            preview = None
            if previewer is not None:
                preview = previewer.decode_latent_to_preview_image("JPEG", chunk.latents[:, :, -1:])
            pbar.update_absolute(index + 1, total, preview)

        def keep_partial(latents, events):
            return sampling.write_partial(os.path.join(folder_paths.get_output_directory(), "grounded_forcing"),
                                          latents, events)

        try:
            result = sampling.sample(module, segments, memory, config, on_chunk=on_chunk,
                                     between_chunks=mm.throw_exception_if_processing_interrupted,
                                     keep_partial=keep_partial)
        finally:
            mm.soft_empty_cache()
        return io.NodeOutput({"samples": result.latents}, result.log)


def _available_bytes(device) -> int:
    """GPU memory free on ``device`` plus what ComfyUI's loaded models hold there (it unloads them as needed)."""
    held = sum(m.model_loaded_memory() for m in mm.current_loaded_models if getattr(m, "device", None) == device)
    return mm.get_free_memory(device) + held
