"""Issue 23, silent long work: `attack distill` (minutes on a CPU at its default 400 steps) shows a progress bar with
the loss, like the trainer's."""

from __future__ import annotations

import re

from seal_diffusion.attacks import distill
from seal_diffusion.cli import main as cli_main
from small_owner import small_owner


def test_distill_draws_a_progress_bar_with_the_loss(tmp_path, capsys):
    owner = small_owner(tmp_path, "progress")
    capsys.readouterr()
    ticks = []
    res = distill.distill_lora(owner["kohya"], tmp_path / "d.safetensors", rank=2, steps=3, batch=1, latent_size=8,
                               fidelity_inputs=2, progress=lambda *a: ticks.append(a), show_progress=True)
    err = capsys.readouterr().err
    assert re.search(r"distill: 100%.*3/3.*loss=", err), err[-500:]  # the bar, on stderr
    assert ticks == [(1, 3), (2, 3), (3, 3)] and res.path.exists()
    distill.distill_lora(owner["kohya"], tmp_path / "quiet.safetensors", rank=2, steps=2, batch=1, latent_size=8,
                         fidelity_inputs=2)
    assert "distill:" not in capsys.readouterr().err  # library callers (robustness, the app) draw their own


def test_attack_distill_command_asks_for_the_bar(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(lora, out, **kw):
        seen.update(kw)
        return distill.DistillResult(out, 0.5, kw["steps"], kw["rank"], 0.1)

    monkeypatch.setattr("seal_diffusion.attacks.distill.distill_lora", fake)  # the handler imports it when it runs
    (tmp_path / "in.safetensors").write_bytes(b"x")
    assert cli_main(["attack", "distill", str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors")]) == 0
    assert seen["show_progress"] is True and seen["steps"] == 400
