"""The toy world, its training forward and the shipped toy model."""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import StubKV, capture_kv, commit, tiny_model

import gf_core as gf
from gf_core import toyworld as tw
from gf_core.errors import BadInput
from gf_core.latents import preview_rgb
from gf_core.memory import ContextSource, Memory
from gf_core.rope import RopeTable
from gf_core.wan import encode_text, forward_chunk

ROOT = Path(__file__).resolve().parent.parent


def _train_module():
    spec = importlib.util.spec_from_file_location("train_toyworld", ROOT / "bench" / "train_toyworld.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = [("a big red circle moves right on the grass", 27), ("then it moves left", 21),
          ("then a small blue square enters", 12), ("then it bounces", 12), ("cut to the snow where it pulses", 12)]


# -- the world ---------------------------------------------------------------------------------


def test_preview_shows_the_picture_and_truth_measures_perfect():
    story = tw.play(SCRIPT)
    latents = tw.story_latents(story)
    assert latents.shape == (1, 16, len(story), 32, 32)
    rgb = tw.to_rgb(latents)[0]
    table, scenes = tw.draw_table(story)
    assert torch.allclose(rgb, tw.render(table, scenes), atol=1e-5)  # the lift inverts the preview projection
    preview = preview_rgb(latents)[0].permute(0, 3, 1, 2).float() / 255
    assert (preview - rgb).abs().max() < 1 / 255 + 1e-6
    m = tw.measure(story, latents)
    assert m["identity"] == 1.0 and m["scene"] == 1.0 and m["recall"] == 1.0 and m["cut_identity"] == 1.0
    assert m["collapse"] == [0.0] and m["drift"][0] < 0.01
    assert m["flicker"] == pytest.approx(m["flicker_truth"], abs=1e-3)


def test_story_follows_the_script():
    story = tw.play(SCRIPT)
    t = story.truth
    assert story.starts == [0, 27, 48, 60, 72]
    assert t[0].actors[0].x == tw.start_x("moves right") and t[26].actors[0].visible() == 0  # walked out
    assert max(a.visible() for a in (t[f].actors[0] for f in range(27, 48))) == 1  # came back
    assert len(t[60].actors) == 2 and t[60].main == 1  # the square entered and is "it"
    assert t[65].actors[1].lift > 0 and t[65].actors[1].x == tw.ENTER_STOP  # bounces where it stopped
    assert t[72].scene == "snow" and [str(a.subject) for a in t[72].actors] == ["small blue square"]
    assert story.segments(tw.Words(tw.word_table()))[4].transition.kind == "cut"
    assert tw.play(SCRIPT).truth[50].actors[1].x == t[50].actors[1].x  # deterministic


def test_measures_see_a_wrong_subject_and_a_wrong_scene():
    story = tw.play(SCRIPT)
    other = tw.play([("a big yellow triangle moves right on the night", 27)] + SCRIPT[1:])
    m = tw.measure(story, tw.story_latents(other))
    assert m["identity_first"] == 0.0 and m["scene"] < 0.7


def _soften(latents: torch.Tensor, side: float) -> torch.Tensor:
    """Latents [1, 16, F, H, W] through a 3 x 3 blur (centre 1, sides ``side``, corners side^2): the
    soft edges a model draws."""
    k = torch.tensor([side, 1.0, side])
    k = torch.outer(k, k) / torch.outer(k, k).sum()
    _, c, f, h, w = latents.shape
    x = latents[0].transpose(0, 1).reshape(f * c, 1, h, w)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3))
    return x.view(f, c, h, w).transpose(0, 1).unsqueeze(0)


def test_every_subject_is_told_apart_sharp_and_with_soft_edges():
    """Every one of the 24 subjects on a random scene: the world's own frames, and the same frames with
    softened edges, show it with its shape, size and colour. A small square and a small circle differ
    only in a few partly covered pixels, which the measure must read. (Softened, a big subject pulsing
    down to 0.8 of its size sits where the two sizes' templates meet, so those run sharp only.)"""
    rng = random.Random(3)
    for shape in tw.SHAPES:
        for size in tw.SIZES:
            for colour in tw.COLOURS:
                action = rng.choice(tw.ACTIONS)
                text = f"a {size} {colour} {shape} {action} on the {rng.choice(list(tw.SCENES))}"
                story = tw.play([(text, 12)])
                latents = tw.story_latents(story)
                for side in (0.0,) if action == "pulses" else (0.0, 0.3, 0.5):
                    assert tw.identity_accuracy(story, _soften(latents, side)) == 1.0, (text, side)


