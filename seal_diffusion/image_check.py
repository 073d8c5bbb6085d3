"""Ownership from generated images alone (the black-box check): a *challenge* of prompts and seeds, the owner's
private reference, and an exact sign-flip test on images a suspect service rendered for that challenge.

**Why it is exact.** Per key module l, M_l = (C_l + C_p,l)/2 and D_l = (C_l − C_p,l)/2. The secret per-module
release coin (:func:`seal_diffusion.passport.release_swap`) decided *after* training which of the two trained
passports was released, i.e. the sign of D_l. Render the challenge with module l's passport at M_l + t_l·D_l:

* x_mid (t = 0) does not depend on the coins;
* the direction of module l, J_l = ∂x/∂t_l at t = 0, flips sign with module l's coin (chain rule through D_l).

For suspect images x_s, r = x_s − x_mid and d_l = ⟨r, J_l⟩. For any suspect that does not derive from the release
(r independent of the coins) d_l = coin_l · ⟨r, J_l⁰⟩ with J_l⁰ coin-free, so the signs of the d_l are fair
independent coins whatever their sizes, and the exact sign-flip p-value
(:func:`seal_diffusion.verify.sign_flip_neg_log10_p`) is valid — for images of any service, sampler or
post-processing. Matching the challenge (same seeds, sampler, steps, CFG, size) only buys *power*: r of a copy then
points along Σ coin_l·J_l. One backward pass through the sampler (DDIM, CFG, VAE decoder) gives every d_l at once;
measured against central finite differences, the two agree to the renders' float precision.

**Where the comparison happens.** Pixel space, after both sides are brought to the challenge size (suspect images of
another size are resized back) and averaged down to ``compare_size`` pixels a side (area filter).

**Files.** The challenge (JSON) is public: give it to the suspect service. x_mid is derived from the key, so it is
private: it lives beside the key (``KEY.imgref-<challenge hash>.safetensors``, mode 0600), bound to the key's
commitment and the challenge's SHA-256; a changed key or challenge makes it stale and it is rendered again. The
directions are not stored: verification loads the base model and runs the backward pass.

**UNet modules only.** The modules l are the key's UNet modules. A key trained with ``--train_text_encoder`` also holds
text-encoder modules; they are skipped here (the reference and the directions use the base text encoder), so the test
stays exact and its floor is 2^−(UNet modules). The weight test (:mod:`seal_diffusion.verify`) covers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .keyfile import SealKey
from .lora_names import unet_modules
from .network import network_from_key

FORMAT = "seal-image-challenge"
VERSION = 1
REF_FORMAT = "seal-image-reference"
GENERIC_PROMPTS = (
    "a photo of a dog", "a landscape with mountains", "a red car on a street", "a bowl of fruit on a table",
    "a portrait of a woman", "a city skyline at night", "a house in the forest", "a painting of flowers",
)
SUBJECT_VARIANTS = ("{}", "{} on a beach", "{} in the snow", "{} on a sofa", "a drawing of {}", "{}, close-up")
DEFAULT_N = 32
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 7.5
DEFAULT_SCHEDULER = "DDIMScheduler"
Progress = Callable[[int, int, str], object]


# -- the challenge -----------------------------------------------------------------------------------------------------
@dataclass
class Challenge:
    """What the suspect service is asked to render: entry i = prompt i with seed i (diffusers, torch CPU generator)."""

    base_model: str
    prompts: list[str]
    seeds: list[int]
    scheduler: str = DEFAULT_SCHEDULER
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    height: int = 64
    width: int = 64
    compare_size: int = 32
    key_commitment: str = ""
    format: str = FORMAT
    version: int = VERSION

    @property
    def n(self) -> int:
        return len(self.prompts)

    def to_json(self) -> dict:
        return asdict(self)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        from .fileio import write_json_atomic

        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Challenge":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: challenge file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a readable JSON challenge ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path}: not a SEAL image challenge (format must be {FORMAT!r})")
        try:
            ch = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
            ok = (len(ch.prompts) == len(ch.seeds) > 0 and all(isinstance(p, str) for p in ch.prompts)
                  and all(isinstance(s, int) for s in ch.seeds) and ch.steps > 0 and ch.height > 0
                  and ch.width > 0 and 0 < ch.compare_size <= min(ch.height, ch.width))
        except TypeError as exc:
            raise UserError(f"{path}: challenge fields are malformed ({exc})") from exc
        if not ok:
            raise UserError(f"{path}: challenge fields are malformed (prompts/seeds/steps/size)")
        return ch


def subject_prompt_from_card(key_path: str | os.PathLike) -> str | None:
    """The instance prompt written in the model card (README.md) beside a key, if there is one."""
    card = Path(key_path).with_name("README.md")
    if not card.is_file():
        return None
    m = re.search(r"^instance_prompt:\s*(\".*\")\s*$", card.read_text(encoding="utf-8", errors="replace"), re.M)
    try:
        return json.loads(m.group(1)) if m else None
    except json.JSONDecodeError:
        return None


def make_challenge(key: SealKey, base_label: str, prompt: str, *, n: int = DEFAULT_N, size: int = 64,
                   steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                   scheduler: str = DEFAULT_SCHEDULER, compare_size: int | None = None,
                   seeds: Sequence[int] | None = None) -> Challenge:
    """n entries: three quarters the subject prompt in a few settings, one quarter generic prompts; fresh seeds."""
    if n < 1:
        raise UserError(f"--n {n}: need at least one image")
    if not prompt.strip():
        raise UserError("--prompt: empty")
    n_subject = max(1, (3 * n + 3) // 4)
    prompts = [SUBJECT_VARIANTS[i % len(SUBJECT_VARIANTS)].format(prompt) for i in range(n_subject)]
    prompts += [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n - n_subject)]
    seeds = list(seeds) if seeds is not None else [secrets.randbelow(2 ** 31) for _ in range(n)]
    if len(seeds) != n:
        raise UserError(f"seeds: {len(seeds)} given for {n} images")
    compare = compare_size or max(1, size // 2)
    if not 0 < compare <= size:
        raise UserError(f"--compare_size {compare}: must be between 1 and the image size {size}")
    return Challenge(base_label, prompts, [int(s) for s in seeds], scheduler, steps, guidance_scale, size, size,
                     compare, key.commitment())


# -- rendering ---------------------------------------------------------------------------------------------------------
def use_scheduler(pipe, name: str) -> None:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise UserError(f"challenge scheduler {name!r}: not a diffusers scheduler class")
    if type(pipe.scheduler).__name__ != name:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


def sample(pipe, challenge: Challenge, index: Sequence[int]) -> torch.Tensor:
    """The challenge entries ``index`` as ``StableDiffusionPipeline`` renders them — same noise (one CPU generator per
    image), scheduler, CFG and decoding — but differentiable (no ``no_grad``): (k, 3, H, W) in [0, 1]."""
    from diffusers.utils.torch_utils import randn_tensor

    use_scheduler(pipe, challenge.scheduler)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    prompts = [challenge.prompts[i] for i in index]
    gens = [torch.Generator(device="cpu").manual_seed(int(challenge.seeds[i])) for i in index]
    cfg = challenge.guidance_scale > 1.0
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg)
    embeds = torch.cat([uncond, cond]) if cfg else cond
    shape = (len(prompts), pipe.unet.config.in_channels, challenge.height // pipe.vae_scale_factor,
             challenge.width // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=gens, device=device, dtype=dtype) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(challenge.steps, device=device)
    for t in pipe.scheduler.timesteps:
        inp = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        noise = pipe.unet(inp, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if cfg:
            n_uncond, n_cond = noise.chunk(2)
            noise = n_uncond + challenge.guidance_scale * (n_cond - n_uncond)
        latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def to_compare_space(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, H, W) → (n, 3, size, size) by area averaging."""
    return F.interpolate(images, size=(size, size), mode="area")


