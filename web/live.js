// GF Live Sampler's panel: plays the frames of a running live take as they arrive and steers it.
//
// Frames come over ComfyUI's own websocket as `gf_live.*` messages (base64 JPEGs, see nodes/live.py);
// commands go back to the pack's route POST /api/gf_live/command. A page opened or reloaded
// mid-take asks GET /api/gf_live/session and attaches to the running take.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "GFLiveSampler";
const START_BUFFER = 4; // frames queued before playback (re)starts
const PANEL_HEIGHT = 380;

const STYLE = `
.gf-live { display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%; box-sizing: border-box;
  padding: 4px; font: 12px sans-serif; color: #ddd; }
.gf-live canvas { flex: 1 1 auto; min-height: 120px; width: 100%; object-fit: contain; background: #000;
  border-radius: 4px; }
.gf-live-row { display: flex; gap: 4px; align-items: center; }
.gf-live-prompt { flex: 1 1 auto; min-width: 60px; background: #222; color: #eee; border: 1px solid #555;
  border-radius: 4px; padding: 4px; font: inherit; }
.gf-live button, .gf-live select { background: #333; color: #eee; border: 1px solid #555; border-radius: 4px;
  padding: 3px 8px; font: inherit; cursor: pointer; }
.gf-live button:disabled { opacity: 0.4; cursor: default; }
.gf-live-status { font-family: monospace; line-height: 1.35; min-height: 2.7em; }
.gf-live-reply { min-height: 1.2em; color: #f99; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
`;

// -- the page's view of the take -------------------------------------------------------------------

const panels = new Set();
let take = null; // the running (or last) take: {session, node, fps, width, height, state, ...}

function panelsFor(detail) {
  const mine = [...panels].filter((p) => String(p.node.id) === String(detail.node));
  return mine.length ? mine : [...panels]; // a node inside a subgraph has another id on this canvas
}

function b64ToBlob(b64) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new Blob([bytes], { type: "image/jpeg" });
}

class Player {
  constructor(canvas, onTick) {
    this.canvas = canvas;
    this.onTick = onTick;
    this.reset(16);
    this.timer = setInterval(() => this.tick(), 10);
  }

  reset(fps) {
    this.fps = fps;
    this.queue = [];
    this.pending = Promise.resolve();
    this.received = 0;
    this.played = 0;
    this.nextDue = null;
    this.held = false; // paused by the user
    this.ended = false;
  }

  push(frames) {
    // decode in order, then queue
    const decoded = Promise.all(frames.map((b64) => createImageBitmap(b64ToBlob(b64))));
    this.pending = this.pending.then(() => decoded).then((bitmaps) => {
      this.queue.push(...bitmaps);
      this.received += bitmaps.length;
    });
  }

  tick() {
    const now = performance.now();
    if (!this.held && this.queue.length) {
      if (this.nextDue === null) {
        if (this.queue.length >= START_BUFFER || this.ended) this.nextDue = now;
      }
      while (this.nextDue !== null && now >= this.nextDue && this.queue.length) {
        this.draw(this.queue.shift());
        this.played += 1;
        this.nextDue += 1000 / this.fps;
      }
    }
    if (!this.queue.length && this.nextDue !== null && now >= this.nextDue) this.nextDue = null; // underrun
    this.onTick();
  }

  draw(bitmap) {
    const c = this.canvas;
    if (c.width !== bitmap.width || c.height !== bitmap.height) {
      c.width = bitmap.width;
      c.height = bitmap.height;
    }
    c.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
  }

  bufferSeconds() {
    return this.queue.length / this.fps;
  }
}

class Panel {
  constructor(node) {
    this.node = node;
    this.sent = new Map(); // command number -> performance.now() when it was sent
    this.appliedAt = {}; // command number -> the chunk first made under it
    this.latency = null;
    this.genFps = null;
    this.madeFrames = 0;
    this.root = document.createElement("div");
    this.root.className = "gf-live";
    this.root.innerHTML = `
      <canvas class="gf-live-screen" width="832" height="480"></canvas>
      <div class="gf-live-status">idle: press Run to start a take</div>
      <div class="gf-live-row">
        <input class="gf-live-prompt" type="text" maxlength="2000"
          placeholder="Next prompt: Enter sends, Ctrl+Enter cuts to it">
        <select class="gf-live-transition" title="How a new prompt enters the cache">
          <option value="apr" selected>apr</option><option value="hard">hard</option><option value="none">none</option>
        </select>
      </div>
      <div class="gf-live-row">
        <button class="gf-live-cut" title="Shot cut: drop the recent frames (to the typed prompt, if any)">Cut</button>
        <button class="gf-live-pause">Pause</button>
        <button class="gf-live-stop">Stop</button>
        <span class="gf-live-reply"></span>
      </div>`;
    const $ = (sel) => this.root.querySelector(sel);
    this.status = $(".gf-live-status");
    this.reply = $(".gf-live-reply");
    this.input = $(".gf-live-prompt");
    this.transition = $(".gf-live-transition");
    this.pauseButton = $(".gf-live-pause");
    this.player = new Player($(".gf-live-screen"), () => this.render());
    this.input.addEventListener("keydown", (e) => {
      e.stopPropagation(); // typing here never triggers the graph's shortcuts
      if (e.key !== "Enter") return;
      e.preventDefault();
      if (e.ctrlKey || e.metaKey) this.cut();
      else this.sendPrompt();
    });
    $(".gf-live-cut").addEventListener("click", () => this.cut());
    this.pauseButton.addEventListener("click", () =>
      this.command({ type: take?.state === "paused" ? "resume" : "pause" }));
    $(".gf-live-stop").addEventListener("click", () => this.command({ type: "stop" }));
  }

