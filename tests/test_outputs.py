"""What a newcomer runs into (issue 14): no silent replacing, readable public files, kohya metadata, a model card
that loads, one-line errors for impossible paths, unreadable images skipped. Reuses the session's owner training."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save as st_save

from seal_diffusion.attacks import file_attacks as attacks
from seal_diffusion.cli import main as cli_main
from seal_diffusion.errors import UserError
from seal_diffusion.fileio import load_safetensors, public_mode
from seal_diffusion.attacks.finetune import finetune_lora
from seal_diffusion.formats.lora_file import read_lora
from seal_diffusion.training import main as train_main
from seal_diffusion.training import parse_args
from seal_diffusion.training.data import ImageSet

NEW_FIELDS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.date", "modelspec.resolution",
              "modelspec.prediction_type", "modelspec.implementation", "ss_resolution", "ss_num_train_images",
              "ss_training_started_at", "ss_training_finished_at", "ss_tag_frequency", "ss_sd_model_name",
              "ss_unet_lr")


def _owner_files(owner_training) -> dict[str, Path]:
    out = Path(owner_training["output_dir"])
    return {"kohya": Path(owner_training["lora_path"]), "diffusers": Path(owner_training["diffusers_path"]),
            "card": Path(owner_training["model_card"]), "key": Path(owner_training["key_path"]), "out": out}


def _kohya_hashes_from_scratch(path: Path) -> tuple[str, str]:
    """Our own reading of kohya's precalculate_safetensors_hashes: re-serialise with the ss_* metadata only, hash
    the bytes after the header (model) and the 64 KiB at 1 MiB (legacy, 8 hex digits)."""
    tensors, meta = load_safetensors(path)
    data = st_save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_second_run_into_the_same_folder_needs_force(owner_training, subject_dir, capsys):
    files = _owner_files(owner_training)
    before = {k: p.read_bytes() for k, p in files.items() if k != "out"}
    rc = train_main(["--instance_data_dir", str(subject_dir), "--instance_prompt", "a photo of sks cat",
                     "--output_dir", str(files["out"]), "--output_name", "astro2", "--rank", "4",
                     "--max_train_steps", "1"])
    err = [l for l in capsys.readouterr().err.splitlines() if ": error: " in l]
    assert rc == 2 and len(err) == 1, err
    assert "pytorch_lora_weights.safetensors" in err[0] and "README.md" in err[0] and "--force" in err[0]
    assert {k: p.read_bytes() for k, p in files.items() if k != "out"} == before
    assert not (files["out"] / "astro2.safetensors").exists()
    # one flag name everywhere: --force, with --overwrite accepted as its alias
    base = ["--instance_data_dir", "x", "--instance_prompt", "p"]
    assert parse_args(base + ["--overwrite"]).force and parse_args(base + ["--force"]).force


def test_public_files_follow_the_umask_and_the_key_stays_private(owner_training):
    files = _owner_files(owner_training)
    assert public_mode() == 0o666 & ~_umask()
    for k in ("kohya", "diffusers", "card"):
        assert stat.S_IMODE(files[k].stat().st_mode) == public_mode(), k
    assert stat.S_IMODE(files["key"].stat().st_mode) == 0o600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_kohya_metadata_is_complete_computed_as_kohya_and_leaks_nothing(owner_training, subject_dir):
    files = _owner_files(owner_training)
    meta = read_lora(files["kohya"]).metadata
    missing = [f for f in NEW_FIELDS if f not in meta]
    assert not missing, missing
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.implementation"] == "diffusers"
    assert meta["ss_resolution"] == "(32, 32)" and meta["modelspec.resolution"] == "32x32"  # the fixture trains at 32
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["ss_num_train_images"] == "8"
    # the trigger word on its own too: A1111 suggests a LoRA's most frequent tags
    assert json.loads(meta["ss_tag_frequency"]) == {"instance": {"a photo of sks cat": 8, "sks": 8}}
    assert meta["ss_sd_model_name"] == "tiny" and float(meta["ss_unet_lr"]) == 2e-3
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert 0 < finished - started < 3600
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _kohya_hashes_from_scratch(files["kohya"])
    # A1111 hashes the file on disk: the bytes after the header are the same tensors
    raw = files["kohya"].read_bytes()
    assert hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest() == meta["sshs_model_hash"]
    text = json.dumps(meta).lower()
    for banned in ("seal", "passport", "secret", "seed", "claim test", str(files["out"]).lower(),
                   str(subject_dir).lower(), "/tmp", os.path.expanduser("~").lower() + "/"):
        assert banned not in text, banned
    # an attacked copy saved with the old metadata gets its own, correct hashes
    pruned = attacks.prune(read_lora(files["kohya"]), 0.5).save(files["out"].parent / "pruned-meta.safetensors")
    pm = read_lora(pruned).metadata
    assert pm["sshs_model_hash"] != meta["sshs_model_hash"]
    assert (pm["sshs_model_hash"], pm["sshs_legacy_hash"]) == _kohya_hashes_from_scratch(pruned)


def test_model_card_snippet_runs_in_plain_diffusers(owner_training, tmp_path, monkeypatch):
    card = _owner_files(owner_training)["card"].read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "from_pretrained(\"tiny\")" not in code and "tiny-model --out tiny-model" in code
    monkeypatch.chdir(tmp_path)
    assert cli_main(["tiny-model", "--out", "tiny-model"]) == 0  # the command the card names
    code = code.replace("path/to/this/folder", str(_owner_files(owner_training)["out"]))
    code = code.replace("num_inference_steps=25", "num_inference_steps=2")  # loading is what is tested
    scope: dict = {}
    exec(compile(code, "model card", "exec"), scope)  # noqa: S102 - our own generated snippet
    assert scope["image"].size == (64, 64)
    assert len(scope["pipe"].get_active_adapters()) == 1


def test_finetune_attack_writes_fresh_hashes_and_warns_about_nothing_asked(owner_training, subject_dir, tmp_path,
                                                                          capsys):
    out = finetune_lora(owner_training["lora_path"], tmp_path / "ft.safetensors", data=subject_dir, steps=1)
    err = capsys.readouterr().err
    assert "--cache_latents" not in err, err
    meta = read_lora(out).metadata
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _kohya_hashes_from_scratch(out)


def test_impossible_paths_and_wrong_flags_are_one_line(owner_training, tmp_path, capsys):
    key = owner_training["key_path"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["export", "--key", key, "--format", "kohya", "--out", str(tmp_path)], "is a folder"),
        (["export", "--key", key, "--format", "kohya", "--out", str(a_file / "x.safetensors")], str(a_file)),
        (["export", "--key", str(tmp_path), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")],
         ".sealkey"),
        (["tiny-model", "--out", str(a_file / "tiny")], str(a_file)),
        (["verify", "--key", key, owner_training["lora_path"], "--json", str(a_file / "r.json")], str(a_file)),
        (["attack", "prune", owner_training["lora_path"], str(a_file / "p.safetensors")], str(a_file)),
        (["export", "--key", key, "--format", "kohya", "--out", owner_training["lora_path"]], "--force"),
        (["train", "--instance_data_dir", str(tmp_path), "--instance_prompt", "p", "--output_dir",
          str(a_file / "out")], "is a file"),  # found before any training
    ]
    for argv, needle in cases:
        rc = cli_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], (argv, err)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit: usage named after the command run
        cli_main(["train", "--instance_prompt", "p"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("seal-diffusion train: error:")
    out = tmp_path / "again.safetensors"
    for flag in ("--force", "--overwrite"):  # one name, one alias
        assert cli_main(["export", "--key", key, "--format", "kohya", "--out", str(out), flag]) == 0
    with pytest.raises(UserError):  # --debug after the subcommand shows the traceback
        cli_main(["export", "--key", str(tmp_path), "--format", "kohya", "--out", str(out), "--debug"])


def test_verify_merged_single_file_takes_the_config_from_base(owner_training, tmp_path, capsys):
    model = attacks.merge_into_checkpoint(owner_training["lora_path"], "tiny", tmp_path / "merged.safetensors")
    assert cli_main(["verify", "--key", owner_training["key_path"], str(model), "--base", "tiny"]) == 0
    assert "DETECTED" in capsys.readouterr().out.upper()


def test_unreadable_images_are_skipped_with_one_warning(subject_dir, tmp_path):
    files = sorted(subject_dir.iterdir())[:3]
    jpeg = tmp_path / "truncated.jpg"
    Image.open(files[0]).convert("RGB").resize((256, 256)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:400])  # a download cut short
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 64)
    warnings: list[str] = []
    images = ImageSet([*files, jpeg, garbage], 64, warnings.append, "--instance_data_dir D")
    assert len(images) == 3 and images.files == files
    assert len(warnings) == 1 and "truncated.jpg" in warnings[0] and "garbage.png" in warnings[0], warnings
    with pytest.raises(UserError, match="no readable image left.*truncated.jpg"):
        ImageSet([jpeg, garbage], 64, warnings.append, "--instance_data_dir D")


def test_diffusers_script_flags(tiny_pipe, subject_dir, tmp_path, monkeypatch):
    """--num_train_epochs, --scale_lr, --logging_dir, --validation_epochs, --allow_tf32, --variant and --push_to_hub
    (public files only) in one short plain-LoRA run."""
    from seal_diffusion.training import loop, train

    base = tmp_path / "base-fp16"
    tiny_pipe.save_pretrained(base, variant="fp16")  # only *.fp16.* weight files: loads with --variant fp16 alone
    pushed = []
    monkeypatch.setattr(loop, "push_public_files", lambda paths, repo, token=None: pushed.append((paths, repo)) or
                        f"https://huggingface.co/{repo}")
    out = tmp_path / "out"
    result = train(parse_args([
        "--pretrained_model_name_or_path", str(base), "--variant", "fp16", "--instance_data_dir", str(subject_dir),
        "--instance_prompt", "a photo of sks cat", "--output_dir", str(out), "--method", "lora", "--rank", "2",
        "--num_train_epochs", "2", "--train_batch_size", "8", "--learning_rate", "1e-3", "--scale_lr",
        "--logging_dir", "my-logs", "--validation_prompt", "a photo of sks cat", "--validation_epochs", "1",
        "--num_validation_images", "1", "--validation_inference_steps", "1", "--allow_tf32", "--seed", "0",
        "--cache_latents", "--center_crop", "--push_to_hub", "--hub_model_id", "me/astro"]))
    assert result["steps"] == 2  # 8 images, batch 8, two epochs
    log = [json.loads(l) for l in (out / "my-logs" / "train_log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log] == [1, 2] and log[0]["lr"] == pytest.approx(8e-3)
    assert [Path(p).name for p in result["validation_images"]] == ["epoch-0001-00.png", "final-00.png"]
    assert pushed == [([result["lora_path"], result["diffusers_path"], result["model_card"]], "me/astro")]
    assert result["hub_url"] == "https://huggingface.co/me/astro"


def test_hub_upload_refuses_private_files_and_flags_fail_clearly(tmp_path):
    import importlib.util

    from seal_diffusion.training.hub import push_public_files

    class FakeApi:
        def __init__(self):
            self.files = []

        def create_repo(self, repo_id, exist_ok):
            return f"https://huggingface.co/{repo_id}"

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id):
            self.files.append(path_in_repo)

    api = FakeApi()
    assert push_public_files([tmp_path / "a.safetensors", tmp_path / "README.md"], "me/a", api=api).endswith("me/a")
    assert api.files == ["a.safetensors", "README.md"]
    with pytest.raises(ValueError):
        push_public_files([tmp_path / "a.sealkey"], "me/a", api=FakeApi())
    base = ["--instance_data_dir", "x", "--instance_prompt", "p"]
    assert parse_args(base + ["--train_text_encoder"]).train_text_encoder  # supported now (tests/test_text_encoder.py)
    with pytest.raises(UserError, match="--text_encoder_lr: only with --train_text_encoder"):
        parse_args(base + ["--text_encoder_lr", "1e-4"])
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(UserError, match="bitsandbytes"):
            parse_args(base + ["--use_8bit_adam"])
    else:
        assert parse_args(base + ["--use_8bit_adam"]).use_8bit_adam
    assert parse_args(base).max_train_steps == 300
    assert parse_args(base + ["--num_train_epochs", "2"]).max_train_steps is None  # set from the data at train time


def test_kohya_implementation_field_follows_the_family_as_kohya_writes_it(tmp_path):
    """kohya's sai_model_spec: SDXL LoRAs name Stability AI's generative-models, SD 1.x LoRAs "diffusers"."""
    import torch

    from seal_diffusion.formats.lora_file import write_lora
    from seal_diffusion.formats.lora_names import SD_V1, SDXL

    factors = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (torch.ones(2, 8), torch.ones(8, 2))}
    found = {arch: read_lora(write_lora(factors, tmp_path / f"{arch}.safetensors", "kohya", architecture=arch))
             .metadata["modelspec.implementation"] for arch in (SD_V1, SDXL)}
    assert found == {SD_V1: "diffusers", SDXL: "https://github.com/Stability-AI/generative-models"}


@pytest.mark.parametrize("prompt, class_prompt, word", [
    ("a photo of sks cat", None, "sks"), ("sks dog", None, "sks"), ("a painting in ohwx style", None, "ohwx"),
    ("a photo of zwx person", "a photo of person", "zwx"), ("portrait of tok, oil", "portrait of oil", "tok")])
def test_trigger_word_of_a_dreambooth_prompt(prompt, class_prompt, word):
    from seal_diffusion.formats.kohya_meta import training_metadata, trigger_word

    assert trigger_word(prompt, class_prompt) == word
    prompts = {"instance": (prompt, 3), **({"class": (class_prompt, 5)} if class_prompt else {})}
    tags = json.loads(training_metadata(resolution=64, num_images=3, prompts=prompts, started_at=0.0)["ss_tag_frequency"])
    assert tags["instance"][word] == 3 and word not in tags.get("class", {})
