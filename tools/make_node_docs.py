"""Writes docs/NODES.md from the pack's node schemas, so the node reference cannot drift from the code.

It imports the pack inside a ComfyUI checkout, asks the extension for its node list (what ComfyUI
registers), and renders each node's V3 schema: id, display name, description, inputs with their
type, default, range or options and tooltip, and outputs. Run it with that ComfyUI's Python after
adding or changing a node:

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python tools/make_node_docs.py

``--out PATH`` writes elsewhere (tests/test_docs.py compares that with the committed file).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "grounded_forcing"  # the repository root's package name here (as in tests/conftest.py)
NUMBER_TYPES = {"INT", "FLOAT"}
LONG_DEFAULT = 60  # characters: longer or multi-line defaults are shown below the table

HEADER = """\
# Node reference

Generated from the node schemas by `tools/make_node_docs.py`; do not edit by hand. The same
text is in each node's tooltips in ComfyUI.

Units: Wan makes 16 pixel frames per second and 4 pixel frames per latent frame, so 1 s = 4
latent frames; the sampler works in chunks of 3 latent frames (0.75 s), and F latent frames
decode to 1 + 4 (F - 1) pixel frames. A prompt switch takes effect at the first chunk boundary
at or after the requested time.
"""


class FolderListing(str):
    """The option list of a combo that lists a models folder, as the doc shows it."""


def folder_placeholder(folder: str) -> list[str]:
    """Stands in for ``folder_paths.get_filename_list``: the doc names the folder, not this machine's files."""
    return [FolderListing(f"the files in models/{folder}")]


def load_nodes(comfy_path: str) -> list[type]:
    """The node classes the pack's extension registers, imported inside the ComfyUI checkout at ``comfy_path``."""
    sys.path.insert(0, comfy_path)
    import comfy.cli_args as cli

    cli.args.cpu = True
    import folder_paths

    folder_paths.get_filename_list = folder_placeholder
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    extension = asyncio.run(sys.modules[PACKAGE].comfy_entrypoint())
    return list(asyncio.run(extension.get_node_list()))


def describe_node(cls: type) -> dict[str, Any]:
    """The documented facts of one node, read from its V3 schema (plain data, no ComfyUI objects)."""
    schema = cls.define_schema()
    inputs = []
    for top in schema.inputs:
        nested = top.get_all() if hasattr(top, "get_all") else [top]
        for inp in nested:
            name = inp.id if inp is top else f"{top.id}.{inp.id}"
            info = inp.as_dict()
            inputs.append({
                "name": name,
                "type": str(inp.get_io_type()),
                "optional": bool(getattr(inp, "optional", False)),
                **{key: info[key] for key in ("default", "min", "max", "step", "options", "multiline",
                                              "control_after_generate", "tooltip") if info.get(key) is not None},
            })
    outputs = [{"name": o.display_name or o.id, "type": str(o.get_io_type()), "tooltip": o.tooltip}
               for o in schema.outputs]
    return {"id": schema.node_id, "display_name": schema.display_name or schema.node_id,
            "category": schema.category, "description": schema.description or "",
            "output_node": bool(schema.is_output_node), "inputs": inputs, "outputs": outputs}


def cell(text: Any) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def value(v: Any) -> str:
    if isinstance(v, FolderListing):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"`{v}`" if isinstance(v, str) else str(v)


def allowed(inp: dict[str, Any]) -> str:
    """The range (numbers) or the options (combos) of an input."""
    if "options" in inp:
        return ", ".join(value(o) for o in inp["options"])
    if inp["type"] in NUMBER_TYPES and ("min" in inp or "max" in inp):
        span = f"{inp.get('min', '')} … {inp.get('max', '')}"
        return span + (f", step {inp['step']}" if "step" in inp else "")
    return ""


def render_node(node: dict[str, Any]) -> str:
    lines = [f"## {node['display_name']}", "", f"`{node['id']}`" + (" (output node)" if node["output_node"] else ""),
             ""]
    if node["description"]:
        lines += [" ".join(node["description"].split()), ""]
    long_defaults = []
    if node["inputs"]:
        lines += ["| input | type | default | range / options | meaning |", "| --- | --- | --- | --- | --- |"]
        for inp in node["inputs"]:
            default = ""
            if "default" in inp:
                text = str(inp["default"])
                if "\n" in text or len(text) > LONG_DEFAULT:
                    long_defaults.append((inp["name"], text))
                    default = "below"
                else:
                    default = value(inp["default"])
            kind = inp["type"] + (", optional" if inp["optional"] else "")
            meaning = inp.get("tooltip", "")
            if inp.get("control_after_generate"):
                meaning += " (with control after generate)"
            lines.append(f"| `{inp['name']}` | {kind} | {cell(default)} | {cell(allowed(inp))} | {cell(meaning)} |")
        lines.append("")
    else:
        lines += ["No inputs.", ""]
    for name, text in long_defaults:
        lines += [f"Default of `{name}`:", "", "```", text, "```", ""]
    lines += ["| output | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{o['name']}` | {o['type']} | {cell(o['tooltip'] or '')} |" for o in node["outputs"]]
    return "\n".join(lines) + "\n"


def render(nodes: list[dict[str, Any]]) -> str:
    """The whole reference: header, an index by category, then every node in registration order."""
    index = ["| node | id | category |", "| --- | --- | --- |"]
    index += [f"| [{n['display_name']}](#{anchor(n['display_name'])}) | `{n['id']}` | {n['category']} |" for n in nodes]
    return "\n".join([HEADER, *index, ""]) + "\n" + "\n".join(render_node(n) for n in nodes)


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, spaces to hyphens, punctuation dropped."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "NODES.md"), help="where to write (default docs/NODES.md)")
    args = ap.parse_args(argv)
    comfy_path = os.environ.get("GF_COMFYUI_PATH")
    if not comfy_path:
        raise SystemExit("set GF_COMFYUI_PATH to a ComfyUI checkout and run this with its Python")
    text = render([describe_node(cls) for cls in load_nodes(comfy_path)])
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
