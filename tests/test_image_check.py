"""The check from generated images alone: the release is found in images it rendered (also after JPEG and
resizing) and in a distilled copy's; innocents are not accused; bad input is one clear error."""

import json
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from seal_diffusion.render import generate
from seal_diffusion.errors import UserError
from seal_diffusion.image_challenge import Challenge
from seal_diffusion.image_check import create_challenge, reference_path, verify_images
from seal_diffusion.image_sampler import use_scheduler
from seal_diffusion.verify import sign_flip_neg_log10_p

N, SIZE, STEPS = 12, 32, 4  # small and fast; the CLI defaults are 32 images at the model's size, 10 steps


def _render(pipe, ch: Challenge, folder, names="img_{:03d}.png"):
    use_scheduler(pipe, ch.scheduler)
    images = generate(pipe, list(zip(ch.prompts, ch.seeds)), steps=ch.steps, guidance_scale=ch.guidance_scale,
                      height=ch.height, width=ch.width, batch_size=N)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / names.format(i))
        Image.fromarray((im * 255).round().astype("uint8")).save(paths[-1])
    return paths


def _with_lora(pipe, path, ch, folder):
    pipe.load_lora_weights(str(path), adapter_name=folder.name)
    try:
        return _render(pipe, ch, folder)
    finally:
        pipe.unload_lora_weights()


@pytest.fixture(scope="module")
def setup(owner_training, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    key = shutil.copyfile(owner_training["key_path"], tmp / "cat.sealkey")
    pipe = owner_training["pipeline"]
    ch = create_challenge(key, tmp / "challenge.json", base="tiny", prompt="a photo of sks cat", n=N, steps=STEPS,
                          size=SIZE, pipe=pipe)
    release = _with_lora(pipe, owner_training["diffusers_path"], ch, tmp / "release")
    s = dict(tmp=tmp, key=key, pipe=pipe, ch=ch, challenge=tmp / "challenge.json", release=release)
    s["report"] = _check(s, release)
    return s


def _check(s, images, **kw):
    return verify_images(s["key"], s["challenge"], images, pipe=s["pipe"], **kw)


def test_release_detected_from_its_images_even_after_jpeg_and_resize(setup):
    ref = reference_path(setup["key"], setup["ch"])
    assert stat.S_IMODE(ref.stat().st_mode) == 0o600  # private, beside the key
    assert "x_mid" not in setup["challenge"].read_text()
    report = setup["report"]
    assert report.detected, report.summary()
    for scale in (0.9, 1.1):
        out = []
        for p in setup["release"]:
            im = Image.open(p).resize((round(SIZE * scale),) * 2, Image.Resampling.BICUBIC)
            out.append(setup["tmp"] / f"jpeg{scale}" / (p.stem + ".jpg"))
            out[-1].parent.mkdir(exist_ok=True)
            im.save(out[-1], "JPEG", quality=75)
        degraded = _check(setup, out)
        assert degraded.detected, degraded.summary()


def test_decoy_keys_see_uniform_p_values(setup):
    """A key whose release coins were drawn otherwise is an innocent's key: x_mid is the same (M is symmetric) and
    every direction flips with its coin, so its statistics are the release's times random signs."""
    d = np.array([m["stat"] for m in setup["report"].per_module])
    rng = np.random.default_rng(0)
    p = np.array([10 ** -sign_flip_neg_log10_p(list(d * rng.choice([-1, 1], d.size))) for _ in range(300)])
    assert (p < 5e-4).sum() <= 2 and 0.01 <= (p < 0.05).mean() <= 0.10 and 0.4 <= (p < 0.5).mean() <= 0.6


def test_innocents_not_accused(setup, subject_dir):
    from seal_diffusion.training import parse_args, train

    base = _render(setup["pipe"], setup["ch"], setup["tmp"] / "base")
    assert not _check(setup, base).detected
    plain_dir = setup["tmp"] / "plain"
    args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(subject_dir),
                       "--instance_prompt", "a photo of sks cat", "--output_dir", str(plain_dir), "--output_name",
                       "plain", "--method", "lora", "--rank", "4", "--max_train_steps", "30", "--learning_rate",
                       "2e-3", "--seed", "0", "--cache_latents", "--resolution", "32"])
    result = train(args)
    result["network"].remove()
    plain = _with_lora(setup["pipe"], plain_dir, setup["ch"], setup["tmp"] / "plain_images")
    report = _check(setup, plain)
    assert not report.detected, report.summary()


