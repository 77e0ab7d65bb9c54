"""Every ComfyUI symbol the pack uses, checked to exist in the ComfyUI trees it supports.

The pack's files (``__init__.py``, ``nodes/``) are read, not imported: every import from a host
module (``comfy``, ``comfy_api``, ``folder_paths``, ``latent_preview``, ``server``, ...) and every
attribute chain on a name so bound (``mm.load_models_gpu``, ``io.Int.Input``) is a symbol, and
every keyword a call passes to one (``load_models_gpu(force_full_load=)``) is checked too; a name
the pack asks about first (``hasattr(comfy.ops, "X")``) is optional. With
``GF_COMFYUI_PATH`` naming one or more trees (separated by ``os.pathsep``), each tree is imported
in a fresh process of this Python on CPU and every symbol resolved there; that Python needs the
tree's requirements::

    GF_COMFYUI_PATH=/path/ComfyUI-a:/path/ComfyUI-b /path/to/comfy-venv/bin/python -m pytest tests/test_comfy_symbols.py
    python tests/test_comfy_symbols.py              # prints the list
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOST_MODULES = ("comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "latent_preview",
                "node_helpers", "server", "av")
TREES = [p for p in os.environ.get("GF_COMFYUI_PATH", "").split(os.pathsep) if p]


def pack_sources() -> dict[str, str]:
    """Relative path -> source of every file of the pack that ComfyUI imports."""
    files = [REPO / "__init__.py", *sorted((REPO / "nodes").rglob("*.py"))]
    return {str(f.relative_to(REPO)): f.read_text() for f in files}


def _is_host(module: str) -> bool:
    return module.split(".")[0] in HOST_MODULES


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything not rooted at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def used_symbols(sources: dict[str, str]) -> dict[str, list[str]]:
    """Host symbol (dotted path, or ``path(keyword=)`` for a keyword passed in a call) -> where it is used."""
    return _walk(sources)[0]


def optional_symbols(sources: dict[str, str]) -> set[str]:
    """The used symbols the pack asks about first (``hasattr(comfy.ops, "X")``): a tree may lack them."""
    uses, asked = _walk(sources)
    return {s for s in uses if any(s == a or s.startswith((f"{a}.", f"{a}(")) for a in asked)}


def _walk(sources: dict[str, str]) -> tuple[dict[str, list[str]], set[str]]:
    uses: dict[str, list[str]] = {}
    asked: set[str] = set()

    def use(symbol: str, where: str) -> None:
        uses.setdefault(symbol, []).append(where)

    for name, source in sources.items():
        tree = ast.parse(source, filename=name)
        bound: dict[str, str] = {}  # local name -> host path
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_host(alias.name):
                        use(alias.name, where)
                        if alias.asname:
                            bound[alias.asname] = alias.name
                        else:
                            root = alias.name.split(".")[0]
                            bound[root] = root
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_host(node.module):
                for alias in node.names:
                    use(f"{node.module}.{alias.name}", where)
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        outer = set()  # attribute nodes that are the .value of another attribute
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                outer.add(id(node.value))
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and id(node) not in outer:
                chain = _chain(node)
                if chain and chain[0] in bound:
                    use(".".join([bound[chain[0]], *chain[1:]]), where)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr" \
                    and len(node.args) == 2 and isinstance(node.args[1], ast.Constant):
                chain = _chain(node.args[0])
                if chain and chain[0] in bound:
                    asked.add(".".join([bound[chain[0]], *chain[1:], str(node.args[1].value)]))
            if isinstance(node, ast.Call):
                chain = _chain(node.func)
                if chain and chain[0] in bound:
                    path = ".".join([bound[chain[0]], *chain[1:]])
                    for kw in node.keywords:
                        if kw.arg is not None:
                            use(f"{path}({kw.arg}=)", where)
    return uses, asked


# ---------------------------------------------------------------------------------------------
# Resolving symbols inside one tree (runs in a process of its own: one ComfyUI per process)


def _runtime_attributes(cls: type) -> set[str]:
    """Attributes a class's own code assigns (``self.x = ...``, ``Cls.x = ...``), as a server's
    ``PromptServer.instance`` that exists once it runs."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                        target.value.id in ("self", "cls", klass.__name__):
                    names.add(target.attr)
    return names


def _resolve(path: str):
    """The object at a dotted path: the longest importable module, then attributes. Raises
    LookupError naming the first missing part."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
            break
        except ModuleNotFoundError as e:
            if e.name != module and not module.startswith(f"{e.name}."):
                raise LookupError(f"importing {module} failed: {e}") from None
    else:
        raise LookupError(f"no module {parts[0]}")
    for j, name in enumerate(parts[i:], start=i):
        if hasattr(obj, name):
            obj = getattr(obj, name)
        elif inspect.isclass(obj) and name in _runtime_attributes(obj):
            return None  # set when the program runs: nothing further to follow
        else:
            raise LookupError(f"{'.'.join(parts[:j])} has no {name}")
    return obj


def missing_symbols(symbols: list[str]) -> dict[str, str]:
    """Symbol -> why it is missing, for every symbol that does not resolve in this process."""
    missing = {}
    for symbol in symbols:
        path, _, keyword = symbol.partition("(")
        try:
            obj = _resolve(path)
        except LookupError as e:
            missing[symbol] = str(e)
            continue
        if keyword and obj is not None:
            keyword = keyword.rstrip("=)")
            try:
                params = inspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue  # no signature to check (a builtin)
            if keyword not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                missing[symbol] = f"{path} takes no keyword {keyword}"
    return missing


def _boot_tree(tree: str) -> None:
    """Make ``tree`` importable as ComfyUI's main.py would run it with ``--cpu``."""
    sys.path.insert(0, tree)
    os.chdir(tree)
    if (Path(tree) / "comfy" / "cli_args.py").exists():
        import comfy.cli_args as cli

        cli.args.cpu = True
    if (Path(tree) / "utils" / "extra_config.py").exists():
        import utils.extra_config  # noqa: F401  (before comfy/ shadows the utils package)


