"""A miniature world whose truth is known: procedural videos in the Wan latent space, their prompts,
and measures of what a causal video model makes of them.

The world is 32 x 32 latent pixels (256 x 256 pixels), one latent frame per step. Each scene is a
fixed background (sky over ground); subjects (a shape x colour x size) stand on the ground and
move left or right, bounce, pulse (grow and shrink) or rest. A subject that walks out of the
frame waits just outside it, so a later "then it moves left" brings it back at a known time; a
second subject can enter from the left; a cut changes the scene and keeps the subject. Every
frame is determined by the prompt and the frames before it (starting positions and motions
follow from the sentence), so a model trained on it can be sharp after four denoising steps.

Pictures are made in RGB at latent resolution and lifted to the 16 latent channels by one fixed
linear map: the least-norm inverse of the Wan2.1 latent-to-RGB preview projection
(:data:`gf_core.latents.RGB_FACTORS`), so :func:`gf_core.latents.preview_rgb` and ComfyUI's
Wan latent preview show a toy latent as the picture it was made from.

Prompts are sentences over :data:`VOCABULARY` in four forms (:data:`FORMS`); :func:`embed` turns
one into a ``[1, L, text_dim]`` embedding like umT5's output (one fixed vector per word, zeros
after the last word), from a word table that ships beside the toy model's weights.

Units: positions and sizes in latent pixels of the 32 x 32 world; time in latent frames
(4 pixel frames, 0.25 s at 16 fps).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import BadInput
from .latents import RGB_BIAS, RGB_FACTORS
from .recache import Transition
from .stream import Segment, chunk_plan

WORLD = 32  # latent pixels across the world (256 pixels)
PIXELS = WORLD * 8
HORIZON = 21.0  # sky above, ground below
GROUND = 25.0  # the bottom of a standing subject
SPEED = 1.5  # latent pixels per frame of "moves left/right" and "enters"
BOUNCE_HEIGHT = 8.0
BOUNCE_PERIOD = 8
PULSE_DEPTH = 0.2
PULSE_PERIOD = 8
FALL = 2.0  # latent pixels per frame a subject in the air falls once it stops bouncing
ENTER_STOP = 8.0  # where an entering subject stops
CHUNK_FRAMES = 3

SIZES = {"small": 4.0, "big": 6.5}  # radius
COLOURS = {
    "red": (0.90, 0.15, 0.10),
    "yellow": (0.95, 0.85, 0.10),
    "blue": (0.15, 0.30, 0.95),
    "magenta": (0.85, 0.20, 0.85),
}
SHAPES = ("circle", "square", "triangle")
# scene: (sky at the top, sky at the horizon, ground)
SCENES = {
    "grass": ((0.45, 0.65, 0.95), (0.75, 0.88, 0.98), (0.25, 0.60, 0.20)),
    "sand": ((0.95, 0.70, 0.50), (0.98, 0.85, 0.70), (0.85, 0.70, 0.50)),
    "snow": ((0.60, 0.65, 0.78), (0.80, 0.83, 0.90), (0.92, 0.93, 0.97)),
    "night": ((0.03, 0.03, 0.15), (0.10, 0.10, 0.28), (0.15, 0.15, 0.25)),
}
ACTIONS = ("moves left", "moves right", "bounces", "pulses", "rests")
FORMS = (
    "a SIZE COLOUR SHAPE ACTION on the SCENE",
    "then it ACTION",
    "cut to the SCENE where it ACTION",
    "then a SIZE COLOUR SHAPE enters",
)
VOCABULARY = ("a", "the", "on", "then", "it", "cut", "to", "where", "enters", "moves", "left", "right",
              "bounces", "pulses", "rests", *SIZES, *COLOURS, *SHAPES, *SCENES)
TEXT_DIM = 64  # width of a word vector
WORD_SEED = 20261201

SHIPPED_TEXT_DIM = 4096  # umT5's width, which ComfyUI's Wan model is built with
TOY_DIR = Path(__file__).resolve().parent / "toy"
MODEL_FILE = "toyworld.safetensors"
WORDS_FILE = "toyworld_words.safetensors"


@dataclass(frozen=True)
class Subject:
    size: str
    colour: str
    shape: str

    def __str__(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Sentence:
    """A parsed prompt: ``kind`` is "opening", "switch", "cut" or "enter"."""

    kind: str
    text: str
    subject: Subject | None = None
    action: str | None = None
    scene: str | None = None


# ---------------------------------------------------------------------------------------------
# Prompts


def parse(text: str) -> Sentence:
    """Read one prompt of one of the :data:`FORMS`; raises :class:`BadInput` naming what is wrong."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    for w in words:
        if w not in VOCABULARY:
            raise BadInput(f"the toy world does not know the word '{w}' in \"{text}\"; "
                           f"use only these words: {', '.join(VOCABULARY)}")
    clean = " ".join(words)

    def action(rest: list[str]) -> str | None:
        a = " ".join(rest)
        return a if a in ACTIONS else None

    def subject(ws: list[str]) -> Subject | None:
        if len(ws) == 3 and ws[0] in SIZES and ws[1] in COLOURS and ws[2] in SHAPES:
            return Subject(*ws)
        return None

    if len(words) >= 8 and words[0] == "a" and words[-3:-1] == ["on", "the"] and words[-1] in SCENES:
        s, a = subject(words[1:4]), action(words[4:-3])
        if s and a:
            return Sentence("opening", clean, s, a, words[-1])
    if words[:2] == ["then", "it"] and action(words[2:]):
        return Sentence("switch", clean, action=action(words[2:]))
    if words[:3] == ["cut", "to", "the"] and len(words) >= 7 and words[3] in SCENES and words[4:6] == ["where", "it"]:
        if action(words[6:]):
            return Sentence("cut", clean, action=action(words[6:]), scene=words[3])
    if words[:2] == ["then", "a"] and words[-1:] == ["enters"] and subject(words[2:-1]):
        return Sentence("enter", clean, subject(words[2:-1]))
    raise BadInput(f"the toy world cannot read \"{text}\"; write it in one of these forms: {'; '.join(FORMS)} "
                   f"(SIZE: {'/'.join(SIZES)}, COLOUR: {'/'.join(COLOURS)}, SHAPE: {'/'.join(SHAPES)}, "
                   f"ACTION: {'/'.join(ACTIONS)}, SCENE: {'/'.join(SCENES)})")


