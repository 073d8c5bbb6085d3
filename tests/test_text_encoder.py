"""--train_text_encoder: SEAL layers with passports on the CLIP text encoder(s), in the key, both public layouts, the
real diffusers loaders, the ComfyUI/A1111 key maps, verify and scan, plain LoRA, resume, and SDXL's two encoders.

One short SD 1.x run (rank 4, 4 steps, a checkpoint at step 2) is shared by most tests; the SDXL run is 2 steps."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from seal_diffusion.core import passport
from seal_diffusion.models.base_model import load_pipeline
from seal_diffusion.errors import UserError
from seal_diffusion.fileio import load_safetensors
from seal_diffusion.core.keyfile import SealKey
from seal_diffusion.formats.lora_file import read_lora
from seal_diffusion.core.network import SealNetwork, find_target_modules, target_modules, text_encoders_of
from seal_diffusion.core.passport import pair_problem
from seal_diffusion.detection.scan import scan
from seal_diffusion.training import main, parse_args, train
from seal_diffusion.detection.verify import lora_suspect, verify, verify_path

PROMPT = "a photo of sks cat"
SECRET = "quokka marmalade typewriter lantern"
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--instance_data_dir", str(data), "--instance_prompt", PROMPT, "--output_dir", str(out),
            "--output_name", "cat", "--rank", "4", "--seed", "0", "--learning_rate", "5e-3", "--train_batch_size", "2",
            "--cache_latents", "--center_crop", "--train_text_encoder", *extra]


@pytest.fixture(scope="module")
def te_run(tiny_dir, subject_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("te") / "a"
    result = train(parse_args(_args(subject_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                                    "--secret", SECRET, "--text_encoder_lr", "1e-2")))
    return dict(result=result, out=out, key=SealKey.load(out / "cat.sealkey"))


def _te_out(pipe, which: str = "text_encoder") -> torch.Tensor:
    tok = pipe.tokenizer if which == "text_encoder" else pipe.tokenizer_2
    ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipe, which)(ids)[0]


def _unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 32, 32, generator=g)
    ehs = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=ehs).sample


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_key_has_text_encoder_modules_with_both_passports(te_run):
    key, net = te_run["key"], te_run["result"]["network"]
    te = sorted(m for m in key.modules if m.startswith("text_encoder."))
    assert len(key.modules) == 48 + 20 and len(te) == 20  # tiny CLIP: 5 layers × q/k/v/out_proj
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in te
    assert all(re.fullmatch(r"text_encoder\.text_model\.encoder\.layers\.\d\.self_attn\.(q|k|v|out)_proj", m) for m in te)
    assert set(TE_TARGETS) <= set(key.target_modules) and "to_q" in key.target_modules
    for m in te:
        mk = key.modules[m]
        assert pair_problem(mk.passport, mk.passport_p) is None, m
        assert float(mk.lora_B.abs().max()) > 0, m  # the text-encoder adapters trained
    assert te_run["result"]["steps"] == 4 and len(net.text_encoder_module_names) == 20
    assert "| text encoder | trained too (learning rate 0.01) |" in (te_run["out"] / "README.md").read_text()


def test_unet_passports_and_init_do_not_change_when_the_text_encoder_is_added(tiny_pipe, tmp_path):
    from PIL import Image

    unet_names = list(find_target_modules(tiny_pipe.unet))
    all_names = list(target_modules(tiny_pipe.unet, text_encoders_of(tiny_pipe)))
    assert all_names[:48] == unet_names and len(all_names) == 68  # text-encoder layers come after the UNet's
    secret = b"s" * 32
    alone, both = passport.make_passports(unet_names, 4, secret), passport.make_passports(all_names, 4, secret)
    assert all(torch.equal(alone[m][0], both[m][0]) and torch.equal(alone[m][1], both[m][1]) for m in unet_names)
    gif = tmp_path / "logo.gif"  # an image passport: module i gets frame i mod N, unchanged for the UNet's modules
    frames = [Image.fromarray((torch.rand(16, 16, generator=torch.Generator().manual_seed(6 + i)) * 255).byte().numpy())
              for i in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    img_a = passport.make_passports(unet_names, 4, secret, f"image:{gif}")
    img_b = passport.make_passports(all_names, 4, secret, f"image:{gif}")
    assert all(torch.equal(img_a[m][0], img_b[m][0]) for m in unet_names)
    # A's secret-derived initialisation of the UNet layers is the same with or without the text encoder
    n1 = SealNetwork(tiny_pipe.unet, 4, passports=alone, generator=passport.init_generator(secret))
    a1 = {m: n1[m].lora_A.detach().clone() for m in unet_names}
    n1.remove()
    n2 = SealNetwork(tiny_pipe.unet, 4, passports=both, generator=passport.init_generator(secret),
                     text_encoders=text_encoders_of(tiny_pipe))
    assert all(torch.equal(a1[m], n2[m].lora_A) for m in unet_names)
    n2.remove()


def test_one_switch_covers_the_text_encoder_and_remove_unpatches_it(te_run, tiny_dir):
    pipe, net = te_run["result"]["pipeline"], te_run["result"]["network"]
    base = _te_out(load_pipeline("tiny"))
    outs = {}
    for mode in ("C", "C_p", "identity", "off"):
        with net.passport(mode):
            outs[mode] = _te_out(pipe)
    assert torch.allclose(outs["off"], base, atol=1e-6)
    assert _rel(outs["C"], base) > 1e-3 and _rel(outs["C"], outs["C_p"]) > 1e-3 and _rel(outs["C"], outs["identity"]) > 1e-3
    with net.passport("split", 1):  # a batch of two: the first sample with C, the second with C_p
        tok = pipe.tokenizer([PROMPT, PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            split = pipe.text_encoder(tok)[0]
    assert torch.allclose(split[0], outs["C"][0], atol=1e-5) and torch.allclose(split[1], outs["C_p"][0], atol=1e-5)


def test_both_layouts_load_in_diffusers_with_the_patched_outputs(te_run, tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe, net, out = te_run["result"]["pipeline"], te_run["result"]["network"], te_run["out"]
    with net.passport("C"):
        want_te, want_unet = _te_out(pipe), _unet_out(pipe)
    diffusers_file = out / "pytorch_lora_weights.safetensors"
    tensors, _ = load_safetensors(diffusers_file)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert sum(k.startswith("text_encoder.") for k in tensors) == 40
    kohya, meta = load_safetensors(out / "cat.safetensors")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te_text_model_encoder_layers_4_self_attn_out_proj.alpha" in kohya
    assert sum(k.startswith("lora_te_") for k in kohya) == 60 and meta["ss_text_encoder_lr"] == "0.01"
    for path in (diffusers_file, out / "cat.safetensors"):
        fresh = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
        fresh.load_lora_weights(str(path))
        assert _rel(_te_out(fresh), want_te) <= 1e-5, path
        assert _rel(_unet_out(fresh), want_unet) <= 1e-5, path


def _comfy_clip_map(n_layers: int, sdxl: bool) -> dict[str, str]:
    """ComfyUI's comfy/lora.py model_lora_keys_clip rule, reproduced for CLIP-L (SD 1.x) and CLIP-L + CLIP-G (SDXL):
    clip_l layer b part c ← ``lora_te_text_model_encoder_layers_{b}_{c with _}``, ``lora_te1_…`` and
    ``text_encoder.text_model.encoder.layers.{b}.{c}``; clip_g (with clip_l present) ← ``lora_te2_…`` and
    ``text_encoder_2.…``."""
    parts = {f"self_attn.{p}": f"self_attn_{p}" for p in TE_TARGETS} | {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}
    out = {}
    for b in range(n_layers):
        for c, u in parts.items():
            l_key = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            out[f"lora_te_text_model_encoder_layers_{b}_{u}"] = l_key
            out[f"lora_te1_text_model_encoder_layers_{b}_{u}"] = l_key
            if sdxl:
                out[f"lora_te2_text_model_encoder_layers_{b}_{u}"] = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
    return out


def _a1111_te_module(stem: str, n_layers: int, sdxl: bool) -> str | None:
    """A1111's extensions-builtin/Lora/networks.py rule, reproduced: SD 1.x ``lora_te_text_model_encoder_layers_{i}_
    {rest}`` → ``transformer_text_model_encoder_layers_{i}_{rest}``; SDXL ``lora_te1_text_model`` → ``0_transformer_
    text_model``; ``lora_te2_text_model_encoder_layers_{i}_{rest}`` → ``1_model_transformer_resblocks_{i}_{rest with
    self_attn → attn}``, whose ``_[qkv]_proj`` suffix is stripped onto the fused in_proj attention (re_x_proj). Returns
    the network layer it lands on, or None."""
    layers = set()
    for i in range(n_layers):
        for p in TE_TARGETS:
            layers.add(f"{'0_' if sdxl else ''}transformer_text_model_encoder_layers_{i}_self_attn_{p}")
        if sdxl:
            layers |= {f"1_model_transformer_resblocks_{i}_attn", f"1_model_transformer_resblocks_{i}_attn_out_proj"}
    if (m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", stem)):
        key = f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    elif (m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", stem)):
        key = f"1_model_transformer_resblocks_{m[1]}_{m[2].replace('self_attn', 'attn')}"
        if key not in layers and (x := re.fullmatch(r"(.*)_([qkv]_proj)", key)):
            key = x[1]
    elif "lora_te1_text_model" in stem:
        key = stem.replace("lora_te1_text_model", "0_transformer_text_model")
    else:
        return None
    return key if key in layers else None


def test_kohya_text_encoder_names_follow_comfyui_and_a1111(te_run):
    stems = {k.split(".")[0] for k in load_safetensors(te_run["out"] / "cat.safetensors")[0] if k.startswith("lora_te")}
    assert len(stems) == 20
    comfy = _comfy_clip_map(5, sdxl=False)
    assert all(s in comfy for s in stems)
    assert len({_a1111_te_module(s, 5, sdxl=False) for s in stems} - {None}) == 20


def test_public_files_leak_nothing_of_the_text_encoder_key(te_run):
    key, out = te_run["key"], te_run["out"]
    private = [t for m, mk in key.modules.items() if m.startswith("text_encoder.")
               for t in (mk.lora_A, mk.lora_B, mk.passport, mk.passport_p)]
    banned = ("seal", "passport", "secret", "seed", "method", SECRET.split()[0], str(out).lower())
    for f in (out / "cat.safetensors", out / "pytorch_lora_weights.safetensors"):
        tensors, meta = load_safetensors(f)
        text = json.dumps(meta).lower() + " ".join(tensors).lower()
        assert not any(word in text for word in banned), f
        assert all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha", "lora_A.weight", "lora_B.weight"))
                   for k in tensors)
        for t in tensors.values():
            assert not any(t.shape == p.shape and torch.allclose(t.float(), p, atol=1e-6) for p in private), f


def test_verify_and_scan_cover_text_encoder_layers(te_run, tmp_path):
    key, out = te_run["key"], te_run["out"]
    full = verify_path(key, out / "cat.safetensors")
    assert full.detected and full.n_modules == 68 and full.n_modules_missing == 0
    assert full.reconstruction_error < 1e-5
    tensors, meta = load_safetensors(out / "cat.safetensors")
    from safetensors.torch import save_file

    te_only = tmp_path / "te_only.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_te_")}, str(te_only))
    report = verify_path(key, te_only)
    assert report.detected and report.n_modules == 20 and report.n_modules_missing == 48
    js = report.to_json()
    assert js["n_modules"] == 20 and len(js["per_module"]) == 20
    assert all(m["module"].startswith("text_encoder.") for m in js["per_module"])
    assert js["max_neg_log10_p"] == pytest.approx(19 * 0.30103, abs=1e-3)  # two-sided: (M − 1)·log10 2
    rows, _ = scan([out / "cat.sealkey"], [te_only, out / "pytorch_lora_weights.safetensors"])
    assert [r.detected for r in rows] == [True, True] and [r.n_modules for r in rows] == [20, 68]
    # a key without text-encoder modules reports them as present but not tested
    unet_key = SealKey({m: mk for m, mk in key.modules.items() if not m.startswith("text_encoder.")}, key.rank,
                       key.alpha, key.base_model)
    lora = read_lora(out / "cat.safetensors")
    r = verify(unet_key, lora_suspect(lora, unet_key))
    assert r.detected and r.n_modules == 48 and any("20 text-encoder layers" in n for n in r.not_tested)
    assert not lora_suspect(read_lora(te_only), unet_key).modules
    with pytest.raises(UserError, match="holds none of the key's 48 modules.*20 text-encoder layers that are not in"):
        verify(unet_key, lora_suspect(read_lora(te_only), unet_key))


def test_resume_restores_the_text_encoder_factors(te_run, subject_dir, tmp_path, capsys):
    a, b = te_run["out"], tmp_path / "b"
    b.mkdir()
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-2")
    assert main(_args(subject_dir, b, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                      "--text_encoder_lr", "1e-2")) == 0
    ka, kb = te_run["key"], SealKey.load(b / "cat.sealkey")
    te = [m for m in ka.modules if m.startswith("text_encoder.")]
    for m in te:
        for f in ("lora_A", "lora_B", "passport", "passport_p"):
            assert torch.equal(getattr(ka.modules[m], f), getattr(kb.modules[m], f)), (m, f)
    assert ka.commitment() == kb.commitment()
    # a checkpoint trained with the text encoder cannot be resumed without it (and vice versa)
    args = _args(subject_dir, tmp_path / "c", "--max_train_steps", "4", "--resume_from_checkpoint",
                 str(a / "checkpoint-2"))
    args.remove("--train_text_encoder")
    assert main(args) == 2
    assert "train_text_encoder" in capsys.readouterr().err


def test_plain_lora_with_the_text_encoder(subject_dir, tmp_path, tiny_dir):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "plain"
    result = train(parse_args(_args(subject_dir, out, "--method", "lora", "--max_train_steps", "1")))
    net = result["network"]
    assert not net.is_seal and len(net.text_encoder_module_names) == 20 and result["key_path"] is None
    want = _te_out(result["pipeline"])
    kohya, _ = load_safetensors(out / "cat.safetensors")
    assert sum(k.startswith("lora_te_") for k in kohya) == 60
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    fresh.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    assert _rel(_te_out(fresh), want) <= 1e-5
    net.remove()
    assert torch.allclose(_te_out(result["pipeline"]), _te_out(load_pipeline("tiny")), atol=1e-6)


def test_sdxl_both_encoders(subject_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from seal_diffusion.models.tiny import tiny_model_dir

    out = tmp_path / "xl"
    result = train(parse_args(["--pretrained_model_name_or_path", "tiny-xl", *_args(subject_dir, out,
                                                                                      "--max_train_steps", "2")]))
    pipe, net = result["pipeline"], result["network"]
    key = SealKey.load(out / "cat.sealkey")
    te1 = [m for m in key.modules if m.startswith("text_encoder.")]
    te2 = [m for m in key.modules if m.startswith("text_encoder_2.")]
    n1 = pipe.text_encoder.config.num_hidden_layers
    n2 = pipe.text_encoder_2.config.num_hidden_layers
    assert len(te1) == 4 * n1 and len(te2) == 4 * n2 and key.architecture == "sdxl_base_v1-0"
    kohya, _ = load_safetensors(out / "cat.safetensors")
    stems = {k.split(".")[0] for k in kohya if k.startswith("lora_te")}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in stems
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" in stems
    assert not any(s.startswith("lora_te_") for s in stems) and len(stems) == len(te1) + len(te2)
    comfy = _comfy_clip_map(max(n1, n2), sdxl=True)
    assert all(s in comfy for s in stems)
    assert all(_a1111_te_module(s, max(n1, n2), sdxl=True) is not None for s in stems)
    with net.passport("C"):
        want = {w: _te_out(pipe, w) for w in ("text_encoder", "text_encoder_2")}
    for path in (out / "pytorch_lora_weights.safetensors", out / "cat.safetensors"):
        fresh = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir(xl=True), local_files_only=True)
        fresh.load_lora_weights(str(path))
        for w in want:
            assert _rel(_te_out(fresh, w), want[w]) <= 1e-5, (path, w)
    assert verify_path(key, out / "cat.safetensors").n_modules == len(key.modules)


def test_function_and_image_tests_skip_text_encoder_modules(te_run, tiny_dir):
    from seal_diffusion.detection.image_sampler import PassportLine
    from seal_diffusion.detection.probes import owner_network

    key, pipe = te_run["key"], load_pipeline("tiny")
    net = owner_network(pipe.unet, key)
    assert len(net.module_names) == 48 and not net.text_encoder_module_names
    net.remove()
    with PassportLine(pipe, key) as line:
        assert len(line.names) == 48 and not line.net.text_encoder_module_names
        assert "forward" not in pipe.text_encoder.encoder.layers[0].self_attn.q_proj.__dict__  # encoder untouched


def test_compare_patches_the_text_encoder_and_matches_the_export(te_run, tiny_dir):
    from seal_diffusion.reports.compare import render_variants

    key, pipe = te_run["key"], load_pipeline("tiny")
    gen = dict(steps=2, guidance_scale=1.0, height=64, width=64)
    images = render_variants(pipe, key, [(PROMPT, 0)], ("C", "exported"), **gen)
    assert abs(images["C"] - images["exported"]).max() < 1e-4  # the exported file (text encoder included) = C
    unet_key = SealKey({m: mk for m, mk in key.modules.items() if not m.startswith("text_encoder.")}, key.rank,
                       key.alpha, key.base_model)
    unet_only = render_variants(pipe, unet_key, [(PROMPT, 0)], ("C",), **gen)["C"]
    assert abs(images["C"] - unet_only).max() > 1e-3  # …and C includes the text encoder's effect
    assert "forward" not in pipe.text_encoder.encoder.layers[0].self_attn.q_proj.__dict__  # unpatched afterwards
