"""Image metrics: SSIM and PSNR (fidelity between two renderings), and CLIP-T, CLIP-I, DINO (DreamBooth scores).

**One SSIM convention** everywhere in this tool (and stated in every report), so numbers are comparable between
torchmetrics and scikit-image and between runs:

    Gaussian window 11×11, σ = 1.5, K1 = 0.01, K2 = 0.03, data_range = 1.0 (images as float in [0, 1]),
    population covariance, SSIM map averaged over the *valid* region only (the full map cropped by 5 px on each side,
    so no padded pixel counts), channels averaged.

torchmetrics computes the full map with reflect padding (``return_full_image=True``); we crop it. scikit-image
computes the same thing with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0`` and
crops the same border itself. The two agree to ~1e-15 (``tests/test_metrics.py`` asserts 1e-6). Torchmetrics' default
(average over the padded full image) differs by ~0.005 on 64 px images, which is why the crop matters.

PSNR = 10·log10(1 / MSE) with data_range 1.0, per image; identical images give ``inf``.

**DreamBooth scores** (Ruiz et al. 2023, used in the SEAL paper's Table 12), computed here from the embeddings:

* CLIP-T — mean cosine similarity between each generated image and its prompt (CLIP image vs text embedding);
* CLIP-I — mean pairwise cosine similarity between generated and real (instance) images, CLIP image embeddings;
* DINO  — the same pairwise mean with the CLS token of a self-supervised ViT (DINO ViT-S/16, or DINOv2).

The scorer models come from a local folder or a hub id the user has (``openai/clip-vit-base-patch32``,
``facebook/dino-vits16``); nothing is bundled. We compute the cosines ourselves: torchmetrics' ``CLIPScore`` is broken
with transformers 5 (``get_image_features`` returns an output object) and only accepts some hub names. Image
preprocessing uses the model's own processor, which in transformers 5 falls back to its PIL backend without torchvision.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ..errors import UserError

SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
SSIM_CROP = (SSIM_KERNEL - 1) // 2  # 5 px: the border where the window would overlap padding
DATA_RANGE = 1.0
SSIM_CONVENTION = (
    f"SSIM: Gaussian window {SSIM_KERNEL}×{SSIM_KERNEL}, σ {SSIM_SIGMA}, data range {DATA_RANGE:g} (images in [0, 1]), "
    f"mean over the map cropped by {SSIM_CROP} px; PSNR: data range {DATA_RANGE:g}, per image"
)


# -- conversions -----------------------------------------------------------------------------------------------------
def _one_to_hwc(image) -> np.ndarray:
    """One image (PIL, HWC/HW array, CHW tensor) → float64 HWC array in [0, 1]."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu().double()
        if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)  # CHW → HWC
        arr = t.numpy()
    else:
        arr = np.asarray(image)
        arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected one image (HWC), got an array of shape {arr.shape}")
    return arr


def to_hwc(images) -> list[np.ndarray]:
    """Images (a PIL image, a list of them, an NHWC/HWC array, a BCHW/CHW tensor) → list of float64 HWC in [0, 1].

    uint8 inputs are divided by 255; float inputs are taken to be in [0, 1] already (diffusers ``output_type="np"``).
    """
    if isinstance(images, Image.Image):
        return [_one_to_hwc(images)]
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:
            return [_one_to_hwc(t) for t in images]  # BCHW
        return [_one_to_hwc(images)]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [_one_to_hwc(x) for x in images]  # NHWC
        return [_one_to_hwc(images)]
    return [_one_to_hwc(x) for x in images]