def word_table(text_dim: int = TEXT_DIM, seed: int = WORD_SEED) -> torch.Tensor:
    """The fixed word vectors [len(VOCABULARY), text_dim] (float32, unit variance per entry)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(VOCABULARY), text_dim, generator=g)


@dataclass
class Words:
    """A word table [V, text_dim] and its vocabulary, as shipped beside the toy model."""

    table: torch.Tensor
    vocabulary: tuple[str, ...] = VOCABULARY

    def embed(self, text: str) -> torch.Tensor:
        """A prompt -> [1, words, text_dim] (float32). Rows past the last word are zeros where the
        model pads the prompt to its text length, as umT5 output is."""
        parse(text)
        rows = [self.vocabulary.index(w) for w in text.lower().replace(",", " ").replace(".", " ").split()]
        return self.table[rows].unsqueeze(0).clone()

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        save_file({"words": self.table.contiguous()}, str(path), metadata={"vocabulary": json.dumps(self.vocabulary)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Words:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            vocabulary = tuple(json.loads(f.metadata()["vocabulary"]))
            table = f.get_tensor("words").float()
        return cls(table, vocabulary)


def widen_text(sd: dict[str, torch.Tensor], words: Words, text_dim: int = SHIPPED_TEXT_DIM,
               seed: int = WORD_SEED) -> tuple[dict[str, torch.Tensor], Words]:
    """The same model and words with word vectors ``text_dim`` wide: exact up to rounding.

    The table T [V, d] becomes T Q^T and the text embedding's first weight W [dim, d] becomes
    W Q^T, with Q [text_dim, d] of orthonormal columns (fixed by ``seed``), so every product
    (T Q^T)(W Q^T)^T = T W^T is unchanged and zero rows stay zero. The toy model is trained with
    narrow word vectors and shipped at umT5's width, the shape ComfyUI builds a Wan model with.
    """
    return widen_weights(sd, text_dim, seed), widen_words(words, sd["text_embedding.0.weight"].shape[1], text_dim, seed)


def widen_words(words: Words, narrow: int, text_dim: int = SHIPPED_TEXT_DIM, seed: int = WORD_SEED) -> Words:
    """The word half of :func:`widen_text`: the table T [V, ``narrow``] as T Q^T (unchanged when it
    is ``text_dim`` wide already)."""
    if words.table.shape[1] == text_dim:
        return words
    return Words((words.table.double() @ text_basis(text_dim, narrow, seed).T).float(), words.vocabulary)


def widen_weights(sd: dict[str, torch.Tensor], text_dim: int = SHIPPED_TEXT_DIM,
                  seed: int = WORD_SEED) -> dict[str, torch.Tensor]:
    """The model half of :func:`widen_text`: the text embedding's first weight W [dim, d] as W Q^T
    [dim, ``text_dim``], in W's dtype (unchanged when it is that wide already)."""
    weight = sd["text_embedding.0.weight"]
    if weight.shape[1] == text_dim:
        return sd
    out = dict(sd)
    out["text_embedding.0.weight"] = (weight.double() @ text_basis(text_dim, weight.shape[1], seed).T).to(weight.dtype)
    return out


def narrow_text(sd: dict[str, torch.Tensor], text_dim: int = TEXT_DIM, seed: int = WORD_SEED) -> dict[str, torch.Tensor]:
    """:func:`widen_text` undone on the model: the text embedding's first weight W' [dim, wide]
    back to W = W' Q [dim, ``text_dim``] (Q^T Q = I), exact up to rounding."""
    weight = sd["text_embedding.0.weight"]
    if weight.shape[1] == text_dim:
        return sd
    out = dict(sd)
    out["text_embedding.0.weight"] = (weight.double() @ text_basis(weight.shape[1], text_dim, seed)).to(weight.dtype)
    return out


