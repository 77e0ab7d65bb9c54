"""GF Live Sampler's logic without ComfyUI: messages, the session's states, the take's script,
pacing, the frame sink, and a live take on the tiny model replayed bit for bit through ``generate``."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from pathlib import Path

import pytest
import torch
from grounded_forcing import gf_core as gf
from grounded_forcing.gf_core.errors import BadInput
from grounded_forcing.nodes import live, prompts
from helpers import CFG, RUN
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SESSION = "abc123"


def msg(**fields) -> dict:
    return {"session": SESSION, **fields}


# ---------------------------------------------------------------------------------------------
# Messages from the page


@pytest.mark.parametrize("body, kind, text, transition", [
    (msg(type="prompt", text="a cat"), "prompt", "a cat", "apr"),
    (msg(type="prompt", text="  a\n cat\t runs ", transition="hard"), "prompt", "a cat runs", "hard"),
    (msg(type="prompt", text="a cat", transition="none"), "prompt", "a cat", "none"),
    (msg(type="cut"), "cut", None, "apr"),
    (msg(type="cut", text="a new shot"), "cut", "a new shot", "apr"),
    (msg(type="pause"), "pause", None, "apr"),
    (msg(type="resume"), "resume", None, "apr"),
    (msg(type="stop"), "stop", None, "apr"),
])
def test_messages_the_page_may_send(body, kind, text, transition):
    session, command = live.parse_command(body)
    assert session == SESSION
    assert (command.kind, command.text, command.transition) == (kind, text, transition)


@pytest.mark.parametrize("body, sentence", [
    (["prompt"], "not a JSON object"),
    (msg(type="prompt", text="x", path="/etc/passwd"), "unknown field 'path'"),
    ({"type": "stop"}, "names no session"),
    (msg(type="render"), "unknown message type 'render'"),
    (msg(type="stop", text="x"), "has no text or transition"),
    (msg(type="pause", transition="apr"), "has no text or transition"),
    (msg(type="cut", transition="hard"), "a cut has no transition"),
    (msg(type="prompt"), "has no text"),
    (msg(type="prompt", text=" \n "), "the prompt is empty"),
    (msg(type="prompt", text=7), "is not text but int"),
    (msg(type="prompt", text="x" * (live.MAX_TEXT_CHARS + 1)), "more than the 2000 allowed"),
    (msg(type="prompt", text="a\x00b"), "control characters"),
    (msg(type="prompt", text="a cat", transition="fade"), "unknown transition 'fade'"),
])
def test_bad_messages_get_one_sentence(body, sentence):
    with pytest.raises(live.Refused, match=sentence) as e:
        live.parse_command(body)
    assert e.value.status == 400
    assert e.value.message.count(". ") == 0 and ";" in e.value.message  # one sentence: the problem; the fix


def test_routes_accept_only_the_running_session():
    sessions = live.Sessions()
    with pytest.raises(live.Refused, match="no live take is running") as e:
        sessions.submit(msg(type="stop"))
    assert e.value.status == 409
    running = live.LiveSession(node="7")
    sessions.start(running)
    with pytest.raises(live.Refused, match="not the one running"):
        sessions.submit(msg(type="stop"))
    reply = sessions.submit({"session": running.id, "type": "prompt", "text": "a dog"})
    assert reply == {"seq": 1, "state": "running", "waiting": 1}
    sessions.finish(live.LiveSession())  # another session ending leaves the running one in place
    assert sessions.current() is running
    sessions.finish(running)
    with pytest.raises(live.Refused, match="no live take is running"):
        sessions.submit({"session": running.id, "type": "stop"})


# ---------------------------------------------------------------------------------------------
# The session's states


def command(kind: str, text: str | None = None, transition: str = "apr") -> live.Command:
    return live.Command(kind, text, transition)


def test_prompts_take_effect_one_per_chunk_boundary_in_order():
    s = live.LiveSession(info={"prompt": "one", "fps": 16})
    s.submit(command("prompt", "one"))
    s.submit(command("cut", "two"))
    first = s.between_chunks()
    assert (first.kind, first.text, first.seq) == ("prompt", "one", 1)
    second = s.between_chunks()
    assert (second.kind, second.text, second.seq) == ("cut", "two", 2)
    assert s.between_chunks() is None
    assert s.snapshot()["waiting"] == 0
    s.applied("two", 6)  # what a page attaching now is told
    assert (s.snapshot()["prompt"], s.snapshot()["latent_frames"]) == ("two", 6)


def test_pause_holds_the_next_chunk_until_resume():
    clock = [0.0]
    s = live.LiveSession(clock=lambda: clock[0])
    s.submit(command("pause"))
    s.submit(command("prompt", "after the pause"))
    waits = []

    def interrupted():  # called while waiting: the page resumes after three waits of 2 s
        clock[0] += 2.0
        waits.append(s.state)
        if len(waits) == 3:
            s.submit(command("resume"))

    change = s.between_chunks(interrupted, poll=0.001)
    assert waits == ["paused"] * 3 and s.state == "running"
    assert change.text == "after the pause"
    assert s.paused_seconds == pytest.approx(6.0)


def test_cancel_while_paused_raises_out_of_the_wait():
    s = live.LiveSession()
    s.submit(command("pause"))

    def interrupted():
        raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        s.between_chunks(interrupted, poll=0.001)


def test_stop_ends_the_wait_and_refuses_later_messages():
    s = live.LiveSession()
    s.submit(command("pause"))
    s.submit(command("prompt", "never shown"))
    s.submit(command("stop"))
    assert s.between_chunks(poll=0.001) is None and s.stopping
    with pytest.raises(live.Refused, match="stopping after the current chunk") as e:
        s.submit(command("prompt", "too late"))
    assert e.value.status == 409
    dropped = s.end()
    assert [c.text for c in dropped] == ["never shown"] and s.state == "ended"
    with pytest.raises(live.Refused, match="has ended"):
        s.submit(command("resume"))


def test_too_many_waiting_prompts_are_refused():
    s = live.LiveSession()
    for k in range(live.MAX_WAITING):
        s.submit(command("prompt", f"p{k}"))
    with pytest.raises(live.Refused, match="already waiting") as e:
        s.submit(command("cut"))
    assert e.value.status == 429
    s.submit(command("pause"))  # controls are not prompts: still accepted
    s.submit(command("resume"))
    s.between_chunks()
    s.submit(command("prompt", "room again"))


def test_messages_cross_threads():
    s = live.LiveSession()
    sender = threading.Thread(target=lambda: [s.submit(command("prompt", f"p{k}")) for k in range(5)])
    sender.start()
    sender.join()
    assert [s.between_chunks().text for _ in range(5)] == [f"p{k}" for k in range(5)]


def test_pacer_keeps_generation_a_lead_ahead_of_playback():
    clock = [0.0]
    pacer = live.Pacer(fps=16, lead=1.0, clock=lambda: clock[0])
    assert pacer.ready(16, 0.0)  # 1 s made, playback starts now: exactly the lead
    assert not pacer.ready(17, 0.0)
    clock[0] = 0.5
    assert pacer.ready(24, 0.0) and not pacer.ready(25, 0.0)
    assert not pacer.ready(24, 0.25)  # while paused, playback did not move


def test_max_duration_in_whole_chunks():
    assert live.max_latent_frames(60, 3) == 240
    assert live.max_latent_frames(1, 3) == 6  # 4 latent frames -> 2 chunks
    assert live.max_latent_frames(0.1, 3) == 3
    with pytest.raises(live.BadInput, match="not positive"):
        live.max_latent_frames(0, 3)


# ---------------------------------------------------------------------------------------------
# The take as a script


def embedding(text: str) -> torch.Tensor:
    """A deterministic fake umT5 embedding [1, 8, text_dim] of a text (what a CLIP would give)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return torch.randn(1, 8, CFG.text_dim, generator=torch.Generator().manual_seed(seed))


