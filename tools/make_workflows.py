"""Writes the UI-format example workflows in workflows/ from the live node schemas.

Run it with the Python environment of a ComfyUI checkout after changing a node's inputs, so the
saved widget values keep matching the schemas (tests/test_comfy_host.py checks that they do):

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python tools/make_workflows.py

The saved files come from ComfyUI 0.3.64's schemas (the oldest supported): newer cores made Save
Video's format and codec dynamic combos, and their frontend fills them from the same saved values.

Layout: nodes are stacked in columns; every node is saved at least as large as the ComfyUI
frontend draws it (``SIZES``; the frontend grows a node that is saved smaller than its widgets
need, which is how nodes came to cover each other). tests/test_browser.py loads every workflow in
a real frontend and checks that no node was grown, no two nodes overlap and the saved view
(``extra.ds``) shows the whole graph; when it fails it prints the sizes the frontend computed.
The thumbnails beside the workflows (``<workflow>.jpg``, what the template browser shows) are
screenshots of that frontend: ``tools/screenshot_workflows.py``.
"""

import asyncio
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMFY = os.environ.get("GF_COMFYUI_PATH")
if not COMFY:
    raise SystemExit("set GF_COMFYUI_PATH to a ComfyUI checkout")
sys.path.insert(0, COMFY)
import utils.extra_config  # noqa
import utils.install_util  # noqa
import comfy.options  # noqa
import comfy.cli_args as cli  # noqa: E402

cli.args.cpu = True
import folder_paths  # noqa: E402

import nodes  # noqa: E402

SCRATCH = tempfile.TemporaryDirectory(prefix="gf-workflows-")  # what nodes write at import stays out of the checkout
for name in ("input", "output", "temp", "user"):
    os.mkdir(os.path.join(SCRATCH.name, name))
    getattr(folder_paths, f"set_{name}_directory")(os.path.join(SCRATCH.name, name))

asyncio.run(nodes.init_builtin_extra_nodes())
assert asyncio.run(nodes.load_custom_node(str(REPO)))
M = nodes.NODE_CLASS_MAPPINGS
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# The frontend draws a node's title bar above its ``pos`` (LiteGraph.NODE_TITLE_HEIGHT).
TITLE = 30
GAP = 40  # between stacked nodes and between columns
# Saved node sizes (width, body height), each at least what frontends 1.27 and 1.49 compute for the
# node's widgets and slots, wide enough that no label or value is cut short (tests/test_browser.py checks).
SIZES = {
    "GFLoadCausalWanModel": (440, 160),
    "CLIPLoader": (440, 110),
    "VAELoader": (440, 60),
    "GFDRRoPE": (320, 134),
    "CLIPTextEncode": (400, 130),
    "GFPromptSegment": (320, 126),
    "GFAPRTransition": (320, 110),
    "GFPromptTimeline": (600, 300),
    "GFDualMemory": (320, 160),
    "GFLongLiveMemory": (320, 110),
    "GFSelfForcingMemory": (320, 62),
    "GFInfinityRoPEMemory": (320, 134),
    "GFAnchorForcingMemory": (320, 86),
    "GFContextForcingMemory": (320, 160),
    "GFSampler": (320, 250),
    "GFStreamDecode": (320, 154),
    "SaveVideo": (420, 320),
    "PreviewAny": (320, 200),
    "GetVideoComponents": (320, 110),
    "ImageStitch": (320, 154),
    "CreateVideo": (320, 106),
    "GFEventTimeline": (320, 200),
    "GFLiveSampler": (460, 720),
    "GFToyWorldModel": (320, 40),
    "GFToyWorldTimeline": (520, 260),
    "GFToyWorldDecode": (320, 62),
    "GFToyWorldTextEncoder": (320, 40),
}
NOTE_WIDTH = 440
# The saved view: the whole graph fits this box of the browser window (CSS pixels: left, top, width,
# height), clear of the frontend's side bar and menus in a 1920 x 960 window (a 1920 x 1080 screen
# less the browser's bars), at a zoom where the frontend still draws every widget (tests/test_browser.py).
VIEW = (70, 100, 1830, 840)

