"""GF Live Sampler: steer a streaming video from the page and keep the take as a timeline script.

The node runs the take (``live.LiveRun``) in the prompt-worker thread; the page talks to it through
two routes this module adds to ComfyUI's server:

- ``GET /gf_live/session``: the running take (id, node, state, size, frames made), so that a page
  opened or reloaded mid-take attaches to it;
- ``POST /gf_live/command``: one JSON message (``live.parse_command``); replies 200 with the
  command's number, or 4xx with ``{"error": one sentence}``.

Frames go to every open page over ComfyUI's websocket (``PromptServer.send_sync``), as base64 JPEGs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import uuid

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import InputImpl, io

from .. import gf_core as gf
from ..gf_core.config import check_fits
from ..gf_core.errors import BadInput
from ..gf_core.kernels import compiled
from ..gf_core.latents import to_raw
from . import live, prompts, sampling
from .decoding import Mp4Writer, StreamDecoder, is_wan21_vae
from .policy import CHUNK_FRAMES, apply_rope, rope_options
from .sampler_nodes import MAX_SIZE, _available_bytes, _compute_dtype
from .sockets import CATEGORY, Memory

log = logging.getLogger(__name__)

EXAMPLE_PROMPT = ("A red fox trots through a snowy pine forest at sunrise, soft golden light, tracking shot, "
                  "cinematic, highly detailed")


class GFLiveSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFLiveSampler",
            display_name="GF Live Sampler",
            category=CATEGORY,
            description="Streams a video you steer while it plays: the node's panel plays the frames as they are "
                        "made; type the next prompt (Enter), Cut, Pause or Stop there. Each change takes effect at "
                        "the next chunk boundary. Outputs the take's latents, its video and its GF Prompt Timeline "
                        "script, which GF Prompt Timeline + GF Sampler (same model, memory and seed, noise order "
                        "chunk) replay bit for bit.",
            inputs=[
                io.Model.Input("model", tooltip="A causal Wan2.1 T2V MODEL (GF Load Causal Wan Model or Load "
                                                "Diffusion Model), optionally patched by GF DR-RoPE."),
                Memory.Input("memory", tooltip="The long-video memory: GF Dual Memory (Grounded Forcing) or any other GF memory node."),
                io.Clip.Input("clip", tooltip="The Wan text encoder (umT5-XXL, CLIP Loader type 'wan'): encodes the "
                                              "first prompt and every prompt typed in the panel."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The Wan2.1 VAE (wan_2.1_vae.safetensors): decodes each chunk as it is made, its "
                                     "causal cache carried from chunk to chunk. Left empty, the panel and the video "
                                     "show the latent preview projection instead: exact for the toy world, a rough "
                                     "but fast preview of a real Wan video."),
                io.String.Input("prompt", multiline=True, default=EXAMPLE_PROMPT,
                                tooltip="The prompt the take starts with."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of all the noise of the take (drawn chunk by chunk)."),
                io.Int.Input("width", default=832, min=16, max=MAX_SIZE, step=16,
                             tooltip="Frame width in pixels, a multiple of 16 (the models were trained at 832)."),
                io.Int.Input("height", default=480, min=16, max=MAX_SIZE, step=16,
                             tooltip="Frame height in pixels, a multiple of 16 (the models were trained at 480)."),
                io.Float.Input("max_seconds", default=60.0, min=0.75, max=3600.0, step=0.75,
                               tooltip="The take ends here unless Stop comes first (16 fps; rounded up to whole "
                                       "chunks of 3 latent frames)."),
                io.Boolean.Input("realtime", default=True,
                                 tooltip="on: generation waits while it is more than a second of video ahead of "
                                         "playback, so a typed prompt shows soon; off: as fast as it can (the "
                                         "page's buffer grows, and with it the wait to see a change)."),
                io.Combo.Input("fused", options=list(sampling.FUSED_CHOICES), default="auto", optional=True,
                               tooltip="As in GF Sampler: compile each DiT block into one fused graph (auto: where "
                                       "it can run). Replay the take with the same setting."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The take's raw Wan latents [1, 16, F, H/8, W/8]."),
                io.Video.Output(display_name="video", tooltip="The take as decoded while it ran (16 fps)."),
                io.String.Output(display_name="script",
                                 tooltip="The take as a GF Prompt Timeline script: one line per prompt with its "
                                         "duration in latent frames and its transition."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> str:
        return uuid.uuid4().hex  # every Run is a new take

    @classmethod
    def execute(cls, model, memory, clip, prompt: str, seed: int, width: int, height: int, max_seconds: float,
                realtime: bool, vae=None, fused: str = "auto") -> io.NodeOutput:
        if clip is None:
            raise BadInput("the clip input is empty; connect a CLIP Loader with type 'wan' (umT5-XXL)")
        if vae is not None and not is_wan21_vae(vae.first_stage_model):
            raise BadInput("GF Live Sampler decodes with the Wan2.1 VAE (wan_2.1_vae.safetensors); connect it "
                                "to the vae input, or leave it empty for the latent preview")
        text = live.clean_text(prompt)
        clip.tokenize(text)  # a text encoder that refuses the prompt (the toy world's) says so before any work
        max_frames = live.max_latent_frames(max_seconds, CHUNK_FRAMES)
        module = model.model.diffusion_model
        memory, rope_kind = apply_rope(memory, rope_options(model.model_options))
        device, dtype = model.load_device, _compute_dtype(model.model)
        # the chunks stay on the device for the decode; the take keeps a host copy of each
        config = dataclasses.replace(sampling.run_config(width, height, seed, 1, "chunk", fused, rope_kind, device,
                                                         dtype), output_device=None)
        cfg = sampling.check_model(module)
        longest = (gf.Segment(torch.zeros(1, 1, cfg.text_dim), max_frames),)  # the prompts come later
        sampling.check(module, longest, memory, config)
        need = sampling.memory_estimate(cfg, memory, config, dtype, weight_bytes=model.model_size())
        if device.type == "cuda":
            check_fits(need, _available_bytes(device), offloadable_weights=True)
        decode_bytes = 0 if vae is None else vae.memory_used_decode((1, 16, 1, height // 8, width // 8), vae.vae_dtype)

        def load() -> None:
            mm.load_models_gpu([model] + ([] if vae is None else [vae.patcher]),
                               memory_required=need.cache + need.activations + decode_bytes)

        def encode(words: str):
            embedding = prompts.prompt_embedding(clip.encode_from_tokens_scheduled(clip.tokenize(words)))
            load()  # the text encoder may have moved the model off the GPU
            return embedding

        session = live.LiveSession(cls.hidden.unique_id, {"fps": prompts.FPS, "width": width, "height": height,
                                                          "max_latent_frames": max_frames, "prompt": text})
        mp4 = Mp4Writer(_temp_video_path(), width, height, prompts.FPS)
        sink = live.FrameSink(_page_sender(), write=lambda frames: mp4.write(frames.float() / 255))
        engine = run = None
        live.SESSIONS.start(session)
        try:
            engine = gf.Session(module, memory, config)
            load()
            pbar = comfy.utils.ProgressBar(max_frames // CHUNK_FRAMES)
            decoder = live.PreviewDecoder() if vae is None else live.PixelDecoder(
                StreamDecoder(vae.first_stage_model), vae.process_output, vae.device, vae.vae_dtype)
            run = live.LiveRun(engine, session, encode, max_frames, CHUNK_FRAMES, decoder=decoder, sink=sink,
                               pacer=live.Pacer(prompts.FPS) if realtime else None,
                               interrupted=mm.throw_exception_if_processing_interrupted,
                               on_chunk=lambda index: pbar.update_absolute(index + 1))
            reason = run.run(text)
            script = run.take.script(_header(seed, width, height, memory.name, engine))
            run.finish(reason, script)
        except BaseException:
            _keep_partial(run, mp4, sink, _header(seed, width, height, memory.name, engine))
            raise
        finally:
            if engine is not None:
                engine.close()
            live.SESSIONS.finish(session)
            mm.soft_empty_cache()
        _close(sink, mp4)
        return io.NodeOutput({"samples": to_raw(run.latents)}, InputImpl.VideoFromFile(mp4.path), script)


def _header(seed: int, width: int, height: int, memory: str, engine) -> list[str]:
    """The script's comment lines: what GF Sampler needs besides the script to replay the take."""
    fused = "on" if engine is not None and compiled(engine.kernels) else "off"
    return [f"GF Live take: seed {seed}, {width}x{height}, memory {memory}, fused {fused}. Replay it with GF Prompt "
            "Timeline + GF Sampler: the same model, memory, seed, size and fused setting, noise_order chunk."]


