"""Prompt segments: durations, chaining, the timeline script and the conditioning rows we use.

A ``GF_SEGMENTS`` value is a tuple of :class:`gf_core.Segment` (prompt embedding [1, L, 4096],
length in latent frames, transition), never mutated once made, so ComfyUI may cache it.

Units: Wan makes 16 pixel frames per second and 4 pixel frames per latent frame, so one second
is 4 latent frames. A segment is at least one chunk of 3 latent frames (0.75 s).

Timeline script grammar (one segment per line)::

    5s | a cat walks through a garden
    +4s apr(0.8, 6) | the cat starts running
    cut 6s | a new scene: a dog sleeps by the fire
    20f hard | the dog wakes up

- ``#`` starts a comment line; blank lines are skipped.
- Before the ``|`` come words in any order: exactly one duration and at most one transition.
- Duration: seconds ``5s`` / ``4.5s`` or latent frames ``20f``; a leading ``+`` is allowed
  (every line adds a segment after the previous one).
- Transition (how the segment starts; omitted: the memory policy's default):
  ``apr``, ``apr(ALPHA)``, ``apr(ALPHA, WINDOW)`` (Adaptive Prompt Recache), ``hard`` (full
  recache), ``none`` (keep the cache), ``cut`` (shot cut: drop the local memory, keep the anchors).
  The first line cannot have one (nothing to switch from).
- After the ``|``: the prompt text (may itself contain ``|``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..gf_core import Segment, Transition

FPS = 16
PIXEL_FRAMES_PER_LATENT = 4
LATENT_FRAMES_PER_SECOND = FPS // PIXEL_FRAMES_PER_LATENT
MIN_SEGMENT_FRAMES = 3  # one chunk of the chunk-wise models
TEXT_ROWS = 512  # umT5 rows the Wan models were trained with

UNITS = ("seconds", "latent frames")
TRANSITION_MODES = ("apr", "hard", "none")

Segments = tuple[Segment, ...]

log = logging.getLogger(__name__)


def latent_frames(duration: float, unit: str) -> int:
    """Length of a segment in latent frames.

    Seconds: ``round(seconds * 4)``, at least 3 (one chunk); latent frames: a whole number >= 3.
    """
    if unit == "seconds":
        if not math.isfinite(duration) or duration <= 0:
            raise ValueError(f"duration {duration} s is not a positive number of seconds; use e.g. 5")
        return max(MIN_SEGMENT_FRAMES, round(duration * LATENT_FRAMES_PER_SECOND))
    if unit == "latent frames":
        if duration != int(duration):
            raise ValueError(f"duration {duration} latent frames is not a whole number; use e.g. {max(3, round(duration))}")
        if duration < MIN_SEGMENT_FRAMES:
            raise ValueError(
                f"duration {int(duration)} latent frames is shorter than one chunk; use at least {MIN_SEGMENT_FRAMES}"
            )
        return int(duration)
    raise ValueError(f"unknown duration unit '{unit}'; use one of {', '.join(UNITS)}")


def prompt_embedding(conditioning: Any) -> torch.Tensor:
    """The umT5 embedding [B, <=512, D] of a ComfyUI CONDITIONING (``[[tensor, dict], ...]``).

    Only the first entry is used; prompts longer than 511 tokens give more rows than the models
    saw in training, so they are cut to 512 as the references do.
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("the conditioning is empty; connect a CLIP Text Encode (Wan umT5) output")
    entry = conditioning[0]
    tensor = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        raise ValueError("the conditioning holds no [1, L, 4096] text embedding; use CLIP Text Encode with a Wan umT5")
    if len(conditioning) > 1:
        log.warning("Grounded Forcing: the conditioning has %d entries; only the first is used", len(conditioning))
    return tensor[:, :TEXT_ROWS]


def make_transition(mode: str, alpha_max: float = 0.8, d_window: float = 0.0) -> Transition:
    """A prompt-switch rule: ``apr`` (with alpha_max and D_window; 0 = the memory's LTM size), ``hard`` or ``none``."""
    if mode not in TRANSITION_MODES:
        raise ValueError(f"unknown transition mode '{mode}'; use one of {', '.join(TRANSITION_MODES)}")
    if mode != "apr":
        return Transition(mode)
    return Transition("apr", alpha_max=alpha_max, proximity_window=d_window if d_window > 0 else None)


