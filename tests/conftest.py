"""Shared test setup: the repository root importable as the package ``grounded_forcing``.

ComfyUI loads the repository folder as a package, so the nodes use relative imports
(``from ..gf_core import ...``). Its ``nodes`` package would also collide with ComfyUI's own
top-level ``nodes`` module, so tests never ``import nodes``: they import
``grounded_forcing.nodes.<module>`` after this registers the root under that unique name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "grounded_forcing"


def load_pack():
    """The repository root as the package ``grounded_forcing`` (loaded once)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


load_pack()


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: the tiny models are faster so, and parallel jobs do not fight."""
    from helpers import one_thread

    yield from one_thread()


@pytest.fixture(scope="module")
def model():
    """A tiny random Wan model (dim 256, 2 blocks), float32."""
    from helpers import tiny_model

    return tiny_model()
