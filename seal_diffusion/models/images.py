"""Image files for training and evaluation: find them in a folder, decode them safely, turn them into tensors.

Used by the trainer's dataset (:mod:`seal_diffusion.training.data`) and by the held-out evaluation
(:mod:`seal_diffusion.evaluation.heldout`), so it sits below both.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def scan_image_dir(folder: str | os.PathLike, arg: str, warn: Callable[[str], None] = _warn) -> list[Path]:
    """The image files of ``folder`` (sorted). Other files are skipped with a warning; none left → UserError."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise UserError(f"{arg} {path}: folder not found")
    if not path.is_dir():
        raise UserError(f"{arg} {path}: not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
        warn(f"{arg} {path}: skipping {len(others)} non-image file(s): {shown}")
    if not images:
        raise UserError(f"{arg} {path}: no images found (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return images


def load_image(path: Path, resolution: int, warn: Callable[[str], None] = _warn,
               resample=Image.Resampling.BILINEAR):
    """Decode ``path`` to RGB and resize it so its shorter side is ``resolution`` with the PIL filter ``resample``
    (the trainer's ``--image_interpolation_mode``) (corrupt → UserError)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (resolution, resolution))  # JPEG: decode at reduced size (huge photos)
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: image is too large to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable image ({msg})") from exc
    w, h = im.size
    if min(w, h) < resolution // 2:
        warn(f"{path}: {w}×{h} is much smaller than the training resolution {resolution}; upscaling it")
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        im = im.resize(size, resample, reducing_gap=3.0)
    return im


def image_to_tensor(im, resolution: int, center_crop: bool, flip: bool, rng: np.random.Generator | None) -> torch.Tensor:
    """Crop (center, or random with ``rng``) to ``resolution``², optionally mirror, map to [−1, 1], CHW float."""
    w, h = im.size
    if center_crop or rng is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