HF_WAN = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
LONGLIVE = "longlive_1.3b_bf16.safetensors"  # LongLive base with its LoRA merged, made by gf_core.convert
MODELS = {  # files the frontend's Missing Models dialog may download (it takes .safetensors URLs only)
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": (HF_WAN + "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                                "text_encoders"),
    "wan_2.1_vae.safetensors": (HF_WAN + "vae/wan_2.1_vae.safetensors", "vae"),
}
# The converter's command (gf_core/convert.py, docs/CHECKPOINTS.md), run in the pack's folder.
CONVERT = ("python -m gf_core.convert ../../models/diffusion_models/longlive_base.pt "
           f"../../models/diffusion_models/{LONGLIVE} --lora ../../models/loras/longlive_lora.pt "
           "--weights generator --dtype bf16")

MODEL_NOTE = f"""Models: put each file in the ComfyUI/models folder
named after the arrow.

- {LONGLIVE} -> diffusion_models
  LongLive-1.3B with its LoRA merged, one ComfyUI-style
  safetensors file. Make it once: download
  models/longlive_base.pt (to diffusion_models) and
  models/lora.pt (to loras, as longlive_lora.pt) from
  https://huggingface.co/Efficient-Large-Model/LongLive-1.3B
  then, with ComfyUI's Python, in
  ComfyUI/custom_nodes/comfyui-grounded-forcing run:

  {CONVERT}

  (docs/CHECKPOINTS.md: the other checkpoints.) Without
  converting: pick longlive_base.pt in GF Load Causal Wan
  Model, lora_name longlive_lora.pt, weights generator.
- umt5_xxl_fp8_e4m3fn_scaled.safetensors -> text_encoders
- wan_2.1_vae.safetensors -> vae
  both from
  https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged
  (split_files/text_encoders, split_files/vae)

Self-Forcing (https://huggingface.co/gdhe17/Self-Forcing,
checkpoints/self_forcing_dmd.pt) and Anchor Forcing's LoRA
on LongLive (https://huggingface.co/young98/AnchorForcing)
convert and load the same way. Research .pt files are read
with weights_only=True.

The sampler's GPU memory does not grow with the video
length (measurements: docs/PERF.md). GF Stream Decode
needs one frame of VAE memory and, keeping the video in a
file (the default), one frame of RAM."""


def spec(kind):
    return M[kind].INPUT_TYPES()