def _keep_partial(run: live.LiveRun | None, mp4: Mp4Writer, sink: live.FrameSink, header: list[str]) -> None:
    """A cancelled or failed take keeps what it finished: its latents (core's .latent), its script
    and its video, in ComfyUI's output folder under grounded_forcing/. The video holds the frames
    decoded before the cancel (ComfyUI's layers may stop a decode mid-chunk; the latents are
    whole). Never raises: the error that ended the take is the one to report."""
    made = run is not None and run.chunks
    script = run.take.script(header) if made else ""
    try:
        if run is not None:
            run.finish("cancelled", script, flush=False)
    except Exception as e:  # the take's files matter more than the page's last message
        log.warning("Grounded Forcing: the live page was not told that the take ended: %s", e)
    try:
        _close(sink, mp4)
        if not made:
            if os.path.exists(mp4.path):
                os.remove(mp4.path)
            return
        folder = os.path.join(folder_paths.get_output_directory(), "grounded_forcing")
        where = sampling.write_partial(folder, to_raw(run.latents), run.events)
        stem = os.path.splitext(where)[0]
        with open(stem + ".txt", "w", encoding="utf-8") as fh:
            fh.write(script)
        if os.path.exists(mp4.path):
            os.replace(mp4.path, stem + ".mp4")
        log.warning("Grounded Forcing: the live take stopped after %d latent frames; its latents, script and video "
                    "were saved as %s (.latent, .txt, .mp4)", run.take.latent_frames, stem)
    except Exception as e:
        log.warning("Grounded Forcing: the finished part of the live take could not be saved: %s", e)


