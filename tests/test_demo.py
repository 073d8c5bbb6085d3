"""The README's first command, `seal-diffusion demo`, end to end (fewer steps)."""

import hashlib

from seal_diffusion.cli import main as cli_main
from seal_diffusion.core import passport


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    # the demo draws a fresh key from the OS each run, and some keys' distilled copies are weak (the demo's
    # DISTILL_STEPS quotes the spread): a fixed secret makes this run the same every time
    monkeypatch.setattr(passport, "new_secret", lambda: hashlib.sha256(b"tests/test_demo.py").digest())
    out = tmp_path / "demo"
    (out / "seal").mkdir(parents=True)
    (out / "seal" / "cat.sealkey").write_bytes(b"an earlier demo's key")  # re-running the demo says so
    assert cli_main(["demo", "--out", str(out), "--steps", "40"]) == 2  # an earlier run's folder: refused at once
    assert (out / "seal" / "cat.sealkey").read_bytes() == b"an earlier demo's key"
    assert cli_main(["demo", "--out", str(out), "--steps", "40", "--force"]) == 0
    summary = (out / "summary.md").read_text()
    assert "**NO**" not in summary, summary
    assert summary.splitlines()[2].startswith("**All ") and "as expected" in summary.splitlines()[2]
    for needle in ("innocent plain LoRA, same subject | not detected", "pruned 90%", "| DETECTED |",
                   "Entanglement", "grid.png", "spectra.png", "**Verdict: ", "2^−48", "random weights",
                   "distilled copy (re-trained on the release's outputs): both tests (`verify --functional`) | DETECTED",
                   "innocent plain LoRA, same subject: both tests (`verify --functional`) | not detected",
                   "| forger.sealkey | no |", "| cat.sealkey | yes |", "**The owner wins** (cat.sealkey)"):
        assert needle in summary, needle
    # the owner's timestamp is a real RFC 3161 reply of the local TSA, checked with its CA; the forger's is later
    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.ownership.timestamp import check_reply

    owner = check_reply(out / "seal" / "cat.tsr", SealKey.load(out / "seal" / "cat.sealkey").commitment(),
                        out / "local-tsa" / "ca.pem")
    forger = check_reply(out / "forger" / "forger.tsr", SealKey.load(out / "forger" / "forger.sealkey").commitment(),
                         out / "local-tsa" / "ca.pem")
    assert owner.gen_time < forger.gen_time
    report = (out / "dispute" / "dispute.md").read_text()
    assert "Ownership dispute report" in report and "R2 genuine pair" in report
    assert "B'M" not in summary and "N(B,A,∅)" not in summary and "Base model `tiny`" in (out / "compare" / "compare.md").read_text()
    for f in ("seal/cat.sealkey", "seal/cat.safetensors", "seal/pytorch_lora_weights.safetensors",
              "compare/grid.png", "spectra.png", "innocent/cat.safetensors", "seal/cat.tsq",
              "distilled/cat_distilled.safetensors"):
        assert (out / f).is_file(), f
    printed = capsys.readouterr().out
    assert "summary.md" in printed and "from an earlier demo run is replaced" in printed