def cut() -> Transition:
    """A shot cut: the Local Temporal Memory is dropped, the anchors (GCM) stay."""
    return Transition("cut")


def add_segment(
    previous: Segments | None, embedding: torch.Tensor, frames: int, transition: Transition | None = None
) -> Segments:
    """``previous`` followed by one more segment (a new tuple; ``previous`` is left as it is)."""
    previous = tuple(previous or ())
    if transition is not None and not previous:
        raise ValueError(
            f"the first segment has a '{transition.kind}' transition but nothing to switch from; "
            "disconnect the transition or connect the previous segments"
        )
    return previous + (Segment(embedding, frames, transition or Transition()),)


# ---------------------------------------------------------------------------------------------
# Timeline script


@dataclass(frozen=True)
class ScriptLine:
    """One parsed script line: 1-based line number, latent frames, transition and prompt text."""

    line: int
    frames: int
    transition: Transition | None
    text: str


_DURATION = re.compile(r"^\+?(?P<value>\d+(?:\.\d*)?|\.\d+)(?P<unit>s|f)$")
_APR = re.compile(r"^apr(?:\((?P<args>[^)]*)\))?$")
_WORD = re.compile(r"\w+\([^)]*\)|\S+")
_WORDS_HELP = "a duration (5s, 4.5s, 20f) and optionally one of apr, apr(0.8), apr(0.8, 6), hard, none, cut"


def _parse_transition(word: str, line: int) -> Transition | None:
    if word in ("cut", "hard", "none"):
        return Transition(word)
    match = _APR.match(word)
    if not match:
        return None
    args = [a.strip() for a in (match["args"] or "").split(",") if a.strip()]
    if len(args) > 2:
        raise ValueError(f"line {line}: '{word}' has {len(args)} numbers; write apr(ALPHA) or apr(ALPHA, WINDOW)")
    try:
        numbers = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"line {line}: '{word}' holds something that is not a number; write e.g. apr(0.8, 6)") from None
    alpha = numbers[0] if numbers else None
    window = numbers[1] if len(numbers) > 1 else None
    try:
        return Transition("apr", alpha_max=alpha, proximity_window=window)
    except ValueError as e:
        raise ValueError(f"line {line}: {e}") from None


def parse_script(script: str) -> list[ScriptLine]:
    """Parse a timeline script (grammar in the module docstring); errors name the line."""
    parsed: list[ScriptLine] = []
    for number, raw in enumerate(script.splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if "|" not in text:
            raise ValueError(f"line {number}: no '|' between the duration and the prompt; write e.g. '5s | a cat walks'")
        header, prompt = (part.strip() for part in text.split("|", 1))
        if not prompt:
            raise ValueError(f"line {number}: the prompt after '|' is empty; write what the segment shows")
        frames: int | None = None
        transition: Transition | None = None
        for word in _WORD.findall(header.lower()):
            duration = _DURATION.match(word)
            if duration:
                if frames is not None:
                    raise ValueError(f"line {number}: two durations before '|'; give one, e.g. '5s'")
                unit = "seconds" if duration["unit"] == "s" else "latent frames"
                try:
                    frames = latent_frames(float(duration["value"]), unit)
                except ValueError as e:
                    raise ValueError(f"line {number}: {e}") from None
                continue
            found = _parse_transition(word, number)
            if found is None:
                raise ValueError(f"line {number}: unknown word '{word}' before '|'; use {_WORDS_HELP}")
            if transition is not None:
                raise ValueError(f"line {number}: two transitions before '|'; give at most one")
            transition = found
        if frames is None:
            raise ValueError(f"line {number}: no duration before '|'; write e.g. '5s | {prompt[:30]}'")
        if transition is not None and not parsed:
            raise ValueError(
                f"line {number}: the first segment has a '{transition.kind}' transition but nothing to switch from; remove it"
            )
        parsed.append(ScriptLine(number, frames, transition, prompt))
    if not parsed:
        raise ValueError("the timeline script has no segments; write one line per segment, e.g. '5s | a cat walks'")
    return parsed


def timeline(script: str, encode: Callable[[str], Any]) -> Segments:
    """Parse ``script`` and encode every line's prompt with ``encode(text) -> CONDITIONING``."""
    segments: Segments = ()
    for line in parse_script(script):
        segments = add_segment(segments, prompt_embedding(encode(line.text)), line.frames, line.transition)
    return segments

