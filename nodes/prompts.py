"""Prompt segments: durations, chaining, the timeline script and the conditioning rows we use.

A ``GF_SEGMENTS`` value is a tuple of :class:`gf_core.Segment` (prompt embedding [1, L, 4096],
length in latent frames, transition), never mutated once made, so ComfyUI may cache it.

Units: Wan makes 16 pixel frames per second and 4 pixel frames per latent frame, so one second
is 4 latent frames. A segment is at least one chunk of 3 latent frames (0.75 s).

Limits, checked before anything is encoded: a video (all segments together) lasts at most
``MAX_VIDEO_SECONDS`` (``MAX_VIDEO_FRAMES`` latent frames), a timeline holds at most ``MAX_SEGMENTS``
segments (each keeps its prompt embedding in memory), and a script, a line's words before the
``|`` and a prompt have the character limits below, so that parsing stays fast on any text.

Timeline script grammar (one segment per line)::

    5s | a cat walks through a garden
    +4s apr(0.8, 6) | the cat starts running
    cut 6s | a new scene: a dog sleeps by the fire
    20f hard | the dog wakes up

- Lines end at ``\n``, ``\r\n`` or ``\r`` (what a text box shows as a new line); ``#`` starts a
  comment line; blank lines are skipped.
- Before the ``|`` come words in any order: exactly one duration and at most one transition.
- Duration: seconds ``5s`` / ``4.5s`` or latent frames ``20f``; a leading ``+`` is allowed
  (every line adds a segment after the previous one).
- Transition (how the segment starts; omitted: the memory policy's default):
  ``apr``, ``apr(ALPHA)``, ``apr(ALPHA, WINDOW)`` (Adaptive Prompt Recache; WINDOW 0 means the
  memory's LTM size, as ``d_window`` 0 does on GF APR Transition), ``hard`` (full recache),
  ``none`` (keep the cache), ``cut`` (shot cut: drop the local memory, keep the anchors).
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
from ..gf_core.errors import BadInput

FPS = 16
PIXEL_FRAMES_PER_LATENT = 4
LATENT_FRAMES_PER_SECOND = FPS // PIXEL_FRAMES_PER_LATENT
MIN_SEGMENT_FRAMES = 3  # one chunk of the chunk-wise models
TEXT_ROWS = 512  # umT5 rows the Wan models were trained with

MAX_VIDEO_SECONDS = 3600  # the longest video the pack makes: one hour
MAX_VIDEO_FRAMES = MAX_VIDEO_SECONDS * LATENT_FRAMES_PER_SECOND
LONGEST_VIDEO = f"the longest video the pack makes ({MAX_VIDEO_SECONDS} s = {MAX_VIDEO_FRAMES} latent frames)"
MAX_SEGMENTS = 1000
MAX_D_WINDOW = 1024  # latent frames; a wider APR window blends like this one over any cache
MAX_SCRIPT_CHARS = 2_000_000
MAX_HEADER_CHARS = 1000  # the words before '|': a duration and a transition fit in a few dozen
MAX_PROMPT_CHARS = 10_000  # umT5 keeps 512 tokens, a few thousand characters
QUOTE_CHARS = 40  # the longest piece of the user's text an error message repeats

UNITS = ("seconds", "latent frames")
TRANSITION_MODES = ("apr", "hard", "none")

Segments = tuple[Segment, ...]

log = logging.getLogger(__name__)


def quote(text: str) -> str:
    """``text`` in quotes for an error message, cut to ``QUOTE_CHARS`` characters."""
    if len(text) > QUOTE_CHARS:
        text = text[: QUOTE_CHARS - 3] + "..."
    return f"'{text}'"


def _number(value: float) -> str:
    return f"{value:g}"


def latent_frames(duration: float, unit: str) -> int:
    """Length of a segment in latent frames.

    Seconds: ``round(seconds * 4)``, at least 3 (one chunk); latent frames: a whole number >= 3.
    Either way at most the longest video (``MAX_VIDEO_SECONDS``, ``MAX_VIDEO_FRAMES``).
    """
    if unit not in UNITS:
        raise BadInput(f"unknown duration unit {quote(str(unit))}; use one of {', '.join(UNITS)}")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise BadInput(f"duration {quote(repr(duration))} is not a number; give e.g. 5 {unit}")
    longest = MAX_VIDEO_SECONDS if unit == "seconds" else MAX_VIDEO_FRAMES
    short = " s" if unit == "seconds" else " latent frames"
    if math.isnan(duration):
        raise BadInput(f"duration NaN{short} is not a number; give e.g. {5 if unit == 'seconds' else 20}")
    if duration > longest:
        raise BadInput(f"duration {_number(duration)}{short} is longer than {LONGEST_VIDEO}; use at most {longest}")
    if unit == "seconds":
        if duration <= 0:
            raise BadInput(f"duration {_number(duration)} s is not a positive number of seconds; use e.g. 5")
        return max(MIN_SEGMENT_FRAMES, round(duration * LATENT_FRAMES_PER_SECOND))
    if duration < MIN_SEGMENT_FRAMES:
        raise BadInput(
            f"duration {_number(duration)} latent frames is shorter than one chunk; use at least {MIN_SEGMENT_FRAMES}"
        )
    if duration != int(duration):
        raise BadInput(
            f"duration {_number(duration)} latent frames is not a whole number; use e.g. {round(duration)}"
        )
    return int(duration)


def prompt_embedding(conditioning: Any) -> torch.Tensor:
    """The umT5 embedding [B, <=512, D] of a ComfyUI CONDITIONING (``[[tensor, dict], ...]``).

    Only the first entry is used; prompts longer than 511 tokens give more rows than the models
    saw in training, so they are cut to 512 as the references do. Refuses embeddings that are
    empty, not floating point or not finite (NaN / inf would make the whole video NaN).
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise BadInput("the conditioning is empty; connect a CLIP Text Encode (Wan umT5) output")
    entry = conditioning[0]
    tensor = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        raise BadInput("the conditioning holds no [1, L, 4096] text embedding; use CLIP Text Encode with a Wan umT5")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise BadInput(
            f"the conditioning's text embedding has shape {list(tensor.shape)}, with no rows; "
            "encode a non-empty prompt with CLIP Text Encode (Wan umT5)"
        )
    if not tensor.is_floating_point():
        raise BadInput(
            f"the conditioning's text embedding holds {str(tensor.dtype).removeprefix('torch.')} values, "
            "not floating point numbers; connect CLIP Text Encode (Wan umT5) output directly"
        )
    if len(conditioning) > 1:
        log.warning("Grounded Forcing: the conditioning has %d entries; only the first is used", len(conditioning))
    rows = tensor[:, :TEXT_ROWS]
    if not bool(torch.isfinite(rows).all()):
        raise BadInput(
            "the conditioning's text embedding holds NaN or infinite values (a corrupt text encoder file or an "
            "fp16 overflow); re-download the umT5 text encoder or load it in bf16 / fp32"
        )
    return rows


