"""Issue 23: the options a diffusers user types (train_dreambooth_lora.py names) are accepted and do what diffusers
does where it applies; the training log has timestamps and the run starts with diffusers' "Running training" block."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import torch
from PIL import Image

from seal_diffusion.errors import UserError
from seal_diffusion.core.layer import SealLoRALayer
from seal_diffusion.training import compat, main, parse_args
from seal_diffusion.training.data import ImageSet

PROMPT = "a photo of sks cat"
DIFFUSERS_LINE = ["--lora_dropout", "0.1", "--pre_compute_text_embeddings", "--image_interpolation_mode", "bicubic",
                  "--tokenizer_max_length", "20", "--text_encoder_use_attention_mask", "--class_labels_conditioning",
                  "timesteps", "--prior_generation_precision", "bf16", "--lr_num_cycles", "3", "--lr_power", "2",
                  "--local_rank", "0", "--enable_xformers_memory_efficient_attention"]


def _base(data, out) -> list[str]:
    return ["--instance_data_dir", str(data), "--instance_prompt", PROMPT, "--output_dir", str(out), "--rank", "4",
            "--seed", "0"]


def test_a_diffusers_command_line_parses(subject_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = parse_args(_base(subject_dir, tmp_path / "o") + DIFFUSERS_LINE)
    assert (args.lora_dropout, args.image_interpolation_mode, args.tokenizer_max_length, args.lr_num_cycles,
            args.lr_power, args.local_rank, args.prior_generation_precision) == (0.1, "bicubic", 20, 3, 2.0, 0, "bf16")
    assert parse_args(_base(subject_dir, tmp_path / "o")).image_interpolation_mode == "lanczos"  # diffusers' default
    monkeypatch.setenv("LOCAL_RANK", "3")  # the launcher's environment wins, as in diffusers
    assert parse_args(_base(subject_dir, tmp_path / "o") + ["--local_rank", "0"]).local_rank == 3


@pytest.mark.parametrize("extra, needle", [
    (["--pre_compute_text_embeddings", "--train_text_encoder"], "cannot be used with --train_text_encoder"),
    (["--lora_dropout", "1.0"], "--lora_dropout 1.0"),
    (["--lr_num_cycles", "0"], "--lr_num_cycles 0"),
    (["--lr_power", "0"], "--lr_power 0"),
    (["--tokenizer_max_length", "1"], "--tokenizer_max_length 1"),
])
def test_nonsense_is_one_line(subject_dir, tmp_path, extra, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        parse_args(_base(subject_dir, tmp_path / "o") + extra)


def test_validation_images_must_be_images(subject_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(UserError, match="notes.txt: not a readable image"):
        parse_args(_base(subject_dir, tmp_path / "o") + ["--validation_images", str(notes)])


def test_lora_dropout_is_on_while_training_only():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    layer = SealLoRALayer("m", base, 4, 4.0, torch.eye(4), torch.eye(4), dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    plain = layer.lora_delta(x.clone()).detach()
    layer.eval()
    assert torch.equal(layer.lora_delta(x), layer.lora_delta(x))  # eval: deterministic
    layer.train()
    a, b = layer.lora_delta(x), layer.lora_delta(x)
    assert not torch.equal(a, b) and not torch.equal(a, plain)  # train: inputs dropped at random


def test_image_interpolation_mode_changes_the_resize(tmp_path):
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(96, 96, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    got = {}
    for mode in ("bilinear", "lanczos", "nearest"):
        args = parse_args(["--instance_data_dir", str(tmp_path), "--instance_prompt", PROMPT,
                           "--image_interpolation_mode", mode])
        im = ImageSet([tmp_path / "a.png"], 32, resample=compat.resample_filter(args)).image(0)
        got[mode] = torch.tensor(list(im.getdata()), dtype=torch.float32)
    assert im.size == (32, 32)
    assert (got["bilinear"] - got["lanczos"]).abs().mean() > 1.0
    assert (got["nearest"] - got["lanczos"]).abs().mean() > 1.0


def test_tokenizer_length_and_attention_mask_change_the_conditioning(tiny_pipe):
    args = parse_args(["--instance_data_dir", ".", "--instance_prompt", PROMPT, "--tokenizer_max_length", "20"])
    short = compat.encode_prompt_ids(tiny_pipe, PROMPT, "cpu", args).encoder_hidden_states
    assert short.shape[:2] == (1, 20)
    args.text_encoder_use_attention_mask = True
    masked = compat.encode_prompt_ids(tiny_pipe, PROMPT, "cpu", args).encoder_hidden_states
    assert masked.shape == short.shape and not torch.allclose(masked, short)


def test_prior_generation_precision():
    assert compat.prior_autocast(parse_args(["--instance_data_dir", ".", "--instance_prompt", "p"]), "cpu") is None
    ctx = compat.prior_autocast(parse_args(["--instance_data_dir", ".", "--instance_prompt", "p",
                                            "--prior_generation_precision", "bf16"]), "cpu")
    with ctx():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_a_diffusers_command_line_trains(subject_dir, tiny_pipe, tmp_path, capsys):
    """One short run with every option: the summary block, timestamps in the log, the polynomial schedule with
    --lr_power 2, a tokenizer from --tokenizer_name, the notes for options that change nothing here."""
    tiny_pipe.tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "v.png").write_bytes((subject_dir / sorted(p.name for p in subject_dir.iterdir())[0]).read_bytes())
    out = tmp_path / "o"
    steps, lr = 4, 1e-3
    rc = main(_base(subject_dir, out) + DIFFUSERS_LINE + [
        "--max_train_steps", str(steps), "--learning_rate", str(lr), "--lr_scheduler", "polynomial",
        "--train_batch_size", "1", "--cache_latents", "--center_crop", "--tokenizer_name", str(tmp_path / "tok"),
        "--validation_images", str(tmp_path / "v.png"), "--secret", "diffusers options"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "***** Running training *****" in err and f"Total optimization steps = {steps}" in err
    assert "--enable_xformers_memory_efficient_attention: changes nothing here" in err
    assert "--class_labels_conditioning timesteps: this UNet has no class embedding" in err
    assert "--validation_images: 1 image(s) checked but not used" in err
    rows = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    times = [datetime.fromisoformat(r["time"]) for r in rows]
    assert len(rows) == steps and times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    end = 1e-7  # diffusers' polynomial schedule: (lr - end)·(1 - t/T)^power + end
    expect = [(lr - end) * (1 - s / steps) ** 2 + end for s in range(1, steps + 1)]
    assert [r["lr"] for r in rows] == pytest.approx(expect, rel=1e-6)
