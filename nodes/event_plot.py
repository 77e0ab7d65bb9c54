"""The sampler's event log as a picture: memory regions over the video's chunks (Pillow only, no ComfyUI).

The log is GF Sampler's ``events`` output (:attr:`nodes.sampling.SampleResult.log`): JSON lines, the
run header ``{"run": {...}}`` first, then one line per chunk with the frames it made, its segment,
the prompt switch applied before it, the RoPE indices it attended with, the memory after it and
what it changed (evictions, GCM updates, promotions). A log without the header (``gf_core.demo``'s
``events.jsonl``, a partial save's metadata) is drawn too.

The picture, top to bottom, every row over the same chunk axis:

- prompt: one block per segment; a vertical line through every row at each switch (colour by
  kind, :data:`SWITCH_COLORS`) and cut;
- one row per memory region, one lane per slot: the frame each slot holds after each chunk,
  coloured by the segment that made it (numbered when the columns are wide enough);
- RoPE index: the temporal index of every key frame (region colours) and of the chunk itself
  (black), with the policy's RoPE range;
- switch alpha: at each switch with per-frame blend weights (APR, hard recache), one bar per cached
  frame in attention order, height alpha;
- GCM update: importance I(z) and the target's redundancy R of every candidate frame, a triangle
  where an anchor was replaced (policies with a diversity update); promotion: the key similarity of
  every candidate, a triangle where it was promoted (Context Forcing);
- evicted: frames leaving the memory per chunk (at a cut or flush, what was dropped);
- a legend and a line per switch with its details.

Columns: ``chunks_per_column`` chunks share one pixel column when a chunk would be narrower than
:data:`MIN_COLUMN` pixels (aggregated: a column shows the memory after its last chunk and every
event of its chunks); with at least :data:`FRAME_COLUMN` pixels per chunk each held frame is
labelled with its number (per frame).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from ..gf_core.errors import BadInput

MIN_COLUMN = 3  # pixels per column; narrower chunks are aggregated
FRAME_COLUMN = 24  # pixels per chunk from which held frames are numbered
DEFAULT_WIDTH = 1280
LISTED_SWITCHES = 14  # switches described one per line under the picture
MIN_WIDTH, MAX_WIDTH = 640, 4096
LEFT = 150  # row labels
RIGHT = 24

BACKGROUND = (255, 255, 255)
TEXT = (38, 38, 38)
MUTED = (118, 118, 118)
GRID = (226, 226, 226)
EMPTY = (244, 244, 244)
QUERY = (20, 20, 20)
IMPORTANCE = (214, 96, 20)
REDUNDANCY = (70, 110, 160)
REPLACED = (30, 150, 60)
CHANGED = (60, 60, 60)
EVICTED = (168, 168, 168)

# Segment colours (Tableau 10); cells use them lightened, the prompt row as they are.
SEGMENT_COLORS = [
    (78, 121, 167), (242, 142, 43), (89, 161, 79), (176, 122, 161), (237, 201, 72),
    (118, 183, 178), (156, 117, 95), (255, 157, 167), (186, 176, 172), (225, 87, 89),
]
# Region colours, by the region's place in the memory.
REGION_COLORS = [(0, 128, 128), (204, 102, 0), (128, 64, 160), (110, 130, 20), (190, 40, 110)]
# Vertical lines at segment boundaries, by switch kind (gf_core.recache.TRANSITIONS and the policies' rules).
SWITCH_COLORS = {
    "apr": (25, 55, 135),
    "hard": (125, 35, 165),
    "none": (125, 125, 125),
    "longlive": (0, 115, 105),
    "anchor": (165, 100, 0),
    "flush": (0, 120, 175),
    "cut": (210, 20, 30),
}
OTHER_SWITCH = (60, 60, 60)
SWITCH_NAMES = {
    "apr": "APR", "hard": "hard recache", "none": "no recache", "longlive": "LongLive recache",
    "anchor": "anchor re-cache", "flush": "KV flush", "cut": "cut",
}
HELP = "connect GF Sampler's events output (or paste its whole text) unchanged"


# ---------------------------------------------------------------------------------------------
# The log


@dataclass
class EventLog:
    """A parsed event log: the run header (empty without one) and the chunk events in order."""

    run: dict
    chunks: list[dict]
    regions: list[str] = field(default_factory=list)  # memory regions in attention order
    capacity: dict[str, int] = field(default_factory=dict)  # most frames each region held
    segment_of: dict[int, int] = field(default_factory=dict)  # latent frame -> segment that made it

    @property
    def total_chunks(self) -> int:
        """Chunks of the whole run (the header's count; more than logged when the run stopped early)."""
        return max(int(self.run.get("chunks") or 0), len(self.chunks))

    @property
    def chunk_frames(self) -> int:
        a, b = self.chunks[0]["frames"]
        return b - a

    @property
    def frames_per_second(self) -> float:
        """Latent frames per second (Wan: 16 pixel frames per second, 4 per latent frame)."""
        return float(self.run.get("fps") or 16) / 4


def parse_log(text: str) -> EventLog:
    """Read a GF Sampler event log; one-sentence :class:`BadInput` for anything else."""
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"the event log is empty; {HELP}")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    run: dict = {}
    chunks: list[dict] = []
    for position, (number, line) in enumerate(lines):
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            where = "the last line" if position == len(lines) - 1 else f"line {number}"
            raise BadInput(f"{where} of the event log is not complete JSON (cut off or edited); {HELP}") from None
        if not isinstance(item, dict):
            raise BadInput(f"line {number} of the event log holds a {type(item).__name__}, not an event; {HELP}")
        if "run" in item and position == 0:
            if not isinstance(item["run"], dict):
                raise BadInput(f"the run header on line {number} is not an object; {HELP}")
            run = item["run"]
            continue
        missing = [k for k in ("chunk", "frames", "segment", "memory") if k not in item]
        if missing:
            raise BadInput(f"line {number} is not a GF Sampler chunk event (it has no '{missing[0]}'); {HELP}")
        frames, memory = item["frames"], item["memory"]
        if not (isinstance(frames, list) and len(frames) == 2 and all(isinstance(f, int) for f in frames)
                and isinstance(memory, dict) and all(isinstance(held, list) for held in memory.values())
                and isinstance(item["segment"], int)):
            raise BadInput(f"line {number} has a malformed 'frames', 'segment' or 'memory' entry; {HELP}")
        if item["chunk"] != len(chunks) and not chunks:
            raise BadInput(f"the event log starts at chunk {item['chunk']} on line {number}, so its beginning is "
                           f"missing; {HELP}")
        if item["chunk"] != len(chunks):
            raise BadInput(f"the event log jumps from chunk {len(chunks) - 1} to chunk {item['chunk']} on line "
                        f"{number}, so lines are missing; {HELP}")
        chunks.append(item)
    if not chunks:
        raise BadInput(f"the event log has no chunk lines; {HELP}")
    log = EventLog(run, chunks)
    for e in chunks:
        for name, held in e["memory"].items():
            if name not in log.capacity:
                log.regions.append(name)
                log.capacity[name] = 0
            log.capacity[name] = max(log.capacity[name], len(held))
        for f in range(*e["frames"]):
            log.segment_of[f] = e["segment"]
    return log


