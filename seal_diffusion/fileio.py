"""Safe file handling: atomic writes and pickle-free safetensors reads with clear errors.

Every file the tool writes goes through :func:`atomic_write` (temp file in the same folder, fsync, rename), so a
crash never leaves a half-written key or LoRA. Reads use safetensors only; nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import UserError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = True, what: str = "file") -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and rename it over ``path``.

    ``overwrite=False`` refuses to replace an existing file (checked before and, via a hard link, at the rename).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise UserError(f"{path}: {what} already exists; refusing to overwrite it (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if someone created ``path`` meanwhile
            except FileExistsError:
                raise UserError(f"{path}: {what} already exists; refusing to overwrite it (pass --force to replace it)")
            tmp.unlink()
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True, what: str = "file") -> Path:
    with atomic_write(path, overwrite=overwrite, what=what) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite)


def write_json_atomic(path: str | os.PathLike, obj, *, overwrite: bool = True) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", overwrite=overwrite)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    overwrite: bool = True,
    what: str = "file",
) -> Path:
    """Serialise ``tensors`` (contiguous CPU copies) with string ``metadata`` and write atomically."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = st_save(clean, metadata=metadata)
    return write_bytes_atomic(path, data, overwrite=overwrite, what=what)


def load_safetensors(path: str | os.PathLike, *, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata of a safetensors file; any problem becomes one clear :class:`UserError`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if path.is_dir():
        raise UserError(f"{path}: expected a {what} (.safetensors), got a folder")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except UserError:
        raise
    except Exception as exc:  # safetensors raises several types for truncated/garbage files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable safetensors {what} ({msg})") from exc
    return tensors, metadata


def read_safetensors_metadata(path: str | os.PathLike, *, what: str = "file") -> dict[str, str]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise UserError(f"{path}: not a readable safetensors {what} ({exc})") from exc


def safe_open_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names of a safetensors file (header only); [] if it is not one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return list(fh.keys())
    except Exception:
        return []
