"""The GF Event Timeline node: GF Sampler's event log drawn as a picture (an IMAGE, shown on the node)."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io, ui

from . import event_plot
from .sockets import CATEGORY


def image_tensor(picture: event_plot.Picture) -> torch.Tensor:
    """The picture as a ComfyUI IMAGE: [1, H, W, 3] float32 in [0, 1]."""
    pixels = np.asarray(picture.image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]


class GFEventTimeline(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFEventTimeline",
            display_name="GF Event Timeline",
            category=CATEGORY,
            description="Draws GF Sampler's event log as a timeline: which frames every memory region holds over "
                        "the video's chunks, the RoPE indices, prompt switches with their per-frame blend weights, "
                        "cuts, GCM replacements (importance, redundancy) and evictions. Long runs are aggregated "
                        "(several chunks per pixel column); short runs are numbered frame by frame.",
            inputs=[
                io.String.Input("events", force_input=True,
                                tooltip="The events output of GF Sampler (JSON lines: the run, then one line per "
                                        "chunk)."),
                io.Int.Input("width", default=event_plot.DEFAULT_WIDTH, min=event_plot.MIN_WIDTH,
                             max=event_plot.MAX_WIDTH, step=16,
                             tooltip="Picture width in pixels; the height follows from the memory's regions."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The timeline picture [1, H, W, 3].")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, events: str, width: int = event_plot.DEFAULT_WIDTH) -> io.NodeOutput:
        image = image_tensor(event_plot.draw(events, width))
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
