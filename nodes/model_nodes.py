"""Loading a causal Wan model as a standard MODEL, and the DR-RoPE patch on a MODEL."""

from __future__ import annotations

import logging

import comfy.sd
import folder_paths
from comfy_api.latest import io

from ..gf_core.checkpoints import CheckpointError, describe
from ..gf_core.errors import BadInput
from . import loading
from .policy import ROPE_LAYOUTS, ROPE_MODES, ROPE_PRECISIONS, RopeOptions, with_rope
from .sockets import CATEGORY


class GFLoadCausalWanModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFLoadCausalWanModel",
            display_name="GF Load Causal Wan Model",
            category=CATEGORY,
            description="Loads a chunk-wise causal Wan2.1 T2V model (Self-Forcing, LongLive, Anchor Forcing, or a "
                        "ComfyUI repack) from models/diffusion_models, optionally merging a LoRA, as a standard MODEL.",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="The checkpoint in models/diffusion_models: a research .pt "
                                       "(self_forcing_dmd.pt, longlive_base.pt) or a .safetensors with Wan keys."),
                io.Combo.Input("weights", options=list(loading.WEIGHTS), default="ema",
                               tooltip="Which generator of a training checkpoint to use: the EMA copy (what the "
                                       "papers sample with) or the raw generator. Falls back to what the file has."),
                io.Combo.Input("lora_name", options=[loading.NO_LORA] + folder_paths.get_filename_list("loras"),
                               default=loading.NO_LORA,
                               tooltip="An optional LoRA from models/loras merged into the weights (LongLive's "
                                       "lora.pt, Anchor Forcing's LoRA, musubi-tuner / kohya Wan LoRAs; PEFT, "
                                       "kohya or diffusers names)."),
                io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Scale of the LoRA update (1 = as trained)."),
                io.Combo.Input("weight_dtype", options=list(loading.weight_dtypes()), default="bf16",
                               tooltip="Storage dtype of the weights. bf16 is what the research models run in; "
                                       "default lets ComfyUI pick for your GPU (often fp16); fp8 halves the "
                                       "weight memory at some quality cost."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model_name: str, weights: str, lora_name: str, lora_strength: float,
                weight_dtype: str) -> io.NodeOutput:
        model_path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        lora_path = None
        if lora_name != loading.NO_LORA:
            lora_path = folder_paths.get_full_path_or_raise("loras", lora_name)
        options = loading.model_options(weight_dtype)
        try:
            sd = loading.read_state_dict(model_path, weights, lora_path, lora_strength)
        except CheckpointError as e:
            raise CheckpointError(str(e)) from None  # one sentence, no loader internals in the traceback
        logging.info("GF Load Causal Wan Model: %s from %s%s", describe(sd), model_name,
                     f" + {lora_name} x {lora_strength}" if lora_path else "")
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
        if model is None:
            raise BadInput(f"ComfyUI did not recognise {model_name} as a Wan2.1 model; update ComfyUI")
        return io.NodeOutput(model)


class GFDRRoPE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFDRRoPE",
            display_name="GF DR-RoPE",
            category=CATEGORY,
            description="Sets how the GF Sampler numbers frames for the temporal RoPE: Dual-Reference RoPE keeps "
                        "every index inside the trained range, absolute lets indices grow with the video.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to patch (it is cloned; the input stays unchanged)."),
                io.Combo.Input("mode", options=list(ROPE_MODES), default="dr_rope",
                               tooltip="dr_rope: anchors at 0, recent frames and the chunk in a block below the "
                                       "range. absolute: frame index (as LongLive; fails past 1024 latent frames)."),
                io.Int.Input("rope_range", default=21, min=2, max=1024,
                             tooltip="DR-RoPE: every temporal index stays below this; 21 = the 5 s the models "
                                     "were trained on. Must hold every cached frame plus the chunk."),
                io.Combo.Input("layout", options=list(ROPE_LAYOUTS), default="pinned_end",
                               tooltip="DR-RoPE: pinned_end puts the chunk at the end of the range (18-20), "
                                       "after_gcm numbers the recent frames right after the anchors."),
                io.Combo.Input("precision", options=list(ROPE_PRECISIONS), default="float32",
                               tooltip="float32 rotations are fast; complex128 rotates in float64 as the research "
                                       "code does (slower, for parity checks)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, mode: str, rope_range: int, layout: str, precision: str) -> io.NodeOutput:
        rope = RopeOptions(mode=mode, rope_range=rope_range, layout=layout, precision=precision)
        patched = model.clone()
        with_rope(patched.model_options, rope)
        return io.NodeOutput(patched)
