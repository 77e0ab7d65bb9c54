"""Test-only ComfyUI node for the live tests (never shipped): a text encoder with ComfyUI's CLIP
interface (``tokenize`` / ``encode_from_tokens_scheduled``) that maps each text to a fixed random
[1, 8, 4096] embedding, so a real server can encode typed prompts without umT5-XXL's weights."""

import hashlib

import torch
from comfy_api.latest import ComfyExtension, io


class HashTextEncoder:
    """Same text, same embedding: the seed is the text's SHA-256."""

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        seed = int.from_bytes(hashlib.sha256(tokens.encode("utf-8")).digest()[:8], "little")
        embedding = torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(seed))
        return [[embedding, {"pooled_output": None}]]


class GFTestTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GFTestTextEncoder",
            category="Grounded Forcing/testing",
            inputs=[],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(HashTextEncoder())


class LiveTestingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [GFTestTextEncoder]


async def comfy_entrypoint() -> LiveTestingExtension:
    return LiveTestingExtension()
