"""Writes the UI-format example workflows in workflows/ from the live node schemas.

Run it with the Python environment of a ComfyUI checkout after changing a node's inputs, so the
saved widget values keep matching the schemas (tests/test_comfy_host.py checks that they do):

    GF_COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python tools/make_workflows.py
"""

import asyncio
import json
import os
import sys
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
import nodes  # noqa: E402

asyncio.run(nodes.init_builtin_extra_nodes())
assert asyncio.run(nodes.load_custom_node(str(REPO)))
M = nodes.NODE_CLASS_MAPPINGS
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

HF_LL = "https://huggingface.co/Efficient-Large-Model/LongLive-1.3B/resolve/main/models/"
HF_WAN = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
MODELS = {
    "longlive_base.pt": (HF_LL + "longlive_base.pt", "diffusion_models"),
    "longlive_lora.pt": (HF_LL + "lora.pt", "loras"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": (HF_WAN + "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                                "text_encoders"),
    "wan_2.1_vae.safetensors": (HF_WAN + "vae/wan_2.1_vae.safetensors", "vae"),
}

MODEL_NOTE = """Models (put each file in the ComfyUI/models folder named after the arrow):

- longlive_base.pt -> diffusion_models
  https://huggingface.co/Efficient-Large-Model/LongLive-1.3B (file models/longlive_base.pt)
- longlive_lora.pt -> loras
  the same repository's models/lora.pt, saved under the name longlive_lora.pt
- umt5_xxl_fp8_e4m3fn_scaled.safetensors -> text_encoders
  https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/text_encoders)
- wan_2.1_vae.safetensors -> vae
  https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/vae)

Other causal Wan2.1-1.3B checkpoints load the same way in GF Load Causal Wan Model: Self-Forcing's
checkpoints/self_forcing_dmd.pt (https://huggingface.co/gdhe17/Self-Forcing, weights: ema, lora: none) or
Anchor Forcing (https://huggingface.co/young98/AnchorForcing). LongLive samples with its raw generator
(weights: generator, as its config's use_ema: false). Research .pt files are read with weights_only=True.

Speed and memory: the sampler's GPU memory does not grow with the video length (measured on an H200 at
832x480 in bf16: 5.7 GiB for the diffusion stage, 28 pixel frames per second; text encoder and VAE come on
top). GF Stream Decode needs one frame of VAE memory and, keeping the video in a file (the default), one
frame of system RAM."""


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
        self.nodes, self.links, self.groups = [], [], []

    def add(self, kind, pos, size=(320, 120), title=None, color=None, **widgets):
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
        node = {"id": nid, "type": kind, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1,
                "mode": 0, "inputs": inputs, "outputs": outs, "properties": props, "widgets_values": values}
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return nid

    def note(self, text, pos, size=(420, 300), title="Read me"):
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

    def group(self, title, bounding):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding),
                            "color": "#3f789e", "font_size": 24, "flags": {}})

    def save(self, name):
        wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "grounded-forcing/" + name)), "revision": 0,
              "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": self.groups, "config": {},
              "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4}
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")


POS = ("#232", "#353")


def loaders(g, x=0, y=0):
    model = g.add("GFLoadCausalWanModel", (x, y), (360, 180), model_name="longlive_base.pt", weights="generator",
                  lora_name="longlive_lora.pt")
    clip = g.add("CLIPLoader", (x, y + 220), (360, 110), clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                 type="wan")
    vae = g.add("VAELoader", (x, y + 370), (360, 60), vae_name="wan_2.1_vae.safetensors")
    return model, clip, vae


def output(g, sampler, vae, x, y, prefix):
    dec = g.add("GFStreamDecode", (x, y), (320, 160), filename_prefix=f"grounded_forcing/{prefix}_frames")
    g.connect(sampler, "latent", dec, "samples")
    g.connect(vae, 0, dec, "vae")
    save = g.add("SaveVideo", (x + 360, y), (480, 420), filename_prefix=f"video/{prefix}")
    g.connect(dec, 0, save, "video")
    return dec


# 1. One prompt, 60 s --------------------------------------------------------------------------
g = Graph()
g.note("GF 60 s single prompt: one prompt streamed for a minute (240 latent frames, 957 frames at "
       "16 fps) under the Grounded Forcing memory.\n\n" + MODEL_NOTE, (-480, 0), (440, 620))
model, clip, vae = loaders(g)
rope = g.add("GFDRRoPE", (400, 0), (320, 160))
g.connect(model, 0, rope, "model")
text = g.add("CLIPTextEncode", (400, 200), (420, 180), title="Prompt", color=POS,
             text="A red fox trots through a snowy pine forest at sunrise, soft golden light, fresh powder "
                  "kicked up by its paws, tracking shot, cinematic, highly detailed")
