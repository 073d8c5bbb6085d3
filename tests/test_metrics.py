"""Metrics: SSIM/PSNR convention (torchmetrics == scikit-image), converters, CLIP-T / CLIP-I / DINO with tiny models."""

import numpy as np
import pytest
import torch
from PIL import Image

from seal_diffusion.evaluation import metrics
from seal_diffusion.errors import UserError


def _noisy_pairs(seed=0, n=3, h=64, w=64, noise=0.08):
    rng = np.random.default_rng(seed)
    a = rng.random((n, h, w, 3))
    # smooth structure + noise, so SSIM is far from both 0 and 1
    a = (a + np.roll(a, 1, axis=1) + np.roll(a, 1, axis=2)) / 3
    b = np.clip(a + noise * rng.standard_normal(a.shape), 0, 1)
    return a, b


# -- SSIM / PSNR -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64), (37, 50)])
def test_ssim_psnr_match_skimage_on_random_images(shape):
    a, b = _noisy_pairs(h=shape[0], w=shape[1])
    s_tm, s_sk = metrics.ssim(a, b), metrics.ssim_skimage(a, b)
    assert s_tm.shape == (3,) and 0.2 < s_tm.min() < s_tm.max() < 0.99
    assert np.abs(s_tm - s_sk).max() < 1e-6
    p_tm, p_sk = metrics.psnr(a, b), metrics.psnr_skimage(a, b)
    assert np.abs(p_tm - p_sk).max() < 1e-4  # torchmetrics reduces in float32: ~1e-6 dB apart
    # the convention matters: torchmetrics' default (mean over the reflect-padded full image) is a different number
    from torchmetrics.functional.image import structural_similarity_index_measure

    default = structural_similarity_index_measure(metrics.to_bchw(a), metrics.to_bchw(b), data_range=1.0,
                                                  reduction="none").numpy()
    assert np.abs(default - s_tm).max() > 1e-4


def test_ssim_psnr_match_skimage_on_real_photos(subject_dir):
    real = metrics.load_images(subject_dir)
    a, b = real[:4], real[4:]  # crops vs mirrored crops: related but different photos
    assert np.abs(metrics.ssim(a, b) - metrics.ssim_skimage(a, b)).max() < 1e-6
    assert np.abs(metrics.psnr(a, b) - metrics.psnr_skimage(a, b)).max() < 1e-4


def test_identical_images_and_summary():
    a, _ = _noisy_pairs(n=2)
    assert np.allclose(metrics.ssim(a, a), 1.0) and np.isinf(metrics.psnr(a, a)).all()
    assert np.isinf(metrics.psnr_skimage(a, a)).all()
    assert metrics.mean_std([float("inf")] * 3) == (float("inf"), 0.0)
    assert metrics.mean_std([1.0, 3.0]) == (2.0, 1.0)
    f = metrics.fidelity(a, a)
    assert f["ssim_mean"] == pytest.approx(1.0) and f["psnr_mean"] == float("inf")
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.ssim(a, a[:1])
    with pytest.raises(ValueError, match="too small"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_converters_pil_numpy_tensor():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    pil = Image.fromarray(u8)
    hwc = metrics.to_hwc(pil)[0]
    assert hwc.shape == (20, 30, 3) and hwc.dtype == np.float64 and np.allclose(hwc * 255, u8)
    assert np.array_equal(metrics.to_hwc(u8)[0], hwc)
    bchw = metrics.to_bchw([pil, pil])
    assert bchw.shape == (2, 3, 20, 30) and torch.allclose(bchw[0].permute(1, 2, 0), torch.from_numpy(hwc))
    assert np.array_equal(metrics.to_hwc(bchw)[1], hwc)  # BCHW tensor back to HWC
    assert np.array_equal(np.asarray(metrics.to_pil(hwc)), u8)  # float → uint8 round trip is exact
    assert np.array_equal(np.asarray(metrics.to_pil(bchw[0])), u8)
    gray = metrics.to_hwc(pil.convert("L"))[0]
    assert gray.shape == (20, 30, 3)  # everything is compared as RGB


# -- CLIP / DINO ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP (hidden 32, 2 layers, 4 heads, image 32, patch 8, projection 16) saved as a model folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from seal_diffusion.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=1000, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **common),
        vision_config=dict(image_size=32, patch_size=8, **common),
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(cfg).save_pretrained(path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    """A random ViT (DINO-style, no pooler) saved with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-dino")
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                    patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _images(seed, n=3):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_t_and_clip_i_match_the_model(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    scorer = metrics.ClipScorer(tiny_clip)
    gen, real = _images(0), _images(1, 2)
    prompts = ["a photo of sks cat", "a sks cat in the snow", "a red sks cat"]
    # reference: the model's own forward, which returns L2-normalised projected embeddings
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**proc(text=prompts, images=gen, return_tensors="pt", padding=True))
    expected_t = float((out.image_embeds * out.text_embeds).sum(-1).mean())
    assert metrics.clip_t(scorer, gen, prompts) == pytest.approx(expected_t, abs=1e-5)
    assert metrics.clip_t(str(tiny_clip), gen[:1], prompts[0]) == pytest.approx(
        float(out.image_embeds[0] @ out.text_embeds[0]), abs=1e-5)  # a path works too
    e_gen, e_real = scorer.image_embeddings(gen), scorer.image_embeddings(real)
    assert torch.allclose(e_gen, out.image_embeds, atol=1e-5)
    assert metrics.clip_i(scorer, gen, real) == pytest.approx(float((e_gen @ e_real.T).mean()), abs=1e-6)
    assert metrics.clip_i(scorer, gen[:1], gen[:1]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        metrics.clip_t(scorer, gen, prompts[:2])


def test_dino_uses_the_cls_token(tiny_dino):
    from transformers import AutoImageProcessor, ViTModel

    scorer = metrics.DinoScorer(tiny_dino)
    gen, real = _images(2), _images(3, 2)
    model, proc = ViTModel.from_pretrained(tiny_dino, add_pooling_layer=False).eval(), AutoImageProcessor.from_pretrained(tiny_dino)
    with torch.no_grad():
        cls = [model(**proc(images=x, return_tensors="pt")).last_hidden_state[:, 0] for x in (gen, real)]
    g, r = (torch.nn.functional.normalize(c, dim=-1) for c in cls)
    assert metrics.dino(scorer, gen, real) == pytest.approx(float((g @ r.T).mean()), abs=1e-5)
    assert metrics.dino(scorer, real[:1], real[:1]) == pytest.approx(1.0, abs=1e-5)


def test_scorer_paths_are_checked(tmp_path):
    with pytest.raises(UserError, match="--clip_model: no CLIP model given"):
        metrics.ClipScorer(None)
    with pytest.raises(UserError, match="--dino_model: no DINO model given"):
        metrics.DinoScorer("")
    with pytest.raises(UserError, match="not a transformers model folder"):
        metrics.ClipScorer(tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        metrics.DinoScorer(str(tmp_path / "missing" / "model"))
    with pytest.raises(UserError, match="could not load the CLIP model"):
        metrics.ClipScorer("nobody-here/no-such-clip-model")  # offline in tests (HF_HUB_OFFLINE=1)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="could not load the DINO model"):
        metrics.DinoScorer(tmp_path)
    with pytest.raises(UserError, match="image folder not found"):
        metrics.load_images(tmp_path / "none")
    with pytest.raises(UserError, match="holds no images"):
        metrics.load_images(tmp_path)