def check_tree(tree: str, symbols: list[str]) -> dict[str, str]:
    """:func:`missing_symbols` inside ``tree``, in a fresh process of this Python."""
    result = subprocess.run([sys.executable, __file__, "--check", tree], input=json.dumps(symbols),
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"checking symbols in {tree} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Tests


def test_the_pack_uses_host_symbols_and_gf_core_none():
    uses = used_symbols(pack_sources())
    assert "comfy.model_management.load_models_gpu" in uses and "comfy_api.latest.io.ComfyNode" in uses
    assert "comfy.model_management.load_models_gpu(memory_required=)" in uses
    engine = {str(f.relative_to(REPO)): f.read_text() for f in sorted((REPO / "gf_core").rglob("*.py"))}
    assert used_symbols(engine) == {}, "gf_core must never import ComfyUI"


def test_walker_follows_aliases_chains_and_keywords():
    source = ("import comfy.model_management as mm\nimport comfy.utils\nfrom comfy_api.latest import io\n"
              "import torch.nn as nn\n"
              "def f(x):\n    mm.load_models_gpu([x], force_full_load=True)\n"
              "    return comfy.utils.ProgressBar(3), io.Int.Input('n', min=1), nn.Linear, x.comfy.thing\n")
    assert set(used_symbols({"m.py": source})) == {
        "comfy.model_management", "comfy.utils", "comfy_api.latest.io", "comfy.model_management.load_models_gpu",
        "comfy.model_management.load_models_gpu(force_full_load=)", "comfy.utils.ProgressBar",
        "comfy_api.latest.io.Int.Input", "comfy_api.latest.io.Int.Input(min=)"}


def test_names_asked_about_first_are_optional():
    source = ("import comfy.ops\nif hasattr(comfy.ops, 'NewCast'):\n    comfy.ops.NewCast(dtype=1)\n"
              "else:\n    comfy.ops.cast_bias_weight(dtype=1)\n")
    assert optional_symbols({"m.py": source}) == {"comfy.ops.NewCast", "comfy.ops.NewCast(dtype=)"}


def test_checker_reports_a_planted_missing_name_and_keyword(tmp_path):
    """A fake tree: the checker resolves what exists and names what does not, in its own process."""
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "__init__.py").write_text("")
    (tmp_path / "comfy" / "utils.py").write_text(
        "class ProgressBar:\n    def __init__(self, total, node_id=None):\n        self.total = total\n\n"
        "class Server:\n    def __init__(self):\n        Server.instance = self\n")
    source = ("import comfy.utils\nbar = comfy.utils.ProgressBar(3, node_id=1)\nbar2 = comfy.utils.ProgressBar(3, "
              "gf_planted_keyword=1)\ncomfy.utils.gf_planted_name\ncomfy.utils.Server.instance.routes\n")
    symbols = sorted(used_symbols({"p.py": source}))
    missing = check_tree(str(tmp_path), symbols)
    assert missing == {
        "comfy.utils.gf_planted_name": "comfy.utils has no gf_planted_name",
        "comfy.utils.ProgressBar(gf_planted_keyword=)": "comfy.utils.ProgressBar takes no keyword gf_planted_keyword",
    }


@pytest.mark.parametrize("tree", TREES or [None], ids=lambda t: Path(t).name if t else "no-tree")
def test_every_symbol_exists_in_the_tree(tree):
    if tree is None:
        pytest.skip("set GF_COMFYUI_PATH to one or more ComfyUI trees (separated by os.pathsep) to check that "
                    "every ComfyUI symbol the pack uses exists there")
    sources = pack_sources()
    symbols = sorted(set(used_symbols(sources)) - optional_symbols(sources))
    missing = check_tree(tree, symbols)
    assert not missing, f"{len(missing)} of {len(symbols)} symbols missing in {tree}: {missing}"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        _boot_tree(sys.argv[2])
        print(json.dumps(missing_symbols(json.loads(sys.stdin.read()))))
        return
    sources = pack_sources()
    uses, optional = used_symbols(sources), optional_symbols(sources)
    for symbol in sorted(uses):
        print(f"{symbol}{'  [optional]' if symbol in optional else ''}  ({', '.join(uses[symbol])})")
    print(f"{len(uses)} symbols, {len(optional)} of them optional (asked about with hasattr first)")


if __name__ == "__main__":
    main()
