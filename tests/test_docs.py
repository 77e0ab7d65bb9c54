"""The docs say the current truth: the node reference is what the schemas give, every result file is cited.

The full regeneration check needs a ComfyUI checkout and its Python::

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python -m pytest tests/test_docs.py

Without it that one test is skipped; the others run anywhere.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NODES_MD = REPO / "docs" / "NODES.md"
COMFY = os.environ.get("GF_COMFYUI_PATH")
REGENERATE = "GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python tools/make_node_docs.py"


def _tool():
    spec = importlib.util.spec_from_file_location("make_node_docs", REPO / "tools" / "make_node_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_node_reference_names_every_node_the_code_defines():
    defined = set()
    for path in (REPO / "nodes").glob("*.py"):
        defined |= set(re.findall(r'node_id="(\w+)"', path.read_text(encoding="utf-8")))
    documented = set(re.findall(r"^## .+\n\n`(\w+)`", NODES_MD.read_text(encoding="utf-8"), flags=re.M))
    assert defined, "no node_id found in nodes/"
    assert defined == documented, (
        f"docs/NODES.md is out of date (missing {sorted(defined - documented)}, stale {sorted(documented - defined)}); "
        f"regenerate it: {REGENERATE}"
    )


def test_render_keeps_table_cells_on_one_line_and_long_defaults_below():
    tool = _tool()
    node = {
        "id": "GFExample", "display_name": "GF Example", "category": "Grounded Forcing", "output_node": False,
        "description": "One line\nof text.",
        "inputs": [
            {"name": "script", "type": "STRING", "optional": False, "default": "5s | a\ncut 4s | b",
             "tooltip": "DURATION | PROMPT"},
            {"name": "steps", "type": "INT", "optional": True, "default": 4, "min": 1, "max": 8, "step": 1},
            {"name": "model_name", "type": "COMBO", "optional": False,
             "options": ["none", *tool.folder_placeholder("loras")]},
            {"name": "flag", "type": "BOOLEAN", "optional": False, "default": False},
        ],
        "outputs": [{"name": "out", "type": "LATENT", "tooltip": None}],
    }
    text = tool.render_node(node)
    assert "One line of text." in text
    assert "| `script` | STRING | below |  | DURATION \\| PROMPT |" in text
    assert "```\n5s | a\ncut 4s | b\n```" in text
    assert "| `steps` | INT, optional | 4 | 1 … 8, step 1 |  |" in text
    assert "| `model_name` | COMBO |  | `none`, the files in models/loras |  |" in text
    assert "| `flag` | BOOLEAN | false |" in text
    assert "| `out` | LATENT |  |" in text


def test_every_result_file_is_cited_by_a_doc():
    docs = [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
    text = "\n".join(p.read_text(encoding="utf-8") for p in docs)
    uncited = [p.name for p in sorted((REPO / "docs" / "results").iterdir()) if p.name not in text]
    assert not uncited, f"docs/results files no doc cites (cite them or git rm them): {uncited}"


@pytest.mark.skipif(not COMFY, reason="set GF_COMFYUI_PATH to a ComfyUI checkout (and use its Python) to regenerate "
                                      "docs/NODES.md from the node schemas")
def test_node_reference_is_what_the_schemas_give(tmp_path):
    out = tmp_path / "NODES.md"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "make_node_docs.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "GF_COMFYUI_PATH": COMFY})
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_text(encoding="utf-8") == NODES_MD.read_text(encoding="utf-8"), (
        f"docs/NODES.md differs from the node schemas; regenerate it: {REGENERATE}"
    )
