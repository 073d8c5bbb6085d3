"""Ownership from generated images alone (the black-box check): a *challenge* of prompts and seeds, the owner's
private reference, and an exact sign-flip test on images a suspect service rendered for that challenge.

**Why it is exact.** Per key module l, M_l = (C_l + C_p,l)/2 and D_l = (C_l − C_p,l)/2. The secret per-module
release coin (:func:`seal_diffusion.core.passport.release_swap`) decided *after* training which of the two trained
passports was released, i.e. the sign of D_l. Render the challenge with module l's passport at M_l + t_l·D_l:

* x_mid (t = 0) does not depend on the coins;
* the direction of module l, J_l = ∂x/∂t_l at t = 0, flips sign with module l's coin (chain rule through D_l).

For suspect image i, r_i = x_s,i − x_mid,i and D_il = ⟨r_i, J_il⟩; every image gets one vote of unit length,
d_l = Σ_i D_il / ‖D_i‖ (‖D_i‖ over the modules: :func:`module_statistics`). For any suspect that does not derive from
the release (r independent of the coins) D_il = coin_l · D⁰_il with D⁰ coin-free and ‖D_i‖ does not see the coins, so
d_l = coin_l · d⁰_l: the signs of the d_l are fair independent coins whatever their sizes, and the exact sign-flip
p-value (:func:`seal_diffusion.detection.verify.sign_flip_neg_log10_p`) is valid — for images of any service, sampler
or post-processing. Matching the challenge (same seeds, sampler, steps, CFG, size) only buys *power*: r of a copy then
points along Σ coin_l·J_l. Why unit votes: the plain sum Σ_i D_il lets the few images that a LoRA changes most (and
least linearly) outvote the rest; measured on four subjects × three challenges, the votes lift the weak subject
(docs/verification.md). One backward pass through the sampler (DDIM, CFG, VAE decoder) gives every D_il at once;
measured against central finite differences, the two agree to the renders' float precision.

**Where the comparison happens.** Pixel space, after both sides are brought to the challenge size (suspect images of
another size are resized back) and averaged down to ``compare_size`` pixels a side (area filter).

**Files.** The challenge (JSON) is public: give it to the suspect service. x_mid is derived from the key, so it is
private: it lives beside the key (``KEY.imgref-<challenge hash>.safetensors``, mode 0600), bound to the key's
commitment and the challenge's SHA-256; a changed key or challenge makes it stale and it is rendered again. The
directions are not stored: verification loads the base model and runs the backward pass.

**UNet modules only.** The modules l are the key's UNet modules. A key trained with ``--train_text_encoder`` also holds
text-encoder modules; they are skipped here (the reference and the directions use the base text encoder), so the test
stays exact and its floor is 2^−(UNet modules). The weight test (:mod:`seal_diffusion.detection.verify`) covers them.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..models.base_model import load_pipeline, resolve_base
from ..errors import UserError
from .image_challenge import DEFAULT_GUIDANCE, DEFAULT_N, Challenge, default_challenge_size, \
    default_challenge_steps, make_challenge, subject_prompt_from_card
from .image_sampler import Progress, directional_statistics, midpoint_and_statistics, render_midpoint, \
    render_release, to_compare_space
from ..core.keyfile import SealKey
from ..formats.lora_names import unet_modules
from ..evaluation.render import default_size
from .verify import sign_flip_neg_log10_p

REF_FORMAT = "seal-image-reference"
STATISTIC_ID = "unit-votes"  # the self-test kept in a reference is read only when made with this statistic
# What benchmarks/image_check_matrix.py measured (docs/verification.md has the table); printed by verify-images.
ROBUSTNESS_NOTE = (
    "where this check ends (tiny, 32 images; benchmarks/image_check_matrix.py, cat / coffee-cup releases): survives "
    "JPEG 75/50 (7.7/7.5 and 4.9/4.6 of 7.7 and 5.1 as asked), resize ±10 % (7.7, 5.2), CFG 10 (6.1, 5.7); on the "
    "stronger release also centre crop 87.5 % (6.3), CFG 5 (6.8), LoRA strength 0.85/0.7 (6.1/4.1); does NOT survive "
    "another sampler (Euler, Euler a, DPM++ 2M: 0.0–1.4), other steps (8 or 20: 0.6–1.9), LoRA strength 0.5 (1.0–2.1) "
    "or another size (48 px: 0.4–1.5). Innocents ≤ 1.2 everywhere. See docs/verification.md.")


# -- the private reference cache ---------------------------------------------------------------------------------------
def reference_path(key_path: str | os.PathLike, challenge: Challenge) -> Path:
    key_path = Path(key_path)
    return key_path.with_name(f"{key_path.stem}.imgref-{challenge.sha256()[:16]}.safetensors")


def save_reference(x_mid: torch.Tensor, path: Path, key: SealKey, challenge: Challenge,
                   self_test: float | None = None) -> Path:
    """Write x_mid (and the self-test score) beside the key, mode 0600 from the start (derived from the passports)."""
    meta = {"format": REF_FORMAT, "key_commitment": key.commitment(), "challenge_sha256": challenge.sha256()}
    if self_test is not None:
        meta["self_test_neg_log10_p"], meta["statistic"] = f"{self_test:.4f}", STATISTIC_ID
    data = st_save({"x_mid": x_mid.float().contiguous()}, metadata=meta)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_reference(path: Path, key: SealKey, challenge: Challenge) -> torch.Tensor | None:
    """The cached x_mid, or None when absent, unreadable, or made for another key or challenge (stale)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if (meta.get("format") != REF_FORMAT or meta.get("key_commitment") != key.commitment()
                    or meta.get("challenge_sha256") != challenge.sha256()):
                return None
            x_mid = fh.get_tensor("x_mid").float()
    except Exception:
        return None
    s = challenge.compare_size
    return x_mid if tuple(x_mid.shape) == (challenge.n, 3, s, s) else None


