"""The check from generated images alone, with the shipped defaults: the release is found in images it rendered (also
after JPEG and resizing) on three subjects and in a distilled copy's; innocents (plain LoRA of the same subject and
seed, SEAL under another key, the base) are not accused; challenges draw private prompts; bad input is one clear
error; ``challenge --out`` is checked first and a failed challenge leaves nothing behind."""

import json
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from seal_diffusion.evaluation.render import generate
from seal_diffusion.errors import UserError
from seal_diffusion.detection.image_challenge import DEFAULT_N, DEFAULT_STEPS, Challenge, challenge_prompts, make_challenge
from seal_diffusion.detection.image_check import create_challenge, reference_path, verify_images
from seal_diffusion.detection.image_sampler import challenge_scheduler
from seal_diffusion.detection.verify import sign_flip_neg_log10_p
from small_owner import fixed_scrypt_salt

SEEDS = [int(x) for x in np.random.default_rng(22).integers(0, 2 ** 31, DEFAULT_N)]  # seeded challenges


N, SIZE, STEPS = DEFAULT_N, 32, DEFAULT_STEPS  # the shipped defaults on tiny (size: half the native 64 px)


def _render(pipe, ch: Challenge, folder, names="img_{:03d}.png"):
    with challenge_scheduler(pipe, ch.scheduler):  # the shared pipeline keeps its scheduler (test_claim renders too)
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
    ch = create_challenge(key, tmp / "challenge.json", base="tiny", prompt="a photo of sks cat", pipe=pipe, seeds=SEEDS)
    assert (ch.n, ch.width, ch.steps) == (N, SIZE, STEPS)
    release = _with_lora(pipe, owner_training["diffusers_path"], ch, tmp / "release")
    s = dict(tmp=tmp, key=key, pipe=pipe, ch=ch, challenge=tmp / "challenge.json", release=release,
             self_test=ch.self_test)
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
    # the self-test (the owner's own render of the release, done by `challenge`) is what a diffusers service scores
    assert report.self_test == pytest.approx(setup["self_test"], abs=1e-3)
    assert abs(report.neg_log10_p - report.self_test) < 0.5, report.summary()
    assert "your own release scores" in report.summary()
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
    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.core.network import network_from_key
    from seal_diffusion.core.fold import fold
    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.formats.lora_file import write_lora
    from seal_diffusion.core.network import SealNetwork

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
    with pytest.raises(UserError, match="img_000.png: not an image"):
        _check(setup, [broken] + release[1:])
    notes = tmp_path / "notes.txt"  # no entry number, not an image: named as such (not "1 images given")
    notes.write_text("my notes")
    with pytest.raises(UserError, match=r"notes.txt: not an image \(PNG, JPEG or WebP expected\)$"):
        _check(setup, [notes])
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


def _train(subject_dir, out, prompt, *extra):
    from seal_diffusion.training import parse_args, train

    args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(subject_dir),
                       "--instance_prompt", prompt, "--output_dir", str(out), "--output_name", "run", "--rank", "4",
                       "--max_train_steps", "60", "--learning_rate", "2e-3", "--seed", "0", "--cache_latents",
                       "--resolution", "32", *extra])
    with fixed_scrypt_salt():
        train(args)["network"].remove()
    return out


@pytest.mark.slow  # trains another key: opt-in (`pytest -m slow`)
def test_other_key_seal_of_the_same_subject_not_accused(setup, subject_dir):
    other = _train(subject_dir, setup["tmp"] / "otherkey", "a photo of sks cat", "--secret", "someone else's key")
    report = _check(setup, _with_lora(setup["pipe"], other, setup["ch"], setup["tmp"] / "otherkey_images"))
    assert not report.detected, report.summary()


@pytest.mark.slow  # trains two LoRAs per subject: opt-in (`pytest -m slow`)
@pytest.mark.parametrize("photo", ["coffee", "astronaut"])
def test_defaults_detect_the_release_on_other_subjects(setup, photo, tmp_path):
    """Two subjects that are not the bundled cat (scikit-image photos, 8 crops each), trained like the cat: the
    challenge with the shipped defaults detects each release (self-test = the owner's own render, which equals a
    diffusers service's to 1/255 as the cat test checks) and does not accuse that subject's plain LoRA."""
    from seal_diffusion.models.subject import PHOTO_SUBJECTS, write_photo_subject

    data = write_photo_subject(tmp_path / "data", photo)
    prompt = PHOTO_SUBJECTS[photo]
    release = _train(data, tmp_path / "release", prompt, "--secret", f"owner of the {photo} subject")
    key = next(release.glob("*.sealkey"))
    ch = create_challenge(key, tmp_path / "challenge.json", base="tiny", prompt=prompt, pipe=setup["pipe"],
                          seeds=SEEDS)
    assert ch.self_test >= 3.3, f"{photo}: release scores {ch.self_test:.2f} with the defaults"
    plain = _train(data, tmp_path / "plain", prompt, "--method", "lora")
    images = _with_lora(setup["pipe"], plain, ch, tmp_path / "plain_images")
    report = verify_images(key, tmp_path / "challenge.json", images, pipe=setup["pipe"])
    assert not report.detected, report.summary()