def _close(sink: live.FrameSink, mp4: Mp4Writer) -> None:
    error = sink.close()
    if error is not None:
        log.warning("Grounded Forcing: the live take's frames did not all reach the page or its video: %s", error)
    mp4.close()


def _temp_video_path() -> str:
    folder = os.path.join(folder_paths.get_temp_directory(), "grounded_forcing")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"live_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:8]}.mp4")


def _prompt_server():
    """ComfyUI's running PromptServer, or None (the pack imported without a server, as in tests)."""
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def _page_sender():
    """send(event, data) to every open page, or None without a server."""
    server = _prompt_server()
    if server is None:
        return None
    return lambda event, data: server.send_sync(event, data)


def add_routes() -> None:
    """Add the live routes to ComfyUI's server (once; nothing without a server)."""
    server = _prompt_server()
    if server is None or getattr(server, "_gf_live_routes", False):
        return
    from aiohttp import web

    def refuse(status: int, message: str):
        return web.json_response({"error": message}, status=status)

    @server.routes.get("/gf_live/session")
    async def get_session(request):
        session = live.SESSIONS.current()
        return web.json_response(session.snapshot() if session is not None else {"session": None})

    @server.routes.post("/gf_live/command")
    async def post_command(request):
        if request.content_length is None:
            return refuse(411, "the message has no Content-Length; send it as a JSON body")
        if request.content_length > live.MAX_BODY_BYTES:
            return refuse(413, f"the message is {request.content_length} bytes, more than {live.MAX_BODY_BYTES}; "
                               f"prompts are at most {live.MAX_TEXT_CHARS} characters")
        raw = await request.content.read(live.MAX_BODY_BYTES + 1)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return refuse(400, "the message is not JSON; send {\"session\": ..., \"type\": ...}")
        try:
            return web.json_response(live.SESSIONS.submit(body))
        except live.Refused as e:
            return refuse(e.status, e.message)

    server._gf_live_routes = True


add_routes()