# ---------------------------------------------------------------------------------------------
# Geometry


@dataclass
class Layout:
    """Where things are in the picture: the chunk axis and every row's vertical span."""

    width: int
    height: int
    chunks: int
    chunks_per_column: int
    rows: dict[str, tuple[int, int]]  # row name -> (top, bottom), bottom exclusive
    lanes: dict[str, list[tuple[int, int]]]  # region -> (top, bottom) of each slot's lane, bottom inclusive
    scales: dict[str, tuple[float, float]]  # plotted row -> (lowest, highest) value on its vertical axis
    left: int = LEFT
    right: int = RIGHT

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def mode(self) -> str:
        """"aggregated" (several chunks per column), "per frame" (held frames numbered) or "per chunk"."""
        return _mode(self.plot_width, self.chunks, self.chunks_per_column)

    def chunk_x(self, chunk: float) -> int:
        """Left pixel of chunk ``chunk`` (fractions place frames inside a chunk)."""
        return self.left + math.floor(chunk * self.plot_width / self.chunks)

    def value_y(self, row: str, value: float) -> int:
        """The pixel row of ``value`` on ``row``'s vertical axis (RoPE index, alpha, importance, ...)."""
        top, bottom = self.rows[row]
        pad_top, pad_bottom = _PADS[row]
        low, high = self.scales[row]
        span = (bottom - pad_bottom) - (top + pad_top)
        return round(bottom - pad_bottom - (value - low) / (high - low) * span)

    def column(self, chunk: int) -> tuple[int, int]:
        """Pixel span [x0, x1) of the column that shows ``chunk``."""
        first = chunk - chunk % self.chunks_per_column
        last = min(first + self.chunks_per_column, self.chunks)
        return self.chunk_x(first), max(self.chunk_x(first) + 1, self.chunk_x(last))