def test_take_script_parses_back_to_the_same_segments():
    take = live.Take()
    take.add(0, "a fox | in snow", None, embedding("a"))
    take.add(9, "the fox runs", "apr", embedding("b"))
    take.add(12, "a lake", "cut", embedding("c"))
    take.add(21, "the lake freezes", "hard", embedding("d"))
    take.latent_frames = 30
    script = take.script(["seed 3"])
    assert script == ("# seed 3\n9f | a fox | in snow\napr 3f | the fox runs\ncut 9f | a lake\n"
                      "hard 9f | the lake freezes\n")
    lines = prompts.parse_script(script)
    assert [(x.frames, x.text) for x in lines] == [(9, "a fox | in snow"), (3, "the fox runs"), (9, "a lake"),
                                                   (9, "the lake freezes")]
    assert [x.transition for x in lines] == [None, gf.Transition("apr"), gf.Transition("cut"), gf.Transition("hard")]
    replay = take.replay_segments()
    assert [s.frames for s in replay] == [9, 3, 9, 9]
    assert [s.transition for s in replay] == [gf.Transition(), gf.Transition("apr"), gf.Transition("cut"),
                                              gf.Transition("hard")]
    with pytest.raises(ValueError, match="does not come after"):
        take.add(21, "again", "none", embedding("e"))


