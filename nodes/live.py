"""Live steering: the logic of GF Live Sampler, testable without ComfyUI.

A live take runs chunk by chunk under a ``gf_core.Session`` and, between two chunks, applies what
the page sent: a new prompt (with an APR, hard or no recache), a shot cut, pause / resume, stop.
The node runs in ComfyUI's prompt-worker thread, the page's messages arrive on the server's event
loop; a :class:`LiveSession` hands them across under a lock.

- :func:`parse_command`: one message from the page -> a :class:`Command`, or :class:`Refused`
  (an HTTP status and one sentence).
- :class:`LiveSession`: the running take's id, inbox and state; :data:`SESSIONS` holds the one
  the routes talk to.
- :class:`Take`: the prompts at the chunk boundaries where they took effect -> a GF Prompt
  Timeline script that replays the take bit for bit (noise order "chunk", same seed).
- :class:`Pacer`: generation waits while it is more than ``lead`` seconds of video ahead of playback.
- :class:`FrameSink`: JPEG-encodes decoded frames and sends them to the page off the worker thread.
- :class:`LiveRun`: the loop tying them together.

Messages to the page (event name, data), all with ``session`` (the take's id) and ``node``:
``gf_live.start`` (fps, width, height, max_latent_frames, prompt), ``gf_live.frames`` (chunk,
frames: base64 JPEGs, latent_frames made, applied: the command numbers this chunk is the first one
made under, latency_s, gen_fps, state, prompt), ``gf_live.state`` (state), ``gf_live.refused`` (seq,
text, error: a typed prompt the text encoder refused; the take goes on under the prompt before it)
and ``gf_live.end`` (reason, latent_frames, script).
"""

from __future__ import annotations

import base64
import gc
import io
import queue
import threading
import time
import unicodedata
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..gf_core import Segment, Transition, pixel_frames, warm_up
from ..gf_core.errors import BadInput
from ..gf_core.latents import preview_rgb, to_raw
from .prompts import FPS, LATENT_FRAMES_PER_SECOND, PIXEL_FRAMES_PER_LATENT

MAX_TEXT_CHARS = 2000  # umT5's 512 tokens are about this many characters of English
MAX_BODY_BYTES = 16 * 1024
MAX_WAITING = 8  # prompts and cuts accepted but not yet applied
PAGE_TRANSITIONS = ("apr", "hard", "none")
COMMANDS = ("prompt", "cut", "pause", "resume", "stop")
FIELDS = ("session", "type", "text", "transition")
JPEG_QUALITY = 85


