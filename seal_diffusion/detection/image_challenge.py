"""The public challenge of the image check: what a suspect service is asked to render (prompts, seeds, sampler, size),
and how one is made from a key and a subject prompt (:mod:`seal_diffusion.detection.image_check` runs the test).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..defaults import CHALLENGE_GUIDANCE as DEFAULT_GUIDANCE, CHALLENGE_N as DEFAULT_N, \
    CHALLENGE_STEPS as DEFAULT_STEPS  # the values --help shows
from ..errors import UserError
from ..fileio import write_json_atomic
from ..core.keyfile import SealKey

FORMAT = "seal-image-challenge"
VERSION = 1
# The private prompt pool: every challenge draws its prompts from these parts with a generator seeded by the owner's
# secret (HMAC over the key's passports, coin-symmetric) and the challenge's own random seeds, so the prompts look like
# ordinary requests for the subject and change with every challenge: 28 settings × 16 styles × 12 details = 5,376
# subject prompts, and 40 × 16 × 12 = 7,680 generic ones. A service cannot tell them from other customers' requests
# by matching a fixed list.
SETTINGS = (
    "", "on a beach", "in the snow", "on a sofa", "in a garden", "on a wooden table", "in the jungle",
    "on a cobblestone street", "in a kitchen", "by a window", "in a forest", "on a mountain top", "in a city at night",
    "on a boat", "in the rain", "in a field of flowers", "on a red carpet", "in a library", "at sunset",
    "in the desert",
    "underwater", "in a living room", "on a bed", "next to a lake", "on the grass", "in front of a brick wall",
    "in autumn leaves", "on a rooftop",
)
STYLES = (
    "", "a photo of", "a close-up of", "a drawing of", "a watercolor painting of", "an oil painting of",
    "a 3d render of", "a polaroid of", "a cartoon of", "a pencil sketch of", "a professional photo of",
    "a cinematic still of", "a portrait of", "a wide shot of", "an illustration of", "a digital art of",
)
DETAILS = (
    "", "high detail", "soft light", "golden hour", "4k", "bokeh", "studio lighting", "vibrant colors",
    "film grain", "sharp focus", "pastel colors", "dramatic lighting",
)
GENERIC_SUBJECTS = (
    "a dog", "a landscape with mountains", "a red car", "a bowl of fruit", "a woman", "a city skyline", "a house",
    "flowers", "a lighthouse", "a bicycle", "an old man", "a cup of coffee", "a sailing ship", "a horse", "a castle",
    "a bridge", "a bird", "a tree", "a guitar", "a cake", "a train", "a child", "a teapot", "a pair of shoes",
    "a waterfall", "a robot", "a mountain lake", "a street market", "a fox", "a bookshelf", "a vase", "a beach hut",
    "an owl", "a motorcycle", "a windmill", "a chair", "a lamp", "a hot air balloon", "a snowy village", "a rabbit",
)


def default_challenge_steps(native: int) -> int:
    """The challenge's default sampler steps: 4 on the tiny test models (native ≤ 64 px; what was measured, and 2.5×
    cheaper than 10 for the same power), 20 on real models (not measured here: a real service renders ≥ 20)."""
    return DEFAULT_STEPS if native <= 64 else 20


def default_challenge_size(native: int) -> int:
    """The challenge's default image side: the model's native size, half of it on the tiny test models (native ≤ 64
    px), where 64 px costs ~10× the time of 32 px for no more power (docs/verification.md)."""
    return native // 2 if native <= 64 else native


DEFAULT_SCHEDULER = "DDIMScheduler"


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

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        return write_json_atomic(path, self.to_json(), overwrite=overwrite)

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


def challenge_prompts(key: SealKey, prompt: str, seeds: Sequence[int]) -> list[str]:
    """The challenge's prompts, drawn from the private pool (see ``SETTINGS``) by a generator seeded with
    HMAC-SHA256(key secret, seeds): three quarters show the subject (``prompt``, e.g. "a photo of sks cat", with a
    style, setting and detail), one quarter other subjects. Only the key's owner can reproduce the draw."""
    from .probes import probe_secret  # the key's coin-symmetric secret (needs both passports)

    n = len(seeds)
    msg = b"seal-image-challenge-prompts-v2\0" + b",".join(str(int(x)).encode() for x in seeds)
    rng = random.Random(hmac.new(probe_secret(key), msg, hashlib.sha256).digest())
    core = re.sub(r"^(a |an )?(photo|picture|image) of ", "", prompt.strip(), flags=re.I) or prompt.strip()
    n_subject = max(1, (3 * n + 3) // 4)
    out = []
    for i in range(n):
        thing = prompt.strip() if i < n_subject and rng.random() < 0.25 else (core if i < n_subject else
                                                                           rng.choice(GENERIC_SUBJECTS))
        style, setting, detail = rng.choice(STYLES), rng.choice(SETTINGS), rng.choice(DETAILS)
        text = thing if thing == prompt.strip() else " ".join(x for x in (style, thing) if x)
        text = " ".join(x for x in (text, setting) if x)
        out.append(f"{text}, {detail}" if detail else text)
    order = list(range(n))
    rng.shuffle(order)  # subject and other prompts interleaved, in a secret order
    return [out[k] for k in order]


def make_challenge(key: SealKey, base_label: str, prompt: str, *, n: int = DEFAULT_N, size: int = 32,
                   steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                   scheduler: str = DEFAULT_SCHEDULER, compare_size: int | None = None,
                   seeds: Sequence[int] | None = None) -> Challenge:
    """n entries with fresh random seeds and prompts from the private pool (:func:`challenge_prompts`)."""
    if n < 1:
        raise UserError(f"--n {n}: need at least one image")
    if not prompt.strip():
        raise UserError("--prompt: empty")
    seeds = list(seeds) if seeds is not None else [secrets.randbelow(2 ** 31) for _ in range(n)]
    if len(seeds) != n:
        raise UserError(f"seeds: {len(seeds)} given for {n} images")
    prompts = challenge_prompts(key, prompt, seeds)
    compare = compare_size or max(1, size // 2)
    if not 0 < compare <= size:
        raise UserError(f"--compare_size {compare}: must be between 1 and the image size {size}")
    return Challenge(base_label, prompts, [int(s) for s in seeds], scheduler, steps, guidance_scale, size, size,
                     compare, key.commitment())
