"""Loading the base model, in one place: the trainer, CLI, UI and tests all call :func:`load_pipeline`.

Accepted sources (``--base MODEL`` / ``--pretrained_model_name_or_path``):

* ``tiny`` — the embedded default (:mod:`seal_diffusion.models.tiny`), built offline and cached; ``tiny-xl`` — its SDXL
  counterpart;
* a local diffusers folder (has ``model_index.json``);
* a single-file checkpoint ``*.safetensors`` (A1111/ComfyUI style); offline it needs ``config=`` a local diffusers
  folder of the same architecture, otherwise diffusers fetches the config from the hub;
* a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (downloaded or taken from the local HF cache;
  ``HF_HUB_OFFLINE=1`` keeps it offline).

The model family (SD 1.x or SDXL) is detected, not assumed: from ``model_index.json`` for folders and hub ids, from
the checkpoint's own tensor names for a single file (SDXL checkpoints hold ``conditioner.embedders.*``), and
:func:`is_sdxl` tells it from a loaded pipeline. SD 1.5 is the default everywhere.

Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run code when loaded, so they are refused unless the
caller passes ``allow_pickle=True`` (CLI: ``--allow_pickle``). Anything else is one clear :class:`UserError`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import safe_open_keys
from .tiny import tiny_model_dir

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
TINY_NAMES = ("tiny", "tiny-xl")
ACCEPTED = (
    "accepted: 'tiny' or 'tiny-xl' (embedded defaults, SD 1.5 / SDXL), a hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5', "
    "a local diffusers folder (with model_index.json) or a single-file .safetensors checkpoint"
)


@dataclass(frozen=True)
class BaseSource:
    """What a ``--base`` string points at. ``kind`` is one of tiny, folder, single_file, hub (``location`` is
    ``tiny`` or ``tiny-xl`` for the embedded defaults)."""

    kind: str
    location: str

    @property
    def label(self) -> str:
        """A name for model cards and key metadata (never a secret)."""
        return self.location


def resolve_base(source: str | os.PathLike, *, allow_pickle: bool = False) -> BaseSource:
    """Classify ``source`` without loading anything; raise :class:`UserError` for anything unusable."""
    text = str(source).strip()
    if not text:
        raise UserError(f"base model: empty name; {ACCEPTED}")
    if text in TINY_NAMES:
        return BaseSource("tiny", text)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return BaseSource("folder", str(path))
        raise UserError(f"{path}: folder has no model_index.json, so it is not a diffusers pipeline folder; {ACCEPTED}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return BaseSource("single_file", str(path))
        if suffix in PICKLE_SUFFIXES:
            if allow_pickle:
                return BaseSource("single_file", str(path))
            raise UserError(
                f"{path}: pickle checkpoint ({suffix}) refused because loading it can run arbitrary code; "
                "convert it to .safetensors, or pass --allow_pickle if you trust its source"
            )
        raise UserError(f"{path}: unsupported file type '{suffix or path.name}'; {ACCEPTED}")
    # owner/name, one slash, no file suffix: anything else that does not exist locally is a typo'd path
    if _HUB_ID.match(text) and not text.lower().endswith((".safetensors",) + PICKLE_SUFFIXES):
        return BaseSource("hub", text)
    raise UserError(f"{text}: no such file or folder, and not a hub id (owner/name); {ACCEPTED}")


def config_from_base(base: str | os.PathLike | None) -> str | None:
    """The local diffusers folder that gives a single-file model's configs when ``base`` names one: the embedded
    default's folder for ``tiny`` / ``tiny-xl``, the folder itself for a diffusers folder; else None."""
    if base is None:
        return None
    if str(base) in TINY_NAMES:
        return str(tiny_model_dir(xl=str(base) == "tiny-xl"))
    path = Path(base).expanduser()
    return str(path) if (path / "model_index.json").is_file() else None