def to_bchw(images) -> torch.Tensor:
    """Images (see :func:`to_hwc`) → a float64 BCHW tensor in [0, 1]; all images must have the same size."""
    arrs = to_hwc(images)
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"images differ in size: {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def to_pil(image):
    """One float [0, 1] HWC array / CHW tensor (or a PIL image) → an RGB PIL image (rounded to uint8)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = _one_to_hwc(image)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_bchw(a), to_bchw(b)
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_KERNEL + 1:
        raise ValueError(f"images of {tuple(x.shape[-2:])} px are too small for an {SSIM_KERNEL}×{SSIM_KERNEL} window")
    return x, y


# -- SSIM / PSNR -----------------------------------------------------------------------------------------------------
def ssim(a, b) -> np.ndarray:
    """Per-image SSIM (torchmetrics, the convention above) of two equally sized batches; returns shape (N,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure  # lazy: heavy

    x, y = _pair(a, b)
    _, full = structural_similarity_index_measure(
        x, y, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL, data_range=DATA_RANGE,
        k1=0.01, k2=0.03, reduction="none", return_full_image=True,
    )
    c = SSIM_CROP
    return full[..., c:-c, c:-c].mean(dim=(1, 2, 3)).numpy()


def psnr(a, b) -> np.ndarray:
    """Per-image PSNR in dB (torchmetrics, data range 1.0); ``inf`` for identical images. Shape (N,)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # lazy: torchmetrics takes seconds to import

    x, y = _pair(a, b)
    return peak_signal_noise_ratio(x, y, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3)).numpy()


def ssim_skimage(a, b) -> np.ndarray:
    """Per-image SSIM with scikit-image under the same convention (the cross-check of :func:`ssim`)."""
    xs, ys = to_hwc(a), to_hwc(b)
    return np.array([
        structural_similarity(x, y, gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False,
                              data_range=DATA_RANGE, channel_axis=-1)
        for x, y in zip(xs, ys, strict=True)
    ])


def psnr_skimage(a, b) -> np.ndarray:
    """Per-image PSNR with scikit-image (data range 1.0), the cross-check of :func:`psnr`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # divide by zero for identical images → inf, as torchmetrics
        return np.array([peak_signal_noise_ratio(y, x, data_range=DATA_RANGE)
                         for x, y in zip(to_hwc(a), to_hwc(b), strict=True)])


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; all-``inf`` values (identical images) give (inf, 0)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if np.isinf(v).all():
        return float(v[0]), 0.0
    finite = v[np.isfinite(v)]
    if finite.size < v.size:  # some identical pairs: the mean is infinite, spread of the finite ones is still useful
        return float("inf"), float(finite.std())
    return float(v.mean()), float(v.std())


def fidelity(a, b) -> dict:
    """SSIM and PSNR of two batches: ``{"ssim": [...], "psnr": [...], "ssim_mean", "ssim_std", "psnr_mean", ...}``."""
    s, p = ssim(a, b), psnr(a, b)
    (sm, ss), (pm, ps) = mean_std(s), mean_std(p)
    return {"ssim": s.tolist(), "psnr": p.tolist(), "ssim_mean": sm, "ssim_std": ss, "psnr_mean": pm, "psnr_std": ps}


# -- CLIP / DINO -----------------------------------------------------------------------------------------------------
def _check_source(source, what: str, option: str, example: str) -> str:
    if source is None or not str(source).strip():
        raise UserError(f"{option}: no {what} model given; pass a local folder or a hub id such as {example!r}")
    text = str(source).strip()
    p = Path(text).expanduser()
    if p.exists():
        if not (p.is_dir() and (p / "config.json").is_file()):
            raise UserError(f"{option} {text}: not a transformers model folder (no config.json)")
        return str(p)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise UserError(f"{option} {text}: no such folder, and not a hub id (owner/name)")
    return text


def _load(loader, source: str, option: str, what: str):
    from transformers.utils import logging as hf_logging  # lazy: transformers is slow to import

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader(source)
    except Exception as exc:  # missing files, no network, wrong architecture
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{option} {source}: could not load the {what} model: {first}") from exc
    finally:
        hf_logging.set_verbosity(previous)


def _features(out) -> torch.Tensor:
    """transformers 4 returns a tensor from ``get_*_features``; transformers 5 an output whose pooler is the embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class _ImageScorer:
    """A transformers model and its processor from ``source`` (local folder or hub id), embedding images in batches."""

    what = option = example = ""

    def __init__(self, source, *, device: str | torch.device = "cpu", batch_size: int = 32):
        model_cls, processor_cls = self._classes()
        src = _check_source(source, self.what, self.option, self.example)
        self.source = src
        self.model = _load(model_cls.from_pretrained, src, self.option, self.what).eval().to(device)
        self.processor = _load(processor_cls.from_pretrained, src, self.option, f"{self.what} processor")
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        pils = [to_pil(x) for x in _as_list(images)]
        out = []
        for chunk in _batches(pils, self.batch_size):
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self._image_features(pixels).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


class ClipScorer(_ImageScorer):
    """A CLIP model (``CLIPModel`` + ``CLIPProcessor``) giving L2-normalised image and text embeddings."""

    what, option, example = "CLIP", "--clip_model", "openai/clip-vit-base-patch32"

    @staticmethod
    def _classes():
        from transformers import CLIPModel, CLIPProcessor  # lazy: transformers is slow to import

        return CLIPModel, CLIPProcessor

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for chunk in _batches(list(texts), self.batch_size):
            tok = self.processor(text=list(chunk), return_tensors="pt", padding=True, truncation=True)
            feats = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                 attention_mask=tok["attention_mask"].to(self.device))
            out.append(_features(feats).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


class DinoScorer(_ImageScorer):
    """A self-supervised ViT (DINO ``ViTModel`` or ``Dinov2Model``); the embedding is the normalised CLS token."""

    what, option, example = "DINO", "--dino_model", "facebook/dino-vits16"

    @staticmethod
    def _classes():
        from transformers import AutoImageProcessor, AutoModel  # lazy: transformers is slow to import

        return AutoModel, AutoImageProcessor

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


def _as_list(images) -> list:
    if isinstance(images, (Image.Image,)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3):
        return [images]
    return list(images)


def _scorer(scorer, cls):
    return scorer if isinstance(scorer, cls) else cls(scorer)


def clip_t(scorer: "ClipScorer | str | os.PathLike", images, prompts: Sequence[str]) -> float:
    """CLIP-T: mean cosine(image_i, prompt_i); ``prompts`` has one prompt per image (or one for all)."""
    scorer = _scorer(scorer, ClipScorer)
    imgs = _as_list(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(imgs)
    if len(prompts) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(prompts)} prompts")
    return float((scorer.image_embeddings(imgs) * scorer.text_embeddings(prompts)).sum(-1).mean())


def pairwise_mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean of all cosines between rows of two L2-normalised embedding matrices."""
    return float((x @ y.T).mean())


def clip_i(scorer: "ClipScorer | str | os.PathLike", generated, real) -> float:
    """CLIP-I: mean pairwise cosine of CLIP image embeddings, generated vs real images."""
    scorer = _scorer(scorer, ClipScorer)
    return pairwise_mean_cosine(scorer.image_embeddings(generated), scorer.image_embeddings(real))


def dino(scorer: "DinoScorer | str | os.PathLike", generated, real) -> float:
    """DINO: mean pairwise cosine of DINO CLS embeddings, generated vs real images."""
    scorer = _scorer(scorer, DinoScorer)
    return pairwise_mean_cosine(scorer.image_embeddings(generated), scorer.image_embeddings(real))


def load_images(folder: str | os.PathLike) -> list:
    """All images of a folder (png, jpg, jpeg, webp, bmp), sorted by name, as RGB PIL images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not files:
        raise UserError(f"{folder}: holds no images (png, jpg, jpeg, webp, bmp)")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{p}: not a readable image ({exc})") from exc
    return out