def test_words_embed_like_umt5_output():
    words = tw.Words(tw.word_table())
    e = words.embed("a big red circle bounces on the grass")
    assert e.shape == (1, 8, tw.TEXT_DIM) and e.abs().sum(-1).min() > 0
    assert torch.equal(e[0, 2], words.table[tw.VOCABULARY.index("red")])


def test_bad_prompts_say_what_works():
    with pytest.raises(BadInput, match="does not know the word 'purple'.*magenta"):
        tw.parse("a big purple circle bounces on the grass")
    with pytest.raises(BadInput, match="cannot read.*then it ACTION"):
        tw.parse("it bounces")
    with pytest.raises(BadInput, match="does not say who is where"):
        tw.play([("then it bounces", 9)])
    with pytest.raises(BadInput, match="256x256 pixels only.*use width 256 and height 256"):
        tw.check_size(480, 832)


# -- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("context,kernel", [("all", "sdpa"), ("sink", "sdpa"), ("sink", "flex"), ("anchors", "sdpa"),
                                            ("relative", "sdpa")])
def test_training_forward_equals_cached_chunk_forward(context, kernel):
    """The masked [clean | noisy] forward of chunk 2 is forward_chunk of chunk 2 after the cache holds
    chunks 0-1 encoded at the cache-pass timestep (each chunk under its own prompt), float32; with
    "anchors", chunk 0's frames sit at temporal index 0 wherever they are keys or clean queries; with
    "relative" (block_relative_layout), chunk 1 is encoded with no context and chunk 0 one chunk later."""
    train = _train_module()
    model = tiny_model()
    cfg = gf.WanConfig.from_module(model)
    g = torch.Generator().manual_seed(0)
    size, frames = 4, 9
    clean = torch.randn(1, 16, frames, size, size, generator=g)
    noisy = torch.randn(1, 16, frames, size, size, generator=g)
    timesteps = torch.tensor([[1000.0, 833.3333, 625.0]])
    prompts = torch.cat([torch.randn(1, 3, 5, cfg.text_dim, generator=g), torch.zeros(1, 3, 2, cfg.text_dim)], dim=2)
    ctx = [[], [0, 1, 2], [0, 4, 5]] if context == "sink" else [[], [0, 1, 2], [0, 1, 2, 3, 4, 5]]
    index = [0, 0, 0] + list(range(3, frames)) if context == "anchors" else list(range(frames))
    if context == "relative":
        layout = train.block_relative_layout(3, 2)
        ctx, index = layout.context, layout.clean_index
        assert ctx == [[], [], [0, 4, 5]] and index == [3, 4, 5] + list(range(3, frames))
    rope = RopeTable(cfg.head_dim)
    flex = block_mask = None
    if kernel == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = flex_attention
        block_mask = train.FlexMasks(frames, 4, "cpu").get(context, train.frame_mask(ctx))
    with torch.no_grad():
        v_train = train.train_forward(model, clean, noisy, timesteps, prompts, ctx, rope, flex, block_mask, index)

        mem = Memory(gf.self_forcing(), 3, cfg.num_layers)
        grid = (size // 2, size // 2)
        zero = torch.zeros(1)

        def source_of(keys):
            slots = {f.index: f.slot for _, f in mem.frames()}
            return ContextSource(mem.store, [slots[f] for f in keys],
                                 rope.frequencies([index[f] for f in keys], *grid, "float32"))

        for c in (0, 1):
            text = encode_text(model, prompts[:, c])
            source = source_of(ctx[c]) if ctx[c] else None
            _, kv = capture_kv(model, clean[:, :, 3 * c:3 * c + 3], zero, text, source, index[3 * c:3 * c + 3], rope,
                               "float32", compute_output=False)
            commit(mem, 3 * c, clean[:, :, 3 * c:3 * c + 3], kv, c)
        source = source_of(ctx[2])
        v_chunk = forward_chunk(model, noisy[:, :, 6:9], timesteps[:, 2], encode_text(model, prompts[:, 2]),
                                   source, [6, 7, 8], rope, "float32")
    assert (v_train[:, :, 6:9] - v_chunk).abs().max() < 1e-5
    if context in ("anchors", "relative"):  # the indices matter: at frame indices the answer differs
        with torch.no_grad():
            v_frames = train.train_forward(model, clean, noisy, timesteps, prompts, ctx, rope)
        assert (v_frames[:, :, 6:9] - v_chunk).abs().max() > 1e-3
    if context == "sink":  # the mask matters: with every frame the answer differs
        with torch.no_grad():
            v_all = train.train_forward(model, clean, noisy, timesteps, prompts, [[], [0, 1, 2], list(range(6))], rope)
        assert (v_all[:, :, 6:9] - v_chunk).abs().max() > 1e-3


def test_grown_model_samples_what_it_grew_from_and_its_new_block_learns():
    from gf_core.checkpoints import load_wan_state_dict

    train = _train_module()
    sd = {k: v.float() for k, v in load_wan_state_dict(tw.TOY_DIR / tw.MODEL_FILE).items()}
    cfg = gf.WanConfig.from_state_dict(sd)
    grown = train.grow_blocks(sd, replace(cfg, num_layers=cfg.num_layers + 1))
    assert gf.WanConfig.from_state_dict(grown).num_layers == cfg.num_layers + 1
    assert grown[f"blocks.{cfg.num_layers}.self_attn.q.weight"].abs().sum() > 0  # random, not zero
    story = tw.play([("a big red circle bounces on the grass", 6)])
    before = gf.generate(gf.WanModel.from_state_dict(sd), story.segments(), "grounded", height=256, width=256, seed=0)
    model = gf.WanModel.from_state_dict(grown)
    after = gf.generate(model, story.segments(), "grounded", height=256, width=256, seed=0)
    assert torch.equal(before.latents, after.latents)  # the new block starts as an identity
    model.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    clean, noisy = torch.randn(2, 1, 16, 6, 8, 8, generator=g)
    prompts = tw.embed("a big red circle bounces on the grass").unsqueeze(1).expand(1, 2, -1, -1)
    v = train.train_forward(model, clean, noisy, torch.tensor([[1000.0, 625.0]]), prompts, [[], [0, 1, 2]],
                            RopeTable(cfg.head_dim))
    v.square().mean().backward()
    assert model.blocks[-1].ffn[2].weight.grad.abs().sum() > 0  # its zero outputs get gradients
    with pytest.raises(SystemExit, match="give --layers 4, or more to grow it"):
        train.grow_blocks(sd, replace(cfg, num_layers=3))


def test_chunk_weights_need_what_the_chunk_shows_to_be_known():
    train = _train_module()
    visible = torch.zeros(1, 9, 2)
    visible[0, :3, 0] = 1  # subject 0 visible in chunk 0 only
    visible[0, 6:, 0] = 1  # and again in chunk 2
    named = torch.zeros(1, 3, 2, dtype=torch.bool)
    first = torch.tensor([True])
    w = train.chunk_weights([[], [0, 1, 2], [3, 4, 5]], visible, named, first)
    assert w.tolist() == [[0.0, 1.0, 0.0]]  # chunk 0: nobody names it; chunk 2 sees only empty frames
    named[0, 0, 0] = True
    assert train.chunk_weights([[], [0, 1, 2], [0, 4, 5]], visible, named, first).tolist() == [[1.0, 1.0, 1.0]]
    # a chunk whose subject only its prompt tells (chunk 0) weighs prompt_weight; one that sees it, 1
    named[0, 2, 0] = True
    assert train.chunk_weights([[], [0, 1, 2], [0, 4, 5]], visible, named, first, 4.0).tolist() == [[4.0, 1.0, 1.0]]
    assert train.chunk_weights([[], [0, 1, 2], [3, 4, 5]], visible, named, first, 4.0).tolist() == [[4.0, 1.0, 4.0]]


def test_training_layouts_are_those_the_memories_sample_with():
    """Every drawn layout: a context per chunk of earlier frames only, indices inside the trained
    range; the anchor layouts hold the first chunk in every later context, at index 0 or 0-2, and a
    chunk right after a gap does not train."""
    train = _train_module()
    rng = random.Random(0)
    kinds, gaps, shared = set(), set(), set()
    for _ in range(400):
        layout = train.draw_context(rng, 7, train.MAX_GAP)
        kinds.add(layout.kind.split("+")[0].rstrip("13"))
        assert len(layout.context) == 7
        assert all(all(f < 3 * c for f in ctx) for c, ctx in enumerate(layout.context))
        if layout.kind.startswith("anchors"):
            assert all({0, 1, 2} <= set(ctx) for ctx in layout.context[1:])
            assert len(layout.clean_index) == 21 and max(layout.clean_index) == 20
            assert layout.clean_index[:3] in ([0, 0, 0], [0, 1, 2])
            shared.add(layout.clean_index[1] == 0)
            assert layout.gap % 3 == 0 and layout.gap <= train.MAX_GAP
            assert layout.untrained == ((1,) if layout.gap else ())
            gaps.add(layout.gap > 0)
        else:
            assert layout.gap == 0 and layout.clean_index is None
    assert kinds == {"all", "sink", "anchors"} and gaps == {True, False} and shared == {True, False}


def test_block_relative_layout_is_infinity_ropes():
    """Each chunk the block-relative layout trains sees what Infinity-RoPE's memory holds before it (the
    first frame and the newest two) at the same index differences from the chunk as that policy's plan
    gives them, for every chunk of the window it can train."""
    train = _train_module()
    policy = gf.infinity_rope()
    mem = Memory(policy, 3, 1)
    stub = StubKV()
    plans = {}
    for c in range(7):
        plan = mem.plan(3 * c, 3)
        plans[c] = ([f.index for _, f in plan.keys], [k - plan.query_index[0] for k in plan.key_index])
        commit(mem, 3 * c, stub.latents(3), stub.kv(3), 0)
    for chunk in range(2, 7):
        layout = train.block_relative_layout(7, chunk)
        frames, offsets = plans[chunk]
        assert layout.context[chunk] == frames
        assert [layout.clean_index[f] - 3 * chunk for f in frames] == offsets == [-3, -2, -1]
        assert all(all(f < 3 * c for f in ctx) for c, ctx in enumerate(layout.context))
        assert max(layout.clean_index) <= 20 and layout.untrained == (1,)
    rng = random.Random(0)
    drawn = {train.draw_context(rng, 7, train.MAX_GAP, relative=0.5).kind for _ in range(200)}
    assert {f"relative{c}" for c in range(2, 7)} <= drawn


def test_training_starts_from_a_shipped_model():
    """--init takes the shipped model (umT5-wide words) back to the width it trains at, exactly."""
    from gf_core.checkpoints import load_wan_state_dict

    cfg = _train_module().model_config()
    narrow = gf.WanModel(cfg)
    narrow.load_state_dict(tw.narrow_text({k: v.float() for k, v in load_wan_state_dict(tw.TOY_DIR / tw.MODEL_FILE).items()}))
    text = "a big red circle bounces on the grass"
    wide = tw.load_model()
    a = wide.text_embedding(tw.load_words().embed(text))
    b = narrow.text_embedding(tw.Words(tw.word_table(cfg.text_dim)).embed(text))
    assert (a - b).abs().max() < 1e-4 * a.abs().max()


def test_first_chunk_training_runs(tmp_path):
    """The first stage of the recipe: one-chunk windows at story starts, every layout drawn."""
    train = _train_module()
    result = train.main(["--device", "cpu", "--steps", "12", "--batch", "2", "--size", "8", "--frames", "3",
                         "--layers", "1", "--ffn", "256", "--stories", "4", "--story-starts", "1", "--out", str(tmp_path),
                         "--no-eval", "--log-every", "1"])
    assert result is None and (tmp_path / "train.json").is_file()
    # --ship: the model keeps the word width it trained at, the word table gets umT5's, the loader widens
    from safetensors import safe_open

    from gf_core.checkpoints import load_wan_state_dict

    shipped = tmp_path / "shipped"
    train.main(["--ship", str(tmp_path), "--out", str(shipped)])
    with safe_open(str(shipped / tw.MODEL_FILE), framework="pt") as f:
        assert f.get_slice("text_embedding.0.weight").get_shape()[1] == tw.TEXT_DIM
    assert tw.load_words(shipped).table.shape[1] == tw.SHIPPED_TEXT_DIM
    loaded = tw.load_state_dict(shipped)
    assert loaded["text_embedding.0.weight"].shape[1] == tw.SHIPPED_TEXT_DIM
    trained = tw.load_model(tmp_path)  # the trained folder: narrow model, narrow words
    text = "a big red circle bounces on the grass"
    a = tw.load_model(shipped).text_embedding(tw.load_words(shipped).embed(text))
    b = trained.text_embedding(tw.load_words(tmp_path).embed(text))
    assert (a - b).abs().max() < 1e-2 * a.abs().max()  # the same model; bf16 rounding of the widened weight
    assert torch.equal(loaded["blocks.0.ffn.0.weight"], load_wan_state_dict(tmp_path / tw.MODEL_FILE)["blocks.0.ffn.0.weight"])


def test_shipped_weights_fit_in_12_mb():
    assert (tw.TOY_DIR / tw.MODEL_FILE).stat().st_size <= 12_000_000


def _shipped_window(text: str, seed: int):
    """(train module, the shipped model in float32, a 9-frame story of ``text``, its latents, its prompt
    per chunk at the training layout, noise of ``seed``, the model's RoPE table) for own_context."""
    from gf_core.rope import RopeTable

    train = _train_module()
    model = tw.load_model(dtype=torch.float32)
    story = tw.play([(text, 9)])
    x0 = tw.story_latents(story)
    e = tw.load_words().embed(text)
    prompts = torch.zeros(1, 3, train.MAX_WORDS, e.shape[-1])
    prompts[0, :, : e.shape[1]] = e[0]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return train, model, story, x0, prompts, eps, RopeTable(gf.WanConfig.from_module(model).head_dim)


def test_own_context_is_the_models_picture_of_the_window():
    """--self-context's stand-in for the true frames: the shipped model's one-step pictures of a true
    window, the named subject in most frames, yet not a copy of the truth."""
    from gf_core.sampler import Schedule

    train, model, story, x0, prompts, eps, rope = _shipped_window("a big red circle moves right on the grass", 0)
    schedule = Schedule.few_step()
    own = train.own_context(model, x0, eps, float(schedule.sigmas[-1]), schedule.timesteps[-1], prompts,
                            [[], [0, 1, 2], [0, 1, 2, 3, 4, 5]], rope)
    assert own.shape == x0.shape and not own.requires_grad
    assert tw.identity_accuracy(story, own, 9) >= 0.7
    assert (own - x0).abs().mean() > 1e-3


def test_own_context_passes_reach_the_chunk_by_chunk_rollout():
    """--self-context-passes: pass k sees pass k-1's pictures, so chunk c's picture carries c chunks
    made one on another. After as many passes as chunks nothing changes any more, and that fixed
    point is the rollout made one chunk at a time, each from the pictures before it."""
    from gf_core.sampler import Schedule

    train, model, _, x0, prompts, eps, rope = _shipped_window("a big red circle bounces on the grass", 1)
    schedule = Schedule.few_step()
    sigma, timestep = float(schedule.sigmas[-1]), schedule.timesteps[-1]
    context = [[], [0, 1, 2], [0, 4, 5]]
    made = {n: train.own_context(model, x0, eps, sigma, timestep, prompts, context, rope, passes=n) for n in (1, 2, 3, 4)}
    assert (made[1][:, :, :3] - made[2][:, :, :3]).abs().max() < 1e-6  # the first chunk sees nothing
    assert (made[1][:, :, 3:] - made[2][:, :, 3:]).abs().mean() > 1e-4
    assert (made[3] - made[4]).abs().max() < 1e-5
    rollout = x0.clone()
    for c in range(3):
        end = 3 * (c + 1)
        rough = (1 - sigma) * x0[:, :, :end] + sigma * eps[:, :, :end]
        v = train.train_forward(model, rollout[:, :, :end], rough, timestep.view(1, 1).expand(1, c + 1),
                                prompts[:, : c + 1], context[: c + 1], rope)
        rollout[:, :, end - 3:end] = (rough - sigma * v.float())[:, :, end - 3:end]
    assert (made[3] - rollout).abs().max() < 1e-4


def test_training_with_its_own_context_runs(tmp_path):
    train = _train_module()
    train.main(["--device", "cpu", "--steps", "3", "--batch", "2", "--size", "8", "--frames", "6", "--layers", "1",
                "--ffn", "256", "--stories", "4", "--self-context", "1", "--self-context-passes", "2",
                "--out", str(tmp_path), "--no-eval"])
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["settings"]["self_context"] == 1.0 and saved["settings"]["self_context_passes"] == 2
    assert saved["steps"] == 3


def test_block_relative_steps_take_windows_of_their_own_length(tmp_path, capsys):
    """--relative-frames: the block-relative steps train on windows of that length and batch, beside
    the full-length windows of the other steps; a window too short for the layout is refused."""
    train = _train_module()
    base = ["--device", "cpu", "--size", "8", "--layers", "1", "--ffn", "256", "--stories", "4", "--no-eval",
            "--log-every", "1", "--out", str(tmp_path)]
    train.main(base + ["--steps", "2", "--frames", "6", "--relative", "1", "--relative-frames", "9",
                       "--relative-batch", "3"])
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["steps"] == 2 and all(p["context"] == "relative2" for p in saved["loss_curve"] if "context" in p)
    assert saved["clips_seen"] == 6  # two steps of the block-relative batch
    for bad, needs in ((["--relative", "0.5", "--relative-frames", "6"], "at least 9"),
                       (["--relative-frames", "9"], "--relative P")):
        with pytest.raises(SystemExit):
            train.main(base + ["--steps", "1"] + bad)
        assert needs in capsys.readouterr().err


def test_training_script_runs_and_its_weights_load(tmp_path):
    train = _train_module()
    train.main(["--device", "cpu", "--steps", "2", "--batch", "2", "--size", "8", "--frames", "6", "--layers", "1",
                "--ffn", "256", "--stories", "4", "--prompt-weight", "4", "--out", str(tmp_path), "--no-eval"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["toyworld.safetensors", "toyworld_words.safetensors", "train.json"]
    model = tw.load_model(tmp_path)
    assert gf.WanConfig.from_module(model).num_layers == 1
    words = tw.load_words(tmp_path)
    assert torch.equal(words.table, tw.word_table())
    story = tw.play([("a big red circle bounces on the grass", 6)])
    out = gf.generate(model, story.segments(words), "grounded", height=64, width=64)
    assert out.latents.shape == (1, 16, 6, 8, 8)


def test_random_scripts_play():
    rng = random.Random(0)
    kinds = set()
    for _ in range(50):
        story = tw.play(tw.random_script(rng, 60))
        kinds |= {s.kind for s in story.sentences}
        assert len(story) >= 60
    assert kinds == {"opening", "switch", "cut", "enter"}


# -- the shipped model ---------------------------------------------------------------------------


def test_shipped_model_keeps_its_subject_through_a_cut():
    """The shipped toy model through the public API under the default memory: the subject the prompt
    names, the scene of each shot, and the subject still there after the cut (the GCM keeps it).
    The thresholds sit below what this run measures."""
    story = tw.play([("a big red circle bounces on the grass", 6), ("cut to the snow where it bounces", 6)])
    out = gf.generate(tw.load_model(), story.segments(), "grounded", height=256, width=256, seed=0)
    assert [e["switch"]["kind"] for e in out.events if e["switch"]] == ["cut"]
    m = tw.measure(story, out.latents)
    assert m["identity_first"] >= 0.9 and m["scene"] >= 0.9
    assert m["cut_identity"] >= 0.9 and m["collapse"][0] <= 0.1


def test_shipped_model_draws_the_subject_each_prompt_names():
    """Every shape at both sizes, two openings each (colour, action and scene drawn at random): the
    shipped model under the default memory shows the named subject in most of the first 9 frames.
    The threshold sits below what this run measures."""
    rng = random.Random(0)
    model = tw.load_model()
    hits = []
    for shape in tw.SHAPES:
        for size in tw.SIZES:
            for _ in range(2):
                subject = tw.Subject(size, rng.choice(list(tw.COLOURS)), shape)
                story = tw.play([(f"a {subject} {rng.choice(tw.ACTIONS)} on the {rng.choice(list(tw.SCENES))}", 9)])
                out = gf.generate(model, story.segments(), "grounded", height=256, width=256, seed=len(hits))
                hits.append(tw.identity_accuracy(story, out.latents, 9))
    assert sum(hits) / len(hits) >= 0.9


def test_demo_plays_the_script(tmp_path, capsys):
    from gf_core import demo

    demo.main(["--out", str(tmp_path), "--seconds", "0.75", "--memory", "longlive"])
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "preview.gif").stat().st_size > 0
    assert "scene right 100%" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # refused in one line, before any work
        demo.main(["--out", str(tmp_path), "--size", "512"])
    assert "use width 256 and height 256" in capsys.readouterr().err


def test_frames_tool_marks_each_frame_and_writes_its_strip(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("toy_frames", ROOT / "bench" / "toy_frames.py")
    frames = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frames)
    out = tmp_path / "frames.json"
    result = frames.main(["--frames", "6", "--seeds", "1", "--png", str(tmp_path), "--out", str(out)])
    (seed,) = result["models"]["shipped"]
    assert len(seed["hits"]) == 6 and seed["hits"][:3] == "###"  # one mark per frame; the shipped first chunk is right
    assert seed["first_wrong_frame"] == (seed["hits"].index(".") if "." in seed["hits"] else None)
    assert json.loads(out.read_text()) == result
    png = (tmp_path / "shipped_cuts_and_return_self_forcing_seed0.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 6 * 32 * 4  # six frames across
    with pytest.raises(SystemExit):
        frames.main(["--frames", "8"])
    assert "--frames 8 is not a positive multiple of 3" in capsys.readouterr().err


def test_openings_bench_covers_every_subject(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("toy_openings", ROOT / "bench" / "toy_openings.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    texts = bench.openings()
    subjects = {tw.parse(t).subject for t in texts}
    assert len(texts) == len(subjects) == len(tw.SHAPES) * len(tw.COLOURS) * len(tw.SIZES)
    out = tmp_path / "openings.json"
    result = bench.main(["--rows", "self_forcing", "--seeds", "1", "--frames", "3", "--jobs", "1", "--out", str(out)])
    row = result["rows"]["self_forcing"]
    assert set(row["per_opening"]) == set(texts) and row["seeds"] == 1
    assert row["mean"] >= 0.8  # the shipped model draws most subjects from their prompt in the first chunk
    assert json.loads(out.read_text()) == result
    with pytest.raises(SystemExit):
        bench.main(["--rows", "sink_only"])
    assert "--rows names sink_only, which the quality bench does not have" in capsys.readouterr().err


# -- in ComfyUI (skipped without GF_COMFYUI_PATH) -------------------------------------------------

TOY_NODES = ("GFToyWorldModel", "GFToyWorldPrompt", "GFToyWorldTimeline", "GFToyWorldDecode", "GFToyWorldTextEncoder")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI imported on CPU with temporary folders, core's extra nodes and this pack."""
    import asyncio
    import os
    import sys

    path = os.environ.get("GF_COMFYUI_PATH")
    if not path:
        pytest.skip("set GF_COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI part")
    root = tmp_path_factory.mktemp("comfy")
    sys.path.insert(0, path)
    import comfy.cli_args as cli
    import utils.extra_config
    import utils.install_util  # noqa: F401

    cli.args.cpu = True
    import folder_paths

    for name in ("output", "temp", "input"):
        (root / name).mkdir()
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_temp_directory(str(root / "temp"))
    folder_paths.set_input_directory(str(root / "input"))
    import execution

    import nodes

    asyncio.run(nodes.init_builtin_extra_nodes())
    assert asyncio.run(nodes.load_custom_node(str(ROOT)))
    return nodes.NODE_CLASS_MAPPINGS, execution


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _api_prompt(workflow: dict, mappings: dict) -> dict:
    """A UI-format workflow as the API prompt the frontend would send (widgets in input order)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] == "Note":
            continue
        values = list(node["widgets_values"])
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        inputs = {}
        spec = mappings[node["type"]].INPUT_TYPES()
        for section in ("required", "optional"):
            for name, definition in spec.get(section, {}).items():
                options = definition[1] if len(definition) > 1 else {}
                socket = isinstance(definition[0], str) and definition[0] not in WIDGET_TYPES
                if socket and name not in linked:
                    continue  # an optional socket left empty has no widget value
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                elif values:
                    inputs[name] = values.pop(0)
                    if options.get("control_after_generate"):
                        values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_toy_nodes_register_and_the_workflow_validates(comfy):
    import asyncio
    import json

    mappings, execution = comfy
    for node_id in TOY_NODES:
        schema = mappings[node_id].GET_SCHEMA()
        assert schema.category.startswith("Grounded Forcing") and all(i.tooltip for i in schema.inputs)
    for name, nodes in (("gf_toy_world", {"GFToyWorldModel", "GFToyWorldTimeline", "GFSampler", "GFToyWorldDecode"}),
                        ("gf_toy_world_live", {"GFToyWorldModel", "GFToyWorldTextEncoder", "GFLiveSampler"})):
        workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        prompt = _api_prompt(workflow, mappings)
        assert {n["class_type"] for n in prompt.values()} >= nodes
        assert "vae" not in next(n for n in prompt.values() if n["class_type"] in ("GFSampler", "GFLiveSampler"))["inputs"]
        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(name, prompt, None))
        assert ok and not node_errors and outputs, (name, error, node_errors)


def test_toy_text_encoder_works_as_a_clip_in_core_nodes(comfy):
    """GF Toy World Text Encoder behind core's CLIP Text Encode gives the toy world's embedding, and a
    word outside the vocabulary is refused in one sentence naming it."""
    mappings, _ = comfy
    clip = mappings["GFToyWorldTextEncoder"].execute()[0]
    cond = mappings["CLIPTextEncode"]().encode(clip, "then it bounces")[0]
    assert torch.equal(cond[0][0], tw.embed("then it bounces"))
    with pytest.raises(ValueError, match="does not know the word 'flies'"):
        clip.tokenize("then it flies")


def test_toy_model_samples_in_comfyui_as_in_the_engine(comfy):
    from grounded_forcing.gf_core.latents import to_normalised

    mappings, _ = comfy
    model = mappings["GFToyWorldModel"].execute()[0]
    script = "3f | a big red circle moves right on the grass\n3f | cut to the snow where it bounces"
    segments = mappings["GFToyWorldTimeline"].execute(script)[0]
    assert [s.transition.kind for s in segments] == ["default", "cut"]
    memory_node = mappings["GFDualMemory"]
    defaults = {i.id: i.default for i in memory_node.GET_SCHEMA().inputs if getattr(i, "default", None) is not None}
    memory = memory_node.execute(**defaults)[0]  # the grounded preset, as the pack ComfyUI loaded builds it
    latent = mappings["GFSampler"].execute(model, memory, segments, 256, 256, 3, 1, "reference", "off")[0]
    reference = gf.generate(tw.load_model(), list(segments), "grounded", width=256, height=256, seed=3).latents
    assert torch.allclose(to_normalised(latent["samples"]), reference, atol=2e-2)
    images = mappings["GFToyWorldDecode"].execute(latent, "16 fps")[0]
    assert images.shape == (1 + 4 * 5, 256, 256, 3)
    cond = mappings["GFToyWorldPrompt"].execute("a big red circle bounces on the grass")[0]
    assert cond[0][0].shape == (1, 8, tw.SHIPPED_TEXT_DIM)
    with pytest.raises(ValueError, match="does not know the word 'dog'") as info:  # the pack's BadInput
        mappings["GFToyWorldTimeline"].execute("3s | a big red dog bounces on the grass")
    assert type(info.value).__name__ == "BadInput"
