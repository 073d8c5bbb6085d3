"""Every LoRA layout frontends load is verified; split LoRAs combined; scan's multiple-testing correction and exit
codes; keys checked against a published commitment.

The renamed files are written here with the test's own code (names from the model's real module tree and from
``checkpoint.unet_to_ldm``, which test_checkpoint checks against diffusers' single-file conversion), and
``pipe.load_lora_weights`` confirms that diffusers loads each of them to the same UNet output as the original.
"""

import functools
import json
import math

import pytest
import torch
from small_owner import small_owner

from seal_diffusion.cli import main as cli_main
from seal_diffusion.core.export import export_lora, public_factors
from seal_diffusion.core.keyfile import SealKey, check_commitment
from seal_diffusion.formats.lora_file import read_lora
from seal_diffusion.core.network import SealNetwork, find_target_modules
from seal_diffusion.core.passport import make_passports
from seal_diffusion.detection.scan import holm, scan
from seal_diffusion.detection.verify import load_suspect, verify, verify_path

RANK = 4
FLOOR = 47 * math.log10(2)  # 14.15: every one of the tiny default's 48 modules on the right side, two-sided (2^-47)


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """A small SEAL run on the tiny UNet (alternating C/C_p), its key and kohya export."""
    o = small_owner(tmp_path_factory.mktemp("layouts"), "layouts owner")
    return o


def _ldm_of(unet) -> dict[str, str]:
    """diffusers module path → LDM path, through the full-checkpoint converter (independent of lora_names)."""
    from seal_diffusion.formats.checkpoint import UNET_PREFIX, unet_to_ldm

    sd = unet.state_dict()
    out = {}
    for k, v in unet_to_ldm(sd, unet.config).items():
        for dk, dv in sd.items():
            if dv is v and dk.endswith(".weight"):
                out[dk[: -len(".weight")]] = k[len(UNET_PREFIX): -len(".weight")]
    return out


