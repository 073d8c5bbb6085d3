"""SEAL core: passports, the patch, the fold, both public layouts, the private key file, export/commitment CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from seal_diffusion.models import tiny
from seal_diffusion.cli import main as cli_main
from seal_diffusion.errors import UserError
from seal_diffusion.core.export import export_lora, public_factors
from seal_diffusion.core.fold import fold
from seal_diffusion.core.keyfile import SealKey
from seal_diffusion.formats.lora_file import read_lora
from seal_diffusion.core.network import SealNetwork, find_target_modules
from seal_diffusion.core.passport import correlation, make_passports, pair_problem

RANK = 4


def _inputs(batch=2, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 77, 32, generator=g))


def _run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def _seal(unet, secret="correct horse", rank=RANK):
    names = list(find_target_modules(unet))
    return SealNetwork(unet, rank, passports=make_passports(names, rank, secret))


def _train_a_bit(net, unet, steps=6, lr=1e-2):
    """A few alternating C/C_p Adam steps on a fixed denoising target (enough to make B non-zero; 16×16 latents,
    a quarter of the tokens: 1 CPU s against 7–8 at the tiny default's 32×32)."""
    opt = torch.optim.Adam(net.trainable_parameters(), lr=lr)
    x, t, e = _inputs(seed=1, size=16)
    target = torch.zeros_like(x)
    for step in range(steps):
        net.set_passport("C" if step % 2 == 0 else "C_p")
        loss = torch.nn.functional.mse_loss(unet(x, t, e).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.set_passport("C")


@pytest.fixture()
def trained(tiny_pipe):
    unet = tiny_pipe.unet
    net = _seal(unet)
    _train_a_bit(net, unet)
    return tiny_pipe, net


def rel(a, b):
    return float((a - b).norm() / b.norm())


# -- passports -------------------------------------------------------------------------------------------------------
def test_passports_deterministic_per_secret_and_module():
    names = ["a.to_q", "a.to_k"]
    p1, p2 = make_passports(names, RANK, "s1"), make_passports(names, RANK, "s1")
    other = make_passports(names, RANK, "s2")
    for n in names:
        assert torch.equal(p1[n][0], p2[n][0]) and torch.equal(p1[n][1], p2[n][1])
        assert not torch.equal(p1[n][0], other[n][0])
        assert pair_problem(*p1[n]) is None
    assert not torch.equal(p1["a.to_q"][0], p1["a.to_k"][0]), "each module has its own passport"
    big = make_passports(names, 32, "s1", std=10.0)
    assert big["a.to_q"][0].std().item() == pytest.approx(10.0, rel=0.15)


def test_bad_pairs_are_refused():
    c = torch.randn(RANK, RANK, generator=torch.Generator().manual_seed(0))
    assert "equals" in pair_problem(c, c.clone()) or "correlates" in pair_problem(c, c.clone())
    assert "identity-like" in pair_problem(c, torch.eye(RANK) * 3)
    assert "correlates" in pair_problem(c, 2 * c + 0.01 * torch.randn(RANK, RANK))
    assert "correlates" in pair_problem(c, -c)
    assert "singular" in pair_problem(torch.ones(RANK, 1) @ torch.randn(1, RANK), c)
    with pytest.raises(UserError, match="rank"):
        make_passports(["m"], 1, "s")


def test_image_passport_and_multiframe(tmp_path):
    rng = np.random.default_rng(0)
    png = tmp_path / "logo.png"
    Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)).save(png)
    ps = make_passports(["m0", "m1"], RANK, "s", source=f"image:{png}", std=2.0)
    c = ps["m0"][0]
    assert torch.equal(c, ps["m1"][0]) and c.abs().max() <= 2.0
    # grayscale → centre crop → resize → x/127.5 − 1, scaled by σ
    ref = Image.open(png).convert("L").crop((10, 0, 50, 40)).resize((RANK, RANK), Image.Resampling.LANCZOS)
    assert torch.allclose(c, torch.tensor(np.asarray(ref) / 127.5 - 1.0, dtype=torch.float32) * 2.0)
    assert abs(correlation(c, ps["m0"][1])) <= 0.5

    gif = tmp_path / "clip.gif"
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    ps = make_passports([f"m{i}" for i in range(5)], RANK, "s", source=f"image:{gif}")
    assert torch.equal(ps["m0"][0], ps["m3"][0]) and torch.equal(ps["m1"][0], ps["m4"][0])
    assert not torch.equal(ps["m0"][0], ps["m1"][0])

    flat = tmp_path / "flat.png"
    Image.new("L", (8, 8), 200).save(flat)
    with pytest.raises(UserError, match="flat.png.*flat"):
        make_passports(["m"], RANK, "s", source=f"image:{flat}")
    with pytest.raises(UserError, match="not found"):
        make_passports(["m"], RANK, "s", source=f"image:{tmp_path / 'none.png'}")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="not a readable image"):
        make_passports(["m"], RANK, "s", source=f"image:{tmp_path / 'bad.png'}")