def outputs_of(kind):
    cls = M[kind]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        info = cls.GET_NODE_INFO_V1()
        return list(zip(info["output_name"], info["output"]))
    types = list(cls.RETURN_TYPES)
    names = list(getattr(cls, "RETURN_NAMES", types))
    return list(zip(names, types))


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, kind, pos, size=None, title=None, color=None, **widgets):
        nid = len(self.nodes) + 1
        inputs, values = [], []
        s = spec(kind)
        for section in ("required", "optional"):
            for name, definition in s.get(section, {}).items():
                typ = definition[0]
                opts = definition[1] if len(definition) > 1 else {}
                if (isinstance(typ, list) or typ in WIDGETS) and not opts.get("forceInput"):
                    value = widgets.pop(name, opts.get("default"))
                    if value is None and (isinstance(typ, list) or typ == "COMBO"):
                        options = typ if isinstance(typ, list) else opts["options"]
                        value = options[0]
                    values.append(value)
                    if opts.get("control_after_generate"):
                        values.append("fixed")
                else:
                    entry = {"name": name, "type": typ, "link": None}
                    if section == "optional":
                        entry["shape"] = 7
                    inputs.append(entry)
        assert not widgets, (kind, widgets)
        outs = [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs_of(kind))]
        props = {"Node name for S&R": kind}
        models = [v for v in values if isinstance(v, str) and v in MODELS]
        if models:
            props["models"] = [{"name": m, "url": MODELS[m][0], "directory": MODELS[m][1]} for m in models]
        node = {"id": nid, "type": kind, "pos": list(pos), "size": list(size or SIZES[kind]), "flags": {},
                "order": nid - 1, "mode": 0, "inputs": inputs, "outputs": outs, "properties": props,
                "widgets_values": values}
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return nid

    def note(self, text, pos, size, title="Read me"):
        nid = len(self.nodes) + 1
        self.nodes.append({"id": nid, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                           "order": nid - 1, "mode": 0, "inputs": [], "outputs": [], "title": title,
                           "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        return nid

    def connect(self, src, out, dst, name):
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = out if isinstance(out, int) else [o["name"] for o in s["outputs"]].index(out)
        target = [i["name"] for i in d["inputs"]].index(name)
        lid = len(self.links) + 1
        typ = s["outputs"][slot]["type"]
        self.links.append([lid, src, slot, dst, target, typ])
        s["outputs"][slot]["links"].append(lid)
        d["inputs"][target]["link"] = lid

    def bounds(self):
        """[x0, y0, x1, y1] of every node as the frontend draws it (title bar included)."""
        boxes = [(n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
                 for n in self.nodes]
        return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes)]

    def view(self):
        """The saved view (LiteGraph's DragAndScale): the whole graph inside ``VIEW``, at most 1:1."""
        x0, y0, x1, y1 = self.bounds()
        left, top, width, height = VIEW
        scale = min(1.0, width / (x1 - x0), height / (y1 - y0))
        return {"scale": round(scale, 4), "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}

    def save(self, name):
        wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "grounded-forcing/" + name)), "revision": 0,
              "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": [], "config": {}, "extra": {"ds": self.view()}, "version": 0.4}
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")


class Column:
    """Nodes stacked top to bottom at one x, each below the previous one's drawn box."""

    def __init__(self, g, x, y=0):
        self.g, self.x, self.y = g, x, y

    def add(self, kind, size=None, **kwargs):
        size = size or SIZES[kind]
        nid = self.g.add(kind, (self.x, self.y + TITLE), size, **kwargs)
        self.y += TITLE + size[1] + GAP
        return nid

    def note(self, text, size, **kwargs):
        nid = self.g.note(text, (self.x, self.y + TITLE), size, **kwargs)
        self.y += TITLE + size[1] + GAP
        return nid


def right_of(*kinds_or_widths):
    """The x after columns of these node kinds (or widths), with a gap after each."""
    return sum((SIZES[k][0] if isinstance(k, str) else k) + GAP for k in kinds_or_widths)


POS = ("#232", "#353")


