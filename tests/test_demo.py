"""The README's first command, `seal-diffusion demo`, end to end (fewer steps)."""

from seal_diffusion.cli import main as cli_main


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--steps", "40"]) == 0
    summary = (out / "summary.md").read_text()
    assert "**NO**" not in summary, summary
    for needle in ("innocent plain LoRA, same subject | not detected", "pruned 90%", "| DETECTED |",
                   "Entanglement", "grid.png", "spectra.png"):
        assert needle in summary
    for f in ("seal/cat.sealkey", "seal/cat.safetensors", "seal/pytorch_lora_weights.safetensors",
              "compare/grid.png", "spectra.png", "innocent/cat.safetensors"):
        assert (out / f).is_file(), f
    assert "summary.md" in capsys.readouterr().out