# -- the patch -------------------------------------------------------------------------------------------------------
def test_patch_with_zero_B_is_exact_and_unpatch_restores(tiny_pipe):
    unet = tiny_pipe.unet
    inputs = _inputs()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    modules_before = dict(unet.named_modules())
    y0 = _run(unet, inputs)
    net = _seal(unet)
    assert torch.equal(_run(unet, inputs), y0), "B = 0 must leave the UNet exactly unchanged"
    assert set(unet.state_dict()) == set(before), "the UNet's state_dict keys are untouched"
    assert not any("passport" in k for k in net.state_dict()), "passports are not persistent state"
    trainable = {id(p) for p in net.trainable_parameters()}
    assert all(not p.requires_grad or id(p) in trainable for p in net.parameters())
    _train_a_bit(net, unet, steps=2)
    assert not torch.equal(_run(unet, inputs), y0)
    net.remove()
    assert torch.equal(_run(unet, inputs), y0)
    assert dict(unet.named_modules()).keys() == modules_before.keys()
    assert all(a is b for a, b in zip(unet.modules(), modules_before.values()))
    assert not any("forward" in m.__dict__ for m in unet.modules())
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k])


def test_passport_modes_and_split(trained):
    pipe, net = trained
    inputs = _inputs()
    y = {m: _run(pipe.unet, inputs) for m in ("C",)}
    for mode in ("C_p", "identity", "off"):
        with net.passport(mode):
            y[mode] = _run(pipe.unet, inputs)
    assert net.mode == "C"
    assert rel(y["C_p"], y["C"]) > 1e-4 and rel(y["identity"], y["C"]) > 1e-4
    net.remove()
    assert torch.equal(_run(pipe.unet, inputs), y["off"]), "mode off is the base model"
    net2 = _seal(pipe.unet)
    net2.load_factors(net.factors())
    with net2.passport("split", 1):
        ys = _run(pipe.unet, inputs)
    assert torch.allclose(ys[0], y["C"][0], atol=1e-5) and torch.allclose(ys[1], y["C_p"][1], atol=1e-5)


@pytest.mark.parametrize("processor", ["AttnProcessor", "sliced"])
def test_patch_works_under_other_attention_processors(trained, processor):
    pipe, net = trained
    inputs = _inputs()
    ref = {m: None for m in ("C", "C_p")}
    for m in ref:
        with net.passport(m):
            ref[m] = _run(pipe.unet, inputs)
    if processor == "sliced":
        pipe.unet.set_attention_slice(1)
    else:
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    for m in ref:
        with net.passport(m):
            assert torch.allclose(_run(pipe.unet, inputs), ref[m], atol=1e-4)


def test_added_kv_projections_are_patched():
    unet = tiny.build_added_kv_unet()
    net = _seal(unet)
    names = net.module_names
    assert sum(n.endswith(("add_k_proj", "add_v_proj")) for n in names) == 8
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([5])
    e = torch.randn(1, 77, 32)
    y0 = _run(unet, (x, t, e))
    torch.nn.init.normal_(net[next(n for n in names if n.endswith("add_k_proj"))].lora_B, std=0.5)
    assert not torch.allclose(_run(unet, (x, t, e)), y0), "an add_k_proj adapter changes the output"
    sd15_names = list(find_target_modules(tiny.build_sd15_unet()))
    assert len(sd15_names) == 128 and not any("add_" in n for n in sd15_names)