def apr_transition(alpha_max: float | None = None, d_window: float | None = None) -> Transition:
    """An APR switch; ``None`` leaves a value to the memory policy, ``d_window`` 0 (or None) is the
    memory's LTM size. The one place that checks APR numbers, for the node and the script alike."""
    if alpha_max is not None:
        if not math.isfinite(alpha_max):
            raise BadInput(f"alpha_max {_number(alpha_max)} is not a number; use a value in [0, 1] (0.8 is the paper's)")
        if not 0.0 <= alpha_max <= 1.0:
            raise BadInput(f"alpha_max {_number(alpha_max)} is outside [0, 1]; 0.8 is the paper's value")
    if d_window is not None:
        if not math.isfinite(d_window):
            raise BadInput(
                f"d_window {_number(d_window)} is not a number; use 0 (the memory's LTM size) or 1 to {MAX_D_WINDOW}"
            )
        if d_window < 0 or 0 < d_window < 1 or d_window > MAX_D_WINDOW:
            raise BadInput(
                f"d_window {_number(d_window)} is outside the allowed values; use 0 (the memory's LTM size) "
                f"or 1 to {MAX_D_WINDOW} latent frames"
            )
    return Transition("apr", alpha_max=alpha_max, proximity_window=d_window or None)


def make_transition(mode: str, alpha_max: float = 0.8, d_window: float = 0.0) -> Transition:
    """A prompt-switch rule: ``apr`` (with alpha_max and D_window; 0 = the memory's LTM size), ``hard`` or ``none``.

    The APR numbers are checked whatever the mode, so a NaN never waits in a graph for a mode change.
    """
    if mode not in TRANSITION_MODES:
        raise BadInput(f"unknown transition mode {quote(str(mode))}; use one of {', '.join(TRANSITION_MODES)}")
    transition = apr_transition(alpha_max, d_window)
    return transition if mode == "apr" else Transition(mode)


