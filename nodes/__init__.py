"""ComfyUI nodes of Grounded Forcing: thin V3 adapters over ``gf_core``.

Two kinds of modules, so that the plain logic is testable without ComfyUI:

- comfy-free logic (``loading``, ``policy``, ``prompts``, ``sampling``, ``decoding``): plain
  functions the nodes call; they import torch and ``gf_core`` only.
- V3 adapters (``*_nodes.py``, ``sockets``, ``extension``): schemas and ``execute`` methods;
  with ``comfy_model`` (a MODEL's weights as plain modules), the only modules that import ComfyUI.
"""
