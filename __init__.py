"""Grounded Forcing: minutes-long, interactive video from causal Wan2.1 models in ComfyUI.

ComfyUI loads this folder as a package and calls :func:`comfy_entrypoint`. The nodes live in
``nodes/`` (thin V3 adapters) and the engine in ``gf_core/`` (pure torch, never imports comfy).
"""

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]

WEB_DIRECTORY = "./web"  # the GF Live Sampler panel (served by ComfyUI under /extensions/<this folder>/)


async def comfy_entrypoint():
    """The pack's ComfyExtension (imported here so the package imports without ComfyUI)."""
    from .nodes.extension import GroundedForcingExtension

    return GroundedForcingExtension()
