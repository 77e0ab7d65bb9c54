"""The toy world in ComfyUI, with nothing to download: its small trained model, its prompts, a
timeline of them and a decode of its latents into IMAGE frames (gf_core.toyworld)."""

from __future__ import annotations

import comfy.sd
from comfy_api.latest import io

from ..gf_core import toyworld as tw
from . import prompts
from .sockets import CATEGORY, Segments

TOY_CATEGORY = f"{CATEGORY}/toy world"
EXAMPLE_SCRIPT = """\
# one sentence per line: DURATION [TRANSITION] | SENTENCE (a "cut to" sentence cuts by itself)
3s | a big red circle moves right on the grass
3s | then it bounces
3s | cut to the snow where it moves left
3s | then a small blue square enters
3s | then it moves right"""
FORMS_HELP = "; ".join(tw.FORMS)


class GFToyWorldModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFToyWorldModel",
            display_name="GF Toy World Model",
            category=TOY_CATEGORY,
            description="The small Wan2.1-architecture model shipped with the pack, trained on the toy world "
                        "(256x256 pixels, shapes on simple scenes): the whole pack runs with it before any Wan "
                        "model is downloaded. Sample it with GF Sampler at width and height 256.",
            inputs=[],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        sd = tw.load_state_dict()
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={})
        if model is None:
            raise RuntimeError("ComfyUI did not recognise the toy world model as a Wan2.1 model; update ComfyUI")
        return io.NodeOutput(model)


class GFToyWorldPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFToyWorldPrompt",
            display_name="GF Toy World Prompt",
            category=TOY_CATEGORY,
            description="A toy-world sentence as the CONDITIONING GF Prompt Segment takes (one word vector per "
                        "word, as umT5 gives one per token).",
            inputs=[
                io.String.Input("text", default="a big red circle bounces on the grass",
                                tooltip=f"A sentence in one of these forms: {FORMS_HELP}. Words: "
                                        f"{', '.join(tw.VOCABULARY)}."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text: str) -> io.NodeOutput:
        return io.NodeOutput([[tw.embed(text), {}]])


class ToyTextEncoder:
    """The toy world's text encoder behind a CLIP socket: core's CLIP interface as CLIP Text Encode,
    GF Prompt Timeline and GF Live Sampler use it (``tokenize``, ``encode_from_tokens_scheduled``).
    A sentence's embedding is one word vector per word from the table shipped with the toy model;
    ``tokenize`` refuses a sentence outside the toy world's forms or vocabulary in one sentence."""

    def __init__(self, words: tw.Words):
        self.words = words

    def tokenize(self, text: str, **_) -> str:
        tw.parse(text)  # raises BadInput naming the word or form it does not know
        return text

    def encode_from_tokens_scheduled(self, tokens: str, **_) -> list:
        return [[self.words.embed(tokens), {"pooled_output": None}]]


class GFToyWorldTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFToyWorldTextEncoder",
            display_name="GF Toy World Text Encoder",
            category=TOY_CATEGORY,
            description="The toy world's text encoder as a CLIP: connect it where a Wan text encoder goes (CLIP "
                        "Text Encode, GF Prompt Timeline, GF Live Sampler) to type toy-world sentences. Only "
                        "the toy world's words work with it, and only with GF Toy World Model.",
            inputs=[],
            outputs=[io.Clip.Output(display_name="clip")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(ToyTextEncoder(tw.load_words()))


class GFToyWorldTimeline(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFToyWorldTimeline",
            display_name="GF Toy World Timeline",
            category=TOY_CATEGORY,
            description="A toy-world script, one sentence per line, as GF Sampler segments: the subject moves, "
                        "prompt switches change what it does, cuts change the scene and keep the subject.",
            inputs=[
                io.String.Input("script", multiline=True, default=EXAMPLE_SCRIPT,
                                tooltip="One line per sentence: a duration (3s, 2.5s, 12f = latent frames), an "
                                        "optional transition (apr, apr(0.8), apr(0.8, 6), hard, none, cut), '|', "
                                        f"the sentence. A 'cut to' sentence cuts unless told otherwise. Forms: "
                                        f"{FORMS_HELP}. Lines starting with # are comments."),
            ],
            outputs=[Segments.Output(display_name="segments")],
        )

    @classmethod
    def execute(cls, script: str) -> io.NodeOutput:
        lines = prompts.parse_script(script)
        story = tw.play([(line.text, line.frames) for line in lines])
        return io.NodeOutput(tuple(story.segments(tw.load_words(), [line.transition for line in lines])))


class GFToyWorldDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFToyWorldDecode",
            display_name="GF Toy World Decode",
            category=TOY_CATEGORY,
            description="Turns toy-world latents into IMAGE frames through the fixed linear map the toy world is "
                        "made with (the Wan2.1 latent-to-RGB preview projection), 8x8 pixels per latent pixel. "
                        "No VAE needed; for real Wan latents it is only a rough preview.",
            inputs=[
                io.Latent.Input("samples", tooltip="Raw Wan latents [B, 16, F, H/8, W/8] from GF Sampler."),
                io.Combo.Input("frames", options=["16 fps", "one per latent frame"], default="16 fps",
                               tooltip="16 fps: as many frames as the Wan VAE would decode (1 + 4 (F - 1)), each "
                                       "latent frame held for 4; one per latent frame: F frames (4 fps)."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, samples, frames: str) -> io.NodeOutput:
        from ..gf_core.latents import to_normalised

        latents = samples["samples"]
        if latents.ndim != 5 or latents.shape[1] != 16:
            raise ValueError(f"the latent has shape {list(latents.shape)}; GF Toy World Decode takes Wan2.1 video "
                             "latents [B, 16, F, H, W]")
        rgb = tw.video_frames(to_normalised(latents.float()), pixel_rate=frames == "16 fps")
        return io.NodeOutput(rgb.flatten(0, 1).cpu())
