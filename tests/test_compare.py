"""compare (base / C / C_p / ∅ / exported images, SSIM/PSNR table, grid), the σ sweep, and the plots."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from seal_diffusion.cli import commands_compare as cli
from seal_diffusion.reports import compare as cmp
from seal_diffusion.reports import sigma_sweep as sweep
from seal_diffusion.evaluation import metrics
from seal_diffusion.reports import plots
from seal_diffusion.errors import UserError
from seal_diffusion.core.export import export_lora, public_factors
from seal_diffusion.core.keyfile import SealKey
from seal_diffusion.core.network import SealNetwork, find_target_modules
from seal_diffusion.core.passport import correlation, make_passports
from seal_diffusion.detection.verify import Suspect, load_suspect, recover_passports

RANK = 4
PROMPT = "a photo of sks cat"
FAST = dict(steps=4, guidance_scale=1.0)  # 4 denoising steps, no CFG: each row is one batch of 5 UNet calls


def _short_run(unet, passports, steps=6, lr=1e-2):
    """A short alternating C/C_p run on a fixed denoising batch (as tests/test_seal_core.py): B becomes non-zero."""
    net = SealNetwork(unet, RANK, passports=passports)
    opt = torch.optim.Adam(net.trainable_parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    x, t, e = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    for step in range(steps):
        if passports is not None:
            net.set_passport("C" if step % 2 == 0 else "C_p")
        loss = torch.nn.functional.mse_loss(unet(x, t, e).sample, torch.zeros_like(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.fixture(scope="module")
def key_and_pipe(tiny_dir):
    """A key from a short SEAL run on the tiny default, and the base pipeline (unpatched again)."""
    from seal_diffusion.models.base_model import load_pipeline

    pipe = load_pipeline("tiny")
    names = list(find_target_modules(pipe.unet))
    net = _short_run(pipe.unet, make_passports(names, RANK, "compare test"))
    key = SealKey.from_network(net, "tiny", "random")
    net.remove()
    return key, pipe


@pytest.fixture(scope="module")
def compared(key_and_pipe, tmp_path_factory):
    key, pipe = key_and_pipe
    out = tmp_path_factory.mktemp("compare")
    calls = []
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = cmp.compare(key, pipe, [PROMPT], [0, 1], out, progress=lambda *a: calls.append(a), show_progress=False,
                         **FAST)
    return result, out, calls, before


def test_compare_rows_and_table(compared):
    result, out, calls, _ = compared
    assert result["variants"] == ["base", "C", "C_p", "identity", "exported"]
    arrays = result["arrays"]
    assert all(a.shape == (2, 64, 64, 3) for a in arrays.values())  # height/width default from the model
    exported = cmp.pair(result, "exported", "C")
    assert exported["ssim_mean"] >= 0.999 and exported["psnr_mean"] >= 40.0, exported
    for a, b in (("identity", "base"), ("C", "C_p"), ("C", "base"), ("C_p", "base")):
        p = cmp.pair(result, a, b)
        assert len(p["ssim"]) == 2 and 0.0 < p["ssim_mean"] < 1.0 and np.isfinite(p["psnr_mean"]), (a, b, p)
    # the SEAL rows really differ from the base, and C_p from C
    assert cmp.pair(result, "C", "base")["psnr_mean"] < exported["psnr_mean"] - 10
    assert not np.allclose(arrays["C_p"], arrays["C"])
    assert calls[-1][:2] == (10, 10) and "exported" in calls[-1][2].lower()


def test_compare_files(compared):
    result, out, _, _ = compared
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(f"{v}_{i}.png" for v in result["variants"] for i in range(2))
    assert Image.open(out / "images" / "C_p_1.png").size == (64, 64)
    grid = Image.open(out / "grid.png")
    assert grid.width >= 150 + 2 * 128 and grid.height >= 5 * 128  # 5 rows × 2 columns, tiles scaled to 128 px
    md = (out / "compare.md").read_text()
    for row in ("| exported vs C |", "| identity vs base |", "| C vs C_p |", "| C vs base |"):
        assert row in md
    assert "Gaussian window 11×11" in md and "grid.png" in md
    data = json.loads((out / "compare.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["settings"]["height"] == 64 and data["seeds"] == [0, 1] and data["prompts"] == [PROMPT]
    assert {(p["a"], p["b"]) for p in data["pairs"]} >= {("exported", "C"), ("identity", "base"), ("C", "C_p")}
    assert "arrays" not in data


def test_compare_leaves_the_pipeline_as_it_was(compared, key_and_pipe):
    _, _, _, before = compared
    _, pipe = key_and_pipe
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules()), "SEAL patch removed"
    assert not getattr(pipe.unet, "peft_config", None), "exported LoRA unloaded"


def test_torchmetrics_and_skimage_agree_on_generated_images(compared):
    arrays = compared[0]["arrays"]
    for a, b in (("C", "base"), ("C", "C_p"), ("identity", "base")):
        assert np.abs(metrics.ssim(arrays[a], arrays[b]) - metrics.ssim_skimage(arrays[a], arrays[b])).max() < 1e-6
        assert np.abs(metrics.psnr(arrays[a], arrays[b]) - metrics.psnr_skimage(arrays[a], arrays[b])).max() < 1e-4


def _cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.add_compare_command(sub)
    cli.add_sigma_sweep_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_compare_cli_with_prompt_file(key_and_pipe, tmp_path, capsys):
    key, _ = key_and_pipe
    kpath = key.save(tmp_path / "cat.sealkey")
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("# comment\n\na {} on the beach\n")
    out = tmp_path / "out"
    assert _cli(["compare", "--key", str(kpath), "--base", "tiny", "--prompts", str(pfile), "--subject", "zwx dog",
                 "--seeds", "3", "--steps", "2", "--guidance_scale", "1", "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["prompts"] == ["a zwx dog on the beach"] and data["seeds"] == [3]
    assert "| exported vs C |" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.png"))) == 5


def test_prompt_files_and_bad_input(tmp_path, key_and_pipe):
    key, pipe = key_and_pipe
    f = tmp_path / "p.txt"
    f.write_text("# DreamBooth\na {} in the snow\n\n  a red {}  \n")
    assert cmp.read_prompts(f) == ["a sks cat in the snow", "a red sks cat"]
    assert cmp.read_prompts("objects", "sks teapot")[0] == "a sks teapot in the jungle"
    assert len(cmp.read_prompts("live_subjects")) == 25
    with pytest.raises(UserError, match="no such file"):
        cmp.read_prompts(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no prompts"):
        cmp.read_prompts(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="no prompt"):
        cmp.compare(key, pipe, ["  "], [0], tmp_path / "o")
    with pytest.raises(UserError, match="unknown variant"):
        cmp.compare(key, pipe, [PROMPT], [0], tmp_path / "o", variants=["C", "D"])
    with pytest.raises(UserError, match="give --prompt"):
        _cli(["compare", "--key", "k.sealkey", "--out", str(tmp_path / "o")])
    # a key for another architecture: one clear error, pipeline untouched
    from seal_diffusion.models import tiny

    other = tiny.build_added_kv_unet()
    net = SealNetwork(other, RANK, passports=make_passports(list(find_target_modules(other)), RANK, "x"))
    wrong = SealKey.from_network(net, "other", "random")
    with pytest.raises(UserError, match="does not fit this base model"):
        cmp.compare(wrong, pipe, [PROMPT], [0], tmp_path / "o2", **FAST)
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())


# -- plots ---------------------------------------------------------------------------------------------------------------
def test_spectrum_from_factors_equals_svd_of_delta_w():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(6, 50, generator=g), torch.randn(40, 6, generator=g)
    ref = torch.linalg.svdvals(up.double() @ down.double())[:6]
    assert torch.allclose(plots.delta_singular_values(down, up), ref, rtol=1e-10)


def _prune(factors, fraction):
    """Zero the smallest |entries| of each factor (magnitude pruning of the suspect, not the attacks module)."""
    out = {}
    for name, (down, up) in factors.items():
        pruned = []
        for t in (down, up):
            k = int(fraction * t.numel())
            thr = t.abs().flatten().kthvalue(k).values if k > 0 else -1.0
            pruned.append(torch.where(t.abs() <= thr, torch.zeros_like(t), t))
        out[name] = tuple(pruned)
    return out


def test_spectra_and_passport_figures(key_and_pipe, tmp_path):
    key, pipe = key_and_pipe
    lora_net = _short_run(pipe.unet, None, steps=2)  # a plain LoRA through the same code, for the spectrum comparison
    plain = {n: (a, b * lora_net.alpha / lora_net.rank) for n, (a, b) in lora_net.factors().items()}
    lora_net.remove()
    export_lora(key, tmp_path / "seal.safetensors", "kohya")
    suspect = load_suspect(tmp_path / "seal.safetensors", key)
    spec = plots.plot_spectra({"LoRA": plain, "SEAL (released)": suspect.factors}, tmp_path / "spectra.png")
    assert Image.open(spec).size[0] > 300

    pruned = Suspect(str(tmp_path / "pruned"), "kohya", factors=_prune(suspect.factors, 0.5))
    recovered = {"release": recover_passports(key, suspect), "pruned 50 %": recover_passports(key, pruned)}
    mods = list(key.modules)[:3]
    for m in mods:
        assert correlation(recovered["release"][m], key.modules[m].passport) > 0.999
    corr_pruned = np.mean([correlation(recovered["pruned 50 %"][m], key.modules[m].passport) for m in key.modules])
    assert 0.3 < corr_pruned < 0.999  # degraded, still clearly the passport
    fig = plots.plot_passports(key, recovered, tmp_path / "passports.png", modules=mods)
    assert Image.open(fig).size[1] > 200
    assert torch.allclose(public_factors(key)[mods[0]][0], suspect.factors[mods[0]][0], atol=1e-6)


def test_sigma_sweep_smoke(tmp_path, subject_dir):
    """Two σ, two training steps through the trainer's train(): files, rows, plot (the real sweep is in the docs)."""
    result = sweep.sigma_sweep(tmp_path, sigmas=[0.1, 10.0], instance_data_dir=subject_dir,
                             instance_prompt="a photo of sks cat", prompts=[PROMPT], seeds=[0], train_steps=2,
                             rank=RANK, steps=2, guidance_scale=1.0, show_progress=False)
    assert [r["sigma"] for r in result["rows"]] == [0.1, 10.0]
    for r in result["rows"]:
        assert 0.0 < r["ssim_identity_vs_base"] <= 1.0 and (tmp_path / f"sigma_{r['sigma']:g}" / "seal.sealkey").is_file()
    md = (tmp_path / "sigma_sweep.md").read_text()
    assert "| 0.1 |" in md and "| 10 |" in md and "0.65" in md  # paper value alongside
    assert Image.open(tmp_path / "sigma_sweep.png").size[0] > 300
    json.loads((tmp_path / "sigma_sweep.json").read_text())
