"""The DreamBooth SEAL trainer on the embedded tiny model: outputs, secrecy, resume, entanglement, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from seal_diffusion import fileio
from seal_diffusion.errors import UserError
from seal_diffusion.fileio import load_safetensors
from seal_diffusion.core.keyfile import SealKey
from seal_diffusion.formats.lora_file import read_lora
from seal_diffusion.evaluation.heldout import heldout_batch, heldout_denoising_loss, training_noise_scheduler
from seal_diffusion.training import main, parse_args, train
from small_owner import fixed_scrypt_salt

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of sks cat"
SECRET = "correct horse battery staple"
NAME = "sks_cat"


def _args(data: Path, out: Path, *extra: str, seed: bool = True) -> list[str]:
    return ["--instance_data_dir", str(data), "--instance_prompt", PROMPT, "--output_dir", str(out),
            "--output_name", NAME, "--rank", "4", *(["--seed", "0"] if seed else []), *extra]


@pytest.fixture(scope="module")
def seal_run(tiny_dir, subject_dir, tmp_path_factory):
    """One SEAL training run shared by the output, secrecy and entanglement tests."""
    out = tmp_path_factory.mktemp("seal") / "out"
    writes: list[str] = []
    original = fileio.write_bytes_atomic

    def recording(path, *a, **kw):
        writes.append(Path(path).name)
        return original(path, *a, **kw)

    calls = []
    args = parse_args(_args(subject_dir, out, "--max_train_steps", "30", "--learning_rate", "1e-2",
                            "--train_batch_size", "2", "--center_crop", "--cache_latents", "--secret", SECRET,
                            "--resolution", "32",  # a quarter of the tiny default's tokens: ~6× cheaper steps
                            "--validation_prompt", PROMPT, "--num_validation_images", "1",
                            "--validation_inference_steps", "2"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fileio, "write_bytes_atomic", recording)
        with fixed_scrypt_salt():
            result = train(args, progress_callback=lambda *a: calls.append(a))
    return dict(result=result, out=out, writes=writes, calls=calls)


def test_outputs_layout_and_key_first(seal_run):
    out, result = seal_run["out"], seal_run["result"]
    key_path = out / f"{NAME}.sealkey"
    kohya, diffusers_file, card = out / f"{NAME}.safetensors", out / "pytorch_lora_weights.safetensors", out / "README.md"
    for p in (key_path, kohya, diffusers_file, card, out / "validation" / "final-00.png"):
        assert p.is_file(), p
    public = [kohya.name, diffusers_file.name, card.name]
    writes = seal_run["writes"]
    assert writes.index(key_path.name) < min(writes.index(n) for n in public), writes

    key = SealKey.load(key_path)
    assert result["commitment"] == key.commitment()
    assert key.rank == 4 and len(key.modules) == 48 and key.base_model == "tiny"

    lora = read_lora(kohya)
    assert lora.layout == "kohya" and lora.rank == 4
    meta = lora.metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == NAME
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    diff = read_lora(diffusers_file)
    for name in list(key.modules)[:6]:
        a, b = key.delta_factors(name, "C")
        expected = b @ a
        for f in (lora, diff):
            down, up = f.by_module([name])[name]
            torch.testing.assert_close(up @ down, expected, rtol=1e-4, atol=1e-6)

    lines = [json.loads(l) for l in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 31))
    assert set(lines[0]) == {"step", "loss", "lr", "time", "elapsed_s"}  # time: UTC ISO 8601

    calls = seal_run["calls"]
    assert len(calls) == 30 and calls[-1][:2] == (30, 30) and calls[-1][3] == pytest.approx(0, abs=1e-6)


def test_public_files_hold_no_secret(seal_run):
    out = seal_run["out"]
    key = SealKey.load(out / f"{NAME}.sealkey")
    private = [t for mk in key.modules.values() for t in (mk.lora_A, mk.lora_B, mk.passport, mk.passport_p)]
    private_shapes = {tuple(t.shape) for t in private}
    banned = ("seal", "passport", "secret", "seed", SECRET.split()[0])
    for f in (out / f"{NAME}.safetensors", out / "pytorch_lora_weights.safetensors"):
        tensors, meta = load_safetensors(f)
        text = json.dumps(meta).lower() + " ".join(tensors).lower()
        assert not any(word in text for word in banned), (f, meta)
        assert SECRET.encode() not in f.read_bytes()
        for t in tensors.values():
            if tuple(t.shape) in private_shapes:
                assert not any(t.shape == p.shape and torch.allclose(t.float(), p, atol=1e-6) for p in private), f
    card = (out / "README.md").read_text().lower()
    assert "base_model: tiny" in card and PROMPT in card and "rank" in card
    assert not any(word in card for word in banned), card


def test_entanglement_and_loss_goes_down(seal_run, subject_dir):
    result = seal_run["result"]
    pipe, net = result["pipeline"], result["network"]
    latents, ehs = heldout_batch(pipe, subject_dir, PROMPT, resolution=32)  # the run's size
    sched = training_noise_scheduler(pipe)
    loss = {m: heldout_denoising_loss(pipe.unet, net, latents, ehs, m, seed=1, n_timesteps=4, noise_scheduler=sched)
            for m in ("C", "C_p", "identity", "off")}
    print("held-out denoising loss:", {k: round(v, 4) for k, v in loss.items()})
    # measured (30 steps at 32 px, lr 1e-2, rank 4, batch 2): C 0.839, C_p 0.836, identity 1.112, off 1.108
    gap = min(loss["identity"], loss["off"]) - max(loss["C"], loss["C_p"])
    assert gap > 0.15, loss
    assert abs(loss["C"] - loss["C_p"]) < 0.2 * gap, loss
    first, last = result["losses"][:10], result["losses"][-10:]
    assert sum(last) / 10 < sum(first) / 10 - 0.1


def test_existing_key_needs_force(subject_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{NAME}.sealkey").write_bytes(b"old key")
    rc = main(_args(subject_dir, out, "--max_train_steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{NAME}.sealkey" in err[0] and "--force" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [f"{NAME}.sealkey"]
    assert (out / f"{NAME}.sealkey").read_bytes() == b"old key"


@pytest.mark.parametrize("base", ["tiny", "tiny-xl"])
def test_resume_gives_the_same_factors(tiny_dir, subject_dir, tmp_path, base):
    common = ("--max_train_steps", "4", "--learning_rate", "1e-3", "--train_batch_size", "2", "--random_flip",
              "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--pretrained_model_name_or_path", base)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(subject_dir, a, *common, "--secret", SECRET)) == 0
    assert sorted(p.name for p in a.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    ckpt = a / "checkpoint-3"
    assert (ckpt / "seal_passports.safetensors").is_file()

    # an interrupted run: only checkpoint-3 exists (mid-epoch: 4 batches per epoch); resume without the secret
    b.mkdir()
    shutil.copytree(ckpt, b / "checkpoint-3")
    assert main(_args(subject_dir, b, *common, "--resume_from_checkpoint", "latest")) == 0
    ka, kb = SealKey.load(a / f"{NAME}.sealkey"), SealKey.load(b / f"{NAME}.sealkey")
    ta, tb = ka.tensors(), kb.tensors()
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert ka.commitment() == kb.commitment()
    first_a = SealKey.load(a / f"{NAME}.sealkey").modules
    assert any(not torch.equal(mk.lora_B, torch.zeros_like(mk.lora_B)) for mk in first_a.values())


def test_resume_with_wrong_secret_is_refused(tiny_dir, subject_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(subject_dir, out, "--max_train_steps", "1", "--checkpointing_steps", "1",
                      "--secret", SECRET, "--output_name", "first")) == 0
    capsys.readouterr()
    rc = main(_args(subject_dir, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest",
                    "--secret", "another secret"))
    assert rc == 2 and "--secret does not match" in capsys.readouterr().err


def test_plain_lora_split_free_public_files_only(tiny_dir, subject_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(subject_dir, data)
    (data / "notes.txt").write_text("not an image")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(data / "tiny.png")  # upscaled
    Image.new("RGB", (200, 100), (30, 200, 30)).save(data / "wide.jpg")  # resized + cropped
    out = tmp_path / "out"
    result = train(parse_args(_args(data, out, "--method", "lora", "--max_train_steps", "4",
                                    "--learning_rate", "1e-3", "--train_batch_size", "2")))
    err = capsys.readouterr().err
    assert "notes.txt" in err and "tiny.png" in err
    assert result["key_path"] is None and result["commitment"] is None
    assert not list(out.glob("*.sealkey"))
    assert (out / f"{NAME}.safetensors").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    net = result["network"]
    lora = read_lora(out / f"{NAME}.safetensors")
    for name, (a, b) in list(net.factors().items())[:4]:
        down, up = lora.by_module([name])[name]
        torch.testing.assert_close(up @ down, (net.alpha / net.rank) * b @ a, rtol=1e-5, atol=1e-7)


def test_split_schedule_prior_preservation_image_passport(tiny_dir, subject_dir, tmp_path):
    class_dir = tmp_path / "class"
    out = tmp_path / "out"
    logo = tmp_path / "logo.png"
    Image.fromarray((torch.rand(48, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(logo)
    rc = main(_args(subject_dir, out, "--max_train_steps", "2", "--train_batch_size", "3",
                    "--passport_schedule", "split", "--passport_source", f"image:{logo}",
                    "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a photo of cat",
                    "--num_class_images", "2", "--num_class_inference_steps", "2"))
    assert rc == 0
    assert len(list(class_dir.glob("*.png"))) == 2
    key = SealKey.load(out / f"{NAME}.sealkey")
    assert key.rank == 4 and key.passport_source == f"image:{logo}"
    passports = [mk.passport for mk in key.modules.values()]
    assert all(torch.equal(p, passports[0]) for p in passports)  # one frame: the same C everywhere


def _corrupt_dir(tmp_path: Path) -> Path:
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return d


@pytest.mark.parametrize(
    "case, make, extra, expect",
    [
        ("missing dir", lambda t: t / "nope", (), "folder not found"),
        ("empty dir", lambda t: (t / "empty").mkdir() or t / "empty", (), "no images found"),
        ("only text", lambda t: (t / "txt").mkdir() or (t / "txt" / "a.txt").write_text("x") and t / "txt", (),
         "no images found"),
        ("corrupt image", _corrupt_dir, (), "broken.png: not a readable image"),
        ("unknown base", None, ("--pretrained_model_name_or_path", "/no/such/model"), "/no/such/model"),
        ("negative steps", None, ("--max_train_steps", "-3"), "--max_train_steps -3"),
        ("rank 1 seal", None, ("--rank", "1"), "--rank 1"),
        ("rank 0", None, ("--rank", "0", "--method", "lora"), "--rank 0"),
        ("bad resolution", None, ("--resolution", "30"), "--resolution 30"),
        ("bad passport image", None, ("--passport_source", "image:/no/logo.png"), "--passport_source"),
        ("prior without class dir", None, ("--with_prior_preservation",), "--class_data_dir"),
        ("resume missing", None, ("--resume_from_checkpoint", "checkpoint-99"), "checkpoint-99"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, make, extra, expect, subject_dir, tmp_path, capsys):
    data = make(tmp_path) if make else subject_dir
    out = tmp_path / "out"
    rc = main(_args(data, out, "--max_train_steps", "1", *extra))
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if ": error: " in l]
    assert rc == 2, case
    assert len(errors) == 1 and expect in errors[0] and "Traceback" not in err, err
    assert not out.exists(), case


def test_debug_shows_the_traceback(subject_dir, tmp_path):
    with pytest.raises(UserError):
        main(_args(subject_dir, tmp_path / "out", "--max_train_steps", "0", "--debug"))


def test_script_help():
    proc = subprocess.run([sys.executable, str(REPO / "train_dreambooth_seal.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--instance_data_dir", "--pretrained_model_name_or_path", "--passport_schedule", "--resume_from_checkpoint"):
        assert flag in proc.stdout


@pytest.mark.parametrize("base", ["tiny", "tiny-xl"])
def test_two_cpu_processes_stay_in_lock_step(tiny_dir, subject_dir, tmp_path, base):
    """torchrun with 2 processes on CPU (gloo): the secret is broadcast, the run checks all processes agree."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # no --seed, no --secret: both are drawn on process 0 and broadcast
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "train_dreambooth_seal.py"),
           *_args(subject_dir, out, "--max_train_steps", "2", "--train_batch_size", "1", "--cache_latents",
                  "--pretrained_model_name_or_path", base, seed=False)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    assert proc.stdout.count("commitment") == 1  # only the main process reports and writes
    key = SealKey.load(out / f"{NAME}.sealkey")
    assert key.rank == 4 and key.architecture == ("sdxl_base_v1-0" if base == "tiny-xl" else "sd_v1")
