import torch

import gf_core as gf


def test_demo_writes_preview_and_events(tmp_path):
    from gf_core import demo

    demo.main(["--out", str(tmp_path), "--seconds", "1", "--size", "32"])
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 4 + 4 + 4 frames end at chunk boundaries 6, 9, 12
    assert (tmp_path / "preview.gif").stat().st_size > 0


def test_generate_shapes_and_finite():
    cfg = gf.WanConfig.tiny()
    model = gf.WanModel.from_state_dict(gf.random_state_dict(cfg))
    seg = gf.Segment(torch.randn(1, 8, cfg.text_dim), 6)
    out = gf.generate(model, [seg], "longlive", height=32, width=48, batch_size=2)
    assert out.latents.shape == (2, 16, 6, 4, 6)
    assert torch.isfinite(out.latents).all()
