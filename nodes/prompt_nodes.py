"""Prompt segments in a graph: chainable segments, transitions, shot cuts and a timeline script."""

from __future__ import annotations

from comfy_api.latest import io

from ..gf_core.errors import BadInput
from . import prompts
from .sockets import CATEGORY, Segments, Transition

EXAMPLE_SCRIPT = """\
# one segment per line: DURATION [TRANSITION] | PROMPT
5s | a red fox trots through a snowy pine forest, morning light, tracking shot
+5s apr(0.8, 6) | the fox stops and looks up as snow starts to fall
cut 5s | a close-up of snowflakes landing on a frozen lake"""


class GFPromptSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFPromptSegment",
            display_name="GF Prompt Segment",
            category=CATEGORY,
            description="One prompt held for a duration. Chain segments through 'previous' to make an interactive "
                        "video; a switch takes effect at the next 3-latent-frame chunk boundary.",
            inputs=[
                io.Conditioning.Input("conditioning",
                                      tooltip="The prompt, from CLIP Text Encode with the Wan umT5 text encoder "
                                              "(first 512 rows are used)."),
                io.Float.Input("duration", default=5.0, min=0.25, max=float(prompts.MAX_VIDEO_FRAMES), step=0.25,
                               tooltip="How long this prompt runs, in the unit below (a whole video lasts at "
                                       f"most {prompts.MAX_VIDEO_SECONDS} s)."),
                io.Combo.Input("unit", options=list(prompts.UNITS), default="seconds",
                               tooltip="seconds (16 fps; 1 s = 4 latent frames, at least 3 latent frames) or "
                                       "latent frames (a whole number, at least 3)."),
                Segments.Input("previous", optional=True,
                               tooltip="The segments that come before this one (leave empty for the first)."),
                Transition.Input("transition", optional=True,
                                 tooltip="How this segment starts (GF APR Transition or GF Cut); empty = the "
                                         "memory policy's default switch."),
            ],
            outputs=[Segments.Output(display_name="segments")],
        )

    @classmethod
    def execute(cls, conditioning, duration: float, unit: str, previous=None, transition=None) -> io.NodeOutput:
        frames = prompts.latent_frames(duration, unit)
        embedding = prompts.prompt_embedding(conditioning)
        return io.NodeOutput(prompts.add_segment(previous, embedding, frames, transition))


class GFAPRTransition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFAPRTransition",
            display_name="GF APR Transition",
            category=CATEGORY,
            description="How the cache follows a prompt switch: Adaptive Prompt Recache blends the cached frames "
                        "toward the new prompt by their distance to the switch.",
            inputs=[
                io.Combo.Input("mode", options=list(prompts.TRANSITION_MODES), default="apr",
                               tooltip="apr: proximity-weighted blend (smooth). hard: recache everything under the new "
                                       "prompt (fast change). none: keep the cache (slow drift)."),
                io.Float.Input("alpha_max", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="apr: the largest blend weight, given to the frames nearest the switch."),
                io.Float.Input("d_window", default=0.0, min=0.0, max=float(prompts.MAX_D_WINDOW), step=1.0,
                               tooltip="apr: frames at least this many latent frames before the switch keep their "
                                       "cache; 0 = the memory's LTM size (as WINDOW 0 in a timeline's apr(ALPHA, "
                                       "WINDOW))."),
            ],
            outputs=[Transition.Output(display_name="transition")],
        )

    @classmethod
    def execute(cls, mode: str, alpha_max: float, d_window: float) -> io.NodeOutput:
        return io.NodeOutput(prompts.make_transition(mode, alpha_max, d_window))


class GFCut(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFCut",
            display_name="GF Cut",
            category=CATEGORY,
            description="A shot cut: the next segment starts a new shot. The recent-frame memory is dropped, the "
                        "anchors (GCM) stay, so characters and style carry over.",
            inputs=[],
            outputs=[Transition.Output(display_name="transition")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(prompts.cut())


class GFPromptTimeline(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFPromptTimeline",
            display_name="GF Prompt Timeline",
            category=CATEGORY,
            description="A whole timeline as text, one segment per line: 'DURATION [TRANSITION] | PROMPT', e.g. "
                        "'5s | a cat walks', '+4s apr(0.8, 6) | the cat runs', 'cut 6s | a new scene'.",
            inputs=[
                io.Clip.Input("clip", tooltip="The Wan text encoder (umT5-XXL, CLIP Loader type 'wan')."),
                io.String.Input("script", multiline=True, default=EXAMPLE_SCRIPT,
                                tooltip="One segment per line: a duration (5s, 4.5s, 20f = latent frames), an "
                                        "optional transition (apr, apr(0.8), apr(0.8, 6), hard, none, cut), '|', "
                                        "the prompt. Lines starting with # are comments."),
            ],
            outputs=[Segments.Output(display_name="segments")],
        )

    @classmethod
    def execute(cls, clip, script: str) -> io.NodeOutput:
        if clip is None:
            raise BadInput("the clip input is empty; connect a CLIP Loader with type 'wan' (umT5-XXL)")
        segments = prompts.timeline(script, lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text)))
        return io.NodeOutput(segments)
