"""Test-only ComfyUI nodes for the host tests (never shipped): a fixed random CONDITIONING, a small
stand-in for the umT5 text encoder, and an output node that records what reached it, so graphs
run in ComfyUI's executor on a CPU and the test can read the results."""

import zlib

import torch
from comfy_api.latest import ComfyExtension, io

TEXT_ROWS = 512
TEXT_DIM = 4096

CAPTURED: dict = {}


class GFTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFTestConditioning",
            category="Grounded Forcing/testing",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Seed of the random embedding."),
                io.Int.Input("rows", default=512, min=1, max=2048, tooltip="Token rows of the embedding."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed: int, rows: int) -> io.NodeOutput:
        g = torch.Generator().manual_seed(seed)
        return io.NodeOutput([[torch.randn(1, rows, 4096, generator=g), {"pooled_output": None}]])


class TinyTextEncoder:
    """Core's CLIP interface as CLIPTextEncode and GF Prompt Timeline use it (``tokenize``,
    ``encode_from_tokens_scheduled``): a text's embedding [1, 512, 4096] is a fixed random
    function of its UTF-8 bytes, one row per byte plus an end row, zeros after (as umT5 pads)."""

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))[: TEXT_ROWS - 1]

    def encode_from_tokens_scheduled(self, tokens: list[int]) -> list:
        g = torch.Generator().manual_seed(zlib.crc32(bytes(tokens)))
        rows = torch.zeros(1, TEXT_ROWS, TEXT_DIM)
        rows[0, : len(tokens) + 1] = torch.randn(len(tokens) + 1, TEXT_DIM, generator=g)
        return [[rows, {"pooled_output": None}]]


class GFTestTextEncoder(io.ComfyNode):
    """Takes CLIPLoader's place in the workflow runs: umT5-XXL (5.7 B parameters) does not fit a CPU test."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFTestTextEncoder",
            category="Grounded Forcing/testing",
            inputs=[
                io.String.Input("clip_name", tooltip="The text encoder file CLIPLoader would load (unused)."),
                io.String.Input("type", tooltip="CLIPLoader's model type (unused)."),
                io.String.Input("device", optional=True, tooltip="CLIPLoader's device (unused)."),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, clip_name: str, type: str, device: str = "default") -> io.NodeOutput:
        return io.NodeOutput(TinyTextEncoder())


class GFTestCapture(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFTestCapture",
            category="Grounded Forcing/testing",
            inputs=[
                io.String.Input("name", default="run", tooltip="Key under which the inputs are recorded."),
                io.Latent.Input("latent", optional=True, tooltip="A LATENT to record."),
                io.String.Input("events", optional=True, force_input=True, tooltip="A STRING to record."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, name: str, latent=None, events=None) -> io.NodeOutput:
        CAPTURED[name] = {"latent": latent, "events": events}
        return io.NodeOutput()


class TestingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [GFTestConditioning, GFTestTextEncoder, GFTestCapture]


async def comfy_entrypoint() -> TestingExtension:
    return TestingExtension()