def cut() -> Transition:
    """A shot cut: the Local Temporal Memory is dropped, the anchors (GCM) stay."""
    return Transition("cut")


def add_segment(
    previous: Segments | None, embedding: torch.Tensor, frames: int, transition: Transition | None = None
) -> Segments:
    """``previous`` followed by one more segment (a new tuple; ``previous`` is left as it is).

    Refuses a transition on the first segment, more than ``MAX_SEGMENTS`` segments and a total
    longer than ``MAX_VIDEO_FRAMES``.
    """
    previous = tuple(previous or ())
    if transition is not None and not previous:
        raise BadInput(
            f"the first segment has a '{transition.kind}' transition but nothing to switch from; "
            "disconnect the transition or connect the previous segments"
        )
    if len(previous) >= MAX_SEGMENTS:
        raise BadInput(
            f"this would be segment {len(previous) + 1}, but a video holds at most {MAX_SEGMENTS} segments; "
            "merge segments or make the video in several runs"
        )
    total = sum(s.frames for s in previous) + frames
    if total > MAX_VIDEO_FRAMES:
        raise BadInput(
            f"the segments add up to {total} latent frames ({total / LATENT_FRAMES_PER_SECOND:g} s), longer than "
            f"{LONGEST_VIDEO}; shorten the segments"
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


# Only \n, \r\n and \r end a line: str.splitlines would also split on U+2028, \x0b, \x85 ... which a
# text box shows inside a line, and every later line number would then be off.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# A word is a run of non-space characters up to an optional "( ... )" (which may hold spaces).
# The header is at most MAX_HEADER_CHARS long, and the tokenizer below looks at each character once.
_RUN = re.compile(r"[^\s(]*")
_DURATION = re.compile(r"\+?(?P<value>\d+(?:\.\d*)?|\.\d+)(?P<unit>[sf])", re.ASCII)
_APR_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)
_WORDS_HELP = "a duration (5s, 4.5s, 20f) and optionally one of apr, apr(0.8), apr(0.8, 6), hard, none, cut"


def _words(header: str, line: int) -> list[str]:
    """Split the words before '|' in one pass; ``apr(0.8, 6)`` stays one word."""
    words = []
    at = 0
    while at < len(header):
        if header[at].isspace():
            at += 1
            continue
        end = _RUN.match(header, at).end()
        if end < len(header) and header[end] == "(":
            close = header.find(")", end)
            if close < 0:
                raise BadInput(f"line {line}: {quote(header[at:])} opens '(' without closing it; write e.g. apr(0.8, 6)")
            end = close + 1
        words.append(header[at:end])
        at = end
    return words


def _parse_transition(word: str, line: int) -> Transition | None:
    if word in ("cut", "hard", "none"):
        return Transition(word)
    if word == "apr":
        return apr_transition()
    if not (word.startswith("apr(") and word.endswith(")")):
        return None
    args = [a.strip() for a in word[4:-1].split(",")]
    if len(args) > 2:
        raise BadInput(f"line {line}: {quote(word)} has {len(args)} numbers; write apr(ALPHA) or apr(ALPHA, WINDOW)")
    if not all(_APR_NUMBER.fullmatch(a) for a in args):
        raise BadInput(
            f"line {line}: {quote(word)} holds something that is not a number; write e.g. apr(0.8) or apr(0.8, 6)"
        )
    numbers = [float(a) for a in args]
    try:
        return apr_transition(numbers[0], numbers[1] if len(numbers) > 1 else None)
    except BadInput as e:
        raise BadInput(f"line {line}: {e}") from None