def _renamed(owner, layout: str) -> dict[str, torch.Tensor]:
    """The release's tensors under another layout's names (the renaming attack)."""
    factors = public_factors(owner["key"])  # {module: (A′, B′)}, scale in B′
    ldm = _ldm_of(owner["unet"]) if layout in ("kohya-ldm", "comfy", "locon") else {}
    t: dict[str, torch.Tensor] = {}
    for m, (a, b) in factors.items():
        if layout == "kohya-ldm":
            stem = "lora_unet_" + ldm[m].replace(".", "_")
            t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = a, b
            t[f"{stem}.alpha"] = torch.tensor(float(RANK))
        elif layout == "comfy":
            t[f"diffusion_model.{ldm[m]}.lora_down.weight"], t[f"diffusion_model.{ldm[m]}.lora_up.weight"] = a, b
        elif layout == "peft-no-prefix":
            t[f"{m}.lora_A.weight"], t[f"{m}.lora_B.weight"] = a, b
        elif layout == "peft-base-model":
            t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"] = a, b
        elif layout == "lora-dot-down":
            t[f"unet.{m}.lora.down.weight"], t[f"unet.{m}.lora.up.weight"] = a, b
        elif layout == "processor":
            attn, _, proj = m.rpartition(".to_") if ".to_out" not in m else (m[: -len(".to_out.0")], "", "out")
            t[f"unet.{attn}.processor.to_{proj}_lora.down.weight"] = a
            t[f"unet.{attn}.processor.to_{proj}_lora.up.weight"] = b
        elif layout == "locon":  # LDM kohya names + conv, feed-forward and text-encoder parts a LoCon file holds
            stem = "lora_unet_" + ldm[m].replace(".", "_")
            t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = a * 2, b  # alpha 2 = rank/2: scale ½
            t[f"{stem}.alpha"] = torch.tensor(float(RANK) / 2)
        elif layout == "loha":  # LyCORIS LoHa: ΔW = (w1a w1b) ⊙ (w2a w2b); w2 = all ones keeps ΔW = B′A′
            stem = "lora_unet_" + m.replace(".", "_")
            t[f"{stem}.hada_w1_a"], t[f"{stem}.hada_w1_b"] = b, a
            t[f"{stem}.hada_w2_a"], t[f"{stem}.hada_w2_b"] = torch.ones(b.shape[0], 1), torch.ones(1, a.shape[1])
            t[f"{stem}.alpha"] = torch.tensor(float(RANK))
        else:
            raise ValueError(layout)
    if layout == "locon":
        g = torch.Generator().manual_seed(1)
        t["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"] = torch.randn(RANK, 32, 3, 3, generator=g)
        t["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"] = torch.randn(32, RANK, 1, 1, generator=g)
        ff = "lora_unet_input_blocks_1_1_transformer_blocks_0_ff_net_2"
        t[f"{ff}.lora_down.weight"] = torch.randn(RANK, 128, generator=g)
        t[f"{ff}.lora_up.weight"] = torch.randn(32, RANK, generator=g)
        t["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(RANK, 32, generator=g)
        t["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(32, RANK, generator=g)
    return t


LAYOUTS = ["kohya-ldm", "comfy", "peft-no-prefix", "peft-base-model", "lora-dot-down", "processor", "locon", "loha"]


def _save(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_every_renamed_export_is_detected_at_the_floor(owner, tmp_path):
    key = owner["key"]
    paths = [_save(_renamed(owner, layout), tmp_path / f"{layout}.safetensors") for layout in LAYOUTS]
    for layout, path in zip(LAYOUTS, paths):
        report = verify(key, load_suspect(path, key))
        assert report.detected and report.n_modules == 48 and report.n_modules_missing == 0, layout
        assert report.neg_log10_p == pytest.approx(FLOOR, abs=1e-9), layout
        assert report.reconstruction_error < 1e-5, (layout, report.reconstruction_error)
    locon = verify(key, load_suspect(tmp_path / "locon.safetensors", key))
    assert "LDM names" in locon.suspect_layout and "LyCORIS LoCon" in locon.suspect_layout
    notes = " | ".join(locon.not_tested)
    assert "1 conv layers (LoCon)" in notes and "1 text-encoder layers" in notes
    assert "1 UNet layers that are not" in notes
    # scan reads them too: every row detected, exit 0
    rows, _ = scan([owner["key_path"]], paths)
    assert all(r.detected for r in rows) and len(rows) == len(LAYOUTS)


def test_diffusers_loads_processor_keys_as_the_original(owner, tmp_path):
    """The attack is real: diffusers' own loader gives the same UNet output for the old attention-processor keys."""
    from seal_diffusion.models.base_model import load_pipeline

    path = _save(_renamed(owner, "processor"), tmp_path / "processor.safetensors")
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    outs = []
    for file in (None, owner["kohya"], path):
        pipe = load_pipeline("tiny")
        if file is not None:
            pipe.load_lora_weights(str(file))
        with torch.no_grad():
            outs.append(pipe.unet(x, torch.tensor([500]), e).sample)
    assert (outs[1] - outs[0]).abs().max() > 1e-4  # the LoRA does something
    assert torch.allclose(outs[1], outs[2], atol=1e-5)


def test_ldm_names_agree_with_diffusers_sgm_conversion(owner):
    """diffusers' SGM→diffusers LoRA renaming (used for SDXL files) maps our LDM kohya stems back to the modules."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    from seal_diffusion.formats.lora_names import kohya_stem, ldm_names

    modules = list(owner["key"].modules)
    for config in (None, owner["unet"].config):
        ldm = ldm_names(modules, config)
        assert len(ldm) == 48
        sd = {kohya_stem(ldm[m]) + ".lora_down.weight": torch.tensor(float(i)) for i, m in enumerate(modules)}
        back = _maybe_map_sgm_blocks_to_diffusers(dict(sd), owner["unet"].config)
        rename = (("input_blocks", "down_blocks"), ("middle_block", "mid_block"), ("output_blocks", "up_blocks"))
        back = {functools.reduce(lambda k, r: k.replace(*r), rename, k): v for k, v in back.items()}  # its next step
        assert {float(v): k for k, v in back.items()} == {float(i): kohya_stem(m) + ".lora_down.weight"
                                                         for i, m in enumerate(modules)}
    # SDXL's layout (3 levels, attention from level 1, 2 layers): names follow from the config, not an SD 1.5 table
    xl = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2}
    got = ldm_names(["down_blocks.1.attentions.0.transformer_blocks.3.attn1.to_q", "mid_block.attentions.0.x.to_k",
                     "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v"], xl)
    assert list(got.values()) == ["input_blocks.4.1.transformer_blocks.3.attn1.to_q", "middle_block.1.x.to_k",
                                  "output_blocks.2.1.transformer_blocks.9.attn2.to_v"]


def test_scan_never_calls_an_unreadable_or_unmapped_file_not_detected(owner, tmp_path, capsys):
    te_only = {k: v for k, v in _renamed(owner, "locon").items() if k.startswith("lora_te_")}
    _save(te_only, tmp_path / "te_only.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    other = {"lora_unet_foo_bar.lora_down.weight": torch.zeros(2, 8),
             "lora_unet_foo_bar.lora_up.weight": torch.zeros(8, 2)}
    _save(other, tmp_path / "other_model.safetensors")
    rows, _ = scan([owner["key_path"]], [tmp_path])
    assert len(rows) == 3 and all(r.detected is None and r.error.startswith("could not be checked") for r in rows)
    assert cli_main(["scan", "--key", str(owner["key_path"]), str(tmp_path), str(owner["kohya"])]) == 2
    out = capsys.readouterr().out
    assert "not detected" not in out and out.count("could not be checked") == 3 and "DETECTED" in out
    assert "text-encoder layers" in out and "holds none of this key" in out


def test_partial_file_reports_its_floor(owner, tmp_path, capsys):
    lora = read_lora(owner["kohya"])
    for k in (10, 20):
        lora.entries = dict(list(read_lora(owner["kohya"]).entries.items())[:k])
        lora.save(tmp_path / f"part{k}.safetensors")
    report = verify_path(owner["key_path"], tmp_path / "part10.safetensors")
    assert report.max_neg_log10_p == pytest.approx(9 * math.log10(2)) and not report.detected
    assert report.neg_log10_p <= report.max_neg_log10_p + 1e-9
    assert cli_main(["verify", "--key", str(owner["key_path"]), str(tmp_path / "part10.safetensors"),
                     "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "at most −log10 p = (10 − 1)·log10 2 = 2.7" in out and "can never be detected" in out
    assert json.loads((tmp_path / "r.json").read_text())["max_neg_log10_p"] == pytest.approx(2.7093, abs=1e-4)
    report = verify_path(owner["key_path"], tmp_path / "part20.safetensors")
    assert report.detected and report.neg_log10_p == pytest.approx(19 * math.log10(2))


def _split(owner, factor: float = 100.0, seed: int = 5):
    """The split attack, our own code: A = release + R, B = −R, with ‖R‖ = factor·‖release‖ per module (rank 2r)."""
    g = torch.Generator().manual_seed(seed)
    a_file, b_file = {}, {}
    for m, (a, b) in public_factors(owner["key"]).items():
        stem = "lora_unet_" + m.replace(".", "_")
        rd, ru = torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)
        ratio = float((b @ a).norm() / (ru @ rd).norm()) * factor
        ru = ru * ratio
        a_file[f"{stem}.lora_down.weight"], a_file[f"{stem}.lora_up.weight"] = torch.cat([a, rd]), torch.cat([b, ru], 1)
        b_file[f"{stem}.lora_down.weight"], b_file[f"{stem}.lora_up.weight"] = rd, -ru
    return a_file, b_file


def test_split_lora_is_detected_only_when_combined(owner, tmp_path, capsys):
    a_file, b_file = _split(owner)
    pa, pb = _save(a_file, tmp_path / "a.safetensors"), _save(b_file, tmp_path / "b.safetensors")
    key = owner["key"]
    alone = [verify(key, load_suspect(p, key)) for p in (pa, pb)]
    print(f"split attack, ‖R‖ = 100×: A alone {alone[0].neg_log10_p:.2f}, B alone {alone[1].neg_log10_p:.2f}")
    assert not any(r.detected for r in alone), [r.neg_log10_p for r in alone]
    combined = verify_path(owner["key_path"], [pa, pb])
    assert combined.detected and combined.neg_log10_p == pytest.approx(FLOOR, abs=1e-6)
    assert combined.suspect_format == "combined" and combined.suspect_files == [str(pa), str(pb)]
    assert cli_main(["verify", "--key", str(owner["key_path"]), str(pa), str(pb)]) == 0
    capsys.readouterr()
    assert cli_main(["scan", "--key", str(owner["key_path"]), str(pa), str(pb)]) == 1  # each alone: nothing
    assert cli_main(["scan", "--combine", "--key", str(owner["key_path"]), str(pa), str(pb), "--json",
                     str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["detected"] for r in rows] == [False, False, True] and " + " in rows[2]["file"]


def test_holm_correction():
    raw = [5.0, 1.0, 3.5, None]
    adj = holm(raw)
    assert adj[0] == pytest.approx(5.0 - math.log10(4)) and adj[3] is None
    assert adj[2] == pytest.approx(3.5 - math.log10(3))
    assert adj[1] == pytest.approx(1.0 - math.log10(2))
    assert holm([1.0, 1.0])[0] == pytest.approx(1.0 - math.log10(2))  # monotone: never above the larger one


def test_scan_corrects_for_files_times_keys(owner, tmp_path, capsys):
    """A raw −log10 p of 3.6 (nominally detected) is not an accusation in a scan of 20 files."""
    lora = read_lora(owner["kohya"])
    names = list(lora.entries)
    for i in range(20):
        lora.entries = {s: pair for s, pair in read_lora(owner["kohya"]).entries.items() if s in names[:12 + (i == 0)]}
        lora.save(tmp_path / f"f{i:02d}.safetensors")
    rows, _ = scan([owner["key_path"]], [tmp_path])
    first = rows[0]  # 13 modules, all right: raw 12·log10 2 = 3.61 ≥ 3.3 (two-sided), Holm 3.61 − log10 20 = 2.31
    assert first.detected_uncorrected and not first.detected
    assert first.neg_log10_p_adjusted == pytest.approx(12 * math.log10(2) - math.log10(20))
    assert cli_main(["scan", "--key", str(owner["key_path"]), str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "Holm" in out and "corrected for 20 tests" in out and "raw p passes, corrected does not" in out


def test_tampered_key_is_refused_with_the_published_commitment(owner, tmp_path, capsys):
    """The attack: relabel C/C_p in the modules where an innocent scored negative and recompute the embedded hash.
    The edited key loads and accuses the innocent; against the published commitment it is refused."""
    key, published = owner["key"], owner["key"].commitment()
    g = torch.Generator().manual_seed(7)
    innocent = read_lora(owner["kohya"])
    innocent.entries = {s: (torch.randn(d.shape, generator=g), torch.randn(u.shape, generator=g))
                        for s, (d, u) in innocent.entries.items()}
    innocent.save(tmp_path / "innocent.safetensors")
    honest = verify_path(key, tmp_path / "innocent.safetensors")
    assert not honest.detected
    forged = SealKey.load(owner["key_path"])
    for m in honest.per_module:
        if m.stat < 0:
            mk = forged.modules[m.module]
            mk.passport, mk.passport_p = mk.passport_p, mk.passport
    forged_path = forged.save(tmp_path / "forged.sealkey")  # save() recomputes the embedded commitment
    assert SealKey.load(forged_path).commitment() != published
    args = ["verify", "--key", str(forged_path), str(tmp_path / "innocent.safetensors")]
    assert cli_main(args) == 0  # without a commitment the edited key "detects" the innocent file
    out = capsys.readouterr().out
    assert "NOT checked against a published commitment" in out
    assert cli_main(args + ["--commitment", published]) == 2
    assert "does not match the published commitment" in capsys.readouterr().err
    assert cli_main(["scan", "--key", str(forged_path), "--commitment", published, str(owner["kohya"])]) == 2
    capsys.readouterr()
    # the real key passes, and the output says so
    assert cli_main(["verify", "--key", str(owner["key_path"]), str(owner["kohya"]), "--commitment",
                     "sha256:" + published.upper()]) == 0
    assert f"matches the published commitment {published}" in capsys.readouterr().out
    with pytest.raises(Exception, match="64 hex digits"):
        check_commitment(key, "abc")
