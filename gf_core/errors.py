"""The pack's error type for input it cannot use.

Every refusal of bad input (a size, a prompt, a memory setting, a checkpoint, a timeline line) raises
:class:`BadInput`: one sentence that names what is wrong and what to do, raised before any model
forward, weight upload or large allocation. It is a ``ValueError``, so callers that catch that keep
working.
"""

from __future__ import annotations


class BadInput(ValueError):
    """Input the pack cannot use; the message says what is wrong and what to do."""
