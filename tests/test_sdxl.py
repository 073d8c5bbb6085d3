"""SDXL support: the embedded tiny-xl default and model-family detection."""

import json

import pytest
import torch

from seal_diffusion.models.base_model import is_sdxl, load_pipeline, pipeline_class, resolve_base
from seal_diffusion.core.network import find_target_modules
from seal_diffusion.models.tiny import build_sdxl_unet, build_tiny_xl_components, write_tiny_model


def test_tiny_xl_has_sdxl_module_names_and_conditioning(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    full = find_target_modules(build_sdxl_unet())
    assert len(full) == 560  # SDXL base: 140 Attention modules × to_q/k/v/out.0
    out = write_tiny_model(tmp_path / "txl", xl=True)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    tiny = find_target_modules(pipe.unet)
    assert list(tiny) == list(full)  # same names, same order
    assert is_sdxl(pipe) and pipe.text_encoder_2.config.projection_dim == 32
    # the added conditioning really is SDXL's: pooled text embedding + 6 time ids
    image = pipe("a photo of sks cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0


def test_tiny_xl_is_deterministic():
    a, b = build_tiny_xl_components()["unet"], build_tiny_xl_components()["unet"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_family_detection(tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    assert pipeline_class(resolve_base("tiny-xl")) is StableDiffusionXLPipeline
    assert pipeline_class(resolve_base("tiny")) is StableDiffusionPipeline
    pipe = load_pipeline("tiny-xl")
    assert isinstance(pipe, StableDiffusionXLPipeline) and not is_sdxl(load_pipeline("tiny"))
    # a single-file SDXL checkpoint is recognised by its own tensor names
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(tmp_path / "xl.safetensors"))
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(tmp_path / "sd.safetensors"))
    assert pipeline_class(resolve_base(tmp_path / "xl.safetensors")) is StableDiffusionXLPipeline
    assert pipeline_class(resolve_base(tmp_path / "sd.safetensors")) is StableDiffusionPipeline


def test_conditioning_matches_generation_for_both_families():
    from seal_diffusion.models.conditioning import encode_text

    sd = load_pipeline("tiny")
    cond = encode_text(sd, "a photo of sks cat")
    ids = sd.tokenizer("a photo of sks cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(cond.encoder_hidden_states, sd.text_encoder(ids)[0])  # SD 1.x: last hidden states
    assert set(cond.unet_kwargs()) == {"encoder_hidden_states"}

    xl = load_pipeline("tiny-xl")
    cond = encode_text(xl, ["a photo of sks cat", "a dog"]).to(dtype=torch.float32)
    assert cond.encoder_hidden_states.shape == (2, 77, 64) and cond.text_embeds.shape == (2, 32)
    assert cond.time_ids.tolist()[0] == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = xl.unet(latents, torch.tensor([10, 500]), **cond.unet_kwargs()).sample
        one = xl.unet(latents[:1], torch.tensor([10]), **cond.index(slice(0, 1)).unet_kwargs()).sample
    assert out.shape == latents.shape and torch.allclose(out[:1], one, atol=1e-5)
    # the pooled embedding and the time ids really reach the UNet
    moved = cond.index(slice(0, 1))
    moved.time_ids = moved.time_ids * 2
    with torch.no_grad():
        other = xl.unet(latents[:1], torch.tensor([10]), **moved.unet_kwargs()).sample
    assert not torch.allclose(one, other)


def test_sdxl_dreambooth_run_exports_and_verifies(tmp_path, subject_dir):
    """Train SEAL on tiny-xl (prior preservation, SDXL conditioning), export, reload in the SDXL pipeline, verify."""
    from diffusers import StableDiffusionXLPipeline

    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.training import parse_args, train
    from seal_diffusion.detection.verify import verify_path

    out = tmp_path / "run"
    args = parse_args(["--pretrained_model_name_or_path", "tiny-xl", "--instance_data_dir", str(subject_dir),
                       "--instance_prompt", "a photo of sks cat", "--output_dir", str(out), "--output_name", "cat",
                       "--rank", "4", "--max_train_steps", "4", "--learning_rate", "2e-3", "--seed", "0",
                       "--cache_latents", "--train_batch_size", "2", "--with_prior_preservation",
                       "--class_prompt", "a photo of a cat", "--class_data_dir", str(tmp_path / "class"),
                       "--num_class_images", "2", "--secret", "sdxl test"])
    result = train(args)
    net = result["network"]
    key = SealKey.load(out / "cat.sealkey")
    assert key.architecture == "sdxl_base_v1-0" and len(key.modules) == 560
    assert any(float(layer.lora_B.detach().abs().max()) > 0 for _, layer in net.items())  # it trained
    assert verify_path(key, out / "cat.safetensors").detected
    card = (out / "README.md").read_text()
    assert "base_model: tiny-xl" in card and 'StableDiffusionXLPipeline.from_pretrained("tiny-xl-model")' in card

    # the diffusers-layout export loads in StableDiffusionXLPipeline and gives the patched network's output (C)
    pipe = result["pipeline"]
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 32, 32, generator=g)
    from seal_diffusion.models.conditioning import encode_text

    cond = encode_text(pipe, "a photo of sks cat")
    t = torch.tensor([500])
    with torch.no_grad(), net.passport("C"):
        want = pipe.unet(latents, t, **cond.unet_kwargs()).sample
    net.remove()
    from seal_diffusion.models.tiny import tiny_model_dir

    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir(xl=True), local_files_only=True)
    fresh.load_lora_weights(str(out))
    with torch.no_grad():
        got = fresh.unet(latents, t, **cond.unet_kwargs()).sample
        base = load_pipeline("tiny-xl").unet(latents, t, **cond.unet_kwargs()).sample
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert float((base - want).norm()) > 0  # the LoRA does change the output

    # the kohya file (SGM names) loads whole in the SDXL pipeline too, same output, SDXL metadata
    from seal_diffusion.fileio import load_safetensors

    tensors, meta = load_safetensors(out / "cat.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert not any(k.startswith("lora_unet_down_blocks") for k in tensors)
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir(xl=True), local_files_only=True)
    fresh.load_lora_weights(str(out / "cat.safetensors"))
    with torch.no_grad():
        got = fresh.unet(latents, t, **cond.unet_kwargs()).sample
    assert float((got - want).norm() / want.norm()) <= 1e-5


def test_sdxl_kohya_names_match_diffusers_conversion_on_full_size_unet():
    """Every attention projection of the real SDXL UNet: our SGM kohya names, converted back by diffusers' own SGM →
    diffusers conversion (what load_lora_weights runs), land on exactly the module they came from."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    from seal_diffusion.formats.lora_file import lora_tensors

    modules = find_target_modules(build_sdxl_unet())
    factors = {m: (torch.full((1, 1), float(i)), torch.ones(1, 1)) for i, m in enumerate(modules)}
    tensors, meta = lora_tensors(factors, "kohya", "x", "sdxl_base_v1-0")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), build_sdxl_unet().config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    # diffusers names them in its attention-processor dialect: unet.<attn>.processor.to_q_lora.down.weight
    back = {}
    for k, v in converted.items():
        if k.endswith("_lora.down.weight"):
            attn, _, proj = k[len("unet."):-len("_lora.down.weight")].partition(".processor.")
            back[f"{attn}.{'to_out.0' if proj == 'to_out' else proj}"] = float(v)
    assert back == {m: float(i) for i, m in enumerate(modules)}  # 560 modules, each to itself


def test_merged_sdxl_checkpoint_is_written_as_sgm_and_detected(tmp_path):
    """attack merge into tiny-xl → one SGM-layout .safetensors; verify MERGED --base tiny-xl finds the passport."""
    from seal_diffusion.attacks import file_attacks as attacks
    from seal_diffusion.cli import main as cli_main
    from seal_diffusion.core.export import export_lora
    from seal_diffusion.fileio import safe_open_keys
    from seal_diffusion.core.keyfile import ModuleKey, SealKey
    from seal_diffusion.core.passport import make_passports

    modules = find_target_modules(load_pipeline("tiny-xl").unet)
    passports = make_passports(list(modules), 4, "merged sdxl")
    g = torch.Generator().manual_seed(0)
    key = SealKey({n: ModuleKey(torch.randn(4, m.in_features, generator=g) / m.in_features ** 0.5,
                                torch.randn(m.out_features, 4, generator=g) * 0.1, *passports[n])
                   for n, m in modules.items()}, 4, 4.0, "tiny-xl", architecture="sdxl_base_v1-0")
    key_path = key.save(tmp_path / "owner.sealkey")
    lora = export_lora(key, tmp_path / "release.safetensors", "kohya")
    model = attacks.merge_into_checkpoint(lora, "tiny-xl", tmp_path / "merged.safetensors")
    names = safe_open_keys(model)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in names
    assert not any(k.startswith("cond_stage_model.") for k in names)
    assert cli_main(["verify", "--key", str(key_path), str(model), "--base", "tiny-xl",
                     "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["suspect_format"] == "checkpoint" and report["n_modules"] == 560
    assert report["reconstruction_error"] < 1e-3


def test_plain_lora_on_tiny_xl_loads_in_the_sdxl_pipeline_and_is_not_detected(tmp_path, subject_dir):
    """--method lora on tiny-xl: no key, both public files load in StableDiffusionXLPipeline and change its output the
    same way; verified against an SDXL key it is not detected (it carries no passport)."""
    from diffusers import StableDiffusionXLPipeline

    from seal_diffusion.models.conditioning import encode_text
    from seal_diffusion.core.keyfile import ModuleKey, SealKey
    from seal_diffusion.core.passport import make_passports
    from seal_diffusion.models.tiny import tiny_model_dir
    from seal_diffusion.training import parse_args, train
    from seal_diffusion.detection.verify import verify_path

    out = tmp_path / "run"
    result = train(parse_args(["--pretrained_model_name_or_path", "tiny-xl", "--instance_data_dir", str(subject_dir),
                               "--instance_prompt", "a photo of sks cat", "--output_dir", str(out), "--output_name",
                               "plain", "--method", "lora", "--rank", "4", "--max_train_steps", "2",
                               "--learning_rate", "1e-2", "--seed", "0", "--train_batch_size", "1"]))
    assert result["key_path"] is None and not list(out.glob("*.sealkey"))
    pipe = result["pipeline"]
    cond = encode_text(pipe, "a photo of sks cat")
    latents, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([500])
    outputs = []
    for path in (out / "plain.safetensors", out):
        fresh = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir(xl=True), local_files_only=True)
        fresh.load_lora_weights(str(path))
        with torch.no_grad():
            outputs.append(fresh.unet(latents, t, **cond.unet_kwargs()).sample)
    with torch.no_grad():
        base = load_pipeline("tiny-xl").unet(latents, t, **cond.unet_kwargs()).sample
    assert float((outputs[0] - outputs[1]).norm() / outputs[1].norm()) <= 1e-5  # kohya (SGM names) = diffusers
    assert float((outputs[0] - base).norm()) > 0

    modules = find_target_modules(load_pipeline("tiny-xl").unet)
    passports = make_passports(list(modules), 4, "someone's sdxl key")
    g = torch.Generator().manual_seed(1)
    key = SealKey({n: ModuleKey(torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g),
                                *passports[n]) for n, m in modules.items()}, 4, 4.0, "tiny-xl",
                  architecture="sdxl_base_v1-0")
    report = verify_path(key, out / "plain.safetensors")
    assert not report.detected and report.n_modules == 560


@pytest.mark.parametrize("base", ["tiny", "tiny-xl"])
def test_image_check_sampler_matches_the_pipeline_for_both_families(base):
    """The image check's differentiable sampler renders a challenge exactly as the base's own pipeline does — for
    SDXL (StableDiffusionXLPipeline): both encoders, pooled text_embeds, time ids (H, W, 0, 0, H, W), CFG rows, DDIM,
    VAE decoding — here at a non-square size, so a swapped height/width in the time ids or the latents would show."""
    from seal_diffusion.detection.image_challenge import Challenge
    from seal_diffusion.detection.image_sampler import sample, use_scheduler

    pipe = load_pipeline(base)
    assert is_sdxl(pipe) == (base == "tiny-xl")
    ch = Challenge(base, ["a photo of sks cat", "a red car on a street"], [7, 123], steps=3,
                   guidance_scale=5.0, height=48, width=64, compare_size=16)
    own = pipe.scheduler
    assert type(own).__name__ != ch.scheduler
    with torch.no_grad():
        got = sample(pipe, ch, [0, 1])
    assert pipe.scheduler is own, "the image check leaves the caller's pipeline with its own scheduler"
    use_scheduler(pipe, ch.scheduler)
    want = pipe(ch.prompts, generator=[torch.Generator().manual_seed(s) for s in ch.seeds],
                num_inference_steps=ch.steps, guidance_scale=ch.guidance_scale, height=ch.height, width=ch.width,
                output_type="pt").images
    assert got.shape == want.shape == (2, 3, 48, 64)
    assert float((got - want).abs().max()) <= 1e-4
    assert float((got[0] - got[1]).abs().max()) > 1e-2  # the two entries really differ (prompt and seed reach it)


def test_image_check_cli_round_trip_on_tiny_xl(tmp_path, monkeypatch):
    """`challenge` and `verify-images` on a tiny-xl key: the release LoRA loaded in StableDiffusionXLPipeline renders
    the challenge, the check runs through the SDXL sampler and finds it; the base model's images are not accused.
    The key is random (small factors, no training): enough for the test's power (−log10 p ≈ 14 with 6 images)."""
    from PIL import Image

    from seal_diffusion.detection import image_challenge
    from seal_diffusion.cli import main
    from seal_diffusion.core.export import export_lora
    from seal_diffusion.detection.image_challenge import Challenge
    from seal_diffusion.detection.image_sampler import use_scheduler
    from seal_diffusion.core.keyfile import ModuleKey, SealKey
    from seal_diffusion.core.passport import make_passports
    from seal_diffusion.evaluation.render import generate

    pipe = load_pipeline("tiny-xl")
    modules = find_target_modules(pipe.unet)
    passports = make_passports(list(modules), 4, "image check sdxl")
    g = torch.Generator().manual_seed(2)
    key = SealKey({n: ModuleKey(0.05 * torch.randn(4, m.in_features, generator=g),
                                0.05 * torch.randn(m.out_features, 4, generator=g), *passports[n])
                   for n, m in modules.items()}, 4, 4.0, "tiny-xl", architecture="sdxl_base_v1-0")
    key_path = key.save(tmp_path / "xl.sealkey")
    seeds = iter([11, 22, 33, 44, 55, 66])  # the CLI draws fresh seeds; fixed here so the p-values are reproducible
    monkeypatch.setattr(image_challenge.secrets, "randbelow", lambda n: next(seeds))
    assert main(["challenge", "--key", str(key_path), "--base", "tiny-xl", "--out", str(tmp_path / "C.json"),
                 "--prompt", "a photo of sks cat", "--n", "6", "--steps", "3", "--size", "32"]) == 0
    ch = Challenge.load(tmp_path / "C.json")
    assert ch.base_model == "tiny-xl" and (ch.height, ch.width, ch.compare_size) == (32, 32, 16)

    def check(folder) -> tuple[int, dict]:
        use_scheduler(pipe, ch.scheduler)
        images = generate(pipe, list(zip(ch.prompts, ch.seeds)), steps=ch.steps, guidance_scale=ch.guidance_scale,
                          height=ch.height, width=ch.width, batch_size=ch.n)
        (tmp_path / folder).mkdir()
        paths = [tmp_path / folder / f"img_{i:03d}.png" for i in range(ch.n)]
        for path, im in zip(paths, images):
            Image.fromarray((im * 255).round().astype("uint8")).save(path)
        out = tmp_path / f"{folder}.json"
        code = main(["verify-images", "--key", str(key_path), "--challenge", str(tmp_path / "C.json"),
                     "--json", str(out), *map(str, paths)])
        return code, json.loads(out.read_text())

    export_lora(key, tmp_path / "release", "diffusers")
    pipe.load_lora_weights(str(tmp_path / "release"))
    code, report = check("release_images")
    assert report["n_images"] == 6 and report["n_modules"] == 560 and report["exact"]
    assert len(report["per_module"]) == 560 and sum(m["stat"] != 0 for m in report["per_module"]) > 500
    assert code == 0 and report["detected"] and report["neg_log10_p"] >= 8, report
    pipe.unload_lora_weights()
    code, report = check("base_images")
    assert code == 1 and not report["detected"] and 0 < 10 ** -report["neg_log10_p"] <= 1


def test_function_test_loads_the_family_s_own_unet():
    """The function-level test's warm-cache path loads the UNet alone: tiny-xl must give the SDXL one, not tiny's."""
    from seal_diffusion.detection.probe_cache import load_unet

    assert load_unet("tiny-xl").config.addition_embed_type == "text_time"
    assert load_unet("tiny").config.addition_embed_type is None