# ---------------------------------------------------------------------------------------------
# Frames to the page


def test_frame_sink_sends_in_order_and_writes_every_frame():
    sent, written = [], []
    sink = live.FrameSink(lambda event, data: sent.append((event, data)), write=written.append)
    frames = torch.zeros(2, 16, 24, 3, dtype=torch.uint8)
    frames[1, :, :, 0] = 255
    sink.message("gf_live.start", {"n": 0})
    sink.message("gf_live.frames", {"n": 1}, frames)
    sink.message("gf_live.end", {"n": 2})
    assert sink.close() is None
    assert [(e, d["n"]) for e, d in sent] == [("gf_live.start", 0), ("gf_live.frames", 1), ("gf_live.end", 2)]
    assert len(written) == 1 and torch.equal(written[0], frames)
    pictures = [Image.open(io.BytesIO(base64.b64decode(b))) for b in sent[1][1]["frames"]]
    assert [p.size for p in pictures] == [(24, 16)] * 2
    assert pictures[1].getpixel((5, 5))[0] > 200 and pictures[0].getpixel((5, 5))[0] < 50


def test_frame_sink_keeps_going_for_the_video_when_the_page_fails():
    written = []

    def send(event, data):
        raise ConnectionError("page gone")

    sink = live.FrameSink(send, write=written.append)
    sink.message("gf_live.frames", {}, torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    sink.message("gf_live.frames", {}, torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    assert isinstance(sink.close(), ConnectionError)
    assert len(written) == 1  # after the first error the sink stops; the error says why


# ---------------------------------------------------------------------------------------------
# A live take on the tiny model


def tiny_take(model, script: dict[int, list[dict]], memory: str = "grounded", max_frames: int = 30, seed: int = 5,
              sink: live.FrameSink | None = None):
    """Run a live take; after chunk i the page sends ``script[i]`` (messages without the session)."""
    session = live.LiveSession(node="1")
    engine = gf.Session(model, memory, gf.RunConfig(batch_size=1, seed=seed, chunk_frames=3, noise_order="chunk",
                                                    **RUN))
    encoded = []

    def encode(text):
        encoded.append(text)
        return embedding(text)

    def on_chunk(index):
        for m in script.get(index, []):
            session.submit(live.parse_command({"session": session.id, **m})[1])

    run = live.LiveRun(engine, session, encode, max_frames, 3, sink=sink, on_chunk=on_chunk)
    reason = run.run("a fox in the snow")
    engine.close()
    return run, reason, encoded


def test_a_take_freezes_the_garbage_collectors_old_objects_until_it_ends(model):
    """No full pass of the garbage collector walks the process's old objects during a take; after
    the take they are collectable again (a model unloaded later is freed)."""
    import gc

    frozen = []
    session = live.LiveSession(node="1")
    engine = gf.Session(model, "grounded", gf.RunConfig(batch_size=1, seed=0, chunk_frames=3, noise_order="chunk",
                                                        **RUN))
    run = live.LiveRun(engine, session, embedding, 9, 3, on_chunk=lambda i: frozen.append(gc.get_freeze_count()))
    assert gc.get_freeze_count() == 0
    assert run.run("a fox in the snow") == "max"
    engine.close()
    assert len(frozen) == 3 and min(frozen) > 0
    assert gc.get_freeze_count() == 0


PAGE = {
    1: [{"type": "prompt", "text": "the fox runs"}],
    2: [{"type": "pause"}, {"type": "resume"}],
    3: [{"type": "cut", "text": "a frozen lake"}, {"type": "prompt", "text": "ice cracks", "transition": "hard"}],
    6: [{"type": "cut"}],
    7: [{"type": "prompt", "text": "the lake at night", "transition": "none"}, {"type": "stop"}],
}


def test_live_take_replays_bit_for_bit_through_generate(model):
    sent = []
    sink = live.FrameSink(lambda event, data: sent.append((event, data)))
    run, reason, encoded = tiny_take(model, PAGE, sink=sink)
    run.finish(reason, run.take.script())
    assert sink.close() is None
    assert reason == "stopped" and run.take.latent_frames == 24  # the stop after chunk 7 beats its prompt
    assert encoded == ["a fox in the snow", "the fox runs", "a frozen lake", "ice cracks"]  # a cut keeps its text
    script = run.take.script()
    assert script == ("6f | a fox in the snow\napr 6f | the fox runs\ncut 3f | a frozen lake\n"
                      "hard 6f | ice cracks\ncut 3f | ice cracks\n")
    lines = prompts.parse_script(script)
    segments = [gf.Segment(embedding(x.text), x.frames, x.transition or gf.Transition()) for x in lines]
    replay = gf.generate(model, segments, "grounded", seed=5, noise_order="chunk", **RUN)
    assert torch.equal(replay.latents, run.latents)
    assert [e["segment"] for e in replay.events] == [e["segment"] for e in run.events]
    assert torch.equal(gf.generate(model, run.take.replay_segments(), "grounded", seed=5, noise_order="chunk",
                                   **RUN).latents, run.latents)
    events = [e for e, _ in sent]
    assert events[0] == "gf_live.start" and events[-1] == "gf_live.end" and events.count("gf_live.frames") == 8
    frames = [d for e, d in sent if e == "gf_live.frames"]
    assert [f["applied"] for f in frames] == [[], [], ["1"], [], ["4"], ["5"], [], ["6"]]
    end = sent[-1][1]
    assert end["reason"] == "stopped" and end["script"] == script and end["dropped"] == [7]
    assert {d["session"] for _, d in sent} == {run.live.id}


def test_a_prompt_the_encoder_refuses_is_answered_and_the_take_goes_on(model):
    """A typed prompt the text encoder cannot encode (the toy world's, for a word outside its
    vocabulary) gets its sentence back on the page; the take goes on under the prompt before it."""
    sent = []
    sink = live.FrameSink(lambda event, data: sent.append((event, data)))
    session = live.LiveSession(node="1")
    engine = gf.Session(model, "grounded", gf.RunConfig(batch_size=1, seed=5, chunk_frames=3, noise_order="chunk",
                                                        **RUN))

    def encode(text):
        if "zebra" in text:
            raise BadInput("the word 'zebra' is not in the toy world's vocabulary")
        return embedding(text)

    script = {1: [{"type": "prompt", "text": "a zebra"}], 2: [{"type": "prompt", "text": "the fox runs"}]}

    def on_chunk(index):
        for m in script.get(index, []):
            session.submit(live.parse_command({"session": session.id, **m})[1])

    run = live.LiveRun(engine, session, encode, 12, 3, sink=sink, on_chunk=on_chunk)
    assert run.run("a fox in the snow") == "max"
    engine.close()
    assert sink.close() is None
    refused = [d for e, d in sent if e == "gf_live.refused"]
    assert [(d["seq"], d["text"]) for d in refused] == [(1, "a zebra")] and "zebra" in refused[0]["error"]
    assert run.take.script() == "9f | a fox in the snow\napr 3f | the fox runs\n"


def test_preview_decoder_gives_the_frames_a_vae_would_in_number_and_size():
    """Without a VAE the panel shows the latent preview projection: 1 frame for the take's first
    latent frame and 4 for every later one, 8x8 pixels per latent pixel, the preview's colours."""
    from grounded_forcing.gf_core.latents import preview_rgb

    decoder = live.PreviewDecoder()
    a, b = torch.randn(1, 16, 3, 4, 6), torch.randn(1, 16, 3, 4, 6)
    first, second = decoder.push(a), decoder.push(b)
    assert first.shape == (9, 32, 48, 3) and second.shape == (12, 32, 48, 3) and first.dtype == torch.uint8
    assert decoder.flush().shape[0] == 0
    expected = preview_rgb(b)[0, 1]  # the second chunk's second latent frame, held for 4 frames
    for k in range(4, 8):
        assert torch.equal(second[k, ::8, ::8], expected)


def test_a_different_page_gives_a_different_take(model):
    """The replay check above would also pass if the page's messages were ignored; they are not."""
    steered, _, _ = tiny_take(model, PAGE)
    plain, _, _ = tiny_take(model, {7: [{"type": "stop"}]})
    assert plain.take.script() == "24f | a fox in the snow\n"
    assert torch.equal(steered.latents[:, :, :6], plain.latents[:, :, :6])
    assert not torch.equal(steered.latents[:, :, 6:], plain.latents[:, :, 6:])


def test_the_take_ends_at_the_maximum(model):
    run, reason, _ = tiny_take(model, {}, memory="longlive", max_frames=9)
    assert reason == "max" and run.latents.shape[2] == 9 and run.take.script() == "9f | a fox in the snow\n"


def test_a_cancelled_take_keeps_its_finished_chunks(model):
    session = live.LiveSession()
    engine = gf.Session(model, "grounded", gf.RunConfig(batch_size=1, seed=0, chunk_frames=3, noise_order="chunk",
                                                        **RUN))
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise InterruptedError("cancelled")

    run = live.LiveRun(engine, session, embedding, 30, 3, interrupted=interrupted)
    with pytest.raises(InterruptedError):
        run.run("a fox")
    assert run.latents.shape[2] == 9 and run.take.script() == "9f | a fox\n"


def test_live_speed_bench_runs_at_tiny_size(tmp_path):
    """bench/live_speed.py (run on a GPU at full size) keeps working: its logic on the tiny model."""
    import importlib.util

    path = REPO / "bench" / "live_speed.py"
    spec = importlib.util.spec_from_file_location("live_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--comfyui", "", "--frames", "30", "--prompts", "2", "--stacks", "--profile", "5:6",
                         "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "live_speed.json").read_text())
    assert saved["latent_frames"] == 30 and saved["chunks"] == 10 and saved["decode"] is False
    assert len(saved["prompt_latency_s"]) == 2 and all(s > 0 for s in saved["prompt_latency_s"])
    lines = prompts.parse_script(saved["script"])
    assert [x.text for x in lines] == ["prompt 0", "prompt 1", "prompt 2"]
    assert sum(x.frames for x in lines) == 30
    assert saved["switch_chunks"] == [lines[0].frames // 3, (lines[0].frames + lines[1].frames) // 3]
    assert saved["steady_fps"] > 0 and saved["latency_bound_s"] > 0 and result["fps"] == saved["fps"]
    assert set(saved["recached_frames_at_switch"]) == {str(c) for c in saved["switch_chunks"]}
    slowest = max(range(10), key=saved["chunk_diffusion_s"].__getitem__)
    assert str(slowest) in saved["stacks_at_chunk"]  # where the slowest chunk's time went
    assert sum(n for top in saved["stacks_at_chunk"].values() for _, n in top) >= 1
    assert saved["profile"]["chunks"] == [5, 6] and any("addmm" in r["name"] for r in saved["profile"]["by_host_ms"])