# -- fold and public files -------------------------------------------------------------------------------------------
def test_fold_is_exact():
    g = torch.Generator().manual_seed(3)
    a, b, c = torch.randn(8, 40, generator=g), torch.randn(30, 8, generator=g), torch.randn(8, 8, generator=g)
    a2, b2 = fold(a, b, c, scale=0.5)
    assert torch.allclose((b2.double() @ a2.double()), 0.5 * b.double() @ c.double() @ a.double(), rtol=1e-5, atol=1e-5)
    u, s, vh = torch.linalg.svd(c.double())
    assert torch.allclose(a2.double(), (s.sqrt()[:, None] * vh) @ a.double(), atol=1e-5)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_exported_lora_matches_patched_unet_in_diffusers(trained, tmp_path, layout):
    from seal_diffusion.models.base_model import load_pipeline

    pipe, net = trained
    inputs = _inputs()
    y = {}
    for mode in ("C", "C_p", "identity"):
        with net.passport(mode):
            y[mode] = _run(pipe.unet, inputs)
    key = SealKey.from_network(net, "tiny", "random")
    target = tmp_path / ("lora.safetensors" if layout == "kohya" else "lora_dir")
    path = export_lora(key, target, layout, "cat")
    fresh = load_pipeline("tiny")
    fresh.load_lora_weights(str(path if layout == "kohya" else target))
    y_loaded = _run(fresh.unet, inputs)
    assert rel(y_loaded, y["C"]) <= 1e-5
    assert rel(y_loaded, y["C_p"]) > 1e-3 and rel(y_loaded, y["identity"]) > 1e-3
    fresh.fuse_lora()
    assert rel(_run(fresh.unet, inputs), y["C"]) <= 1e-5


def test_public_files_hold_no_secret(trained, tmp_path):
    pipe, net = trained
    key = SealKey.from_network(net, "tiny", "random")
    secret_tensors = list(key.tensors().values())
    for layout, target in (("kohya", tmp_path / "k.safetensors"), ("diffusers", tmp_path / "d")):
        path = export_lora(key, target, layout, "my_cat")
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            public = [fh.get_tensor(k) for k in fh.keys()]
            keys = list(fh.keys())
        blob = json.dumps(meta).lower()
        for word in ("seal", "passport", "secret", "seed", "commitment", "watermark", key.commitment()):
            assert word not in blob, f"{layout} metadata mentions {word!r}"
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha"))
                   for k in keys)
        for s in secret_tensors:
            for p in public:
                if p.shape == s.shape:
                    assert not torch.allclose(p, s, atol=1e-6), f"a key tensor appears in the {layout} file"
        raw = path.read_bytes()
        for s in secret_tensors:
            assert s.numpy().tobytes()[:64] not in raw
    meta = read_lora(tmp_path / "k.safetensors").metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(RANK)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "my_cat"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert all(isinstance(v, str) for v in meta.values())


def test_read_lora_recovers_public_factors(trained, tmp_path):
    pipe, net = trained
    key = SealKey.from_network(net, "tiny", "random")
    export_lora(key, tmp_path / "k.safetensors", "kohya")
    export_lora(key, tmp_path / "d", "diffusers")
    ref = public_factors(key)
    for path in (tmp_path / "k.safetensors", tmp_path / "d"):
        lf = read_lora(path)
        got = lf.by_module(key.modules)
        assert set(got) == set(ref)
        for name, (a, b) in ref.items():
            assert torch.allclose(got[name][0], a) and torch.allclose(got[name][1], b)