def _mode(plot_width: int, chunks: int, chunks_per_column: int) -> str:
    if chunks_per_column > 1:
        return "aggregated"
    return "per frame" if plot_width / chunks >= FRAME_COLUMN else "per chunk"


_PADS = {"rope": (6, 4), "alpha": (4, 2), "gcm_update": (10, 3), "promotion": (10, 3)}  # (top, bottom) margins


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


@dataclass
class _Pen:
    draw: ImageDraw.ImageDraw
    small: ImageFont.ImageFont
    normal: ImageFont.ImageFont
    large: ImageFont.ImageFont

    def text(self, xy, text: str, font=None, fill=TEXT, anchor: str = "la", bold: bool = False) -> None:
        self.draw.text(xy, text, font=font or self.normal, fill=fill, anchor=anchor,
                       stroke_width=1 if bold else 0, stroke_fill=fill)

    def width(self, text: str, font=None) -> int:
        box = self.draw.textbbox((0, 0), text, font=font or self.normal)
        return box[2] - box[0]


def _lighten(color: tuple[int, int, int], amount: float = 0.35) -> tuple[int, int, int]:
    return tuple(round(c + (255 - c) * amount) for c in color)


def segment_color(segment: int) -> tuple[int, int, int]:
    return SEGMENT_COLORS[segment % len(SEGMENT_COLORS)]


def cell_color(segment: int) -> tuple[int, int, int]:
    """Fill of a memory cell holding a frame of ``segment``."""
    return _lighten(segment_color(segment))


def region_color(index: int) -> tuple[int, int, int]:
    return REGION_COLORS[index % len(REGION_COLORS)]


def switch_color(kind: str) -> tuple[int, int, int]:
    return SWITCH_COLORS.get(kind, OTHER_SWITCH)


def _nice_step(span: float, pixels: float, min_gap: float) -> float:
    """A 1-2-5 step so that ticks over ``span`` units drawn on ``pixels`` are at least ``min_gap`` apart."""
    if span <= 0:
        return 1.0
    raw = span * min_gap / max(pixels, 1.0)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10 * magnitude


def _ranges(frames: list[int]) -> str:
    """``[6, 7, 8, 12]`` -> ``"6-8, 12"``."""
    out, run = [], []
    for f in sorted(frames):
        if run and f == run[-1] + 1:
            run.append(f)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [f]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------
# Drawing


@dataclass
class Picture:
    image: Image.Image  # RGB
    layout: Layout
    log: EventLog


def draw(log: EventLog | str, width: int = DEFAULT_WIDTH) -> Picture:
    """The timeline picture of an event log (text or :func:`parse_log` result), ``width`` pixels wide."""
    if not isinstance(width, int) or not MIN_WIDTH <= width <= MAX_WIDTH:
        raise BadInput(f"timeline width {width} is outside {MIN_WIDTH}..{MAX_WIDTH} pixels; use {DEFAULT_WIDTH}")
    if isinstance(log, str):
        log = parse_log(log)
    return _Painter(log, width).paint()