def load_self_test(path: Path) -> float | None:
    """The self-test score kept in the private reference (None when absent, or made with an earlier statistic)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            value = meta.get("self_test_neg_log10_p") if meta.get("statistic") == STATISTIC_ID else None
        return float(value) if value is not None else None
    except Exception:
        return None


def reference_with_self_test(pipe, key: SealKey, challenge: Challenge,
                             progress: Progress | None = None) -> tuple[torch.Tensor, float]:
    """(x_mid, −log10 p of the owner's own release on this challenge): the challenge rendered with the released
    passports, rounded to 8 bits like a saved PNG, tested like a suspect's. What a service that runs the release
    exactly as asked scores; a service's images should be compared with it. x_mid comes from the same pass."""
    release = render_release(pipe, key, challenge, progress=progress)
    x_mid, per_image = midpoint_and_statistics(pipe, key, challenge, release, progress=progress)
    return x_mid, sign_flip_neg_log10_p(list(module_statistics(per_image)))


def _check_binding(key_path, key: SealKey, challenge: Challenge) -> None:
    if challenge.key_commitment != key.commitment():
        raise UserError(f"challenge was made for another key (its commitment {challenge.key_commitment[:12]}… is not "
                        f"{Path(key_path).name}'s {key.commitment()[:12]}…)")


def owner_reference(key_path: str | os.PathLike, key: SealKey, challenge: Challenge, pipe,
                    progress: Progress | None = None) -> torch.Tensor:
    """x_mid for ``challenge`` from the private cache beside the key, rendering (and caching) it when needed."""
    _check_binding(key_path, key, challenge)
    path = reference_path(key_path, challenge)
    x_mid = load_reference(path, key, challenge)
    if x_mid is None:
        x_mid = render_midpoint(pipe, key, challenge, progress=progress)
        save_reference(x_mid, path, key, challenge)
    return x_mid


# -- the test ----------------------------------------------------------------------------------------------------------
def module_statistics(per_image: np.ndarray) -> np.ndarray:
    """d_l = Σ_i D_il / ‖D_i‖ from the per-image terms D (images × modules, or k × images × modules): every image
    one vote of unit length over the modules (an image with no residual votes 0). ‖D_i‖ is the same under every
    choice of release coins, so the signs of the d_l stay fair coins for a suspect that is not the release."""
    norm = np.sqrt((per_image ** 2).sum(-1, keepdims=True))
    return (per_image / np.where(norm > 0, norm, 1.0)).sum(-2)


@dataclass
class ImageReport:
    detected: bool
    neg_log10_p: float
    threshold: float
    n_images: int
    n_modules: int
    n_positive: int
    exact: bool = True  # False for an image passport: no release coin, the p-value is indicative only
    statistic: str = "sign-flip over modules of sum over images of <suspect - midpoint, d image / d t_l> / its norm"
    per_module: list[dict] = field(default_factory=list)
    self_test: float | None = None  # the owner's own release on this challenge (−log10 p), when known

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = ("DETECTED: these images were made with your LoRA (or a copy of it)" if self.detected
                   else "not detected")
        note = "" if self.exact else "; indicative only: an image passport has no release coin"
        return (f"{verdict} (−log10 p = {self.neg_log10_p:.1f}, threshold {self.threshold}; {self.n_images} images, "
                f"{self.n_positive} of {self.n_modules} modules lean the released way{note})"
                + (f"\nyour own release scores {self.self_test:.1f} on this challenge (rendered exactly as asked); "
                   "a service's images should be compared with that" if self.self_test is not None else ""))


def check_images(pipe, key: SealKey, challenge: Challenge, x_mid: torch.Tensor, suspect: torch.Tensor,
                 index: Sequence[int], threshold: float = 3.3, progress: Progress | None = None) -> ImageReport:
    """The exact sign-flip test of ``suspect`` (compare space, rows = challenge entries ``index``)."""
    residual = suspect - x_mid[list(index)]
    d = module_statistics(directional_statistics(pipe, key, challenge, residual, index, progress=progress))
    nlp = sign_flip_neg_log10_p(list(d))
    return ImageReport(nlp >= threshold, nlp, threshold, len(index), len(d), int((d > 0).sum()),
                       exact=not key.passport_source.startswith("image:"),
                       per_module=[{"module": n, "stat": float(v)} for n, v in zip(unet_modules(key.modules), d)])


# -- reading the suspect's images --------------------------------------------------------------------------------------
def _entry_number(path: Path) -> int | None:
    nums = re.findall(r"\d+", path.stem)
    return int(nums[-1]) if nums else None


def match_images(paths: Sequence[str | os.PathLike], challenge: Challenge) -> list[int]:
    """Challenge entry of each image: by the last number in every file name when all names carry distinct numbers
    within range (``img_7.png`` → entry 7, counting from 0; a subset is then allowed), else by the order given (then
    the count must equal the challenge's)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no images given")
    nums = [_entry_number(p) for p in paths]
    if all(k is not None and k < challenge.n for k in nums) and len(set(nums)) == len(nums):
        return nums  # type: ignore[return-value]
    if len(paths) != challenge.n:
        raise UserError(f"{len(paths)} images given, the challenge has {challenge.n} entries (give one image per "
                        "entry in order, or name each file with its entry number, e.g. img_007.png)")
    return list(range(challenge.n))


def load_images(paths: Sequence[str | os.PathLike], challenge: Challenge) -> torch.Tensor:
    """(n, 3, S, S) in compare space: RGB, resized back to the challenge size (bicubic), then area-averaged."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"{p}: image not found")
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (challenge.width, challenge.height):
                    im = im.resize((challenge.width, challenge.height), Image.Resampling.BICUBIC)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except UnidentifiedImageError as exc:
            raise UserError(f"{p}: not an image (PNG, JPEG or WebP expected)") from exc
        except (OSError, ValueError) as exc:
            raise UserError(f"{p}: not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return to_compare_space(torch.stack(out), challenge.compare_size)


def _pipeline(pipe, base: str):
    if pipe is not None:
        return pipe
    return load_pipeline(base)


def verify_images(key_path: str | os.PathLike, challenge: str | os.PathLike | Challenge,
                  images: Sequence[str | os.PathLike], *, base: str | None = None, threshold: float = 3.3,
                  pipe=None, progress: Progress | None = None) -> ImageReport:
    """Load key, challenge and images, get the owner's reference (cached) and test: what CLI and app call.

    ``base`` defaults to the challenge's ``base_model``; the base is needed because the per-module directions are
    computed on the fly (one backward pass through the sampler), not stored."""
    key = SealKey.load(key_path)
    challenge = challenge if isinstance(challenge, Challenge) else Challenge.load(challenge)
    _check_binding(key_path, key, challenge)
    suspect = load_images(images, challenge)  # first: a file that is not an image is named as such
    index = match_images(images, challenge)
    pipe = _pipeline(pipe, base or challenge.base_model)
    x_mid = owner_reference(key_path, key, challenge, pipe, progress)
    report = check_images(pipe, key, challenge, x_mid, suspect, index, threshold, progress)
    report.self_test = load_self_test(reference_path(key_path, challenge))
    return report


def check_output_path(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a bad ``--out`` before any slow work: a folder, an existing file (unless ``overwrite``), or a place
    that cannot be written (a parent that is a file, a read-only folder)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; expected the challenge JSON path")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: challenge already exists; refusing to overwrite it (pass --force to replace it)")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "not a folder" if not parent.is_dir() else "read-only"
        raise UserError(f"{out}: cannot write here ({parent} is {why})")
    return out


def create_challenge(key_path: str | os.PathLike, out: str | os.PathLike, *, base: str = "tiny",
                     prompt: str | None = None, n: int = DEFAULT_N, steps: int | None = None,
                     guidance_scale: float = DEFAULT_GUIDANCE, size: int | None = None,
                     compare_size: int | None = None, pipe=None, progress: Progress | None = None,
                     overwrite: bool = False, self_test: bool = True, seeds: Sequence[int] | None = None) -> Challenge:
    """Write the challenge JSON to ``out`` and the owner's private reference beside the key: what CLI and app call.

    ``size`` and ``steps`` default to :func:`~seal_diffusion.detection.image_challenge.default_challenge_size` and
    :func:`~seal_diffusion.detection.image_challenge.default_challenge_steps` (32 px and 4 steps on tiny). With ``self_test``
    the challenge is also rendered with the owner's own release and tested (:func:`reference_with_self_test`); the
    score is kept in the private
    reference and returned as ``challenge.self_test`` (not saved in the public JSON). A failure leaves no new
    private file beside the key and no challenge."""
    out = check_output_path(out, overwrite)
    key = SealKey.load(key_path)
    prompt = prompt or subject_prompt_from_card(key_path)
    if not prompt:
        raise UserError("--prompt: not given, and no model card (README.md) with instance_prompt beside the key")
    label = resolve_base(base).label
    pipe = _pipeline(pipe, base)
    size = size or default_challenge_size(default_size(pipe))
    steps = steps or default_challenge_steps(default_size(pipe))
    if size % pipe.vae_scale_factor:
        raise UserError(f"--size {size}: must be a multiple of {pipe.vae_scale_factor}")
    challenge = make_challenge(key, label, prompt, n=n, size=size, steps=steps, guidance_scale=guidance_scale,
                               compare_size=compare_size, seeds=seeds)  # seeds: fresh random ones unless given
    ref = reference_path(key_path, challenge)
    existed = ref.exists()
    try:
        if self_test:
            x_mid, score = reference_with_self_test(pipe, key, challenge, progress=progress)
            save_reference(x_mid, ref, key, challenge, self_test=score)
            challenge.self_test = score
        else:
            owner_reference(key_path, key, challenge, pipe, progress)
        challenge.save(out, overwrite=overwrite)
    except BaseException:
        if not existed and ref.exists():
            ref.unlink()
        raise
    return challenge