g.connect(clip, 0, text, "clip")
seg = g.add("GFPromptSegment", (860, 200), (320, 140), duration=60.0)
g.connect(text, 0, seg, "conditioning")
mem = g.add("GFDualMemory", (860, -160), (320, 300))
sampler = g.add("GFSampler", (1220, 0), (320, 260), seed=42)
g.connect(rope, 0, sampler, "model")
g.connect(mem, 0, sampler, "memory")
g.connect(seg, 0, sampler, "segments")
output(g, sampler, vae, 1580, 0, "gf_single_60s")
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
g.note("GF 60 s interactive: six prompts of 10 s each, like live prompt switching. Each switch uses "
       "Asymmetric Proximity Recache (APR): cached frames near the switch are blended toward the new prompt, "
       "so the story moves on without a jump. A switch lands on the next 3-latent-frame chunk boundary."
       "\n\n" + MODEL_NOTE, (-480, 0), (440, 700))
model, clip, vae = loaders(g)
apr = g.add("GFAPRTransition", (400, -180), (320, 130))
previous = None
for k, prompt in enumerate(PROMPTS):
    y = k * 240
    text = g.add("CLIPTextEncode", (400, y), (420, 160), title=f"Prompt {k + 1} (from {10 * k} s)", color=POS,
                 text=prompt)
    g.connect(clip, 0, text, "clip")
    seg = g.add("GFPromptSegment", (860, y), (320, 140), title=f"Segment {k + 1}", duration=10.0)
    g.connect(text, 0, seg, "conditioning")
    if previous is not None:
        g.connect(previous, 0, seg, "previous")
        g.connect(apr, 0, seg, "transition")
    previous = seg
mem = g.add("GFDualMemory", (1220, -180), (320, 300))
sampler = g.add("GFSampler", (1220, 160), (320, 260), seed=7)
g.connect(model, 0, sampler, "model")
g.connect(mem, 0, sampler, "memory")
g.connect(previous, 0, sampler, "segments")
output(g, sampler, vae, 1580, 160, "gf_interactive_60s")
log = g.add("PreviewAny", (1220, 480), (320, 300), title="Event log (one JSON line per chunk)")
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
g.note("GF multi-shot story: a timeline script with shot cuts and smooth prompt switches (40 s). One line "
       "per segment: a duration (6s, or 24f for latent frames), an optional transition (apr, apr(ALPHA, "
       "WINDOW), hard, none, cut) and '|' before the prompt.\n\n" + MODEL_NOTE, (-480, 0), (440, 700))
model, clip, vae = loaders(g)
timeline = g.add("GFPromptTimeline", (400, 160), (640, 320), script=STORY)
g.connect(clip, 0, timeline, "clip")
mem = g.add("GFDualMemory", (400, -180), (320, 300), gcm_update="after_switch")
sampler = g.add("GFSampler", (1080, 0), (320, 260), seed=1234)
g.connect(model, 0, sampler, "model")
g.connect(mem, 0, sampler, "memory")
g.connect(timeline, 0, sampler, "segments")
output(g, sampler, vae, 1440, 0, "gf_story")
g.save("gf_multi_shot_story")

# 4. A/B: every windowed memory policy on the same prompts --------------------------------------
AB = """\
# The same four prompts for every memory (40 s). No transition is written, so each memory uses its
# own switch rule: APR (grounded), KV recache (longlive), KV flush (infinity_rope), none (context_forcing).
10s | An astronaut in a white suit walks across a red desert on Mars, dust drifting, wide shot
10s | The astronaut stops and kneels to pick up a glowing blue crystal from the sand
10s | The astronaut holds the glowing crystal up against the pink Martian sky
10s | The astronaut walks back toward a small silver lander as the sun sets over the dunes"""
POLICIES = ("grounded", "longlive", "anchor_forcing", "infinity_rope", "context_forcing")
g = Graph()
g.note("GF A/B of the memory policies on the same prompts, seed and model, side by side, left to right: "
       "Grounded Forcing (GCM + LTM with DR-RoPE and APR); LongLive (sink + window, absolute RoPE, KV recache); "
       "Anchor Forcing (sink + junction + window, tri-region RoPE, anchor-guided recache); Infinity-RoPE "
       "(block-relative window, KV flush); Context Forcing (sink + slow memory of surprising frames + fast "
       "window). Anchor Forcing ships its own LoRA, Infinity-RoPE is training-free on Self-Forcing-style weights "
       "and Context Forcing was trained with its own memory, so on LongLive weights those three show the memory "
       "rule, not their best results. self_forcing is left out: it stops at 5 s. Watch identity and colour "
       "drift late in the video and how each handles the prompt switches.\n\n" + MODEL_NOTE,
       (-480, 0), (440, 800))