class _Painter:
    """Builds the layout row by row, then paints every row into one image."""

    def __init__(self, log: EventLog, width: int):
        self.log = log
        self.width = width
        self.chunks = log.total_chunks
        self.per_column = max(1, math.ceil(self.chunks * MIN_COLUMN / (width - LEFT - RIGHT)))
        self.switches = [e for e in log.chunks if e.get("switch")]
        self.alpha_switches = [e for e in self.switches if e["switch"].get("alpha")]
        self.updates = [(e, u) for e in log.chunks for u in e.get("gcm_updates") or []]
        self.promotions = [(e, p) for e in log.chunks for p in e.get("promotions") or []]
        self.anchor_region = self._anchor_region()
        self.order = {name: k for k, name in enumerate(log.regions)}

    def _anchor_region(self) -> str | None:
        """The region the GCM updates rewrite: the one that held a replaced frame."""
        before: dict = {}
        for e in self.log.chunks:
            for u in e.get("gcm_updates") or []:
                if u.get("replaced") is not None:
                    for name, held in before.items():
                        if u["replaced"] in held:
                            return name
            before = e["memory"]
        return None

    # -- layout ---------------------------------------------------------------------------------

    def _scales(self) -> dict[str, tuple[float, float]]:
        log = self.log
        rope_range = log.run.get("rope_range")
        indices = [i for e in log.chunks for i in _indices(e)]
        scales: dict[str, tuple[float, float]] = {"rope": (0.0, float(max([*indices, (rope_range or 1) - 1, 1])))}
        scales["alpha"] = (0.0, 1.0)

        def around(values: list[float]) -> tuple[float, float]:  # [0, 1] widened to quarter steps
            return min(0.0, math.floor(min(values) * 4) / 4), max(1.0, math.ceil(max(values) * 4) / 4)

        if self.updates:
            scales["gcm_update"] = around([v for _, u in self.updates for v in (u["importance"], u["redundancy"])])
        if self.promotions:
            scales["promotion"] = around([p["similarity"] for _, p in self.promotions])
        return scales

    def _layout(self) -> Layout:
        per_frame = _mode(self.width - LEFT - RIGHT, self.chunks, self.per_column) == "per frame"
        lane_height = 16 if per_frame else 10
        rows: dict[str, tuple[int, int]] = {}
        lanes: dict[str, list[tuple[int, int]]] = {}
        y = 80  # title, subtitle, chunk axis

        def row(name: str, height: int, gap: int = 8) -> None:
            nonlocal y
            rows[name] = (y, y + height)
            y += height + gap

        row("prompt", 24)
        for name in self.log.regions:
            capacity = max(1, self.log.capacity[name])
            lh = max(3, min(lane_height, 200 // capacity))
            lanes[name] = [(y + j * lh, y + (j + 1) * lh - 2) for j in range(capacity)]
            row(name, lh * capacity - 1, gap=7)
        y += 6
        row("rope", 96, gap=10)
        if self.alpha_switches:
            row("alpha", 44)
        if self.updates:
            row("gcm_update", 56)
        if self.promotions:
            row("promotion", 44)
        row("evicted", 30, gap=4)
        y += 30  # seconds axis
        rows["legend"] = (y, y + 44)
        y += 52
        listed = min(len(self.switches), LISTED_SWITCHES) + (len(self.switches) > LISTED_SWITCHES)
        rows["switches"] = (y, y + (22 + 18 * listed if listed else 0))
        return Layout(self.width, rows["switches"][1] + 12, self.chunks, self.per_column, rows, lanes, self._scales())

    # -- painting -------------------------------------------------------------------------------

    def paint(self) -> Picture:
        layout = self._layout()
        image = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
        self.layout = layout
        self.pen = _Pen(ImageDraw.Draw(image), _font(12), _font(14), _font(19))
        self._title()
        self._axes()
        self._prompt_row()
        for name in self.log.regions:
            self._region_row(name)
        self._rope_row()
        if self.alpha_switches:
            self._alpha_row()
        if self.updates:
            self._update_row()
        if self.promotions:
            self._promotion_row()
        self._evicted_row()
        self._switch_lines()
        self._legend()
        self._switch_list()
        return Picture(image, layout, self.log)

    def _label(self, row: str, text: str, sub: str, swatch: tuple[int, int, int] | None = None) -> None:
        top, bottom = self.layout.rows[row]
        mid = (top + bottom) // 2
        x = 12
        if swatch is not None:
            self.pen.draw.rectangle((x, mid - 5, x + 9, mid + 4), fill=swatch)
            x += 15
        self.pen.text((x, mid - 1), text, anchor="ls")
        self.pen.text((x, mid + 2), sub, font=self.pen.small, fill=MUTED, anchor="lt")

    def _columns(self) -> list[tuple[list[dict], int, int]]:
        """(logged chunk events, x0, x1) of every pixel column."""
        per, chunks = self.per_column, self.log.chunks
        return [(chunks[first:first + per], *self.layout.column(first)) for first in range(0, len(chunks), per)]

    def _pad(self) -> int:
        """Gap between columns: only where columns are wide enough to read one by one."""
        return 1 if self.layout.mode == "per frame" else 0

    def _title(self) -> None:
        run, log, pen = self.log.run, self.log, self.pen
        frames = log.total_chunks * log.chunk_frames
        title = (f"{run.get('memory', 'memory')} · {log.total_chunks} chunks · {frames} latent frames · "
                 f"{frames / log.frames_per_second:.1f} s")
        if len(log.chunks) < log.total_chunks:
            title += f" · stopped after {len(log.chunks)} chunks"
        pen.text((12, 12), title, font=pen.large, bold=True)
        details = []
        if run.get("index_rule"):
            details.append(f"RoPE {run['index_rule']}" + (f" (range {run['rope_range']})" if run.get("rope_range") else ""))
        if run.get("width") and run.get("height"):
            details.append(f"{run['width']}x{run['height']}")
        if "seed" in run:
            details.append(f"seed {run['seed']}")
        kinds: dict[str, int] = {}
        for e in self.switches:
            kinds[e["switch"]["kind"]] = kinds.get(e["switch"]["kind"], 0) + 1
        segments = f"{1 + len(self.switches)} segments"
        if kinds:
            segments += ": " + ", ".join(f"{n} {SWITCH_NAMES.get(k, k)}" for k, n in kinds.items())
        details.append(segments)
        mode = self.layout.mode
        details.append(mode + (f", {self.per_column} chunks per column" if mode == "aggregated" else ""))
        pen.text((12, 38), " · ".join(details), fill=MUTED)

    def _plot_span(self) -> tuple[int, int]:
        return self.layout.rows["prompt"][0], self.layout.rows["evicted"][1]

    def _axes(self) -> None:
        layout, pen, log = self.layout, self.pen, self.log
        top, bottom = self._plot_span()
        step = int(max(1, _nice_step(self.chunks, layout.plot_width, 64)))
        for c in range(0, self.chunks + 1, step):
            x = layout.chunk_x(c)
            pen.draw.line((x, top - 4, x, bottom), fill=GRID)
            pen.text((x, top - 6), str(c), font=pen.small, fill=MUTED, anchor="mb")
        pen.text((12, top - 6), "chunk", font=pen.small, fill=MUTED, anchor="lb")
        seconds = self.chunks * log.chunk_frames / log.frames_per_second
        step_s = _nice_step(seconds, layout.plot_width, 64)
        for k in range(int(seconds / step_s + 1e-9) + 1):
            x = layout.chunk_x(k * step_s * log.frames_per_second / log.chunk_frames)
            pen.draw.line((x, bottom, x, bottom + 4), fill=MUTED)
            pen.text((x, bottom + 6), f"{k * step_s:g} s", font=pen.small, fill=MUTED, anchor="mt")
        pen.text((12, bottom + 6), "time", font=pen.small, fill=MUTED, anchor="lt")

    def _prompt_row(self) -> None:
        layout, pen = self.layout, self.pen
        top, bottom = layout.rows["prompt"]
        self._label("prompt", "prompt", "segment by segment")
        starts: list[tuple[int, int]] = []
        for e in self.log.chunks:
            if not starts or starts[-1][1] != e["segment"]:
                starts.append((e["chunk"], e["segment"]))
        ends = [c for c, _ in starts[1:]] + [len(self.log.chunks)]
        for (first, segment), end in zip(starts, ends):
            x0, x1 = layout.chunk_x(first), layout.chunk_x(end)
            pen.draw.rectangle((x0, top, max(x0, x1 - 1), bottom - 1), fill=segment_color(segment))
            label = str(segment + 1)
            if x1 - x0 > pen.width(label) + 6:
                pen.text(((x0 + x1) // 2, (top + bottom) // 2), label, fill=BACKGROUND, anchor="mm", bold=True)
        if len(self.log.chunks) < self.chunks:  # stopped early: the rest was never made
            pen.draw.rectangle((layout.chunk_x(len(self.log.chunks)), top, layout.chunk_x(self.chunks) - 1,
                                bottom - 1), outline=MUTED)

    def _region_row(self, name: str) -> None:
        layout, pen, log = self.layout, self.pen, self.log
        lanes = layout.lanes[name]
        self._label(name, name, f"{log.capacity[name]} frames", swatch=region_color(self.order[name]))
        top, bottom = layout.rows[name]
        for y0, y1 in lanes:
            pen.draw.rectangle((layout.left, y0, layout.chunk_x(self.chunks) - 1, y1), fill=EMPTY)
        numbered = layout.mode == "per frame" and lanes[0][1] - lanes[0][0] >= 11
        previous: list[int] = []
        for events, x0, x1 in self._columns():
            held = events[-1]["memory"][name]
            right = x1 - 1 - self._pad()
            for j, frame in enumerate(held[: len(lanes)]):
                y0, y1 = lanes[j]
                pen.draw.rectangle((x0, y0, right, y1), fill=cell_color(log.segment_of.get(frame, 0)))
                if name == self.anchor_region and j < len(previous) and previous[j] != frame:
                    pen.draw.line((x0, y0, x0, y1), fill=CHANGED, width=2 if x1 - x0 > 4 else 1)
                if numbered:
                    pen.text(((x0 + right + 1) // 2, (y0 + y1 + 1) // 2), str(frame), font=pen.small, anchor="mm")
            previous = held

    def _rope_row(self) -> None:
        layout, pen, log = self.layout, self.pen, self.log
        self._label("rope", "RoPE index", "keys and chunk")
        low, highest = layout.scales["rope"]
        end = layout.chunk_x(self.chunks)
        pen.draw.line((layout.left, layout.value_y("rope", 0), end, layout.value_y("rope", 0)), fill=GRID)
        for value in (0, highest):
            pen.text((layout.left - 6, layout.value_y("rope", value)), f"{value:g}", font=pen.small, fill=MUTED,
                     anchor="rm")
        rope_range = log.run.get("rope_range")
        if rope_range:  # the trained range's last index, dashed
            y = layout.value_y("rope", rope_range - 1)
            for x in range(layout.left, end, 8):
                pen.draw.line((x, y, x + 3, y), fill=MUTED)
            if rope_range - 1 != highest:
                pen.text((layout.left - 6, y), str(rope_range - 1), font=pen.small, fill=MUTED, anchor="rm")
        pad = self._pad()
        for events, x0, x1 in self._columns():
            for e in events:
                rope = e.get("rope") or {}
                for name, pairs in rope.get("keys", {}).items():
                    for _, index in pairs:
                        y = layout.value_y("rope", index)
                        pen.draw.rectangle((x0 + pad, y - 1, x1 - 1 - pad, y), fill=region_color(self.order.get(name, 0)))
                query = rope.get("query") or []
                if query:
                    pen.draw.rectangle((x0 + pad, layout.value_y("rope", max(query)) - 1, x1 - 1 - pad,
                                        layout.value_y("rope", min(query))), fill=QUERY)

    def _alpha_row(self) -> None:
        layout, pen = self.layout, self.pen
        self._label("alpha", "switch alpha", "per cached frame")
        base = layout.value_y("alpha", 0)
        pen.draw.line((layout.left, base, layout.chunk_x(self.chunks), base), fill=GRID)
        pen.text((layout.left - 6, layout.value_y("alpha", 1)), "1", font=pen.small, fill=MUTED, anchor="rm")
        pen.text((layout.left - 6, base), "0", font=pen.small, fill=MUTED, anchor="rm")
        nexts = [e["chunk"] for e in self.alpha_switches[1:]] + [self.chunks]
        for e, nxt in zip(self.alpha_switches, nexts):
            bars = self._alpha_bars(e, nxt)
            for (x0, x1), (key, a) in zip(bars, e["switch"]["alpha"].items()):
                color = region_color(self.order.get(key.rsplit(":", 1)[0], 0))
                pen.draw.rectangle((x0, min(base - 1, layout.value_y("alpha", a)), x1, base), fill=color)

    def _alpha_bars(self, e: dict, next_switch: int) -> list[tuple[int, int]]:
        """[x0, x1] of each cached frame's bar at switch ``e``: right of the line, within one chunk
        column or 6 pixels a bar, never past the next switch."""
        n = len(e["switch"]["alpha"])
        layout = self.layout
        x0 = layout.chunk_x(e["chunk"]) + 3
        room = min(layout.chunk_x(next_switch) - x0 - 3, max(layout.chunk_x(e["chunk"] + 1) - x0, 6 * n))
        bar = max(1, room // n)
        return [(x0 + j * bar, x0 + j * bar + max(bar - 2, 0)) for j in range(n)]

    def _dots_row(self, row: str, entries: list[tuple[float, float, tuple[int, int, int]]],
                  marks: list[float]) -> None:
        """Dots at (chunk position, value) and triangles at the row's top at ``marks`` (chunk positions)."""
        layout, pen = self.layout, self.pen
        top, _ = layout.rows[row]
        radius = 1 if layout.mode == "aggregated" else 2
        for v in layout.scales[row]:
            y = layout.value_y(row, v)
            pen.draw.line((layout.left, y, layout.chunk_x(self.chunks), y), fill=GRID)
            pen.text((layout.left - 6, y), f"{v:g}", font=pen.small, fill=MUTED, anchor="rm")
        for position, value, color in entries:
            x, y = layout.chunk_x(position), layout.value_y(row, value)
            pen.draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
        for position in marks:
            x = layout.chunk_x(position)
            pen.draw.polygon([(x - 3, top), (x + 3, top), (x, top + 6)], fill=REPLACED)

    def frame_position(self, e: dict, frame: int) -> float:
        """Chunk position of latent frame ``frame`` (the middle of its third of chunk ``e``; a frame of
        an earlier chunk sits in the middle of ``e``)."""
        first, end = e["frames"]
        if not first <= frame < end:
            return e["chunk"] + 0.5
        return e["chunk"] + (frame - first + 0.5) / (end - first)

    def _update_row(self) -> None:
        self._label("gcm_update", "GCM update", "I(z) and R")
        entries, marks = [], []
        for e, u in self.updates:
            p = self.frame_position(e, u["frame"])
            entries += [(p, u["redundancy"], REDUNDANCY), (p, u["importance"], IMPORTANCE)]
            if u.get("replaced") is not None:
                marks.append(p)
        self._dots_row("gcm_update", entries, marks)

    def _promotion_row(self) -> None:
        self._label("promotion", "promotion", "key similarity")
        entries = [(self.frame_position(e, p["frame"]), p["similarity"], REDUNDANCY) for e, p in self.promotions]
        marks = [self.frame_position(e, p["frame"]) for e, p in self.promotions if p.get("promoted")]
        self._dots_row("promotion", entries, marks)

    def _evicted_row(self) -> None:
        layout, pen = self.layout, self.pen
        top, bottom = layout.rows["evicted"]
        self._label("evicted", "evicted", "frames leaving")
        columns = []
        for events, x0, x1 in self._columns():
            gone = [f for e in events for f in e.get("evicted") or []]
            dropped = [f for e in events for f in _dropped(e.get("switch") or {})]
            columns.append((gone, dropped, x0, x1))
        most = max([len(g) + len(d) for g, d, _, _ in columns] + [1])
        pad = self._pad()
        for gone, dropped, x0, x1 in columns:
            h_gone = round(len(gone) / most * (bottom - top - 2))
            h_drop = round(len(dropped) / most * (bottom - top - 2))
            if gone:
                pen.draw.rectangle((x0 + pad, bottom - 1 - h_gone, x1 - 1 - pad, bottom - 1), fill=EVICTED)
            if dropped:
                pen.draw.rectangle((x0 + pad, bottom - 1 - h_gone - h_drop, x1 - 1 - pad, bottom - 1 - h_gone),
                                   fill=SWITCH_COLORS["cut"])
            text = _ranges(gone + dropped)
            if layout.mode == "per frame" and text and pen.width(text, pen.small) < x1 - x0 - 2:
                pen.text(((x0 + x1) // 2, top), text, font=pen.small, anchor="mt")

    def _switch_lines(self) -> None:
        top, bottom = self._plot_span()
        for e in self.switches:
            kind = e["switch"]["kind"]
            x = self.layout.chunk_x(e["chunk"])
            self.pen.draw.rectangle((x - 1, top, x + (1 if kind == "cut" else 0), bottom), fill=switch_color(kind))

    def _legend(self) -> None:
        pen = self.pen
        top, _ = self.layout.rows["legend"]
        cells = ("cells: the frame each memory slot holds after each chunk, coloured by the segment that made it "
                 "(swatches by the region names: its keys below)")
        pen.text((12, top), cells, font=pen.small, fill=MUTED)
        x = 12 + pen.width(cells, pen.small) + 8
        for s in range(min(len(SEGMENT_COLORS), 1 + len(self.switches))):
            pen.draw.rectangle((x, top + 1, x + 9, top + 10), fill=cell_color(s))
            x += 12
        items: list[tuple[str, tuple[int, int, int], str]] = []
        for kind in dict.fromkeys(e["switch"]["kind"] for e in self.switches):
            items.append(("line", switch_color(kind), SWITCH_NAMES.get(kind, kind)))
        items.append(("box", QUERY, "chunk's RoPE index"))
        if self.anchor_region:
            items.append(("line", CHANGED, "anchor replaced"))
        if self.updates:
            items += [("dot", IMPORTANCE, "importance I(z)"), ("dot", REDUNDANCY, "redundancy R"),
                      ("tri", REPLACED, "replaced")]
        if self.promotions:
            items += [("dot", REDUNDANCY, "similarity"), ("tri", REPLACED, "promoted")]
        items += [("box", EVICTED, "evicted"), ("box", SWITCH_COLORS["cut"], "dropped at a switch or cut")]
        x, y = 12, top + 20
        for shape, color, text in items:
            if shape == "line":
                pen.draw.rectangle((x, y, x + 2, y + 12), fill=color)
            elif shape == "dot":
                pen.draw.ellipse((x, y + 3, x + 6, y + 9), fill=color)
            elif shape == "tri":
                pen.draw.polygon([(x, y + 3), (x + 7, y + 3), (x + 3, y + 10)], fill=color)
            else:
                pen.draw.rectangle((x, y + 2, x + 9, y + 10), fill=color)
            x += 14
            pen.text((x, y), text, font=pen.small)
            x += pen.width(text, pen.small) + 16

    def _switch_list(self) -> None:
        pen, log = self.pen, self.log
        if not self.switches:
            return
        top, _ = self.layout.rows["switches"]
        pen.text((12, top), "switches", bold=True)
        y = top + 22
        for e in self.switches[:LISTED_SWITCHES]:
            s = e["switch"]
            pen.draw.rectangle((12, y + 2, 21, y + 11), fill=switch_color(s["kind"]))
            start = s.get("frame", e["frames"][0])
            pen.text((28, y), f"chunk {e['chunk']} · frame {start} · {start / log.frames_per_second:.2f} s",
                     font=pen.small, fill=MUTED)
            pen.text((230, y), f"{SWITCH_NAMES.get(s['kind'], s['kind'])} to segment {e['segment'] + 1}: "
                     + switch_details(s), font=pen.small)
            y += 18
        if len(self.switches) > LISTED_SWITCHES:
            pen.text((28, y), f"... and {len(self.switches) - LISTED_SWITCHES} more", font=pen.small, fill=MUTED)


def _indices(e: dict) -> list[int]:
    """Every temporal RoPE index of a chunk event: its key frames' and its own."""
    rope = e.get("rope") or {}
    return [index for pairs in rope.get("keys", {}).values() for _, index in pairs] + list(rope.get("query") or [])


def _dropped(switch: dict) -> list[int]:
    """Frames a switch took out of the memory (a cut, a flush, the previous junction)."""
    return [*(switch.get("dropped") or []), *(switch.get("junction_dropped") or [])]


def switch_details(s: dict) -> str:
    """One line about a switch event: its per-frame alphas, what it re-cached or dropped."""
    parts = []
    if s.get("alpha"):
        by_region: dict[str, list[str]] = {}
        for key, a in s["alpha"].items():
            region, frame = key.rsplit(":", 1)
            by_region.setdefault(region, []).append(f"{frame}={a:.2f}")
        parts.append("alpha " + "; ".join(f"{r} " + " ".join(v) for r, v in by_region.items()))
    if "recached" in s:
        parts.append(f"recached {_ranges(s['recached']) or 'nothing'}")
    if s.get("sink"):
        parts.append(f"sink {_ranges(s['sink'])}")
    if s.get("junction"):
        parts.append(f"junction context {_ranges(s['junction'])}")
    if "dropped" in s:
        parts.append(f"dropped {_ranges(s['dropped']) or 'nothing'}")
    if s.get("junction_dropped"):
        parts.append(f"junction dropped {_ranges(s['junction_dropped'])}")
    if s.get("query"):
        parts.append(f"chunk at RoPE {_ranges(s['query'])}")
    return ", ".join(parts) or "prompt changed, cache kept"