def text_basis(wide: int, narrow: int, seed: int = WORD_SEED) -> torch.Tensor:
    """Q [wide, narrow] of orthonormal columns (float64), fixed by ``seed``: the map between the
    toy model's word vectors and umT5's width."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(wide, narrow, generator=g, dtype=torch.float64))[0]


def embed(text: str, words: Words | None = None) -> torch.Tensor:
    """:meth:`Words.embed` with the shipped word table (or ``words``)."""
    return (words or load_words()).embed(text)


# ---------------------------------------------------------------------------------------------
# The world's truth: a script of sentences -> every frame's subjects


@dataclass
class Actor:
    subject: Subject
    action: str
    x: float
    lift: float = 0.0  # height above the ground
    scale: float = 1.0
    phase: int = 0

    @property
    def radius(self) -> float:
        return SIZES[self.subject.size] * self.scale

    def step(self) -> None:
        """Advance one frame under the current action."""
        r = SIZES[self.subject.size]
        if self.action == "bounces":
            self.phase += 1
            self.lift = BOUNCE_HEIGHT * abs(math.sin(math.pi * self.phase / BOUNCE_PERIOD))
        else:
            self.lift = max(0.0, self.lift - FALL)
        if self.action == "pulses":
            self.phase += 1
            self.scale = 1.0 + PULSE_DEPTH * math.sin(2 * math.pi * self.phase / PULSE_PERIOD)
        elif self.scale != 1.0:
            self.scale = 1.0 + max(0.0, abs(self.scale - 1.0) - 0.05) * (1 if self.scale > 1 else -1)
        if self.action == "moves left":
            self.x = max(-(r + 1.0), self.x - SPEED)  # waits just outside the frame
        elif self.action == "moves right":
            self.x = min(WORLD + r + 1.0, self.x + SPEED)
        elif self.action == "enters":
            self.x = min(ENTER_STOP, self.x + SPEED)
            if self.x >= ENTER_STOP:
                self.action = "rests"

    def start(self, action: str) -> None:
        """Take up a new action (its phase starts now)."""
        self.action = action
        self.phase = 0

    def visible(self) -> float:
        """Fraction of the subject's width inside the frame."""
        r = self.radius
        return max(0.0, min(self.x + r, WORLD) - max(self.x - r, 0.0)) / (2 * r)


def start_x(action: str) -> float:
    """Where a subject starts a new shot: the far side of where it goes, else the middle."""
    return {"moves right": 8.0, "moves left": 24.0}.get(action, 16.0)


@dataclass
class FrameTruth:
    scene: str
    actors: list[Actor]  # copies, oldest first (drawn in this order)
    main: int  # the actor "it" refers to
    segment: int


@dataclass
class Story:
    """A script played out: the sentences, the frames they cover and every frame's truth."""

    sentences: list[Sentence]
    frames: list[int]  # requested latent frames per sentence
    truth: list[FrameTruth]
    starts: list[int]  # first frame of each segment (at a chunk boundary, as the engine plays them)
    shots: list[bool]  # whether each sentence starts a new shot

    def segments(self, words: Words | None = None, transitions: list[Transition | None] | None = None) -> list[Segment]:
        """The script as engine segments. A sentence starts with ``transitions[k]`` where given, else
        a sentence that starts a new shot (a cut, or an opening of another subject or scene) with a
        shot cut and the others with the policy's default switch."""
        words = words or load_words()
        transitions = transitions or [None] * len(self.sentences)
        return [Segment(words.embed(s.text), n, given or Transition("cut" if k and shot else "default"))
                for k, (s, n, given, shot) in enumerate(zip(self.sentences, self.frames, transitions, self.shots))]

    def __len__(self) -> int:
        return len(self.truth)


def play(script: list[tuple[str, int]], chunk_frames: int = CHUNK_FRAMES) -> Story:
    """Play a script of (sentence, latent frames) pairs into every frame's truth.

    Segment boundaries fall on chunk boundaries exactly as :func:`gf_core.stream.chunk_plan` puts
    them. The first sentence must be an opening; a later opening starts a new shot unless it names
    the subject and scene already on screen (then it acts as a switch); a cut keeps the subject "it"
    and drops every other; an entering subject becomes "it" and the others keep their action.
    """
    if not script:
        raise BadInput("the toy-world script is empty; give at least one sentence, e.g. "
                       "'a big red circle bounces on the grass'")
    sentences = [parse(text) for text, _ in script]
    frames = [int(n) for _, n in script]
    if sentences[0].kind != "opening":
        raise BadInput(f"the first sentence \"{sentences[0].text}\" does not say who is where; start with the form "
                       f"'{FORMS[0]}', e.g. 'a big red circle bounces on the grass'")
    for text, n in script:
        if n < chunk_frames:
            raise BadInput(f"the sentence \"{text}\" lasts {n} latent frames, less than one chunk of {chunk_frames}; "
                           f"give it at least {chunk_frames}")
    plan = chunk_plan([Segment(torch.zeros(1, 1, 1), n) for n in frames], chunk_frames)
    total = plan[-1][0] + chunk_frames
    segment_of = [k for _, k in plan for _ in range(chunk_frames)]
    starts = [next(i for i, k in enumerate(segment_of) if k == s) if s in segment_of else total
              for s in range(len(sentences))]

    scene, actors, main = "", [], 0
    truth: list[FrameTruth] = []
    shots = [False] * len(sentences)
    for f in range(total):
        k = segment_of[f]
        new = f == starts[k]
        if new:
            s = sentences[k]
            named_same = (s.kind == "opening" and actors and actors[main].subject == s.subject and scene == s.scene)
            shots[k] = s.kind == "cut" or (s.kind == "opening" and not named_same)
            if s.kind == "opening" and not named_same:
                scene, actors, main = s.scene, [Actor(s.subject, s.action, start_x(s.action))], 0
            elif s.kind == "cut":
                scene, actors, main = s.scene, [Actor(actors[main].subject, s.action, start_x(s.action))], 0
            elif s.kind == "enter":
                if any(a.subject.colour == s.subject.colour for a in actors):
                    raise BadInput(f"\"{s.text}\": a {s.subject.colour} subject is already there; "
                                   "let a subject of another colour enter")
                if len(actors) >= 2:
                    raise BadInput(f"\"{s.text}\": two subjects are already there; cut to a new scene first")
                for a in actors:
                    a.step()
                actors.append(Actor(s.subject, "enters", -(SIZES[s.subject.size] + 1.0) - SPEED))
                main = len(actors) - 1
                actors[main].step()
            else:  # a switch, or an opening naming what is on screen
                actors[main].start(s.action)
                for a in actors:
                    a.step()
        elif f > 0:
            for a in actors:
                a.step()
        truth.append(FrameTruth(scene, [replace(a) for a in actors], main, k))
    return Story(sentences, frames, truth, starts, shots)


