"""Test-only ComfyUI nodes for the host tests (never shipped): a fixed random CONDITIONING and an
output node that records what reached it, so a graph can run in ComfyUI's executor without a
text encoder and the test can read the results."""

import torch
from comfy_api.latest import ComfyExtension, io

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
        return [GFTestConditioning, GFTestCapture]


async def comfy_entrypoint() -> TestingExtension:
    return TestingExtension()