class PassportLine:
    """The key's SEAL layers on ``pipe.unet`` with module l's passport at M_l + t_l·D_l (``t`` a leaf vector, so
    autograd gives ∂/∂t_l). Use as a context manager; the UNet is exactly the base again afterwards."""

    def __init__(self, pipe, key: SealKey):
        self.pipe, self.key, self.names = pipe, key, unet_modules(key.modules)  # text-encoder layers: not probed
        self.mid = {n: (m.passport + m.passport_p) / 2 for n, m in key.modules.items()}
        self.half = {n: (m.passport - m.passport_p) / 2 for n, m in key.modules.items()}

    def __enter__(self) -> "PassportLine":
        self.net = network_from_key(self.key, self.pipe, text_encoders=False)
        self.net.set_passport("C")
        self.set(torch.zeros(len(self.names)))
        return self

    def set(self, t: torch.Tensor) -> None:
        for i, n in enumerate(self.names):
            self.net[n].passport = self.mid[n] + t[i] * self.half[n]

    def __exit__(self, *exc) -> None:
        self.net.remove()


def render_midpoint(pipe, key: SealKey, challenge: Challenge, batch_size: int = 8,
                    progress: Progress | None = None) -> torch.Tensor:
    """x_mid: every module at M = (C + C_p)/2, in compare space (n, 3, S, S). Independent of the release coins."""
    out = []
    with PassportLine(pipe, key), torch.no_grad():
        for start in range(0, challenge.n, batch_size):
            idx = list(range(start, min(start + batch_size, challenge.n)))
            out.append(to_compare_space(sample(pipe, challenge, idx), challenge.compare_size))
            if progress:
                progress(idx[-1] + 1, challenge.n, "owner's reference images")
    return torch.cat(out)