# -- the key file ------------------------------------------------------------------------------------------------------
def test_key_layout_roundtrip_and_no_overwrite(trained, tmp_path):
    pipe, net = trained
    key = SealKey.from_network(net, "tiny", "random")
    path = key.save(tmp_path / "cat.sealkey")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        names = set(fh.keys())
        m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        assert fh.get_tensor(f"{m}.lora_A").shape == (RANK, 32)
        assert fh.get_tensor(f"{m}.lora_B").shape == (32, RANK)
        assert fh.get_tensor(f"{m}.passport").shape == (RANK, RANK)
        assert fh.get_tensor(f"{m}.passport_p").shape == (RANK, RANK)
    assert len(names) == 48 * 4
    assert meta["format"] == "sealkey" and meta["rank"] == str(RANK) and float(meta["alpha"]) == RANK
    assert json.loads(meta["target_modules"]) == ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    assert meta["commitment"] == key.commitment() and len(meta["commitment"]) == 64
    for field in ("version", "base_model", "passport_source", "created"):
        assert meta[field]
    loaded = SealKey.load(path)
    for name, mk in key.modules.items():
        assert torch.equal(mk.passport, loaded.modules[name].passport)
        # ΔW = (alpha/rank) · B @ C @ A reproduces the layer
        a_eff, b_eff = loaded.delta_factors(name, "C")
        layer = net[name]
        assert torch.allclose(b_eff @ a_eff, layer.scale * layer.lora_B @ layer.passport @ layer.lora_A, atol=1e-6)
    stamp = path.stat().st_mtime_ns
    with pytest.raises(UserError, match="already exists.*--force"):
        key.save(path)
    assert path.stat().st_mtime_ns == stamp
    key.save(path, force=True)
    assert not list(tmp_path.glob(".*tmp")), "no temp files left behind"


def test_export_and_commitment_cli(trained, tmp_path, capsys):
    pipe, net = trained
    key = SealKey.from_network(net, "tiny", "random")
    kpath = key.save(tmp_path / "cat.sealkey")
    assert cli_main(["commitment", "--key", str(kpath)]) == 0
    assert capsys.readouterr().out.strip() == key.commitment()
    out = tmp_path / "cat.safetensors"
    assert cli_main(["export", "--key", str(kpath), "--format", "kohya", "--out", str(out)]) == 0
    assert read_lora(out).metadata["ss_output_name"] == "cat"
    assert cli_main(["export", "--key", str(kpath), "--format", "kohya", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["export", "--key", str(kpath), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "pytorch_lora_weights.safetensors").is_file()


def _rewrite_key(src, dst, edit):
    with safe_open(str(src), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    edit(tensors, meta)
    from safetensors.torch import save_file

    save_file(tensors, str(dst), metadata=meta)


def _tamper(tensors, meta):
    k = next(k for k in tensors if k.endswith(".passport_p"))
    tensors[k] = tensors[k].clone()
    tensors[k][0, 0] += 1e-3


def _drop_module(tensors, meta):
    for k in [k for k in tensors if k.startswith("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.")][:1]:
        del tensors[k]


def _wrong_rank(tensors, meta):
    meta["rank"] = "8"


def _foreign(tensors, meta):
    meta["format"] = "pt"


@pytest.mark.parametrize(
    "edit, message",
    [(_tamper, "tampered"), (_drop_module, "lacks lora_A"), (_wrong_rank, "inconsistent with rank 8"),
     (_foreign, "not a SEAL key file")],
)
def test_bad_keys_are_one_clear_line(trained, tmp_path, capsys, edit, message):
    pipe, net = trained
    good = SealKey.from_network(net, "tiny", "random").save(tmp_path / "good.sealkey")
    bad = tmp_path / "bad.sealkey"
    _rewrite_key(good, bad, edit)
    out = tmp_path / "out.safetensors"
    assert cli_main(["export", "--key", str(bad), "--format", "kohya", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and message in err[0]
    assert not out.exists()


def test_truncated_key_is_one_clear_line(trained, tmp_path, capsys):
    pipe, net = trained
    good = SealKey.from_network(net, "tiny", "random").save(tmp_path / "good.sealkey")
    bad = tmp_path / "truncated.sealkey"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert cli_main(["commitment", "--key", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated.sealkey" in err[0] and "not a readable safetensors" in err[0]
