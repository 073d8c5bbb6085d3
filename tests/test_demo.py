"""The README's first command, `seal-diffusion demo`, end to end (fewer steps)."""

from seal_diffusion.cli import main as cli_main


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "seal").mkdir(parents=True)
    (out / "seal" / "cat.sealkey").write_bytes(b"an earlier demo's key")  # re-running the demo says so
    assert cli_main(["demo", "--out", str(out), "--steps", "40"]) == 0
    summary = (out / "summary.md").read_text()
    assert "**NO**" not in summary, summary
    assert summary.splitlines()[2].startswith("**All ") and "as expected" in summary.splitlines()[2]
    for needle in ("innocent plain LoRA, same subject | not detected", "pruned 90%", "| DETECTED |",
                   "Entanglement", "grid.png", "spectra.png", "**Verdict: ", "2^−48", "random weights"):
        assert needle in summary
    assert "B'M" not in summary and "N(B,A,∅)" not in summary and "Base model `tiny`" in (out / "compare" / "compare.md").read_text()
    for f in ("seal/cat.sealkey", "seal/cat.safetensors", "seal/pytorch_lora_weights.safetensors",
              "compare/grid.png", "spectra.png", "innocent/cat.safetensors"):
        assert (out / f).is_file(), f
    printed = capsys.readouterr().out
    assert "summary.md" in printed and "from an earlier demo run is replaced" in printed