def _parse_duration(word: str, line: int) -> int | None:
    """Latent frames of a duration word (``5s``, ``+4.5s``, ``20f``), None for other words."""
    match = _DURATION.fullmatch(word)
    if match is None:
        return None
    unit = "seconds" if match["unit"] == "s" else "latent frames"
    value = float(match["value"])  # hundreds of digits give inf, never an error
    if value > (MAX_VIDEO_SECONDS if unit == "seconds" else MAX_VIDEO_FRAMES):
        raise BadInput(
            f"line {line}: duration {quote(word)} is longer than {LONGEST_VIDEO}; "
            f"use at most {MAX_VIDEO_SECONDS}s or {MAX_VIDEO_FRAMES}f"
        )
    try:
        return latent_frames(value, unit)
    except BadInput as e:
        raise BadInput(f"line {line}: {e}") from None


def parse_script(script: str) -> list[ScriptLine]:
    """Parse a timeline script (grammar in the module docstring); errors name the line.

    Time and memory are linear in the script's length, and the lengths are bounded first.
    """
    if not isinstance(script, str):
        raise BadInput(f"the timeline script is a {type(script).__name__}, not text; type the segments into the box")
    if len(script) > MAX_SCRIPT_CHARS:
        raise BadInput(
            f"the timeline script has {len(script):,} characters, more than {MAX_SCRIPT_CHARS:,}; "
            "shorten the prompts or split the video into several runs"
        )
    parsed: list[ScriptLine] = []
    frames_so_far = 0
    for number, raw in enumerate(_LINE_BREAK.split(script), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        bar = text.find("|")
        if bar < 0:
            raise BadInput(f"line {number}: no '|' between the duration and the prompt; write e.g. '5s | a cat walks'")
        header, prompt = text[:bar].strip(), text[bar + 1 :].strip()
        if len(header) > MAX_HEADER_CHARS:
            raise BadInput(
                f"line {number}: the words before '|' are {len(header):,} characters long, more than "
                f"{MAX_HEADER_CHARS}; write just a duration and a transition there, e.g. '+4s apr(0.8, 6) |'"
            )
        if not prompt:
            raise BadInput(f"line {number}: the prompt after '|' is empty; write what the segment shows")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadInput(
                f"line {number}: the prompt has {len(prompt):,} characters, more than {MAX_PROMPT_CHARS:,} "
                f"(the text encoder keeps {TEXT_ROWS} tokens); shorten it"
            )
        frames: int | None = None
        transition: Transition | None = None
        for word in _words(header.lower(), number):
            duration = _parse_duration(word, number)
            if duration is not None:
                if frames is not None:
                    raise BadInput(f"line {number}: two durations before '|'; give one, e.g. '5s'")
                frames = duration
                continue
            found = _parse_transition(word, number)
            if found is None:
                raise BadInput(f"line {number}: unknown word {quote(word)} before '|'; use {_WORDS_HELP}")
            if transition is not None:
                raise BadInput(f"line {number}: two transitions before '|'; give at most one")
            transition = found
        if frames is None:
            raise BadInput(f"line {number}: no duration before '|'; write e.g. '5s | {prompt[:30]}'")
        if transition is not None and not parsed:
            raise BadInput(
                f"line {number}: the first segment has a '{transition.kind}' transition but nothing to switch from; "
                "remove it"
            )
        if len(parsed) == MAX_SEGMENTS:
            raise BadInput(
                f"line {number}: the timeline has more than {MAX_SEGMENTS} segments; merge segments or make the "
                "video in several runs"
            )
        frames_so_far += frames
        if frames_so_far > MAX_VIDEO_FRAMES:
            raise BadInput(
                f"line {number}: the timeline reaches {frames_so_far / LATENT_FRAMES_PER_SECOND:g} s here, longer than "
                f"{LONGEST_VIDEO}; shorten the segments"
            )
        parsed.append(ScriptLine(number, frames, transition, prompt))
    if not parsed:
        raise BadInput("the timeline script has no segments; write one line per segment, e.g. '5s | a cat walks'")
    return parsed


def timeline(script: str, encode: Callable[[str], Any]) -> Segments:
    """Parse ``script`` and encode every line's prompt with ``encode(text) -> CONDITIONING``.

    The whole script is checked before the first prompt is encoded.
    """
    segments: Segments = ()
    for line in parse_script(script):
        try:
            embedding = prompt_embedding(encode(line.text))
        except BadInput as e:
            raise BadInput(f"line {line.line}: {e}") from None
        segments = add_segment(segments, embedding, line.frames, line.transition)
    return segments