def load_pipeline(
    source: str | os.PathLike | BaseSource = "tiny",
    *,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    variant: str | None = None,
):
    """Load a ``StableDiffusionPipeline`` from any accepted source (see module docstring).

    ``config`` is a local diffusers folder giving the component configs (and tokenizer) for a single-file checkpoint.
    ``cache_dir`` is the Hugging Face cache for hub ids (default: the HF cache). The safety checker is not loaded:
    this tool trains and verifies, it does not serve images to the public.
    """
    src = source if isinstance(source, BaseSource) else resolve_base(source, allow_pickle=allow_pickle)
    if src.kind == "single_file" and config is not None and not (Path(config) / "model_index.json").is_file():
        raise UserError(f"{config}: --config must be a local diffusers folder with model_index.json")
    pipeline_cls = pipeline_class(src, config=config)
    kwargs = dict(safety_checker=None, requires_safety_checker=False) if not _xl(pipeline_cls) else {}
    if variant:
        kwargs["variant"] = variant  # e.g. fp16: diffusion_pytorch_model.fp16.safetensors
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        if src.kind == "tiny":
            pipe = pipeline_cls.from_pretrained(tiny_model_dir(xl=src.location == "tiny-xl"), local_files_only=True,
                                                **kwargs)
        elif src.kind == "folder":
            pipe = pipeline_cls.from_pretrained(src.location, local_files_only=True, **kwargs)
        elif src.kind == "single_file":
            extra = {"config": str(config), "local_files_only": True} if config is not None else {}
            if src.location.lower().endswith(PICKLE_SUFFIXES):
                extra["use_safetensors"] = False
            pipe = pipeline_cls.from_single_file(src.location, **extra, **kwargs)
        else:  # hub
            pipe = pipeline_cls.from_pretrained(src.location, revision=revision, cache_dir=cache_dir, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if src.kind == "single_file" and config is None:
            hint = (" (its configs are missing: offline, a single-file model needs --config, a local diffusers folder"
                    " of the same architecture, or a --base that is one)")
        elif src.kind == "hub":
            hint = " (no network? download it once, or point at a local folder)"
        raise UserError(f"{src.location}: could not load the base model: {first}{hint}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _xl(cls) -> bool:
    return cls.__name__.startswith("StableDiffusionXL")


def pipeline_class(src: BaseSource, *, config: str | os.PathLike | None = None):
    """``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` for ``src``, without loading weights.

    tiny / tiny-xl by name; a folder (or a single file's ``config`` folder) by its ``model_index.json``; a single file
    without config by its tensor names (SDXL checkpoints carry ``conditioner.embedders``); a hub id by the
    ``model_index.json`` in the local HF cache when there is one, else SD 1.x.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # lazy: diffusers takes ~5 s to import

    def from_index(folder) -> bool | None:
        index = Path(folder) / "model_index.json"
        if not index.is_file():
            return None
        try:
            name = json.loads(index.read_text()).get("_class_name", "")
        except (OSError, ValueError) as exc:
            raise UserError(f"{index}: unreadable model_index.json ({exc})") from exc
        return "XL" in name

    xl: bool | None = None
    if src.kind == "tiny":
        xl = src.location == "tiny-xl"
    elif src.kind == "folder":
        xl = from_index(src.location)
    elif src.kind == "single_file":
        xl = from_index(config) if config is not None else None
        if xl is None and src.location.lower().endswith(".safetensors"):
            xl = any(k.startswith("conditioner.embedders.") for k in safe_open_keys(Path(src.location)))
    elif src.kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache  # lazy: only this cache probe needs it

            cached = try_to_load_from_cache(src.location, "model_index.json")
            xl = from_index(Path(cached).parent) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 — a cache probe only; the load itself reports real problems
            xl = None
    return StableDiffusionXLPipeline if xl else StableDiffusionPipeline


def is_sdxl(pipe_or_unet) -> bool:
    """True for an SDXL pipeline or UNet (the ``text_time`` added conditioning: pooled text + size/crop ids)."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    return getattr(unet.config, "addition_embed_type", None) == "text_time"