  sendPrompt() {
    const text = this.input.value.trim();
    if (!text) return;
    this.command({ type: "prompt", text, transition: this.transition.value }).then((ok) => {
      if (ok) this.input.value = "";
    });
  }

  cut() {
    const text = this.input.value.trim();
    this.command(text ? { type: "cut", text } : { type: "cut" }).then((ok) => {
      if (ok) this.input.value = "";
    });
  }

  async command(message) {
    if (!take || take.state === "ended") {
      this.reply.textContent = "no live take is running; press Run first";
      return false;
    }
    const sentAt = performance.now();
    let reply;
    try {
      const res = await api.fetchApi("/gf_live/command", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ session: take.session, ...message }),
      });
      reply = await res.json();
      if (!res.ok) {
        this.reply.textContent = reply.error ?? `refused (${res.status})`;
        return false;
      }
    } catch (e) {
      this.reply.textContent = `the server did not answer: ${e}`;
      return false;
    }
    this.reply.textContent = "";
    if (message.type === "prompt" || message.type === "cut") this.sent.set(String(reply.seq), sentAt);
    return true;
  }

  start(detail) {
    this.player.reset(detail.fps ?? 16);
    this.sent.clear();
    this.appliedAt = {};
    this.latency = null;
    this.genFps = null;
    this.madeFrames = detail.latent_frames ?? 0;
    this.reply.textContent = "";
    this.root.dataset.session = detail.session;
  }

  frames(detail) {
    if (this.root.dataset.session !== detail.session) this.start(detail); // attached mid-take
    this.player.push(detail.frames ?? []);
    this.madeFrames = detail.latent_frames;
    if (detail.gen_fps) this.genFps = detail.gen_fps;
    for (const seq of detail.applied ?? []) {
      this.appliedAt[seq] = detail.chunk;
      const sentAt = this.sent.get(String(seq));
      if (sentAt !== undefined) {
        this.latency = (performance.now() - sentAt) / 1000;
        this.sent.delete(String(seq));
      }
    }
  }

  end(detail) {
    this.player.ended = true;
    this.reply.textContent = "";
    this.endReason = detail.reason;
    this.root.dataset.total = detail.pixel_frames;
  }

  render() {
    const now = performance.now();
    if (now - (this.rendered ?? 0) < 100) return;
    this.rendered = now;
    const p = this.player;
    p.held = take?.state === "paused";
    this.pauseButton.textContent = p.held ? "Resume" : "Pause";
    const live = take && take.state !== "ended" && this.root.dataset.session === take.session;
    for (const b of this.root.querySelectorAll("button")) b.disabled = !live;
    Object.assign(this.root.dataset, {
      received: p.received, played: p.played, buffered: p.queue.length, latent: this.madeFrames,
      applied: JSON.stringify(this.appliedAt),
    });
    if (!this.root.dataset.session) return;
    const gen = this.genFps ? `${this.genFps.toFixed(1)}` : "-";
    const lat = this.latency === null ? "-" : `${this.latency.toFixed(2)} s`;
    const state = take && this.root.dataset.session === take.session ? take.state : "ended";
    const ended = state === "ended" ? ` (${this.endReason ?? "ended"})` : "";
    this.status.textContent = `${state}${ended} | making ${gen} fps, playing ${p.fps} fps | buffer ` +
      `${p.bufferSeconds().toFixed(2)} s | prompt latency ${lat} | ${this.madeFrames} latent frames made, ` +
      `${p.played} frames shown`;
  }
}

// -- websocket messages ----------------------------------------------------------------------------

function onMessage(name, handler) {
  api.addEventListener(name, (event) => {
    const detail = event.detail;
    if (!detail?.session) return;
    handler(detail);
  });
}

onMessage("gf_live.start", (detail) => {
  take = { ...detail };
  for (const p of panelsFor(detail)) p.start(detail);
});
onMessage("gf_live.frames", (detail) => {
  if (!take || take.session !== detail.session) take = { session: detail.session, node: detail.node, fps: 16 };
  take.state = detail.state === "ending" ? take.state : detail.state;
  for (const p of panelsFor(detail)) p.frames(detail);
});
onMessage("gf_live.state", (detail) => {
  if (take?.session === detail.session) take.state = detail.state;
});
onMessage("gf_live.refused", (detail) => {
  for (const p of panelsFor(detail)) p.reply.textContent = detail.error;
});
onMessage("gf_live.end", (detail) => {
  if (take?.session === detail.session) take.state = "ended";
  for (const p of panelsFor(detail)) p.end(detail);
});

async function attach() {
  // a page opened or reloaded mid-take picks it up; frames follow from the next chunk
  try {
    const res = await api.fetchApi("/gf_live/session");
    const current = await res.json();
    if (current.session && current.session !== take?.session) {
      take = { ...current };
      for (const p of panelsFor(current)) p.start(current);
    } else if (current.session) {
      take.state = current.state;
    }
  } catch (e) {
    console.warn("Grounded Forcing live: could not ask for the running take", e);
  }
}

app.registerExtension({
  name: "GroundedForcing.Live",
  setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.appendChild(style);
    api.addEventListener("reconnected", attach);
    attach();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const panel = new Panel(this);
      const widget = this.addDOMWidget("live", "gf_live_panel", panel.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => PANEL_HEIGHT,
      });
      widget.serialize = false;
      panels.add(panel);
      if (take && take.state !== "ended" && String(take.node) === String(this.id)) panel.start(take);
      const removed = this.onRemoved;
      this.onRemoved = function () {
        panels.delete(panel);
        clearInterval(panel.player.timer);
        return removed?.apply(this, arguments);
      };
      this.setSize([Math.max(this.size[0], 420), this.computeSize()[1]]);
      return result;
    };
  },
});