def directional_statistics(pipe, key: SealKey, challenge: Challenge, residual: torch.Tensor, index: Sequence[int],
                           batch_size: int = 4, progress: Progress | None = None) -> np.ndarray:
    """d_l = ⟨r, ∂x/∂t_l⟩ at t = 0 for every module at once: one backward pass per batch of images (the images are
    independent, so the sum over batches is exact and memory stays bounded)."""
    grad = torch.zeros(len(unet_modules(key.modules)), dtype=torch.float64)
    with PassportLine(pipe, key) as line:
        for start in range(0, len(index), batch_size):
            rows = list(range(start, min(start + batch_size, len(index))))
            t = torch.zeros(len(line.names), requires_grad=True)
            line.set(t)
            with torch.enable_grad():
                x = to_compare_space(sample(pipe, challenge, [index[i] for i in rows]), challenge.compare_size)
                (x * residual[rows].to(x.dtype)).sum().backward()
            grad += t.grad.double()
            if progress:
                progress(rows[-1] + 1, len(index), "testing the images against each module's direction")
        line.set(torch.zeros(len(line.names)))
    return grad.numpy()


# -- the private reference cache ---------------------------------------------------------------------------------------
def reference_path(key_path: str | os.PathLike, challenge: Challenge) -> Path:
    key_path = Path(key_path)
    return key_path.with_name(f"{key_path.stem}.imgref-{challenge.sha256()[:16]}.safetensors")


def save_reference(x_mid: torch.Tensor, path: Path, key: SealKey, challenge: Challenge) -> Path:
    """Write x_mid beside the key, mode 0600 from the start (it is derived from the key's passports)."""
    from safetensors.torch import save as st_save

    meta = {"format": REF_FORMAT, "key_commitment": key.commitment(), "challenge_sha256": challenge.sha256()}
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
    from safetensors import safe_open

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
@dataclass
class ImageReport:
    detected: bool
    neg_log10_p: float
    threshold: float
    n_images: int
    n_modules: int
    n_positive: int
    exact: bool = True  # False for an image passport: no release coin, the p-value is indicative only
    statistic: str = "sign-flip over modules of <suspect - midpoint, d image / d t_l>"
    per_module: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = ("DETECTED: these images were made with your LoRA (or a copy of it)" if self.detected
                   else "not detected")
        note = "" if self.exact else "; indicative only: an image passport has no release coin"
        return (f"{verdict} (−log10 p = {self.neg_log10_p:.1f}, threshold {self.threshold}; {self.n_images} images, "
                f"{self.n_positive} of {self.n_modules} modules lean the released way{note})")


def check_images(pipe, key: SealKey, challenge: Challenge, x_mid: torch.Tensor, suspect: torch.Tensor,
                 index: Sequence[int], threshold: float = 3.3, progress: Progress | None = None) -> ImageReport:
    """The exact sign-flip test of ``suspect`` (compare space, rows = challenge entries ``index``)."""
    from .verify import sign_flip_neg_log10_p

    residual = suspect - x_mid[list(index)]
    d = directional_statistics(pipe, key, challenge, residual, index, progress=progress)
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
    from PIL import Image, UnidentifiedImageError

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
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"{p}: not a readable image ({type(exc).__name__}: {exc})") from exc
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return to_compare_space(torch.stack(out), challenge.compare_size)


def _pipeline(pipe, base: str):
    if pipe is not None:
        return pipe
    from .base_model import load_pipeline

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
    index = match_images(images, challenge)
    suspect = load_images(images, challenge)
    pipe = _pipeline(pipe, base or challenge.base_model)
    x_mid = owner_reference(key_path, key, challenge, pipe, progress)
    return check_images(pipe, key, challenge, x_mid, suspect, index, threshold, progress)


def create_challenge(key_path: str | os.PathLike, out: str | os.PathLike, *, base: str = "tiny",
                     prompt: str | None = None, n: int = DEFAULT_N, steps: int = DEFAULT_STEPS,
                     guidance_scale: float = DEFAULT_GUIDANCE, size: int | None = None,
                     compare_size: int | None = None, pipe=None, progress: Progress | None = None) -> Challenge:
    """Write the challenge JSON to ``out`` and the owner's private reference beside the key: what CLI and app call."""
    from .base_model import resolve_base
    from .render import default_size

    key = SealKey.load(key_path)
    prompt = prompt or subject_prompt_from_card(key_path)
    if not prompt:
        raise UserError("--prompt: not given, and no model card (README.md) with instance_prompt beside the key")
    label = resolve_base(base).label
    pipe = _pipeline(pipe, base)
    size = size or default_size(pipe)
    if size % pipe.vae_scale_factor:
        raise UserError(f"--size {size}: must be a multiple of {pipe.vae_scale_factor}")
    challenge = make_challenge(key, label, prompt, n=n, size=size, steps=steps, guidance_scale=guidance_scale,
                               compare_size=compare_size)
    owner_reference(key_path, key, challenge, pipe, progress)
    challenge.save(out)
    return challenge