def random_script(rng: random.Random, frames: int, chunk_frames: int = CHUNK_FRAMES) -> list[tuple[str, int]]:
    """A random script of at least ``frames`` latent frames: an opening, then switches, cuts, entries
    and openings that name what is on screen; segments of 2-6 chunks. Half the time a subject moving
    out of the frame is sent back the other way, so leaving and returning is common."""
    def subject() -> Subject:
        return Subject(rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES))

    main, scene, action = subject(), rng.choice(list(SCENES)), rng.choice(ACTIONS)
    colours = {main.colour}
    n = chunk_frames * rng.randint(2, 6)
    script = [(f"a {main} {action} on the {scene}", n)]
    total = n
    while total < frames:
        n = chunk_frames * rng.randint(2, 6)
        u = rng.random()
        if action in ("moves left", "moves right") and u < 0.5:
            action = "moves right" if action == "moves left" else "moves left"
            script.append((f"then it {action}", n))
        elif u < 0.62:
            action = rng.choice([a for a in ACTIONS if a != action])
            script.append((f"then it {action}", n))
        elif u < 0.77:
            scene, action = rng.choice(list(SCENES)), rng.choice(ACTIONS)
            colours = {main.colour}
            script.append((f"cut to the {scene} where it {action}", n))
        elif u < 0.9 and len(colours) < 2:
            new = subject()
            while new.colour in colours:
                new = subject()
            main, action = new, "rests"
            colours.add(new.colour)
            script.append((f"then a {main} enters", n))
        else:
            action = rng.choice(ACTIONS)
            script.append((f"a {main} {action} on the {scene}", n))
        total += n
    return script


# ---------------------------------------------------------------------------------------------
# Pictures and latents

SHAPE_ID = {s: i for i, s in enumerate(SHAPES)}
COLOUR_ID = {c: i for i, c in enumerate(COLOURS)}
SCENE_ID = {s: i for i, s in enumerate(SCENES)}
SUBJECT_SLOTS = 2


def draw_table(story: Story) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: the subjects to draw [F, SUBJECT_SLOTS, 6] as (present, shape, colour, x, y, radius)
    in drawing order, and the scene ids [F]."""
    table = torch.zeros(len(story), SUBJECT_SLOTS, 6)
    for f, t in enumerate(story.truth):
        for j, a in enumerate(t.actors):
            r = a.radius
            table[f, j] = torch.tensor([1.0, SHAPE_ID[a.subject.shape], COLOUR_ID[a.subject.colour],
                                        a.x, GROUND - r - a.lift, r])
    scenes = torch.tensor([SCENE_ID[t.scene] for t in story.truth])
    return table, scenes


def _grid(size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (y [size, 1], x [1, size]) in world units."""
    c = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) * (WORLD / size)
    return c.view(-1, 1), c.view(1, -1)