class Refused(Exception):
    """A message the route answers with HTTP ``status`` and one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Command:
    """One accepted message. ``seq`` numbers the session's commands from 1; ``received`` is the
    monotonic time it arrived; ``text`` is None for a cut that keeps the current prompt."""

    kind: str
    text: str | None = None
    transition: str = "apr"
    seq: int = 0
    received: float = 0.0


def clean_text(text: object) -> str:
    """A typed prompt as it is encoded and written into the script: whitespace runs become one space.

    Raises BadInput for a non-string, an empty prompt, control characters or more than
    :data:`MAX_TEXT_CHARS` characters.
    """
    if not isinstance(text, str):
        raise BadInput(f"the prompt is not text but {type(text).__name__}; send it as a JSON string")
    if len(text) > MAX_TEXT_CHARS:
        raise BadInput(f"the prompt has {len(text)} characters, more than the {MAX_TEXT_CHARS} allowed; shorten it")
    words = text.split()
    if not words:
        raise BadInput("the prompt is empty; type what the video should show next")
    joined = " ".join(words)
    if any(unicodedata.category(c) == "Cc" for c in joined):
        raise BadInput("the prompt holds control characters; send plain text")
    return joined


def parse_command(body: object) -> tuple[str, Command]:
    """A message from the page -> (the session id it names, the command without seq / time).

    A message is a JSON object with ``session``, ``type`` (one of :data:`COMMANDS`) and, for a prompt,
    ``text`` and an optional ``transition`` (one of :data:`PAGE_TRANSITIONS`, default apr); a cut may
    carry ``text`` (the new shot's prompt). Nothing else: no field is ever a path. Raises Refused(400).
    """
    if not isinstance(body, dict):
        raise Refused(400, "the message is not a JSON object; send {\"session\": ..., \"type\": ...}")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise Refused(400, f"unknown field '{unknown[0]}'; a message has only {', '.join(FIELDS)}")
    session = body.get("session")
    if not isinstance(session, str) or not session:
        raise Refused(400, "the message names no session; send the id from the gf_live.start message")
    kind = body.get("type")
    if kind not in COMMANDS:
        raise Refused(400, f"unknown message type {kind!r}; use one of {', '.join(COMMANDS)}")
    has_text, has_transition = "text" in body, "transition" in body
    if kind in ("pause", "resume", "stop") and (has_text or has_transition):
        raise Refused(400, f"a '{kind}' message has no text or transition; send only session and type")
    if kind == "cut" and has_transition:
        raise Refused(400, "a cut has no transition (it drops the recent frames); send type 'cut' with optional text")
    if kind == "prompt" and not has_text:
        raise Refused(400, "a prompt message has no text; send the new prompt in 'text'")
    text = None
    if has_text:
        try:
            text = clean_text(body["text"])
        except BadInput as e:
            raise Refused(400, str(e)) from None
    transition = body.get("transition", "apr")
    if transition not in PAGE_TRANSITIONS:
        raise Refused(400, f"unknown transition {transition!r}; use one of {', '.join(PAGE_TRANSITIONS)}")
    return session, Command(kind, text, transition)


class LiveSession:
    """The running take as the page sees it: an id, an inbox and a state.

    ``submit`` runs on the server's event loop, everything else in the worker thread. States:
    running -> paused <-> running; running / paused -> stopping (a stop was accepted) -> ended.
    Prompts and cuts wait in order and take effect one per chunk boundary; pause, resume and
    stop take effect at the next boundary, ahead of waiting prompts.
    """

    def __init__(self, node: str | None = None, info: dict | None = None, clock: Callable[[], float] = time.monotonic):
        self.id = uuid.uuid4().hex
        self.node = node
        self.info = dict(info or {})
        self.clock = clock
        self.state = "running"
        self.text = self.info.get("prompt", "")
        self.latent_frames = 0
        self.paused_seconds = 0.0
        self._cond = threading.Condition()
        self._inbox: deque[Command] = deque()
        self._changes: deque[Command] = deque()
        self._waiting = 0  # prompts and cuts accepted and not yet applied
        self._seq = 0
        self._stop = False

    # -- the server's side ---------------------------------------------------------------------

    def submit(self, command: Command) -> dict:
        """Accept a parsed command; returns the reply. Raises Refused(409 / 429)."""
        with self._cond:
            if self.state == "ended":
                raise Refused(409, "this live take has ended; press Run to start a new one")
            if self._stop:
                raise Refused(409, "this live take is stopping after the current chunk; press Run to start a new one")
            change = command.kind in ("prompt", "cut")
            if change and self._waiting >= MAX_WAITING:
                raise Refused(429, f"{MAX_WAITING} prompts are already waiting for a chunk boundary; "
                                   "wait until they take effect")
            self._seq += 1
            accepted = Command(command.kind, command.text, command.transition, self._seq, self.clock())
            if change:
                self._waiting += 1
            if command.kind == "stop":
                self._stop = True
            self._inbox.append(accepted)
            self._cond.notify_all()
            return {"seq": accepted.seq, "state": self.state, "waiting": self._waiting}

    def snapshot(self) -> dict:
        """What a page that (re)connects needs to pick the take up."""
        with self._cond:
            state = "stopping" if self._stop and self.state != "ended" else self.state
            return {**self.info, "session": self.id, "node": self.node, "state": state,
                    "latent_frames": self.latent_frames, "prompt": self.text, "waiting": self._waiting}

    # -- the worker's side ---------------------------------------------------------------------

    def _drain(self) -> None:
        while self._inbox:
            c = self._inbox.popleft()
            if c.kind == "pause" and self.state == "running":
                self.state = "paused"
            elif c.kind == "resume" and self.state == "paused":
                self.state = "running"
            elif c.kind == "stop":
                self.state = "stopping"
            elif c.kind in ("prompt", "cut"):
                self._changes.append(c)

    def between_chunks(self, interrupted: Callable[[], None] = lambda: None,
                       ready: Callable[[], bool] = lambda: True, poll: float = 0.05) -> Command | None:
        """Wait while paused or while ``ready()`` is false, then return the next prompt or cut (or None).

        Returns None at once when a stop has arrived (``stopping`` tells). ``interrupted`` is
        called while waiting (ComfyUI's cancel check); time spent paused adds to ``paused_seconds``.
        """
        with self._cond:
            while True:
                self._drain()
                if self.state == "stopping":
                    return None
                if self.state == "paused" or not ready():
                    began, paused = self.clock(), self.state == "paused"
                    self._cond.wait(poll)
                    self._cond.release()  # the cancel check may take long; the page may send meanwhile
                    try:
                        interrupted()
                    finally:
                        self._cond.acquire()
                    if paused:
                        self.paused_seconds += self.clock() - began
                    continue
                if not self._changes:
                    return None
                change = self._changes.popleft()
                self._waiting -= 1
                return change

    @property
    def stopping(self) -> bool:
        return self.state == "stopping"

    def applied(self, text: str, latent_frames: int) -> None:
        with self._cond:
            self.text = text
            self.latent_frames = latent_frames

    def end(self) -> list[Command]:
        """Mark the take ended; returns the prompts and cuts that never took effect."""
        with self._cond:
            self._drain()
            self.state = "ended"
            dropped = list(self._changes)
            self._changes.clear()
            self._waiting = 0
            self._cond.notify_all()
            return dropped


class Sessions:
    """The live session the routes accept messages for (at most one runs: ComfyUI executes one
    prompt at a time)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._current: LiveSession | None = None

    def start(self, session: LiveSession) -> None:
        with self._lock:
            self._current = session

    def finish(self, session: LiveSession) -> None:
        with self._lock:
            if self._current is session:
                self._current = None

    def current(self) -> LiveSession | None:
        with self._lock:
            return self._current

    def submit(self, body: object) -> dict:
        """Parse and accept a message; raises Refused with the reply's status and sentence."""
        session_id, command = parse_command(body)
        session = self.current()
        if session is None:
            raise Refused(409, "no live take is running; press Run on a workflow with GF Live Sampler")
        if session_id != session.id:
            raise Refused(409, "this message names a live take that is not the one running; reload the page "
                               "to attach to the running take")
        return session.submit(command)


SESSIONS = Sessions()


# ---------------------------------------------------------------------------------------------
# The take as a timeline script


@dataclass(frozen=True)
class TakeSegment:
    """A prompt from latent frame ``start`` on; ``transition`` is how it began (None for the first)."""

    start: int
    text: str
    transition: str | None
    embedding: torch.Tensor  # [1, L, text_dim]


@dataclass
class Take:
    """The prompts of a live take at the chunk boundaries where they took effect."""

    segments: list[TakeSegment] = field(default_factory=list)
    latent_frames: int = 0

    def add(self, start: int, text: str, transition: str | None, embedding: torch.Tensor) -> None:
        if self.segments and start <= self.segments[-1].start:
            raise ValueError(f"a take segment at frame {start} does not come after the previous one")
        self.segments.append(TakeSegment(start, text, transition, embedding))

    def durations(self) -> list[int]:
        """Latent frames each segment ran for."""
        ends = [s.start for s in self.segments[1:]] + [self.latent_frames]
        return [end - s.start for s, end in zip(self.segments, ends)]

    def script(self, header: list[str] = ()) -> str:
        """A GF Prompt Timeline script: ``NNf [transition] | text`` per segment (durations in latent
        frames, so exact), after ``header`` as comment lines."""
        lines = [f"# {h}" for h in header]
        for seg, frames in zip(self.segments, self.durations()):
            word = f"{seg.transition} " if seg.transition else ""
            lines.append(f"{word}{frames}f | {seg.text}")
        return "\n".join(lines) + "\n"

    def replay_segments(self) -> list[Segment]:
        """The take as ``gf_core`` segments, as GF Prompt Timeline would make them from :meth:`script`."""
        return [Segment(s.embedding, frames, transition_of(s.transition) or Transition())
                for s, frames in zip(self.segments, self.durations())]


def transition_of(kind: str | None) -> Transition | None:
    """The engine transition for a page choice (apr, hard, none) or a cut; None for the first prompt."""
    return None if kind is None else Transition(kind)


def max_latent_frames(seconds: float, chunk_frames: int) -> int:
    """A maximum duration in seconds as whole chunks of latent frames (at least one chunk)."""
    if not seconds > 0:
        raise BadInput(f"the maximum duration {seconds} s is not positive; use e.g. 60")
    chunks = max(1, -(-round(seconds * LATENT_FRAMES_PER_SECOND) // chunk_frames))
    return chunks * chunk_frames


# ---------------------------------------------------------------------------------------------
# Pacing, frames to the page


class Pacer:
    """Keeps generation at most ``lead`` seconds of video ahead of a player that started with the
    first frames and plays at ``fps`` (pauses excluded), so a typed prompt shows soon."""

    def __init__(self, fps: float = FPS, lead: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.fps, self.lead, self.clock = fps, lead, clock
        self.started: float | None = None

    def ready(self, frames_made: int, paused_seconds: float) -> bool:
        """Whether the next chunk may start, ``frames_made`` pixel frames into the take."""
        now = self.clock()
        if self.started is None:
            self.started = now
        played = now - self.started - paused_seconds
        return frames_made / self.fps - played <= self.lead


def jpeg_base64(frame: np.ndarray, quality: int = JPEG_QUALITY) -> str:
    """One frame [H, W, 3] uint8 -> a base64 JPEG."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class FrameSink:
    """Sends messages to the page in order from its own thread; frames [T, H, W, 3] uint8 are
    JPEG-encoded there (and handed to ``write``, e.g. the take's MP4) so the GPU loop never waits.

    ``close`` sends what is queued, stops the thread and returns the first error it met (or None):
    a page that cannot be reached never ends the take.
    """

    def __init__(self, send: Callable[[str, dict], None] | None, write: Callable[[torch.Tensor], None] | None = None):
        self.send, self.write = send, write
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="gf-live-frames", daemon=True)
        self._thread.start()

    def message(self, event: str, data: dict, frames: torch.Tensor | None = None) -> None:
        """Queue a message; with ``frames`` its data gets ``frames`` (base64 JPEGs)."""
        self._queue.put((event, data, frames))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            event, data, frames = item
            try:
                if frames is not None and self.write is not None:
                    self.write(frames)
                if self.send is None:
                    continue
                if frames is not None:
                    data = {**data, "frames": [jpeg_base64(f) for f in frames.numpy()]}
                self.send(event, data)
            except BaseException as e:  # kept for close(); the take goes on without the page
                self._error = e

    def close(self) -> BaseException | None:
        self._queue.put(None)
        self._thread.join()
        return self._error


class PixelDecoder:
    """Normalised latents on the device -> frames [T, H, W, 3] uint8 on the host, through a
    ``StreamDecoder`` (``push`` / ``flush``, causal cache carried) and the VAE's output mapping
    (``to_unit``: VAE range -> [0, 1])."""

    def __init__(self, decoder, to_unit: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 dtype: torch.dtype):
        self.decoder, self.to_unit, self.device, self.dtype = decoder, to_unit, device, dtype

    def _frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, T, H, W] in the VAE's range -> [T, H, W, 3] uint8 (host)."""
        unit = self.to_unit(pixels.float()).clamp(0, 1)
        return (unit[0].movedim(0, -1) * 255).round().to(torch.uint8).cpu()

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        z = to_raw(latents.float()).to(device=self.device, dtype=self.dtype)
        return self._frames(self.decoder.push(z))

    def flush(self) -> torch.Tensor:
        return self._frames(self.decoder.flush())


class PreviewDecoder:
    """Normalised latents -> frames [T, H, W, 3] uint8 on the host without a VAE: the Wan2.1
    latent-to-RGB preview projection (:func:`gf_core.latents.preview_rgb`), each latent pixel an
    ``scale`` x ``scale`` block, as many frames as the Wan VAE's streaming decode gives (1 for the
    take's first latent frame, 4 for every later one, each held). Exact for the toy world, whose
    latents are made through that projection; a rough, fast preview of a real Wan video."""

    def __init__(self, scale: int = 8):
        self.scale = scale
        self.started = False

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = preview_rgb(latents.float())[0]  # [F, h, w, 3]
        rgb = rgb.repeat_interleave(self.scale, dim=1).repeat_interleave(self.scale, dim=2)
        held = torch.full((rgb.shape[0],), PIXEL_FRAMES_PER_LATENT, dtype=torch.long)
        if not self.started:
            held[0] = 1
            self.started = True
        return rgb.repeat_interleave(held.to(rgb.device), dim=0).cpu()

    def flush(self) -> torch.Tensor:
        return torch.zeros(0, 0, 0, 3, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# The loop


class LiveRun:
    """One live take: steps ``engine`` (a ``gf_core.Session``) chunk by chunk under what ``live``
    received, decodes each chunk and sends it, and records the take.

    ``encode(text) -> embedding [1, L, text_dim]`` runs in this (the worker) thread. ``latents``
    (normalised, float32, host) and ``take`` hold everything finished, also after an error.
    """

    def __init__(self, engine, live: LiveSession, encode: Callable[[str], torch.Tensor], max_frames: int,
                 chunk_frames: int, *, decoder: PixelDecoder | None = None, sink: FrameSink | None = None,
                 pacer: Pacer | None = None, interrupted: Callable[[], None] = lambda: None,
                 on_chunk: Callable[[int], None] | None = None):
        self.engine, self.live, self.encode = engine, live, encode
        self.max_frames, self.chunk_frames = max_frames, chunk_frames
        self.decoder, self.sink, self.pacer = decoder, sink, pacer
        self.interrupted, self.on_chunk = interrupted, on_chunk
        self.chunks: list[torch.Tensor] = []
        self.events: list[dict] = []
        self.take = Take()
        self.pixel_frames_sent = 0
        self.reason = "running"

    @property
    def latents(self) -> torch.Tensor:
        """Every finished chunk, [1, 16, F, H/8, W/8] normalised float32 on the host."""
        return torch.cat(self.chunks, dim=2)

    def _send(self, event: str, data: dict, frames: torch.Tensor | None = None) -> None:
        if self.sink is not None:
            self.sink.message(event, {"session": self.live.id, "node": self.live.node, **data}, frames)

    def run(self, first_text: str) -> str:
        """Make the take; returns why it ended: "stopped" (the page) or "max" (the maximum duration)."""
        live, engine = self.live, self.engine
        self._send("gf_live.start", live.snapshot())
        segment = Segment(self.encode(first_text), self.chunk_frames)
        # compiled blocks: compile the switch and cut graphs now, not when the first typed prompt arrives
        warm_up(engine.model, engine.policy, engine.config, segment.prompt)
        # no full pass of Python's garbage collector over the process's long-lived objects (torch, the
        # compiled graphs, the models) stalls a chunk: they are frozen for the take, and unfrozen after
        # it, so that what a later model unload leaves in reference cycles is still collected
        gc.collect()
        gc.freeze()
        try:
            return self._take(segment, first_text)
        finally:
            gc.unfreeze()

    def _take(self, segment: Segment, text: str) -> str:
        """The take's loop, from its first chunk under ``segment`` (the prompt ``text``)."""
        live, engine = self.live, self.engine
        kind, command = None, None
        state = live.state
        while True:
            began = time.monotonic()
            chunk = engine.step(segment)
            latents = chunk.latents
            made = time.monotonic()
            if command is not None or not self.take.segments:
                self.take.add(chunk.start, text, kind, segment.prompt)
            self.chunks.append(latents.float().cpu())
            self.take.latent_frames = chunk.start + latents.shape[2]
            frames = self.decoder.push(latents) if self.decoder is not None else None
            busy = time.monotonic() - began
            event = {**chunk.event, "live": {"text": text, "made_s": round(made - began, 4),
                                             "busy_s": round(busy, 4)}}
            applied = {}
            if command is not None:
                latency = time.monotonic() - command.received
                applied = {str(command.seq): round(latency, 4)}
                event["live"]["applied"] = {"seq": command.seq, "kind": command.kind, "latency_s": round(latency, 4)}
            self.events.append(event)
            live.applied(text, self.take.latent_frames)
            n = 0 if frames is None else frames.shape[0]
            self.pixel_frames_sent += n
            self._send("gf_live.frames", {
                "chunk": chunk.index, "latent_frames": self.take.latent_frames, "applied": list(applied),
                "latency_s": applied, "gen_fps": round(PIXEL_FRAMES_PER_LATENT * latents.shape[2] / busy, 2) if busy else None,
                "state": live.state, "prompt": text,
            }, frames)
            if self.on_chunk is not None:
                self.on_chunk(chunk.index)
            if self.take.latent_frames >= self.max_frames:
                self.reason = "max"
                break
            self.interrupted()
            ready = (lambda: self.pacer.ready(pixel_frames(self.take.latent_frames), live.paused_seconds)) \
                if self.pacer is not None else (lambda: True)
            command = live.between_chunks(self.interrupted, ready)
            if live.state != state:
                state = live.state
                self._send("gf_live.state", {"state": state})
            if live.stopping:
                self.reason = "stopped"
                break
            if command is not None:
                kind = "cut" if command.kind == "cut" else command.transition
                embedding = segment.prompt
                if command.text is not None and command.text != text:
                    try:
                        embedding = self.encode(command.text)
                    except BadInput as e:  # a prompt the text encoder refuses: the take goes on as it was
                        self._send("gf_live.refused", {"seq": command.seq, "text": command.text, "error": str(e)})
                        command = None
                        continue
                    text = command.text
                segment = Segment(embedding, self.chunk_frames, transition_of(kind))
        return self.reason

    def finish(self, reason: str, script: str, flush: bool = True) -> None:
        """Flush the decoder (not after a cancel, which may have stopped it mid-frame), tell the page
        the take ended and end the session."""
        if flush and self.decoder is not None and self.chunks:
            frames = self.decoder.flush()
            if frames.shape[0]:
                self.pixel_frames_sent += frames.shape[0]
                self._send("gf_live.frames", {"chunk": None, "latent_frames": self.take.latent_frames,
                                              "applied": [], "latency_s": {}, "gen_fps": None,
                                              "state": "ending", "prompt": self.live.text}, frames)
        dropped = self.live.end()
        self._send("gf_live.end", {"reason": reason, "latent_frames": self.take.latent_frames,
                                   "pixel_frames": self.pixel_frames_sent, "script": script,
                                   "dropped": [c.seq for c in dropped]})
