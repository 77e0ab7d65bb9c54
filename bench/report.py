"""What every bench script's JSON result starts with, and writing it."""

from __future__ import annotations

import json

import torch


def run_header(**extra) -> dict:
    """The device and PyTorch a result was measured with, then ``extra``."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, **extra}


def write_json(result: dict, path: str | None) -> None:
    """Write ``result`` as indented JSON to ``path`` (nothing without a path)."""
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
