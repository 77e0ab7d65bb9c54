"""Every bad input of the timeline, the prompt / transition / loader nodes and the checkpoint readers,
one parametrised case each: refused with the pack's own error (BadInput), in one sentence that names
the input, in under a second (the 1 MiB timeline headers in under 0.1 s), before any model forward.

Case ids start with their class (``script-``, ``input-``, ``loader-``, ``shard-``, ``weights-``,
``file-``, ``pickle-``, ``lora-``); docs/RELIABILITY.md counts them by that prefix. The engine's
pre-flight checks (sizes, lengths, RoPE tables, GPU memory, seeds, ...) are not in this file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from grounded_forcing import gf_core as gf
from grounded_forcing.gf_core.checkpoints import load_lora, load_wan_state_dict, merge_lora
from grounded_forcing.gf_core.config import MAX_LATENT_FRAMES
from grounded_forcing.gf_core.errors import BadInput
from grounded_forcing.nodes import loading, prompts
from safetensors.torch import save_file

CFG = gf.WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=1, text_dim=32)
RANK = 4
MIB = 2**20
NAN, INF = math.nan, math.inf
MARKER = "pwned"  # what a malicious pickle would create in the case's folder if it ever ran

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol 5")


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], Callable[[], object]]  # prepares files under a folder, returns the call
    names: str  # regex the message must match: it names the bad input
    limit_s: float = 1.0


CASES: list[Case] = []


def case(id: str, names: str, limit_s: float = 1.0):
    """Register the decorated ``make(folder) -> call`` as a case."""

    def register(make: Callable[[Path], Callable[[], object]]) -> Callable:
        CASES.append(Case(id, make, names, limit_s))
        return make

    return register


def calls(id: str, names: str, fn: Callable, *args, limit_s: float = 1.0, **kwargs) -> None:
    """Register a case that needs no files: ``fn(*args, **kwargs)``."""
    CASES.append(Case(id, lambda _folder: lambda: fn(*args, **kwargs), names, limit_s))


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny Wan model, a text encoder that counts its calls, and no nn.Module forward


ENCODED: list[str] = []


def encode(text: str) -> list:
    """The text encoder of the timeline cases: any call is a model forward, which must not happen."""
    ENCODED.append(text)
    return [[torch.zeros(1, 8, 4096), {}]]


def timeline(script: object) -> Callable[[], object]:
    return lambda: prompts.timeline(script, encode)  # type: ignore[arg-type]


def base(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return gf.random_state_dict(CFG, seed=0, dtype=dtype)


def with_(sd: dict, **changes: torch.Tensor) -> dict:
    """``sd`` with entries replaced (keys given with '__' for '.')."""
    return dict(sd, **{k.replace("__", "."): v for k, v in changes.items()})


def save(folder: Path, name: str, sd: dict) -> Path:
    path = folder / name
    if name.endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def lora(modules: tuple[str, ...] = ("blocks.0.self_attn.q", "blocks.0.ffn.2")) -> dict[str, torch.Tensor]:
    """A kohya LoRA (lora_down [r, in], lora_up [out, r], alpha) for ``modules`` of CFG."""
    g = torch.Generator().manual_seed(1)
    shapes = {k: v.shape for k, v in base().items()}
    out = {}
    for m in modules:
        rows, cols = shapes[f"{m}.weight"]
        out[f"{m}.lora_down.weight"] = torch.randn(RANK, cols, generator=g) / cols**0.5
        out[f"{m}.lora_up.weight"] = torch.randn(rows, RANK, generator=g) * 0.1
        out[f"{m}.alpha"] = torch.tensor(float(RANK))
    return out


def index(folder: Path, weight_map: object, name: str = "model.safetensors.index.json") -> Path:
    path = folder / name
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


class EvilOpen:
    """Unpickling this creates the marker file."""

    def __init__(self, folder: Path) -> None:
        self.target = str(folder / MARKER)

    def __reduce__(self):
        return (open, (self.target, "w"))


class EvilSystem(EvilOpen):
    def __reduce__(self):
        return (os.system, (f"touch '{self.target}'",))


class NotATensor:
    def __init__(self) -> None:
        self.lr = 1e-4


# ---------------------------------------------------------------------------------------------
# script-: the timeline script (GF Prompt Timeline)

# The 1 MiB headers are the shapes a backtracking tokenizer is quadratic on.
calls("script-1mib-header", r"line 1: the words before '\|' are 1,048,5\d\d characters", timeline(
    "5s " + "a" * MIB + " | a cat"), limit_s=0.1)
calls("script-1mib-header-of-open-parens", r"line 1: the words before '\|' are 1,048,5\d\d characters", timeline(
    "5s " + "apr(" * (MIB // 4) + " | a cat"), limit_s=0.1)
calls("script-1mib-header-of-words", r"line 1: the words before '\|' are 1,048,5\d\d characters", timeline(
    "5s " + "ab " * (MIB // 3) + " | a cat"), limit_s=0.1)
calls("script-1mib-line-without-bar", r"line 1: no '\|'", timeline("x" * MIB), limit_s=0.1)
calls("script-1mib-prompt", r"line 1: the prompt has 1,048,576 characters", timeline("5s | " + "x" * MIB), limit_s=0.1)
calls("script-too-long", r"timeline script has 2,000,00\d characters", timeline("# " + "x" * 2_000_000))
calls("script-too-many-segments", r"line 1001: the timeline has more than 1000 segments", timeline(
    "\n".join("3f | a" for _ in range(1001))))
calls("script-total-over-an-hour", r"line 2: the timeline reaches 6000 s", timeline("3000s | a\n+3000s | b"))
calls("script-400-digit-frames", r"line 1: duration '9{30}.*' is longer than the longest video", timeline(
    "9" * 400 + "f | a"))
calls("script-400-digit-seconds", r"line 1: duration '9{30}.*' is longer than the longest video", timeline(
    "9" * 400 + "s | a"))
calls("script-99999999s", r"line 1: duration '99999999s' is longer than the longest video", timeline("99999999s | a"))
calls("script-3601s", r"line 1: duration .3601s. is longer than the longest video the pack makes \(3600 s = 14400 latent frames\)", timeline("3601s | a"))
calls("script-14401f", r"line 1: duration '14401f' is longer", timeline("14401f | a"))
calls("script-exponent-seconds", r"line 1: unknown word '1e20s'", timeline("1e20s | a"))
calls("script-negative-seconds", r"line 1: unknown word '-5s'", timeline("-5s | a"))
calls("script-0s", r"line 1: duration 0 s is not a positive number", timeline("0s | a"))
calls("script-0f", r"line 1: duration 0 latent frames is shorter than one chunk", timeline("0f | a"))
calls("script-2f", r"line 2: duration 2 latent frames is shorter than one chunk", timeline("5s | a\n2f | b"))
calls("script-fractional-frames", r"line 1: duration 4.5 latent frames is not a whole number", timeline("4.5f | a"))
calls("script-apr-nan-window", r"line 2: 'apr\(0.8, nan\)' holds something that is not a number", timeline(
    "5s | a\n4s apr(0.8, nan) | b"))
calls("script-apr-nan-alpha", r"line 2: 'apr\(nan\)' holds something that is not a number", timeline(
    "5s | a\n4s apr(nan) | b"))
calls("script-apr-inf-window", r"line 2: 'apr\(0.8, inf\)' holds", timeline("5s | a\n4s apr(0.8, inf) | b"))
calls("script-apr-empty-args", r"line 2: 'apr\(,\)' holds", timeline("5s | a\n4s apr(,) | b"))
calls("script-apr-no-args", r"line 2: 'apr\(\)' holds", timeline("5s | a\n4s apr() | b"))
calls("script-apr-trailing-comma", r"line 2: 'apr\(0.8,\)' holds", timeline("5s | a\n4s apr(0.8,) | b"))
calls("script-apr-exponent", r"line 2: 'apr\(8e-1\)' holds", timeline("5s | a\n4s apr(8e-1) | b"))
calls("script-apr-word", r"line 2: 'apr\(x\)' holds", timeline("5s | a\n4s apr(x) | b"))
calls("script-apr-three-numbers", r"line 2: 'apr\(0.8, 6, 2\)' has 3 numbers", timeline("5s | a\n4s apr(0.8, 6, 2) | b"))
calls("script-apr-alpha-above-1", r"line 3: alpha_max 1.5 is outside \[0, 1\]", timeline("5s | a\n# c\n4s apr(1.5) | b"))
calls("script-apr-alpha-negative", r"line 2: alpha_max -0.1 is outside", timeline("5s | a\n4s apr(-0.1) | b"))
calls("script-apr-window-below-1", r"line 2: d_window 0.5 is outside", timeline("5s | a\n4s apr(0.8, 0.5) | b"))
calls("script-apr-window-above-max", r"line 2: d_window 5000 is outside .* 1 to 1024", timeline(
    "5s | a\n4s apr(0.8, 5000) | b"))
calls("script-apr-window-negative", r"line 2: d_window -6 is outside", timeline("5s | a\n4s apr(0.8, -6) | b"))
calls("script-apr-unclosed", r"line 2: 'apr\(0.8' opens '\(' without closing it", timeline("5s | a\n4s apr(0.8 | b"))
calls("script-unknown-transition", r"line 2: unknown word 'fade'", timeline("5s | a\n4s fade | b"))
calls("script-unknown-switch-rule", r"line 2: unknown word 'aprr'", timeline("5s | a\n4s aprr | b"))
calls("script-two-durations", r"line 1: two durations", timeline("5s 4s | a"))
calls("script-two-transitions", r"line 2: two transitions", timeline("5s | a\n4s cut hard | b"))
calls("script-no-duration", r"line 3: no duration before '\|'", timeline("5s | a\n\n| a cat"))
calls("script-no-bar", r"line 2: no '\|'", timeline("5s | a\n4s a cat"))
calls("script-empty-prompt", r"line 1: the prompt after '\|' is empty", timeline("5s |   "))
calls("script-first-line-cut", r"line 1: the first segment has a 'cut' transition", timeline("cut 5s | a"))
calls("script-first-line-apr", r"line 2: the first segment has a 'apr' transition", timeline("# intro\napr 5s | a"))
calls("script-only-comments", r"timeline script has no segments", timeline("# only a comment\n\n"))
calls("script-empty", r"timeline script has no segments", timeline(""))
calls("script-not-text", r"timeline script is a NoneType, not text", timeline(None))
# Line numbers count only \n, \r\n and \r: other Unicode breaks inside a prompt do not shift them.
for _id, _sep in [("u2028", "\u2028"), ("u2029", "\u2029"), ("nel", "\x85"), ("vt", "\x0b"), ("ff", "\x0c")]:
    calls(f"script-{_id}-in-prompt-keeps-line-numbers", r"^line 2: unknown word 'fade'", timeline(
        f"5s | a{_sep}b\n4s fade | c"))
calls("script-cr-line-break", r"^line 3: unknown word 'fade'", timeline("5s | a\r4s | b\r\n4s fade | c"))
calls("script-long-word-is-quoted-short", r"unknown word 'z{30,40}\.\.\.'", timeline("5s " + "z" * 900 + " | a"))


# ---------------------------------------------------------------------------------------------
# input-: GF Prompt Segment, GF APR Transition, the conditioning and segment chaining

frames = prompts.latent_frames
calls("input-seconds-nan", r"duration NaN s is not a number", frames, NAN, "seconds")
calls("input-frames-nan", r"duration NaN latent frames is not a number", frames, NAN, "latent frames")
calls("input-seconds-inf", r"duration inf s is longer than the longest video", frames, INF, "seconds")
calls("input-frames-inf", r"duration inf latent frames is longer", frames, INF, "latent frames")
calls("input-frames-minus-inf", r"duration -inf latent frames is shorter than one chunk", frames, -INF, "latent frames")
calls("input-seconds-negative", r"duration -1 s is not a positive number", frames, -1.0, "seconds")
calls("input-seconds-1e20", r"duration 1e\+20 s is longer than the longest video .*3600 s", frames, 1e20, "seconds")
calls("input-seconds-99999999", r"duration 1e\+08 s is longer", frames, 99999999.0, "seconds")
calls("input-frames-14401", r"duration 14401 latent frames is longer .*14400", frames, 14401, "latent frames")
calls("input-frames-fractional", r"duration 4.5 latent frames is not a whole number", frames, 4.5, "latent frames")
calls("input-frames-2", r"duration 2 latent frames is shorter than one chunk", frames, 2, "latent frames")
calls("input-unit-unknown", r"unknown duration unit 'minutes'", frames, 5, "minutes")
calls("input-duration-text", r"duration ''5'' is not a number", frames, "5", "seconds")

transition = prompts.make_transition
calls("input-apr-alpha-nan", r"alpha_max nan is not a number", transition, "apr", NAN, 0.0)
calls("input-apr-alpha-inf", r"alpha_max inf is not a number", transition, "apr", INF, 0.0)
calls("input-apr-alpha-above-1", r"alpha_max 1.5 is outside \[0, 1\]", transition, "apr", 1.5, 0.0)
calls("input-apr-alpha-negative", r"alpha_max -0.5 is outside", transition, "apr", -0.5, 0.0)
calls("input-apr-window-nan", r"d_window nan is not a number", transition, "apr", 0.8, NAN)
calls("input-apr-window-inf", r"d_window inf is not a number", transition, "apr", 0.8, INF)
calls("input-apr-window-below-1", r"d_window 0.5 is outside", transition, "apr", 0.8, 0.5)
calls("input-apr-window-negative", r"d_window -1 is outside", transition, "apr", 0.8, -1.0)
calls("input-apr-window-above-max", r"d_window 5000 is outside", transition, "apr", 0.8, 5000.0)
calls("input-transition-unknown-mode", r"unknown transition mode 'aprr'", transition, "aprr")
calls("input-hard-with-nan-alpha", r"alpha_max nan is not a number", transition, "hard", NAN, 0.0)

embedding = prompts.prompt_embedding
calls("input-conditioning-empty", r"the conditioning is empty", embedding, [])
calls("input-conditioning-none", r"the conditioning is empty", embedding, None)
calls("input-conditioning-2d", r"holds no \[1, L, 4096\] text embedding", embedding, [[torch.zeros(8, 4096), {}]])
calls("input-conditioning-no-rows", r"shape \[1, 0, 4096\], with no rows", embedding, [[torch.zeros(1, 0, 4096), {}]])
calls("input-conditioning-int64", r"holds int64 values, not floating point", embedding,
      [[torch.zeros(1, 8, 4096, dtype=torch.int64), {}]])
calls("input-conditioning-bool", r"holds bool values", embedding, [[torch.zeros(1, 8, 4096, dtype=torch.bool), {}]])
calls("input-conditioning-complex", r"holds complex64 values", embedding,
      [[torch.zeros(1, 8, 4096, dtype=torch.complex64), {}]])
calls("input-conditioning-nan", r"holds NaN or infinite values", embedding, [[torch.full((1, 8, 4096), NAN), {}]])
calls("input-conditioning-inf", r"holds NaN or infinite values", embedding,
      [[torch.zeros(1, 8, 4096).index_fill_(1, torch.tensor([3]), INF), {}]])
calls("input-first-segment-with-transition", r"first segment has a 'cut' transition", prompts.add_segment,
      None, torch.zeros(1, 8, 4096), 20, gf.Transition("cut"))


@case("input-segments-over-an-hour", r"the segments add up to 14403 latent frames \(3600.75 s\)")
def _(folder: Path):
    hour = prompts.add_segment(None, torch.zeros(1, 8, 4096), prompts.MAX_VIDEO_FRAMES)
    return lambda: prompts.add_segment(hour, torch.zeros(1, 8, 4096), 3)


@case("input-segment-1001", r"this would be segment 1001, but a video holds at most 1000 segments")
def _(folder: Path):
    chain = None
    for _ in range(prompts.MAX_SEGMENTS):
        chain = prompts.add_segment(chain, torch.zeros(1, 1, 8), 3)
    return lambda: prompts.add_segment(chain, torch.zeros(1, 1, 8), 3)


# ---------------------------------------------------------------------------------------------
# loader-: GF Load Causal Wan Model's options (checked before any file is read: the paths below
# do not exist, so a later check would report that instead)

calls("loader-weights-unknown", r"unknown weights 'critic'", loading.read_state_dict, "missing.pt", "critic")
calls("loader-weight-dtype-unknown", r"unknown weight dtype 'int4'", loading.model_options, "int4")
calls("loader-lora-strength-nan", r"LoRA strength nan is not a finite number", loading.read_state_dict,
      "missing.pt", "ema", "missing_lora.safetensors", NAN)
calls("loader-lora-strength-inf", r"LoRA strength inf is not a finite number", loading.read_state_dict,
      "missing.pt", "ema", "missing_lora.safetensors", INF)
calls("loader-prefer-unknown", r"prefer must be 'ema' or 'generator', not 'critic'", load_wan_state_dict,
      {}, "critic")


# ---------------------------------------------------------------------------------------------
# shard-: sharded checkpoints and their index


def sharded(folder: Path) -> tuple[Path, dict]:
    """A good two-shard model in ``folder/model``; returns the folder and its weight_map."""
    model = folder / "model"
    model.mkdir()
    sd = base()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(model / name))
        weight_map.update(dict.fromkeys(part, name))
    return model, weight_map


def escaping(target: str) -> Callable[[Path], Callable[[], object]]:
    def make(folder: Path):
        model, weight_map = sharded(folder)
        weight_map[next(iter(weight_map))] = target
        path = index(model, weight_map)
        return lambda: load_wan_state_dict(path)

    return make


@case("shard-outside-folder-on-disk", r"names the shard '\.\./secret\.safetensors', which lies outside")
def _(folder: Path):
    save_file(base(), str(folder / "secret.safetensors"))  # exists and is valid: it must still not be read
    return escaping("../secret.safetensors")(folder)


CASES.append(Case("shard-dot-dot-etc-hostname", escaping("../../etc/hostname"),
                  r"names the shard '\.\./\.\./etc/hostname', which lies outside the index's folder"))
CASES.append(Case("shard-absolute-path", escaping("/etc/hostname"), r"names the shard '/etc/hostname', which lies outside"))
CASES.append(Case("shard-nul-in-name", escaping("a\0b.safetensors"), r"names the shard 'a\\x00b\.safetensors'"))


@case("shard-symlink-out-of-folder", r"names the shard 'model-00001-of-00002\.safetensors', which lies outside")
def _(folder: Path):
    model, weight_map = sharded(folder)
    outside = folder / "elsewhere.safetensors"
    (model / "model-00001-of-00002.safetensors").rename(outside)
    (model / "model-00001-of-00002.safetensors").symlink_to(outside)
    path = index(model, weight_map)
    return lambda: load_wan_state_dict(path)


def bad_map(weight_map: object) -> Callable[[Path], Callable[[], object]]:
    def make(folder: Path):
        path = index(folder, weight_map)
        return lambda: load_wan_state_dict(path)

    return make


CASES += [
    Case("shard-weight-map-list", bad_map(["a.safetensors"]), r"model\.safetensors\.index\.json has a weight_map that"),
    Case("shard-weight-map-numbers", bad_map({"head.modulation": 3}), r"index\.json has a weight_map that is not"),
    Case("shard-weight-map-empty", bad_map({}), r"index\.json has a weight_map that is not"),
]


@case("shard-index-not-json", r"model\.safetensors\.index\.json is incomplete or corrupt")
def _(folder: Path):
    path = folder / "model.safetensors.index.json"
    path.write_text('{"weight_map": {"a": ')
    return lambda: load_wan_state_dict(path)


@case("shard-index-is-a-list", r"model\.safetensors\.index\.json is incomplete or corrupt")
def _(folder: Path):
    path = folder / "model.safetensors.index.json"
    path.write_text("[1, 2]")
    return lambda: load_wan_state_dict(path)


@case("shard-index-huge", r"model\.safetensors\.index\.json is 68,157,440 bytes")
def _(folder: Path):
    path = folder / "model.safetensors.index.json"
    with open(path, "wb") as f:
        f.truncate(65 * MIB)  # sparse: no disk used, nothing to read
    return lambda: load_wan_state_dict(path)


@case("shard-missing", r"shard model-00002-of-00002\.safetensors listed in .* does not exist")
def _(folder: Path):
    model, weight_map = sharded(folder)
    (model / "model-00002-of-00002.safetensors").unlink()
    path = index(model, weight_map)
    return lambda: load_wan_state_dict(path)


@case("shard-two-full-models", r"two\.safetensors repeats 42 weights of another of the given files")
def _(folder: Path):
    files = [save(folder, "one.safetensors", base()), save(folder, "two.safetensors", base())]
    return lambda: load_wan_state_dict(files)


@case("shard-key-in-two-shards", r"model-00002-of-00002\.safetensors repeats 1 weights .*first: blocks\.0\.cross_attn\.k")
def _(folder: Path):
    model, weight_map = sharded(folder)
    sd = base()
    first, second = (model / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    part = {k: sd[k] for k, v in weight_map.items() if v == second.name}
    part["blocks.0.cross_attn.k.bias"] = sd["blocks.0.cross_attn.k.bias"]  # also in the first shard
    save_file(part, str(second))
    path = index(model, weight_map)
    return lambda: load_wan_state_dict(path)


# ---------------------------------------------------------------------------------------------
# weights-: tensors that do not form a Wan2.1 T2V model (checked on names, shapes and dtypes)

SD = base()
DIM = CFG.dim
shape_cases = {
    "patch-embedding-1d": (dict(patch_embedding__weight=torch.zeros(DIM)), r"patch_embedding\.weight of shape \[128\]"),
    "patch-embedding-4d": (dict(patch_embedding__weight=torch.zeros(DIM, 16, 2, 2)), r"patch_embedding\.weight .*5-D"),
    "patch-embedding-empty": (dict(patch_embedding__weight=torch.zeros(0, 16, 1, 2, 2)), r"patch_embedding\.weight of shape \[0,"),
    "head-modulation-2d": (dict(head__modulation=torch.zeros(2, DIM)), r"head\.modulation of shape \[2, 128\] .*3-D"),
    "head-1d": (dict(head__head__weight=torch.zeros(64)), r"head\.head\.weight of shape \[64\]"),
    "ffn-1d": (dict(blocks__0__ffn__0__weight=torch.zeros(256)), r"blocks\.0\.ffn\.0\.weight of shape \[256\]"),
    "text-embedding-1d": (dict(text_embedding__0__weight=torch.zeros(DIM)), r"text_embedding\.0\.weight of shape"),
    "time-embedding-1d": (dict(time_embedding__0__weight=torch.zeros(DIM)), r"time_embedding\.0\.weight of shape"),
    "dim-not-multiple-of-128": (dict(patch_embedding__weight=torch.zeros(200, 16, 1, 2, 2)), r"200 output channels"),
    "head-rows-not-patches": (dict(head__head__weight=torch.zeros(63, DIM)), r"head\.head\.weight of shape \[63, 128\]"),
    "block-gap": (dict(blocks__7__ffn__0__weight=torch.zeros(256, DIM)), r"blocks up to blocks\.7 but no blocks\.1"),
    "block-number-huge": (dict(blocks__99999999__ffn__0__weight=torch.zeros(1)), r"blocks up to blocks\.99999999"),
    "block-not-a-number": (dict(blocks__x__ffn__0__weight=torch.zeros(1)), r"weights under blocks\.x"),
    "wrong-shape": (dict(blocks__0__self_attn__q__weight=torch.zeros(DIM, 64)), r"blocks\.0\.self_attn\.q\.weight of shape \[128, 64\]"),
    "extra-vace-weights": (dict(vace_blocks__0__before_proj__weight=torch.zeros(4, 4)), r"does not have \(first: vace_blocks"),
    "i2v-image-embedding": (dict(img_emb__proj__1__weight=torch.zeros(DIM, 1280)), r"image-to-video"),
    "i2v-36-channels": (dict(patch_embedding__weight=torch.zeros(DIM, 36, 1, 2, 2)), r"image-to-video"),
    "wan22-48-channels": (dict(patch_embedding__weight=torch.zeros(DIM, 48, 1, 2, 2)), r"takes 48 latent channels, like Wan2\.2"),
    "diffusers-format": (dict(scale_shift_table=torch.zeros(1, 2, DIM)), r"diffusers format"),
    "fp8-scaled": (dict(scaled_fp8=torch.zeros(1)), r"fp8_scaled ComfyUI checkpoint"),
}
for _id, (_changes, _names) in shape_cases.items():
    CASES.append(Case(f"weights-{_id}", lambda _f, c=_changes: lambda: load_wan_state_dict(with_(SD, **c)), _names))

calls("weights-missing-one", r"missing 1 of the 42 Wan2\.1 weights \(first: blocks\.0\.ffn\.2\.bias\)",
      load_wan_state_dict, {k: v for k, v in SD.items() if k != "blocks.0.ffn.2.bias"})
calls("weights-missing-head-modulation", r"not a Wan2\.1 diffusion model \(no patch_embedding / head\.modulation\)",
      load_wan_state_dict, {k: v for k, v in SD.items() if k != "head.modulation"})
calls("weights-lacks-core-tensor", r"lacks time_embedding\.0\.weight, a core Wan2\.1 weight",
      load_wan_state_dict, {k: v for k, v in SD.items() if k != "time_embedding.0.weight"})
calls("weights-empty-dict", r"the given state dict is empty", load_wan_state_dict, {})
calls("weights-list-of-numbers", r"the list of checkpoint files holds a value of type int", load_wan_state_dict, [1, 2])
calls("weights-two-models-in-one", r"both become 'head\.modulation'", load_wan_state_dict,
      {"model.head.modulation": SD["head.modulation"], "_orig_mod.head.modulation": SD["head.modulation"]})
calls("weights-lora-as-base", r"the given state dict is a LoRA, not a base model", load_wan_state_dict, lora())
calls("weights-critic-only", r"holds only critic weights", load_wan_state_dict, {"critic": {"model.x": 1}})


def wrong_dtype(dtype: torch.dtype, fmt: str) -> Callable[[Path], Callable[[], object]]:
    def make(folder: Path):
        sd = {k: v.to(dtype) for k, v in SD.items()} if dtype != torch.int8 else {
            k: (v * 100).to(torch.int8) for k, v in SD.items()}
        path = save(folder, f"wan_quantized.{fmt}", sd if fmt == "safetensors" else {"generator": sd})
        return lambda: load_wan_state_dict(path)

    return make


for _dtype, _formats in [(torch.int8, ("safetensors", "pt")), (torch.uint8, ("safetensors",)),
                         (torch.int32, ("safetensors",)), (torch.bool, ("safetensors",)),
                         (torch.complex64, ("pt",)), (torch.float8_e4m3fnuz, ("pt",))]:
    for _fmt in _formats:
        _name = str(_dtype).removeprefix("torch.")
        CASES.append(Case(f"weights-{_name}-{_fmt}", wrong_dtype(_dtype, _fmt),
                          rf"wan_quantized\.{_fmt} stores \S+ as {_name}, not as floating point"))


def wrong_slot(name: str, sd: dict) -> Callable[[Path], Callable[[], object]]:
    return lambda folder: (lambda path: lambda: load_wan_state_dict(path))(save(folder, name, sd))


CASES += [
    Case("weights-vae-in-model-slot", wrong_slot("wan_2.1_vae.safetensors", {
        "encoder.conv1.weight": torch.zeros(96, 3, 3, 3, 3), "decoder.head.0.gamma": torch.ones(96, 1, 1, 1),
        "conv1.weight": torch.zeros(32, 32, 1, 1, 1)}), r"wan_2\.1_vae\.safetensors looks like a Wan VAE"),
    Case("weights-umt5-wan-names", wrong_slot("umt5.safetensors", {
        "token_embedding.weight": torch.zeros(32, 64), "blocks.0.attn.q.weight": torch.zeros(64, 64)}),
        r"umt5\.safetensors looks like the umT5 text encoder"),
    Case("weights-umt5-hf-names", wrong_slot("umt5_xxl_fp8.safetensors", {
        "shared.weight": torch.zeros(32, 64), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(64, 64)}),
        r"umt5_xxl_fp8\.safetensors looks like the umT5 text encoder"),
    Case("weights-resnet-pickle", wrong_slot("resnet50.pt", {"state_dict": {"fc.weight": torch.zeros(10, 4)}}),
         r"resnet50\.pt is not a Wan2\.1 diffusion model"),
    Case("weights-critic-pickle", wrong_slot("critic.pt", {"critic": {f"model.{k}": v for k, v in SD.items()}}),
         r"critic\.pt holds only critic weights"),
    Case("weights-pickled-list", wrong_slot("list.pt", [torch.zeros(2)]), r"list\.pt holds a list, not a state dict"),
    Case("weights-optimizer-state-only", wrong_slot("optim.pt", {"step": torch.tensor(3), "lr": 0.1}),
         r"optim\.pt is not a Wan2\.1 diffusion model"),
]


# ---------------------------------------------------------------------------------------------
# file-: unreadable, cut-off and mislabeled files


def file_bytes(name: str, data: bytes | Callable[[Path], bytes]) -> Callable[[Path], Callable[[], object]]:
    def make(folder: Path):
        path = folder / name
        path.write_bytes(data(folder) if callable(data) else data)
        return lambda: load_wan_state_dict(path)

    return make


def truncated(fmt: str) -> Callable[[Path], bytes]:
    def data(folder: Path) -> bytes:
        path = folder / "full"
        if fmt == "safetensors":
            save_file(SD, str(path))
        else:
            torch.save({"generator": SD}, path, _use_new_zipfile_serialization=fmt == "zip")
        whole = path.read_bytes()
        return whole[: len(whole) // 2]

    return data


def safetensors_header(header: bytes, length: int | None = None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header


def plain_zip(folder: Path) -> bytes:
    with zipfile.ZipFile(folder / "z.zip", "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    return (folder / "z.zip").read_bytes()


CASES += [
    Case("file-missing", lambda f: lambda: load_wan_state_dict(f / "nope.safetensors"), r"nope\.safetensors does not exist"),
    Case("file-nul-in-path", lambda f: lambda: load_wan_state_dict(str(f / "a\0b.pt")), r"holds a NUL character"),
    Case("file-truncated-safetensors", file_bytes("cut.safetensors", truncated("safetensors")),
         r"cut\.safetensors is incomplete or corrupt"),
    Case("file-truncated-zip", file_bytes("cut.pt", truncated("zip")), r"cut\.pt is incomplete or corrupt"),
    Case("file-truncated-legacy-pickle", file_bytes("cut.pth", truncated("legacy")), r"cut\.pth is incomplete or corrupt"),
    Case("file-safetensors-header-only", file_bytes("head.safetensors", safetensors_header(b'{"a": {"dtype"')),
         r"head\.safetensors is incomplete or corrupt"),
    Case("file-safetensors-header-claims-petabyte", file_bytes("big.safetensors", safetensors_header(b"{}", 10**15)),
         r"big\.safetensors is incomplete or corrupt"),
    Case("file-safetensors-header-not-json", file_bytes("bad.safetensors", safetensors_header(b"{not json}   ")),
         r"bad\.safetensors is incomplete or corrupt"),
    Case("file-safetensors-offsets-past-end", file_bytes("short.safetensors", safetensors_header(
        b'{"head.modulation": {"dtype": "F32", "shape": [1, 2, 128], "data_offsets": [0, 1024]}}')),
        r"short\.safetensors is incomplete or corrupt"),
    Case("file-safetensors-unknown-dtype", file_bytes("f4.safetensors", safetensors_header(
        b'{"head.modulation": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}') + b"\0"),
        r"f4\.safetensors stores head\.modulation as F4|f4\.safetensors is incomplete or corrupt"),
    Case("file-html-error-page", file_bytes("wan.safetensors", b"<!DOCTYPE html><html><body>Rate limited</body></html>"),
         r"wan\.safetensors is neither a safetensors file nor a PyTorch checkpoint"),
    Case("file-git-lfs-pointer", file_bytes("lfs.safetensors", b"version https://git-lfs.github.com/spec/v1\noid x\n"),
         r"lfs\.safetensors is a Git LFS pointer"),
    Case("file-gguf", file_bytes("wan-q4.gguf", b"GGUF\x03\x00\x00\x00" + b"\0" * 32), r"wan-q4\.gguf is a GGUF file"),
    Case("file-empty", file_bytes("empty.pt", b""), r"empty\.pt is incomplete or corrupt"),
    Case("file-five-bytes", file_bytes("tiny.pt", b"\x00\x01\x02\x03\x04"), r"tiny\.pt is incomplete or corrupt"),
    Case("file-random-bytes", file_bytes("noise.bin", bytes(range(7, 256)) * 16), r"noise\.bin is neither"),
    Case("file-plain-zip", file_bytes("archive.pt", plain_zip), r"archive\.pt is incomplete or corrupt"),
    Case("file-directory-of-two-models", lambda f: (save(f, "a.safetensors", SD), save(f, "b.safetensors", SD))
         and (lambda: load_wan_state_dict(f)), r"is a directory without exactly one"),
    Case("file-pickle-named-safetensors", lambda f: (lambda p: lambda: load_wan_state_dict(p))(
        (torch.save({"generator": SD}, f / "model.safetensors"), f / "model.safetensors")[1]),
        r"model\.safetensors is a PyTorch pickle although its name ends in \.safetensors"),
]


# ---------------------------------------------------------------------------------------------
# pickle-: pickles that would run code; weights_only refuses every one and nothing runs


def evil(name: str, payload: Callable[[Path], object], legacy: bool = False,
         reader: Callable = load_wan_state_dict) -> Callable[[Path], Callable[[], object]]:
    def make(folder: Path):
        path = folder / name
        torch.save(payload(folder), path, _use_new_zipfile_serialization=not legacy)
        return lambda: reader(path)

    return make


def raw_pickle(name: str, protocol: int) -> Callable[[Path], Callable[[], object]]:
    def make(folder: Path):
        path = folder / name
        path.write_bytes(pickle.dumps(EvilSystem(folder), protocol=protocol))
        return lambda: load_wan_state_dict(path)

    return make


ARBITRARY = r"needs arbitrary code to load .* will not be unpickled"
CASES += [
    Case("pickle-custom-class", evil("trainer_state.pt", lambda f: {"generator": SD, "config": NotATensor()}),
         rf"trainer_state\.pt {ARBITRARY}"),
    Case("pickle-reduce-open-zip", evil("zip_open.pt", lambda f: {"generator": SD, "x": EvilOpen(f)}),
         rf"zip_open\.pt {ARBITRARY}"),
    Case("pickle-reduce-system-zip", evil("zip_system.pt", lambda f: {"generator_ema": EvilSystem(f)}),
         rf"zip_system\.pt {ARBITRARY}"),
    Case("pickle-reduce-system-legacy", evil("legacy.pt", lambda f: {"generator": SD, "x": EvilSystem(f)}, legacy=True),
         rf"legacy\.pt {ARBITRARY}"),
    Case("pickle-nested-in-generator", evil("nested.pt", lambda f: {"generator": {"model.head.modulation": EvilOpen(f)}}),
         rf"nested\.pt {ARBITRARY}"),
    Case("pickle-raw-protocol-2", raw_pickle("raw2.pt", 2), rf"raw2\.pt {ARBITRARY}"),
    Case("pickle-raw-protocol-5", raw_pickle("raw5.pth", 5), rf"raw5\.pth {ARBITRARY}"),
    Case("pickle-raw-protocol-0-text", raw_pickle("raw0.ckpt", 0), r"raw0\.ckpt is neither a safetensors file"),
    Case("pickle-named-safetensors", raw_pickle("evil.safetensors", 4),
         r"evil\.safetensors is a PyTorch pickle although its name ends in \.safetensors"),
    Case("pickle-in-lora-slot", evil("lora.pt", lambda f: {"generator_lora": lora(), "x": EvilSystem(f)}, reader=load_lora),
         rf"lora\.pt {ARBITRARY}"),
]


# ---------------------------------------------------------------------------------------------
# lora-: LoRA files and merges


def lora_with(**changes: torch.Tensor) -> dict:
    return with_(lora(), **changes)


calls("lora-alpha-two-elements", r"blocks\.0\.self_attn\.q\.alpha of shape \[2\] where a LoRA alpha is one number",
      load_lora, lora_with(blocks__0__self_attn__q__alpha=torch.tensor([4.0, 4.0])))
calls("lora-alpha-empty", r"alpha of shape \[0\]", load_lora, lora_with(blocks__0__self_attn__q__alpha=torch.zeros(0)))
calls("lora-alpha-nan", r"blocks\.0\.self_attn\.q\.alpha = nan, not a finite number", load_lora,
      lora_with(blocks__0__self_attn__q__alpha=torch.tensor(NAN)))
calls("lora-alpha-inf", r"alpha = inf, not a finite number", load_lora,
      lora_with(blocks__0__ffn__2__alpha=torch.tensor(INF)))
calls("lora-factor-nan", r"NaN or infinite values in the LoRA factor A of blocks\.0\.self_attn\.q", load_lora,
      lora_with(blocks__0__self_attn__q__lora_down__weight=torch.full((RANK, DIM), NAN)))
calls("lora-factor-inf", r"NaN or infinite values in the LoRA factor B of blocks\.0\.ffn\.2", load_lora,
      lora_with(blocks__0__ffn__2__lora_up__weight=torch.full((DIM, RANK), INF)))
calls("lora-factor-int8", r"stores the LoRA factor A of blocks\.0\.ffn\.2 as int8", load_lora,
      lora_with(blocks__0__ffn__2__lora_down__weight=torch.zeros(RANK, 256, dtype=torch.int8)))
calls("lora-factor-3d", r"factors of shapes A \[4, 128, 1\] and B \[128, 4\] for blocks\.0\.self_attn\.q", load_lora,
      lora_with(blocks__0__self_attn__q__lora_down__weight=torch.zeros(RANK, DIM, 1)))
calls("lora-rank-mismatch", r"factors of shapes A \[3, 128\] and B \[128, 4\]", load_lora,
      lora_with(blocks__0__self_attn__q__lora_down__weight=torch.zeros(3, DIM)))
calls("lora-rank-0", r"factors of shapes A \[0, 128\] and B \[128, 0\]", load_lora,
      lora_with(blocks__0__self_attn__q__lora_down__weight=torch.zeros(0, DIM),
                blocks__0__self_attn__q__lora_up__weight=torch.zeros(DIM, 0)))
calls("lora-one-half", r"only one half of the LoRA pair for blocks\.0\.ffn\.2", load_lora,
      {k: v for k, v in lora().items() if k != "blocks.0.ffn.2.lora_up.weight"})
calls("lora-two-namings-one-module", r"two LoRA weights for blocks\.0\.self_attn\.q", load_lora,
      dict(lora(), **{"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(RANK, DIM),
                      "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(DIM, RANK)}))
calls("lora-not-pairs", r"not LoRA pairs \(first: blocks\.0\.self_attn\.q\.dora_scale\)", load_lora,
      dict(lora(), **{"blocks.0.self_attn.q.dora_scale": torch.ones(1, DIM)}))
calls("lora-no-lora-weights", r"holds no LoRA weights", load_lora, {"hello.world": torch.zeros(2)})
calls("lora-full-model-as-lora", r"is a full model, not a LoRA", load_lora, SD)
calls("lora-strength-nan", r"LoRA strength nan is not a finite number", merge_lora, SD, load_lora(lora()), NAN)
calls("lora-strength-minus-inf", r"LoRA strength -inf is not a finite number", merge_lora, SD, load_lora(lora()), -INF)
calls("lora-alpha-override-nan", r"LoRA alpha nan is not a finite number", merge_lora, SD, load_lora(lora()), 1.0, NAN)
calls("lora-for-another-size", r"the LoRA for blocks\.0\.self_attn\.q has shape \[128, 64\]", merge_lora, SD,
      load_lora(lora_with(blocks__0__self_attn__q__lora_down__weight=torch.zeros(RANK, 64))))
calls("lora-target-missing", r"targets blocks\.5\.self_attn\.q, which the base model does not have", merge_lora, SD,
      {"blocks.5.self_attn.q": (torch.zeros(RANK, DIM), torch.zeros(DIM, RANK), None)})
calls("lora-sdxl-kohya", r"targets down\.blocks\.0\.attentions\.0\.proj\.in, which the base model does not have",
      merge_lora, SD, load_lora({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(RANK, 8),
                                 "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, RANK)}))
calls("lora-merge-overflows-fp16", r"merging the LoRA into blocks\.0\.self_attn\.q at strength 4 overflows .* float16",
      merge_lora, {k: v.half() for k, v in SD.items()},
      {"blocks.0.self_attn.q": (torch.full((1, DIM), 300.0), torch.full((DIM, 1), 300.0), None)}, 4.0)
calls("lora-base-weight-nan", r"the base model's blocks\.0\.ffn\.2\.weight already holds NaN", merge_lora,
      with_(SD, blocks__0__ffn__2__weight=torch.full((DIM, 256), NAN)), load_lora(lora()))


@case("lora-file-with-nan-via-loader", r"lora_nan\.safetensors has NaN or infinite values")
def _(folder: Path):
    model = save(folder, "model.safetensors", SD)
    bad = save(folder, "lora_nan.safetensors", lora_with(blocks__0__ffn__2__lora_up__weight=torch.full((DIM, RANK), NAN)))
    return lambda: loading.read_state_dict(str(model), "ema", str(bad), 1.0)


# ---------------------------------------------------------------------------------------------
# The test


@pytest.fixture(scope="module", autouse=True)
def warmed(tmp_path_factory) -> None:
    """Load each format once, so that no case pays for a first import or a cache fill."""
    folder = tmp_path_factory.mktemp("warm")
    load_wan_state_dict(save(folder, "m.safetensors", SD))
    load_wan_state_dict(save(folder, "m.pt", {"generator": SD}))
    load_lora(lora())


@pytest.fixture
def no_forward(monkeypatch):
    """Any nn.Module forward (a model, a text encoder) or text encode during a case fails it."""

    def forward(self, *args, **kwargs):
        raise AssertionError(f"a {type(self).__name__} forward ran for a bad input")

    monkeypatch.setattr(torch.nn.Module, "__call__", forward)
    ENCODED.clear()
    yield
    assert ENCODED == [], "the text encoder ran for a bad input"


def test_the_guard_catches_a_forward(no_forward):
    with pytest.raises(AssertionError, match="a Linear forward ran"):
        torch.nn.Linear(2, 2)(torch.zeros(2))


def test_case_ids_are_unique_and_classed():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert {i.split("-", 1)[0] for i in ids} == {"script", "input", "loader", "shard", "weights", "file", "pickle", "lora"}


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused(bad: Case, tmp_path: Path, no_forward) -> None:
    call = bad.make(tmp_path)
    start = time.perf_counter()
    with pytest.raises(BadInput) as info:
        call()
    took = time.perf_counter() - start
    message = str(info.value)
    assert re.search(bad.names, message), message
    assert "\n" not in message and not re.search(r"\.\s+[A-Z]", message), f"not one sentence: {message}"
    assert len(message) < 400, f"{len(message)} characters"
    assert took < bad.limit_s, f"took {took:.3f} s"
    assert not (tmp_path / MARKER).exists(), "a pickle ran code"


# ---------------------------------------------------------------------------------------------
# What the limits and the shared APR rule still accept


def test_apr_window_zero_means_the_ltm_size_in_node_and_script():
    node = prompts.make_transition("apr", 0.5, 0.0)
    script = prompts.parse_script("5s | a\n4s apr(0.5, 0) | b")[1].transition
    assert node == script == gf.Transition("apr", alpha_max=0.5, proximity_window=None)
    assert prompts.parse_script("5s | a\n4s apr(0.5, 6) | b")[1].transition == prompts.make_transition("apr", 0.5, 6)


def test_the_nodes_longest_video_fits_the_engines():
    chunks = math.ceil(prompts.MAX_VIDEO_FRAMES / 3)  # a plan's boundaries round up to whole chunks
    assert chunks * 3 <= MAX_LATENT_FRAMES


def test_limits_accept_what_they_state():
    assert prompts.latent_frames(3600, "seconds") == prompts.MAX_VIDEO_FRAMES == 14400
    assert prompts.latent_frames(14400, "latent frames") == 14400
    lines = prompts.parse_script("1800s | a\n+1800s apr(1, 1024) | b")
    assert sum(line.frames for line in lines) == prompts.MAX_VIDEO_FRAMES
    long_prompt = "a " * (prompts.MAX_PROMPT_CHARS // 2)
    assert prompts.parse_script(f"5s | {long_prompt}")[0].text == long_prompt.strip()
    assert len(prompts.parse_script("\n".join("3f | a" for _ in range(prompts.MAX_SEGMENTS)))) == prompts.MAX_SEGMENTS


def test_unicode_line_breaks_stay_inside_the_prompt():
    lines = prompts.parse_script("5s | a\u2028b\r\n4s | c")
    assert [(ln.line, ln.text) for ln in lines] == [(1, "a\u2028b"), (2, "c")]


def test_shards_inside_the_folder_and_symlinks_within_it_load(tmp_path: Path):
    model, weight_map = sharded(tmp_path)
    sub = model / "shards"
    sub.mkdir()
    (model / "model-00002-of-00002.safetensors").rename(sub / "second.safetensors")
    (model / "model-00002-of-00002.safetensors").symlink_to(sub / "second.safetensors")
    loaded = load_wan_state_dict(index(model, weight_map))
    assert loaded.keys() == SD.keys() and all(torch.equal(loaded[k], SD[k]) for k in SD)


def test_fp8_weights_pass_the_dtype_check(tmp_path: Path):
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in SD.items()}
    loaded = load_wan_state_dict(save(tmp_path, "wan_fp8_e4m3fn.safetensors", sd))
    assert loaded["blocks.0.ffn.0.weight"].dtype == torch.float8_e4m3fn