def backgrounds(size: int = WORLD, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every scene's background, RGB in [0, 1]: [len(SCENES), 3, size, size]."""
    y, x = _grid(size, device)
    out = []
    for name, (top, horizon, ground) in SCENES.items():
        top, horizon, ground = (torch.tensor(c, device=device).view(3, 1, 1) for c in (top, horizon, ground))
        u = (y / HORIZON).clamp(0, 1).view(1, -1, 1)
        sky = top * (1 - u) + horizon * u
        stripes = 1.0 - 0.08 * ((torch.floor(y) % 4) < 1).float().view(1, -1, 1)
        img = torch.where((y >= HORIZON).view(1, -1, 1), ground * stripes, sky).expand(3, size, size).clone()
        if name == "night":  # a few fixed stars
            for sx, sy in ((4, 3), (11, 7), (19, 2), (27, 5), (23, 11), (7, 13), (30, 15)):
                star = ((x - sx - 0.5).abs() < 0.6 * WORLD / size + 0.01) & ((y - sy - 0.5).abs() < 0.6 * WORLD / size + 0.01)
                img = torch.where(star.unsqueeze(0), torch.ones_like(img) * 0.95, img)
        out.append(img)
    return torch.stack(out)


def coverage(shape: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of subjects (shape ids, centres, radii [N]) on a size x size
    grid: [N, size, size]. A square's half side is 0.9 r; a triangle points up, base 2 r wide."""
    gy, gx = _grid(size, x.device)
    dx = gx - x.view(-1, 1, 1)
    dy = gy - y.view(-1, 1, 1)
    rr = r.view(-1, 1, 1)
    circle = rr - torch.sqrt(dx * dx + dy * dy)
    square = 0.9 * rr - torch.maximum(dx.abs(), dy.abs())
    triangle = torch.minimum(torch.minimum((dy + rr) * 0.5 - dx.abs(), rr - dy), dy + rr)
    sdf = torch.where(shape.view(-1, 1, 1) == 0, circle, torch.where(shape.view(-1, 1, 1) == 1, square, triangle))
    return (sdf * (size / WORLD) + 0.5).clamp(0, 1)


def render(table: torch.Tensor, scenes: torch.Tensor, size: int = WORLD) -> torch.Tensor:
    """Draw frames: subjects [N, S, 6] (:func:`draw_table`) over scenes [N] -> RGB [N, 3, size, size] in [0, 1]."""
    device = table.device
    img = backgrounds(size, device)[scenes]
    palette = torch.tensor(list(COLOURS.values()), device=device)
    for j in range(table.shape[1]):
        t = table[:, j]
        cov = coverage(t[:, 1].long(), t[:, 3], t[:, 4], t[:, 5], size) * t[:, 0].view(-1, 1, 1)
        colour = palette[t[:, 2].long()].view(-1, 3, 1, 1)
        img = img * (1 - cov.unsqueeze(1)) + colour * cov.unsqueeze(1)
    return img


def _factors(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.tensor(RGB_FACTORS, dtype=torch.float32, device=device)  # [16, 3]
    return f, torch.tensor(RGB_BIAS, dtype=torch.float32, device=device)


def lift_matrix(device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed map [16, 3] from preview RGB in [-1, 1] (less the preview bias) to latents: the
    least-norm z with ``RGB_FACTORS^T z = p``, so the Wan preview of a lifted picture is the picture."""
    f, _ = _factors(device)
    return f @ torch.linalg.inv(f.T @ f)


def to_latents(rgb: torch.Tensor) -> torch.Tensor:
    """RGB frames [F, 3, H, W] in [0, 1] -> normalised Wan latents [1, 16, F, H, W] (float32)."""
    _, bias = _factors(rgb.device)
    p = rgb * 2 - 1 - bias.view(1, 3, 1, 1)
    return torch.einsum("cr,frhw->cfhw", lift_matrix(rgb.device), p).unsqueeze(0)


def to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, 16, F, H, W] -> RGB [B, F, 3, H, W] in [0, 1] (float32): the preview projection
    :func:`gf_core.latents.preview_rgb` uses, before its rounding to 8 bits."""
    f, bias = _factors(latents.device)
    p = torch.einsum("bcfhw,cr->bfrhw", latents.float(), f) + bias.view(1, 1, 3, 1, 1)
    return ((p + 1) / 2).clamp(0, 1)


def story_latents(story: Story, size: int = WORLD) -> torch.Tensor:
    """The story's true video as latents [1, 16, F, size, size]."""
    table, scenes = draw_table(story)
    return to_latents(render(table, scenes, size))


def video_frames(latents: torch.Tensor, scale: int = 8, pixel_rate: bool = True) -> torch.Tensor:
    """Normalised latents [B, 16, F, H, W] -> RGB frames [B, F', H * scale, W * scale, 3] in [0, 1]
    through the preview projection (:func:`to_rgb`), each latent pixel a ``scale`` x ``scale``
    block. ``pixel_rate``: as many frames as the Wan VAE decodes (1 + 4 (F - 1), 16 fps), each
    latent frame held for its 4 pixel frames; else one frame per latent frame."""
    rgb = to_rgb(latents).permute(0, 1, 3, 4, 2)  # [B, F, H, W, 3]
    rgb = rgb.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    if pixel_rate and rgb.shape[1] > 1:
        rgb = torch.cat([rgb[:, :1], rgb[:, 1:].repeat_interleave(4, dim=1)], dim=1)
    return rgb


def check_size(height: int, width: int) -> None:
    """Raise :class:`BadInput` unless (height, width) in pixels is the toy model's trained size."""
    if (height, width) != (PIXELS, PIXELS):
        raise BadInput(f"the toy world model was trained at {PIXELS}x{PIXELS} pixels only, not {width}x{height}; "
                       f"use width {PIXELS} and height {PIXELS}")


# ---------------------------------------------------------------------------------------------
# The shipped model


def load_words(folder: str | os.PathLike | None = None) -> Words:
    """The word table shipped beside the toy model (``gf_core/toy/`` unless ``folder``)."""
    path = Path(folder or TOY_DIR) / WORDS_FILE
    if not path.is_file():
        raise BadInput(f"the toy world's word table {path.name} is missing from {path.parent}; reinstall the pack")
    return Words.load(path)


def load_model(folder: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu"):
    """The shipped toy model (or the one in ``folder``) as a :class:`gf_core.wan.WanModel`."""
    from .wan import WanModel

    return WanModel.from_state_dict(load_state_dict(folder), dtype=dtype, device=device)


def load_state_dict(folder: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The toy model's weights (through :mod:`gf_core.checkpoints`) at the width of the word table
    beside it: a file stored with narrower word vectors is widened exactly (:func:`widen_weights`)."""
    from .checkpoints import load_wan_state_dict

    path = Path(folder or TOY_DIR) / MODEL_FILE
    if not path.is_file():
        raise BadInput(f"the toy world model {path.name} is missing from {path.parent}; reinstall the pack")
    return widen_weights(load_wan_state_dict(path), load_words(folder).table.shape[1])


# ---------------------------------------------------------------------------------------------
# Measures from the known truth, on decoded frames (no learned judge)

COLOUR_MATCH = 0.3  # a pixel within this RGB distance of a palette colour belongs to that colour
VISIBLE = 0.9  # a subject counts where at least this fraction of it is inside the frame
TEMPLATE_SCALES = (0.8, 0.9, 1.0, 1.1, 1.2)
CENTRE_SHIFTS = (-0.5, 0.0, 0.5)  # pixels a template is moved either way from the box centre
COVER_FLOOR = 0.2  # a colour covering less of a pixel than this counts as absent there


@dataclass
class Detection:
    """What a frame shows in one colour: pixels [H, W] (bool), the best (shape, size) and its IoU,
    the centre (x, y) and height in world units; ``found`` False when the colour is (almost) absent."""

    found: bool
    shape: str = ""
    size: str = ""
    iou: float = 0.0
    x: float = 0.0
    y: float = 0.0
    height: float = 0.0


def colour_masks(rgb: torch.Tensor) -> torch.Tensor:
    """Frames [F, 3, H, W] -> per palette colour the pixels of that colour [F, len(COLOURS), H, W] (bool)."""
    palette = torch.tensor(list(COLOURS.values()), device=rgb.device).view(1, -1, 3, 1, 1)
    return (rgb.unsqueeze(1) - palette).norm(dim=2) < COLOUR_MATCH


def _templates(size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Every (shape, size, scale) centred at the origin of a doubled grid, for matching."""
    names, shapes, radii = [], [], []
    for shape in SHAPES:
        for name, r in SIZES.items():
            for s in TEMPLATE_SCALES:
                names.append((shape, name))
                shapes.append(SHAPE_ID[shape])
                radii.append(r * s)
    return torch.tensor(shapes, device=device), torch.tensor(radii, device=device), names


def row_backgrounds(rgb: torch.Tensor) -> torch.Tensor:
    """Frames [F, 3, H, W] -> the background colour of every row [F, 3, H, 1]: the median of the row's
    pixels that are no palette colour's, or of the nearest such row where a row has fewer than 4 (every
    scene is the same across a row, but for a few stars)."""
    coloured = colour_masks(rgb).any(1)  # [F, H, W]
    median = torch.where(coloured.unsqueeze(1), torch.nan, rgb).nanmedian(dim=3, keepdim=True).values
    enough = (~coloured).sum(2) >= 4  # [F, H]
    frames, height = enough.shape
    rows = torch.arange(height, device=rgb.device, dtype=torch.float32)
    distance = (rows.view(-1, 1) - rows.view(1, -1)).abs().expand(frames, height, height)
    source = torch.where(enough.unsqueeze(1), distance, torch.inf).argmin(2)  # [F, H]: the row to take
    return torch.gather(median, 2, source.view(frames, 1, height, 1).expand(frames, 3, height, 1))


def colour_cover(rgb: torch.Tensor) -> torch.Tensor:
    """Frames [F, 3, H, W] -> how much of each pixel each palette colour covers [F, len(COLOURS), H, W]
    in [0, 1]: the pixel read as a blend of the colour over its row's background (:func:`row_backgrounds`),
    as the world draws a subject's edge; 0 where the pixel is no such blend (off that line by
    :data:`COLOUR_MATCH` or more) or the colour covers less than :data:`COVER_FLOOR` of it."""
    background = row_backgrounds(rgb).unsqueeze(1)  # [F, 1, 3, H, 1]
    palette = torch.tensor(list(COLOURS.values()), device=rgb.device).view(1, -1, 3, 1, 1)
    pixel, towards = rgb.unsqueeze(1) - background, palette - background
    share = ((pixel * towards).sum(2) / (towards * towards).sum(2).clamp_min(1e-4)).clamp(0, 1)  # [F, K, H, W]
    off_line = (pixel - share.unsqueeze(2) * towards).norm(dim=2)
    return torch.where((off_line < COLOUR_MATCH) & (share >= COVER_FLOOR), share, torch.zeros_like(share))


def detect(cover: torch.Tensor, batch: int = 64) -> list[Detection]:
    """Classify the cover of one colour each, [N, H, W] in [0, 1] (:func:`colour_cover`), by the shape
    template whose anti-aliased coverage overlaps it best (soft IoU: sum of minima over sum of maxima),
    placed at the centre of the box of the pixels it covers more than half of (a triangle's centre is
    the middle of its box too) and up to half a pixel either way; fewer than 3 such pixels: not found.

    The overlap is soft because a small subject's shape is in its edge pixels: a small square and a
    small circle differ in a few partly covered pixels, which a yes/no mask of the colour loses."""
    n, size = cover.shape[0], cover.shape[-1]
    unit = WORLD / size
    shapes, radii, names = _templates(size, cover.device)
    shifts = torch.tensor([(sx, sy) for sx in CENTRE_SHIFTS for sy in CENTRE_SHIFTS], device=cover.device) * unit
    placed = len(names) * len(shifts)
    out: list[Detection] = [Detection(False)] * n
    solid = cover > 0.5
    index = (solid.flatten(1).sum(1) >= 3).nonzero().flatten()
    coords = torch.arange(size, device=cover.device, dtype=torch.float32)
    big = float(size + 1)
    for part in index.split(batch):
        m, c = solid[part], cover[part]  # [P, H, W]
        rows, cols = m.any(2), m.any(1)  # [P, H], [P, W]
        y0 = torch.where(rows, coords, big).min(1).values * unit
        y1 = (torch.where(rows, coords, -1.0).max(1).values + 1) * unit
        x0 = torch.where(cols, coords, big).min(1).values * unit
        x1 = (torch.where(cols, coords, -1.0).max(1).values + 1) * unit
        p = len(part)
        cx = (((x0 + x1) / 2).view(p, 1, 1) + shifts[:, 0].view(1, -1, 1)).expand(p, len(shifts), len(names))
        cy = (((y0 + y1) / 2).view(p, 1, 1) + shifts[:, 1].view(1, -1, 1)).expand(p, len(shifts), len(names))
        template = coverage(shapes.repeat(p * len(shifts)), cx.reshape(-1), cy.reshape(-1),
                            radii.repeat(p * len(shifts)), size).view(p, placed, size, size)
        inter = torch.minimum(template, c.unsqueeze(1)).flatten(2).sum(2)
        union = torch.maximum(template, c.unsqueeze(1)).flatten(2).sum(2)
        iou, best = (inter / union.clamp_min(1e-6)).max(1)
        for j, k in enumerate(part.tolist()):
            b = int(best[j]) % len(names)
            out[k] = Detection(True, names[b][0], names[b][1], float(iou[j]), float((x0[j] + x1[j]) / 2),
                               float((y0[j] + y1[j]) / 2), float(y1[j] - y0[j]))
    return out


def decode_detections(latents: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Detection]]]:
    """Latents [1, 16, F, H, W] -> RGB frames [F, 3, H, W] and per frame a detection per colour."""
    rgb = to_rgb(latents)[0]
    found = detect(colour_cover(rgb).flatten(0, 1))
    k = len(COLOURS)
    return rgb, [dict(zip(COLOURS, found[f * k:(f + 1) * k])) for f in range(rgb.shape[0])]


def identity_hits(story: Story, found: list[dict[str, Detection]], frames: range | None = None) -> list[tuple[int, bool]]:
    """(frame, right) for every subject the truth shows (at least :data:`VISIBLE` inside the frame)
    in ``frames``: right when its colour is there with its shape and size (template IoU >= 0.5)."""
    out = []
    for f in frames if frames is not None else range(len(story)):
        if f >= len(found):
            break
        for a in story.truth[f].actors:
            if a.visible() < VISIBLE:
                continue
            d = found[f][a.subject.colour]
            out.append((f, d.found and d.shape == a.subject.shape and d.size == a.subject.size and d.iou >= 0.5))
    return out


def _rate(hits: list[tuple[int, bool]]) -> float | None:
    return sum(ok for _, ok in hits) / len(hits) if hits else None


def identity_accuracy(story: Story, latents: torch.Tensor, frames: int | None = None) -> float | None:
    """Share of (frame, visible subject) pairs shown right over the first ``frames`` frames (all: None)."""
    _, found = decode_detections(latents[:, :, :frames] if frames else latents)
    return _rate(identity_hits(story, found))


def background_error(rgb: torch.Tensor, story: Story) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: mean |frame - background| against every scene over pixels away from any subject
    [F, len(SCENES)], and the mask of those pixels [F, H, W]."""
    size = rgb.shape[-1]
    bgs = backgrounds(size, rgb.device)
    masks = colour_masks(rgb).any(dim=1).float()
    table, scenes = draw_table(story)
    truth = render(table[: rgb.shape[0]].to(rgb.device), scenes[: rgb.shape[0]].to(rgb.device), size)
    subject = (truth - bgs[scenes[: rgb.shape[0]]]).abs().sum(1) > 0.02  # where the truth has a subject
    near = torch.nn.functional.max_pool2d((masks + subject.float()).clamp(max=1).unsqueeze(1), 3, 1, 1)[:, 0] > 0
    keep = ~near
    diff = (rgb.unsqueeze(1) - bgs.unsqueeze(0)).abs().mean(2)  # [F, scenes, H, W]
    err = (diff * keep.unsqueeze(1)).flatten(2).sum(2) / keep.flatten(1).sum(1, keepdim=True).clamp_min(1)
    return err, keep


def motion_of(track: list[Detection | None], t: int) -> str | None:
    """The action frames t-2..t of one subject's detections show (None where it was not seen)."""
    window = track[max(0, t - 2): t + 1]
    if len(window) < 3 or any(d is None or not d.found for d in window):
        return None
    dx = (window[-1].x - window[0].x) / 2
    dy = sum(abs(b.y - a.y) for a, b in zip(window, window[1:])) / 2
    dh = sum(abs(b.height - a.height) for a, b in zip(window, window[1:])) / 2
    if dx < -0.75:
        return "moves left"
    if dx > 0.75:
        return "moves right"
    if dy > 0.75:
        return "bounces"
    if dh > 0.3:
        return "pulses"
    return "rests"


def measure(story: Story, latents: torch.Tensor, first: int = 21, frames_per_minute: int = 240) -> dict:
    """Every measure of a generated video [1, 16, F, H, W] against the story it was asked for.

    identity_first: identity accuracy over the first ``first`` frames; identity: over all frames;
    scene: share of frames whose background is nearest the true scene's; recall: identity accuracy
    over the 12 frames after a subject returns into the frame after at least 6 frames outside it;
    cut_identity: identity accuracy over the 12 frames after each cut; flicker: mean |difference| of
    consecutive frames (RGB, 0-255) and the truth's; drift: per minute, mean |frame - true
    background| (0-255) away from subjects; collapse: per minute, share of frames where a subject
    the truth shows is not found in its colour at all; switch_response: frames from each action
    switch until the motion shows the new action 3 frames running (None: never within the segment);
    switch_shock: the frame difference at each switch over the median of the 8 before it.
    """
    rgb, found = decode_detections(latents)
    n = rgb.shape[0]
    hits = identity_hits(story, found)
    out: dict = {"frames": n, "identity_first": _rate([h for h in hits if h[0] < first]), "identity": _rate(hits)}

    err, _ = background_error(rgb, story)
    true_scene = torch.tensor([SCENE_ID[t.scene] for t in story.truth[:n]])
    out["scene"] = float((err.argmin(1).cpu() == true_scene).float().mean())

    recall, cuts = _returns_and_cuts(story, found, n)
    out["recall"] = _rate(recall)
    out["cut_identity"] = _rate(cuts)

    def diffs(x: torch.Tensor) -> torch.Tensor:
        return (x[1:] - x[:-1]).abs().mean(dim=(1, 2, 3)) * 255

    truth_rgb = render(*draw_table(story), size=rgb.shape[-1])[:n]
    d = diffs(rgb)
    out["flicker"] = float(d.mean()) if n > 1 else None
    out["flicker_truth"] = float(diffs(truth_rgb).mean()) if n > 1 else None

    drift, collapse = [], []
    for m in range(0, n, frames_per_minute):
        span = range(m, min(n, m + frames_per_minute))
        drift.append(float(err[span.start:span.stop].gather(1, true_scene[span.start:span.stop].view(-1, 1)).mean() * 255))
        shown = [(f, a) for f in span for a in story.truth[f].actors if a.visible() >= VISIBLE]
        missing = [f for f, a in shown if not found[f][a.subject.colour].found]
        collapse.append(len(missing) / len(shown) if shown else None)
    out["drift"] = drift
    out["collapse"] = collapse

    responses, shocks = _switches(story, found, d, n)
    out["switch_response"] = responses
    out["switch_shock"] = shocks
    return out


def _returns_and_cuts(story: Story, found: list, n: int) -> tuple[list, list]:
    """Identity hits over the 12 frames after a subject returns (after 6+ frames outside) and after each cut."""
    recall, cuts = [], []
    for j in range(SUBJECT_SLOTS):
        outside = 0
        for f in range(n):
            actors = story.truth[f].actors
            if j >= len(actors):
                outside = 0
                continue
            v = actors[j].visible()
            if v < 0.1:
                outside += 1
            elif outside >= 6 and v >= VISIBLE:
                recall += identity_hits(story, found, range(f, min(n, f + 12)))
                outside = 0
            elif v >= VISIBLE:
                outside = 0
    for k, s in enumerate(story.sentences):
        if k and s.kind == "cut" and story.starts[k] < n:
            cuts += identity_hits(story, found, range(story.starts[k], min(n, story.starts[k] + 12)))
    return recall, cuts


def _switches(story: Story, found: list, d: torch.Tensor, n: int) -> tuple[list, list]:
    """Per action switch: frames until the motion shows the new action 3 frames running, and the shock
    (the frame difference ``d`` at the switch over the median of the 8 before it)."""
    responses, shocks = [], []
    for k, s in enumerate(story.sentences):
        start = story.starts[k]
        if not k or s.kind != "switch" or start >= n:
            continue
        end = story.starts[k + 1] if k + 1 < len(story.starts) else n
        end = min(end, n)
        subject = story.truth[start].actors[story.truth[start].main].subject
        actors = [next((a for a in t.actors if a.subject == subject), None) for t in story.truth[:n]]
        track = [found[f][subject.colour] if a is not None and a.visible() >= VISIBLE else None
                 for f, a in enumerate(actors)]
        truth_track = [Detection(True, x=a.x, y=GROUND - a.radius - a.lift, height=2 * a.radius)
                       if a is not None and a.visible() >= VISIBLE else None for a in actors]
        if motion_of(truth_track, min(end - 1, start + 4)) != s.action:
            continue  # the new action is not visible in the truth (e.g. the subject waits outside the frame)
        response = None
        for f in range(start, end - 2):
            if all(motion_of(track, g) == s.action for g in (f, f + 1, f + 2)):
                response = f - start
                break
        responses.append(response)
        if start >= 9:
            before = sorted(float(x) for x in d[start - 9: start - 1])
            median = before[len(before) // 2]
            shocks.append(float(d[start - 1]) / max(median, 1e-3))
    return responses, shocks