model, clip, vae = loaders(g)
timeline = g.add("GFPromptTimeline", (400, 160), (600, 260), script=AB)
g.connect(clip, 0, timeline, "clip")
videos = []
for k, policy in enumerate(POLICIES):
    y = -200 + k * 560
    mem = g.add("GFDualMemory", (1040, y), (320, 300), title=f"Memory: {policy}", policy=policy)
    sampler = g.add("GFSampler", (1400, y), (320, 260), title=f"Sampler ({policy})", seed=2024)
    g.connect(model, 0, sampler, "model")
    g.connect(mem, 0, sampler, "memory")
    g.connect(timeline, 0, sampler, "segments")
    dec = g.add("GFStreamDecode", (1760, y), (320, 160), title=f"Decode ({policy})",
                filename_prefix=f"grounded_forcing/ab_{policy}_frames")
    g.connect(sampler, "latent", dec, "samples")
    g.connect(vae, 0, dec, "vae")
    parts = g.add("GetVideoComponents", (1760, y + 220), (320, 100))
    g.connect(dec, 0, parts, "video")
    videos.append(parts)
stitched = videos[0]
for k in range(1, len(POLICIES)):
    stitch = g.add("ImageStitch", (2120, 100 + (k - 1) * 220), (320, 160), title=f"+ {POLICIES[k]}",
                   direction="right", spacing_width=16, spacing_color="black")
    g.connect(stitched, 0, stitch, "image1")
    g.connect(videos[k], "images", stitch, "image2")
    stitched = stitch
create = g.add("CreateVideo", (2120, 1000), (320, 100), fps=16.0)
g.connect(stitched, 0, create, "images")
save = g.add("SaveVideo", (2480, 100), (640, 420), filename_prefix="video/gf_ab_memory_policies")
g.connect(create, 0, save, "video")
g.save("gf_ab_memory_policies")


# 5. The toy world: the whole pack with the model it ships, nothing to download -----------------
def toy_world():
    g = Graph()
    g.note("GF toy world: runs as it is, with nothing to download. A small Wan2.1-architecture model that "
           "ships with the pack, trained on a toy world of shapes on simple scenes (256x256), plays a five-line "
           "script: the red circle moves right, a prompt switch makes it bounce, a cut moves it to the snow, a "
           "second subject enters. Change the sentences (the timeline's tooltip lists the words) or the memory "
           "policy and run again. GF Toy World Decode shows the latents "
           "through the Wan latent-to-RGB map the toy world is made with, so no VAE is needed. For real video, "
           "open the other workflows and download a causal Wan2.1 model.", (-480, 0), (440, 420))
    model = g.add("GFToyWorldModel", (0, 0), (320, 60))
    timeline = g.add("GFToyWorldTimeline", (0, 120), (520, 260))
    mem = g.add("GFDualMemory", (560, -200), (320, 300))
    sampler = g.add("GFSampler", (560, 140), (320, 260), width=256, height=256, seed=0)
    g.connect(model, 0, sampler, "model")
    g.connect(mem, 0, sampler, "memory")
    g.connect(timeline, 0, sampler, "segments")
    decode = g.add("GFToyWorldDecode", (920, 0), (320, 100))
    g.connect(sampler, "latent", decode, "samples")
    create = g.add("CreateVideo", (920, 160), (320, 100), fps=16.0)
    g.connect(decode, 0, create, "images")
    save = g.add("SaveVideo", (1280, 0), (420, 460), filename_prefix="video/gf_toy_world")
    g.connect(create, 0, save, "video")
    g.save("gf_toy_world")


toy_world()

# 5. Live: steer the video from the node's panel ------------------------------------------------
def live_workflow():
    g = Graph()
    g.note("GF Live: press Run, then steer the video in the GF Live Sampler panel while it plays. Type the next "
           "prompt and press Enter (it takes effect at the next chunk boundary, with the transition chosen "
           "beside the box: apr, hard or none); Cut (or Ctrl+Enter) starts a new shot, to the typed prompt if "
           "any; Pause holds generation and playback; Stop ends the take. The status line shows the generation "
           "rate against playback (16 fps), the buffer and the latency from a sent prompt to its first frame."
           "\n\nThe take comes out as latents, a video and a GF Prompt Timeline script (shown on the right): paste "
           "it into GF Prompt Timeline and run GF Sampler with the same model, memory, seed and size and "
           "noise_order 'chunk' to make the same video again, bit for bit (docs/LIVE.md).\n\n" + MODEL_NOTE,
           (-480, 0), (440, 820))
    model, clip, vae = loaders(g)
    mem = g.add("GFDualMemory", (400, -160), (320, 300))
    sampler = g.add("GFLiveSampler", (780, 0), (460, 760), seed=42)
    g.connect(model, 0, sampler, "model")
    g.connect(mem, 0, sampler, "memory")
    g.connect(clip, 0, sampler, "clip")
    g.connect(vae, 0, sampler, "vae")
    save = g.add("SaveVideo", (1280, 0), (480, 420), filename_prefix="video/gf_live")
    g.connect(sampler, "video", save, "video")
    script = g.add("PreviewAny", (1280, 460), (480, 300), title="The take as a timeline script")
    g.connect(sampler, "script", script, "source")
    g.save("gf_live")


live_workflow()
print("wrote", ", ".join(sorted(p.name for p in (REPO / "workflows").glob("*.json"))))
