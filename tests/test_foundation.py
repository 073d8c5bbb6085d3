"""Foundation: the embedded tiny model, base-model loading, the bundled subject, prompts, the CLI skeleton."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seal_diffusion.models import tiny
from seal_diffusion.models.base_model import load_pipeline, resolve_base
from seal_diffusion.cli import main as cli_main
from seal_diffusion.errors import UserError
from seal_diffusion.core.network import find_target_modules
from seal_diffusion.models.subject import load_prompts, subject_images


def _weights_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def test_tiny_model_is_reproducible_and_loads_offline(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(["tiny-model", "--out", str(a)]) == 0
    assert cli_main(["tiny-model", "--out", str(b)]) == 0
    da, db = _weights_digest(a), _weights_digest(b)
    assert set(da) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                       "text_encoder/model.safetensors"}
    assert da == db, "two builds of the embedded default must give identical weights"

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(a, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    arr = torch.tensor(list(image.getdata()), dtype=torch.float32)
    assert arr.std() > 0, "the generated image should not be constant"


def test_tiny_has_sd15_module_names():
    sd15 = set(find_target_modules(tiny.build_sd15_unet()))
    assert len(sd15) == 128
    pipe = tiny.build_tiny_pipeline()
    names = set(find_target_modules(pipe.unet))
    assert len(names) == 48
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert names <= sd15, "every tiny module path must exist in SD 1.5"
    assert all(".add_k_proj" not in n and ".add_v_proj" not in n for n in sd15)


def test_added_kv_unet_has_add_projections():
    names = find_target_modules(tiny.build_added_kv_unet())
    assert sum(n.endswith(("add_k_proj", "add_v_proj")) for n in names) == 8


def test_sd15_unet_real_build_shapes():
    unet = tiny.build_sd15_unet()  # meta: names and shapes only
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.shape == (320, 768)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(859.5e6, rel=1e-3)


def test_tiny_cache_is_used(tiny_dir, monkeypatch):
    assert (tiny_dir / "model_index.json").is_file()
    called = []
    monkeypatch.setattr(tiny, "write_tiny_model", lambda out: called.append(out))
    assert tiny.tiny_model_dir() == tiny_dir
    assert not called, "a cached model must not be rebuilt"


# -- loader -----------------------------------------------------------------------------------------------------------
def test_load_tiny_and_folder(tiny_dir):
    assert resolve_base("tiny").kind == "tiny"
    assert resolve_base(str(tiny_dir)).kind == "folder"
    pipe = load_pipeline(str(tiny_dir))
    ref = load_pipeline("tiny")
    for k, v in ref.unet.state_dict().items():
        assert torch.equal(v, pipe.unet.state_dict()[k])


def test_load_hub_id_from_local_cache(tiny_dir, tmp_path):
    """A hub id resolves through huggingface_hub's cache (offline); only the download boundary is absent."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd15"
    shutil.copytree(tiny_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    assert resolve_base("someone/tiny-sd15").kind == "hub"
    pipe = load_pipeline("someone/tiny-sd15", cache_dir=tmp_path / "hub")
    assert len(find_target_modules(pipe.unet)) == 48
    with pytest.raises(UserError, match="could not load the base model"):
        load_pipeline("someone/not-cached", cache_dir=tmp_path / "hub")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match="pickle checkpoint") as err:
        resolve_base(str(path))
    assert str(path) in str(err.value) and "--allow_pickle" in str(err.value)
    assert resolve_base(str(path), allow_pickle=True).kind == "single_file"


@pytest.mark.parametrize(
    "source, message",
    [
        ("does/not/exist/model", "no such file or folder"),
        ("./missing-folder", "no such file or folder"),
        ("", "empty name"),
    ],
)
def test_nonsense_sources(source, message):
    with pytest.raises(UserError, match=message):
        resolve_base(source)


def test_folder_without_model_index_and_odd_file(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        resolve_base(str(tmp_path))
    odd = tmp_path / "model.onnx"
    odd.write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        resolve_base(str(odd))


def test_garbage_single_file_is_one_clear_error(tmp_path, tiny_dir):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="could not load the base model"):
        load_pipeline(str(bad), config=tiny_dir)


# -- subject and prompts --------------------------------------------------------------------------------------------
def test_bundled_subject_and_prompts():
    images = subject_images(64)
    assert len(images) == 8 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    assert images[0].transpose(0).tobytes() == images[1].tobytes(), "odd images are mirrors of even ones"
    assert subject_images(64)[3].tobytes() == images[3].tobytes(), "deterministic"
    for kind in ("objects", "live_subjects"):
        prompts = load_prompts(kind)
        assert len(prompts) == 25 and all("sks cat" in p for p in prompts)
    assert "a sks cat wearing a santa hat" in load_prompts("live_subjects")


# -- CLI skeleton -----------------------------------------------------------------------------------------------------
def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "seal_diffusion.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("tiny-model", "train", "export", "commitment"):
        assert command in out.stdout


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["export", "--key", str(tmp_path / "nope.sealkey"), "--format", "kohya",
                     "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.sealkey" in err[0] and "not found" in err[0]
    with pytest.raises(SystemExit) as exc:
        cli_main(["export", "--format", "png"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_load_single_file_checkpoint_made_from_tiny(tiny_dir, tmp_path):
    from seal_diffusion.formats.checkpoint import save_single_file

    ref = load_pipeline("tiny")
    ckpt = save_single_file(ref, tmp_path / "tiny-sd15.safetensors")
    assert resolve_base(str(ckpt)).kind == "single_file"
    pipe = load_pipeline(str(ckpt), config=tiny_dir)
    for k, v in ref.unet.state_dict().items():
        assert torch.equal(v, pipe.unet.state_dict()[k])
    with pytest.raises(UserError, match="--config"):
        load_pipeline(str(ckpt), config=tmp_path)


def test_cli_train_passes_everything_to_the_trainer(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--help"])
    assert exc.value.code == 0 and "--instance_data_dir" in capsys.readouterr().out
    assert cli_main(["train", "--instance_data_dir", "/does/not/exist", "--instance_prompt", "x"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
