"""The bundled subject and the DreamBooth prompts.

The subject is scikit-image's bundled cat photo (``skimage.data.chelsea()``, shipped inside the package, no download),
cut into a handful of square crops and flips: enough for a DreamBooth run on the embedded default.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from skimage import data as skimage_data

SUBJECT_TOKEN = "sks"
SUBJECT_CLASS = "cat"
INSTANCE_PROMPT = f"a photo of {SUBJECT_TOKEN} {SUBJECT_CLASS}"
CLASS_PROMPT = f"a photo of {SUBJECT_CLASS}"
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"

# (left, top, size) crops of the 451×300 photo, each also written mirrored.
_CROPS = ((60, 0, 300), (90, 10, 280), (40, 20, 260), (110, 30, 240))


def subject_images(size: int = 64) -> list[Image.Image]:
    """Eight RGB ``size``×``size`` images of the cat: four crops and their mirror images."""
    photo = Image.fromarray(skimage_data.chelsea()).convert("RGB")
    out = []
    for left, top, side in _CROPS:
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        out.extend([crop, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    return out


def write_subject(out_dir: str | os.PathLike, size: int = 64) -> Path:
    """Write the bundled subject as PNG files (``cat_00.png`` …) into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(subject_images(size)):
        img.save(out / f"cat_{i:02d}.png")
    return out


def load_prompts(kind: str = "live_subjects", subject: str = f"{SUBJECT_TOKEN} {SUBJECT_CLASS}") -> list[str]:
    """The 25 DreamBooth evaluation prompts (``objects`` or ``live_subjects``) with ``{}`` filled by ``subject``."""
    path = PROMPTS_DIR / f"{kind}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt list not found (kinds: objects, live_subjects)")
    lines = [l.strip() for l in path.read_text().splitlines()]
    return [l.format(subject) for l in lines if l and not l.startswith("#")]


# Other subjects for measurements (benchmarks/image_check_matrix.py, tests): scikit-image's bundled photos, each cut
# like the cat into four centred square crops (100 %, 90 %, 80 %, 70 % of the short side) and their mirror images.
PHOTO_SUBJECTS = {"coffee": "a photo of sks cup", "astronaut": "a photo of sks person", "rocket": "a photo of sks rocket"}


def write_photo_subject(out_dir: str | os.PathLike, photo: str, size: int = 64) -> Path:
    """Write eight ``size``×``size`` crops of ``skimage.data.<photo>()`` (``coffee``, ``astronaut``, ``rocket``)."""
    if photo not in PHOTO_SUBJECTS:
        raise ValueError(f"photo subject {photo!r}: one of {', '.join(PHOTO_SUBJECTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(getattr(skimage_data, photo)()).convert("RGB")
    w, h = image.size
    for i, frac in enumerate((1.0, 0.9, 0.8, 0.7)):
        side = int(min(w, h) * frac)
        left, top = (w - side) // 2 + 7 * i, (h - side) // 2
        crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        crop.save(out / f"{photo}_{2 * i:02d}.png")
        crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out / f"{photo}_{2 * i + 1:02d}.png")
    return out