def loaders(col):
    model = col.add("GFLoadCausalWanModel", model_name=LONGLIVE)
    clip = col.add("CLIPLoader", clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan")
    vae = col.add("VAELoader", vae_name="wan_2.1_vae.safetensors")
    return model, clip, vae


def output(g, col, sampler, vae, prefix):
    dec = col.add("GFStreamDecode", filename_prefix=f"gf_frames/{prefix}")
    g.connect(sampler, "latent", dec, "samples")
    g.connect(vae, 0, dec, "vae")
    save = col.add("SaveVideo", filename_prefix=f"video/gf_{prefix}")
    g.connect(dec, 0, save, "video")
    return dec


def live_outputs(g, col, live, prefix):
    """A GF Live Sampler's take kept: its video saved, its script shown."""
    save = col.add("SaveVideo", filename_prefix=prefix)
    g.connect(live, "video", save, "video")
    script = col.add("PreviewAny", (SIZES["SaveVideo"][0], 300), title="The take as a timeline script")
    g.connect(live, "script", script, "source")


# 1. One prompt, 60 s --------------------------------------------------------------------------
g = Graph()
Column(g, -NOTE_WIDTH - GAP).note(
    "GF 60 s single prompt: one prompt streamed for a minute (240 latent frames, 957 frames at 16 fps) under "
    "the Grounded Forcing memory (GF Dual Memory).\n\n" + MODEL_NOTE, (NOTE_WIDTH, 700))
col = Column(g, 0)
model, clip, vae = loaders(col)
rope = col.add("GFDRRoPE")
g.connect(model, 0, rope, "model")
col = Column(g, right_of("CLIPLoader"))
text = col.add("CLIPTextEncode", (400, 200), title="Prompt", color=POS,
               text="A red fox trots through a snowy pine forest at sunrise, soft golden light, fresh powder "
                    "kicked up by its paws, tracking shot, cinematic, highly detailed")
g.connect(clip, 0, text, "clip")
seg = col.add("GFPromptSegment", duration=60.0)
g.connect(text, 0, seg, "conditioning")
col = Column(g, right_of("CLIPLoader", "CLIPTextEncode"))
mem = col.add("GFDualMemory")
sampler = col.add("GFSampler", seed=42)
g.connect(rope, 0, sampler, "model")
g.connect(mem, 0, sampler, "memory")
g.connect(seg, 0, sampler, "segments")
output(g, Column(g, right_of("CLIPLoader", "CLIPTextEncode", "GFSampler")), sampler, vae, "single_60s")
g.save("gf_60s_single_prompt")

# 2. Six prompts, 60 s, APR ---------------------------------------------------------------------
PROMPTS = [
    "A golden retriever sits on a sunny beach, waves rolling in behind it, wide shot, cinematic",
    "The golden retriever stands up and runs along the shoreline, splashing through shallow water",
    "The golden retriever chases a red ball that bounces across the wet sand",
    "The golden retriever catches the red ball and trots back, tail wagging, sun low on the horizon",
    "The golden retriever lies down on the sand next to the red ball as the sky turns orange",
    "The golden retriever falls asleep on the beach at dusk, gentle waves, warm evening light",
]
g = Graph()
Column(g, -NOTE_WIDTH - GAP).note(
    "GF 60 s interactive: six prompts of 10 s each, like live prompt switching. Each switch uses Asymmetric "
    "Proximity Recache (APR): cached frames near the switch are blended toward the new prompt, so the story "
    "moves on without a jump. A switch lands on the next 3-latent-frame chunk boundary. The event log says, "
    "chunk by chunk, what the memory held and how each switch blended.\n\n" + MODEL_NOTE, (NOTE_WIDTH, 760))
col = Column(g, 0)
model, clip, vae = loaders(col)
apr = col.add("GFAPRTransition")
previous = None
for k, prompt in enumerate(PROMPTS):  # two columns of three (prompt over its segment)
    if k % 3 == 0:
        col = Column(g, right_of("CLIPLoader") + (k // 3) * right_of("CLIPTextEncode"))
    text = col.add("CLIPTextEncode", title=f"Prompt {k + 1} (from {10 * k} s)", color=POS, text=prompt)
    g.connect(clip, 0, text, "clip")
    seg = col.add("GFPromptSegment", (SIZES["CLIPTextEncode"][0], SIZES["GFPromptSegment"][1]),
                  title=f"Segment {k + 1}", duration=10.0)
    g.connect(text, 0, seg, "conditioning")
    if previous is not None:
        g.connect(previous, 0, seg, "previous")
        g.connect(apr, 0, seg, "transition")
    previous = seg
x = right_of("CLIPLoader", "CLIPTextEncode", "CLIPTextEncode")
col = Column(g, x)
mem = col.add("GFDualMemory")
sampler = col.add("GFSampler", seed=7)
g.connect(model, 0, sampler, "model")
g.connect(mem, 0, sampler, "memory")
g.connect(previous, 0, sampler, "segments")
col = Column(g, x + right_of("GFSampler"))
output(g, col, sampler, vae, "interactive_60s")
log = col.add("PreviewAny", (SIZES["SaveVideo"][0], SIZES["PreviewAny"][1]), title="Event log (one JSON line per chunk)")
g.connect(sampler, "events", log, "source")
g.save("gf_60s_interactive_six_prompts")

# 3. Multi-shot story with cuts -------------------------------------------------------------------
STORY = """\
# Multi-shot story: DURATION [TRANSITION] | PROMPT. 'cut' starts a new shot: the recent frames are
# dropped, the anchors (GCM) stay, so the knight and the look carry across shots.
6s | A knight in silver armour rides a black horse across a misty moor at dawn, wide shot, cinematic
+6s apr(0.8, 6) | The knight slows the horse and looks toward a ruined castle on a hill
cut 6s | Close-up of the knight's face under the raised visor, determined eyes, mist in the background
cut 8s | The knight walks through the broken castle gate into a courtyard overgrown with ivy
+6s | The knight kneels before an old stone well in the courtyard, sunlight breaking through clouds
cut 8s | Wide aerial shot of the castle on the hill as the mist clears, the knight's horse waiting below"""
g = Graph()
Column(g, -NOTE_WIDTH - GAP).note(
    "GF multi-shot story: a timeline script with shot cuts and smooth prompt switches (40 s). One line per "
    "segment: a duration (6s, or 24f for latent frames), an optional transition (apr, apr(ALPHA, WINDOW), hard, "
    "none, cut) and '|' before the prompt.\n\n" + MODEL_NOTE, (NOTE_WIDTH, 740))
col = Column(g, 0)
model, clip, vae = loaders(col)
col = Column(g, right_of("CLIPLoader"))
timeline = col.add("GFPromptTimeline", (600, 340), script=STORY)
g.connect(clip, 0, timeline, "clip")
col = Column(g, right_of("CLIPLoader", "GFPromptTimeline"))
mem = col.add("GFDualMemory", gcm_update="after_switch")
sampler = col.add("GFSampler", seed=1234)
g.connect(model, 0, sampler, "model")
g.connect(mem, 0, sampler, "memory")
g.connect(timeline, 0, sampler, "segments")
output(g, Column(g, right_of("CLIPLoader", "GFPromptTimeline", "GFSampler")), sampler, vae, "story")
g.save("gf_multi_shot_story")

# 4. A/B: every windowed memory policy on the same prompts --------------------------------------
AB = """\
# The same four prompts for every memory (40 s). No transition is written, so each memory uses its
# own switch rule: APR (grounded), KV recache (longlive), anchor-guided recache (anchor_forcing),
# KV flush (infinity_rope), none (context_forcing).
10s | An astronaut in a white suit walks across a red desert on Mars, dust drifting, wide shot
10s | The astronaut stops and kneels to pick up a glowing blue crystal from the sand
10s | The astronaut holds the glowing crystal up against the pink Martian sky
10s | The astronaut walks back toward a small silver lander as the sun sets over the dunes"""
MEMORIES = (  # (memory node, short name), left to right
    ("GFDualMemory", "grounded"),
    ("GFLongLiveMemory", "longlive"),
    ("GFAnchorForcingMemory", "anchor_forcing"),
    ("GFInfinityRoPEMemory", "infinity_rope"),
    ("GFContextForcingMemory", "context_forcing"),
)
g = Graph()
Column(g, -NOTE_WIDTH - GAP).note(
    "GF A/B of the memory policies on the same prompts, seed and model, side by side, left to right: Grounded "
    "Forcing (GF Dual Memory: GCM + LTM with DR-RoPE and APR); LongLive (sink + window, absolute RoPE, KV "
    "recache); Anchor Forcing (sink + junction + window, tri-region RoPE, anchor-guided recache); Infinity-RoPE "
    "(block-relative window, KV flush); Context Forcing (sink + slow memory of surprising frames + fast window). "
    "Anchor Forcing ships its own LoRA, Infinity-RoPE is training-free on Self-Forcing-style weights and Context "
    "Forcing was trained with its own memory, so on LongLive weights those three show the memory rule, not "
    "their best results. GF Self-Forcing Memory is left out: it stops at 5 s. Watch identity and colour drift "
    "late in the video and how each handles the prompt switches; the GF Event Timeline under each column "
    "draws what that memory held, chunk by chunk, and how it switched.\n\n" + MODEL_NOTE, (NOTE_WIDTH, 900))
col = Column(g, 0)
model, clip, vae = loaders(col)
timeline = col.add("GFPromptTimeline", (SIZES["CLIPLoader"][0], 300), script=AB)
g.connect(clip, 0, timeline, "clip")
memory_height = max(SIZES[kind][1] for kind, _ in MEMORIES)  # the samplers side by side in one row
columns = [Column(g, right_of("CLIPLoader") + k * right_of("GFSampler")) for k in range(len(MEMORIES))]
frames, samplers = [], []
for col, (kind, policy) in zip(columns, MEMORIES):
    mem = col.add(kind, (SIZES["GFSampler"][0], memory_height), title=f"Memory: {policy}")
    sampler = col.add("GFSampler", title=f"Sampler ({policy})", seed=2024)
    g.connect(model, 0, sampler, "model")
    g.connect(mem, 0, sampler, "memory")
    g.connect(timeline, 0, sampler, "segments")
    dec = col.add("GFStreamDecode", title=f"Decode ({policy})", filename_prefix=f"gf_ab/{policy}")
    g.connect(sampler, "latent", dec, "samples")
    g.connect(vae, 0, dec, "vae")
    parts = col.add("GetVideoComponents", title=f"Frames ({policy})")
    g.connect(dec, 0, parts, "video")
    frames.append(parts)
    samplers.append(sampler)
# The videos side by side: each column's frames stitched to the right of the columns before it.
stitched = frames[0]
for k in range(1, len(MEMORIES)):
    stitch = columns[k].add("ImageStitch", title=f"+ {MEMORIES[k][1]}", direction="right", spacing_width=16,
                            spacing_color="black")
    g.connect(stitched, 0, stitch, "image1")
    g.connect(frames[k], "images", stitch, "image2")
    stitched = stitch
# The event timelines side by side: what each memory held, chunk by chunk, in one row under the columns.
row = max(col.y for col in columns)
for col, sampler, (_, policy) in zip(columns, samplers, MEMORIES):
    col.y = row
    plot = col.add("GFEventTimeline", title=f"Timeline ({policy})")
    g.connect(sampler, "events", plot, "events")
col = Column(g, right_of("CLIPLoader") + len(MEMORIES) * right_of("GFSampler"))
# 400 wide: the last policy column then ends left of where frontend 1.49 draws its minimap.
create = col.add("CreateVideo", (400, SIZES["CreateVideo"][1]), fps=16.0)
g.connect(stitched, 0, create, "images")
save = col.add("SaveVideo", (400, 360), filename_prefix="video/gf_ab_memory_policies")
g.connect(create, 0, save, "video")
g.save("gf_ab_memory_policies")


# 5. Live steering ------------------------------------------------------------------------------
g = Graph()
Column(g, -NOTE_WIDTH - GAP).note(
    "GF Live: press Run, then steer the video in the GF Live Sampler panel while it plays. Type the next prompt "
    "and press Enter (it takes effect at the next chunk boundary, with the transition chosen beside the box: "
    "apr, hard or none); Cut (or Ctrl+Enter) starts a new shot, to the typed prompt if any; Pause holds "
    "generation and playback; Stop ends the take. The status line shows the generation rate against playback "
    "(16 fps), the buffer and the latency from a sent prompt to its first frame.\n\nThe take comes out as "
    "latents, a video and a GF Prompt Timeline script (shown on the right): paste it into GF Prompt Timeline "
    "and run GF Sampler with the same model, memory, seed and size and noise_order 'chunk' to make the same "
    "video again, bit for bit (docs/LIVE.md).\n\n" + MODEL_NOTE, (NOTE_WIDTH, 900))
col = Column(g, 0)
model, clip, vae = loaders(col)
mem = col.add("GFDualMemory")
live = Column(g, right_of("CLIPLoader")).add(
    "GFLiveSampler", seed=42, prompt="A red fox trots through a snowy pine forest at sunrise, soft golden light, "
                                     "tracking shot, cinematic, highly detailed")
for src, name in ((model, "model"), (mem, "memory"), (clip, "clip"), (vae, "vae")):
    g.connect(src, 0, live, name)
live_outputs(g, Column(g, right_of("CLIPLoader", "GFLiveSampler")), live, "video/gf_live")
g.save("gf_live")

# 6. The toy world: the whole pack with the model it ships, nothing to download ------------------------------------------
g = Graph()
Column(g, -NOTE_WIDTH - GAP).note(
    "GF toy world: runs as it is, with nothing to download. A small Wan2.1-architecture model that ships with "
    "the pack, trained on a toy world of shapes on simple scenes (256x256), plays a five-line script: the red "
    "circle moves right, a prompt switch makes it bounce, a cut moves it to the snow, a second subject enters. "
    "Change the sentences (the timeline's tooltip lists the words) or the memory policy and run again. "
    "GF Toy World Decode shows the latents through the Wan latent-to-RGB map the toy "
    "world is made with, so no VAE is needed. For real video, open the other workflows and download a causal "
    "Wan2.1 model.", (NOTE_WIDTH, 420))
col = Column(g, 0)
toy = col.add("GFToyWorldModel")
script = col.add("GFToyWorldTimeline")
col = Column(g, right_of("GFToyWorldTimeline"))
mem = col.add("GFDualMemory")
sampler = col.add("GFSampler", width=256, height=256, seed=0)
g.connect(toy, 0, sampler, "model")
g.connect(mem, 0, sampler, "memory")
g.connect(script, 0, sampler, "segments")
col = Column(g, right_of("GFToyWorldTimeline", "GFSampler"))
decode = col.add("GFToyWorldDecode")
g.connect(sampler, "latent", decode, "samples")
create = col.add("CreateVideo", fps=16.0)
g.connect(decode, 0, create, "images")
save = Column(g, right_of("GFToyWorldTimeline", "GFSampler", "GFToyWorldDecode")).add(
    "SaveVideo", filename_prefix="video/gf_toy_world")
g.connect(create, 0, save, "video")
g.save("gf_toy_world")

# 7. The toy world, live: steer the shipped model from the page, nothing to download ---------------------------------
g = Graph()
Column(g, -NOTE_WIDTH - GAP).note(
    "GF toy world, live: runs as it is, with nothing to download. Press Run: the small toy-world model that "
    "ships with the pack plays in the GF Live Sampler panel. While it plays, type the next sentence and press "
    "Enter: 'then it bounces', 'then it moves left', 'then it pulses', 'then a small blue square enters'; or "
    "'cut to the snow where it rests' and press Cut. Only the toy world's words work (the text encoder's "
    "refusal names the word); the vae input is left empty, so the panel shows the latent preview, which is "
    "the toy world's true picture. The take comes out as latents, a video and a GF Prompt Timeline script that "
    "replays it.", (NOTE_WIDTH, 420))
col = Column(g, 0)
toy = col.add("GFToyWorldModel")
words = col.add("GFToyWorldTextEncoder")
mem = col.add("GFDualMemory")
live = Column(g, right_of("GFDualMemory")).add(
    "GFLiveSampler", seed=0, prompt="a big red circle moves right on the grass", width=256, height=256,
    max_seconds=60.0)
for src, name in ((toy, "model"), (mem, "memory"), (words, "clip")):
    g.connect(src, 0, live, name)
live_outputs(g, Column(g, right_of("GFDualMemory", "GFLiveSampler")), live, "video/gf_toy_world_live")
g.save("gf_toy_world_live")
print("wrote", ", ".join(sorted(p.name for p in (REPO / "workflows").glob("*.json"))))
