"""The public challenge of the image check: what a suspect service is asked to render (prompts, seeds, sampler, size),
and how one is made from a key and a subject prompt (:mod:`seal_diffusion.image_check` runs the test).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .defaults import CHALLENGE_GUIDANCE as DEFAULT_GUIDANCE, CHALLENGE_N as DEFAULT_N, \
    CHALLENGE_STEPS as DEFAULT_STEPS  # the values --help shows
from .errors import UserError
from .fileio import write_json_atomic
from .keyfile import SealKey

FORMAT = "seal-image-challenge"
VERSION = 1
GENERIC_PROMPTS = (
    "a photo of a dog", "a landscape with mountains", "a red car on a street", "a bowl of fruit on a table",
    "a portrait of a woman", "a city skyline at night", "a house in the forest", "a painting of flowers",
)
SUBJECT_VARIANTS = ("{}", "{} on a beach", "{} in the snow", "{} on a sofa", "a drawing of {}", "{}, close-up")
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

    def save(self, path: str | os.PathLike) -> Path:
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