def test_per_image_terms_are_each_images_own_derivative_named_by_module(owner_training):
    """D[i, l] from one backward pass per batch equals image i's central finite difference along module l's line
    M_l + t·D_l (the module named l in the report, whatever order the network keeps its layers in)."""
    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.detection.image_sampler import PassportLine, directional_statistics, sample, \
        to_compare_space
    from seal_diffusion.formats.lora_names import unet_modules

    key, pipe = SealKey.load(owner_training["key_path"]), owner_training["pipeline"]
    ch = make_challenge(key, "tiny", "a photo of sks cat", n=3, steps=2, compare_size=16, seeds=[5, 6, 7])
    r = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    per_image = directional_statistics(pipe, key, ch, r, [0, 1, 2], batch_size=2)  # one batch of 2, one of 1
    assert per_image.shape == (3, 48)
    names, h = unet_modules(key.modules), 1e-2
    with PassportLine(pipe, key) as line, torch.no_grad():
        for j in (0, 17, 47):
            x = []
            for sign in (1, -1):
                line.set(torch.zeros(len(names)))
                line.net[names[j]].interp_t = sign * h  # the layer itself, by the name the report gives it
                x.append(to_compare_space(sample(pipe, ch, [0, 1, 2]), 16).double())
            fd = ((x[0] - x[1]) / (2 * h) * r.double()).flatten(1).sum(1).numpy()
            assert np.allclose(per_image[:, j], fd, rtol=0.05, atol=0.02 * np.abs(per_image).max()), (names[j], fd)


def test_unit_votes_flip_with_the_coins_alone():
    """The combined statistic is exact: flipping module l's coin flips d_l and nothing else (each image's norm over
    the modules does not see the coins), and every image's vote has length 1."""
    from seal_diffusion.detection.image_check import module_statistics

    rng = np.random.default_rng(0)
    per_image = rng.standard_normal((32, 48)) * rng.uniform(0.01, 100, (32, 1))  # images of very unequal weight
    coins = rng.choice([-1.0, 1.0], 48)
    assert np.allclose(module_statistics(per_image * coins), module_statistics(per_image) * coins)
    assert np.allclose(np.linalg.norm(module_statistics(per_image[:1])), 1.0)
    assert np.allclose(module_statistics(np.zeros((2, 48))), 0.0)  # an image with no residual votes 0
    assert module_statistics(np.stack([per_image, -per_image])).shape == (2, 48)


def test_challenge_prompts_are_private_per_challenge_and_ordinary(owner_training):
    """Prompts come from the owner's secret and the challenge's seeds: reproducible by the owner, different for another
    challenge or another key, mostly about the subject, and not a fixed list a service could match."""
    from seal_diffusion.core.keyfile import SealKey

    key = SealKey.load(owner_training["key_path"])
    seeds = list(range(100, 132))
    a = challenge_prompts(key, "a photo of sks cat", seeds)
    assert a == challenge_prompts(key, "a photo of sks cat", seeds)
    b = challenge_prompts(key, "a photo of sks cat", list(range(200, 232)))
    assert sum(x == y for x, y in zip(a, b)) <= 2 and len(set(a)) >= 28
    other = SealKey.load(owner_training["key_path"])
    for m in other.modules.values():  # another key: other passports
        m.passport, m.passport_p = m.passport_p * 1.5, m.passport * 0.5
    assert challenge_prompts(other, "a photo of sks cat", seeds) != a
    assert 20 <= sum("sks cat" in p for p in a) <= 28  # three quarters about the subject
    assert not any("seal" in p.lower() or "challenge" in p.lower() for p in a)
    ch = make_challenge(key, "tiny", "a photo of sks cat", seeds=seeds)
    assert ch.prompts == a and ch.seeds == seeds


def test_challenge_out_checked_first_and_failure_leaves_nothing(setup, tmp_path, monkeypatch, capsys):
    from seal_diffusion.cli import main

    key = shutil.copyfile(setup["key"], tmp_path / "k.sealkey")
    existing = tmp_path / "challenge.json"
    existing.write_text("{}")
    t = __import__("time").perf_counter()
    assert main(["challenge", "--key", str(key), "--out", str(existing), "--prompt", "a photo of sks cat"]) == 2
    err = capsys.readouterr().err
    assert "already exists; refusing to overwrite it (pass --force" in err and err.count("\n") == 1
    assert __import__("time").perf_counter() - t < 5  # refused before loading the model or rendering
    (tmp_path / "file").write_text("x")
    assert main(["challenge", "--key", str(key), "--out", str(tmp_path / "file" / "c.json"),
                 "--prompt", "a photo of sks cat"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    before = set(tmp_path.iterdir())

    def broken_save(self, path, overwrite=True):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Challenge, "save", broken_save)
    with pytest.raises(OSError):
        create_challenge(key, tmp_path / "new.json", prompt="a photo of sks cat", n=2, pipe=setup["pipe"],
                         self_test=False)
    assert set(tmp_path.iterdir()) == before  # no private reference left beside the key, no challenge


def test_cli_challenge_and_verify_images_show_progress(setup, tmp_path, capsys):
    from seal_diffusion.cli import main

    key = shutil.copyfile(setup["key"], tmp_path / "k.sealkey")
    out = tmp_path / "c.json"
    assert main(["challenge", "--key", str(key), "--out", str(out), "--prompt", "a photo of sks cat", "--n", "2",
                 "--no-self-test"]) == 0
    cap = capsys.readouterr()
    assert "owner's reference images" in cap.err and "ask the service for all 2 images" in cap.out
    assert main(["challenge", "--key", str(key), "--out", str(out), "--prompt", "x", "--n", "2"]) == 2
    ch = Challenge.load(out)
    images = _render(setup["pipe"], ch, tmp_path / "imgs")[:2]
    assert main(["verify-images", "--key", str(key), "--challenge", str(out), *map(str, images)]) in (0, 1)
    cap = capsys.readouterr()
    assert "testing the images" in cap.err and "does NOT survive another sampler" in cap.out
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert main(["verify-images", "--key", str(key), "--challenge", str(out), str(notes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("notes.txt: not an image (PNG, JPEG or WebP expected)")