def test_distilled_copy_detected(setup):
    """A thief's copy: a fresh plain LoRA trained to match the release's noise predictions on random inputs."""
    from seal_diffusion.base_model import load_pipeline
    from seal_diffusion.network import network_from_key
    from seal_diffusion.fold import fold
    from seal_diffusion.keyfile import SealKey
    from seal_diffusion.lora_file import write_lora
    from seal_diffusion.network import SealNetwork

    torch.manual_seed(0)
    teacher = setup["pipe"]
    tnet = network_from_key(SealKey.load(setup["key"]), teacher)
    student = load_pipeline("tiny")
    snet = SealNetwork(student.unet, 4, passports=None)
    prompts = ["a photo of sks cat", "sks cat on a beach", "a photo of a dog", "a landscape", "a red car", ""]
    try:
        with torch.no_grad():
            embeds = torch.cat([teacher.encode_prompt(p, "cpu", 1, False)[0] for p in prompts])
        opt = torch.optim.Adam(snet.trainable_parameters(), lr=3e-3)
        for _ in range(300):
            x, t = torch.randn(4, 4, 8, 8), torch.randint(50, 950, (4,))
            e = embeds[torch.randint(0, len(prompts), (4,))]
            with torch.no_grad():
                target = teacher.unet(x, t, encoder_hidden_states=e).sample
            loss = torch.nn.functional.mse_loss(student.unet(x, t, encoder_hidden_states=e).sample, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        tnet.remove()
    public = {m: fold(a, b, None, snet.alpha / snet.rank) for m, (a, b) in snet.factors().items()}
    copy_dir = write_lora(public, setup["tmp"] / "distilled", "diffusers", "copy").parent
    images = _with_lora(setup["pipe"], copy_dir, setup["ch"], setup["tmp"] / "distilled_images")
    report = _check(setup, images)
    assert report.detected, report.summary()


def test_bad_input_is_one_clear_error(setup, tmp_path):
    release = setup["release"]
    unnamed = [shutil.copyfile(p, tmp_path / f"x{chr(97 + i)}.png") for i, p in enumerate(release[:3])]
    with pytest.raises(UserError, match="3 images given, the challenge has"):
        _check(setup, unnamed)
    broken = tmp_path / "img_000.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(UserError, match="not a readable image"):
        _check(setup, [broken] + release[1:])
    data = json.loads(setup["challenge"].read_text())
    data["key_commitment"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(UserError, match="another key"):
        verify_images(setup["key"], other, release, pipe=setup["pipe"])
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(UserError, match="not a readable JSON challenge"):
        verify_images(setup["key"], tmp_path / "junk.json", release, pipe=setup["pipe"])


def test_cli_exit_codes(setup, tmp_path):
    from seal_diffusion.cli import main

    assert main(["verify-images", "--key", str(setup["key"]), "--challenge", str(tmp_path / "none.json"),
                 str(setup["release"][0])]) == 2


def test_app_tab_gives_the_verdict_in_plain_words(setup, tmp_path):
    import gradio as gr

    from ui.app import Workspace
    from ui.image_check import _handlers

    ws = Workspace()
    try:
        make, check = _handlers(ws, "tiny")
        text = check(str(setup["key"]), str(setup["challenge"]), [str(p) for p in setup["release"]], "", 3.3)
        assert "made with your LoRA" in text
        with pytest.raises(UserError, match="Upload the challenge"):
            check(str(setup["key"]), None, [str(p) for p in setup["release"]])
        assert isinstance(gr.Markdown(text), gr.Markdown)
    finally:
        ws.cleanup()
