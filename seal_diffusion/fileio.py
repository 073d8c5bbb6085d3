"""Safe file handling: atomic writes and pickle-free safetensors reads with clear errors.

Every file the tool writes goes through :func:`atomic_write` (temp file in the same folder, fsync, rename), so a
crash never leaves a half-written key or LoRA. Public files get the permissions of the user's umask (normally 0644,
so a frontend running as another user can read them); only private files (``private=True``: the key and owner-side
secrets) stay 0600. Reads use safetensors only; nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import UserError


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore (briefly process-wide)
    os.umask(mask)
    return mask


def public_mode() -> int:
    """Permissions of a public file: what ``open()`` would give, 0666 minus the umask (0644 as usual)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = True, what: str = "file",
                 private: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and rename it over ``path``.

    ``overwrite=False`` refuses to replace an existing file (checked before and, via a hard link, at the rename).
    The file is 0600 when ``private``, else it follows the umask.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a {what} path")
    if not overwrite and path.exists():
        raise UserError(f"{path}: {what} already exists; refusing to overwrite it (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if not private:
            os.chmod(tmp, public_mode())
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


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True, what: str = "file",
                       private: bool = False) -> Path:
    with atomic_write(path, overwrite=overwrite, what=what, private=private) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite)


def json_safe(obj, nan=None):
    """``obj`` with inf → "inf"/"-inf", NaN → ``nan`` and numpy scalars → Python ones, so that it dumps as strict
    JSON (robustness writes NaN as null, compare and the σ sweep as "nan")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return nan if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v, nan) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, nan) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return json_safe(obj.item(), nan)
    return obj


def write_json_atomic(path: str | os.PathLike, obj, *, overwrite: bool = True) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", overwrite=overwrite)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    overwrite: bool = True,
    what: str = "file",
    private: bool = False,
) -> Path:
    """Serialise ``tensors`` (contiguous CPU copies) with string ``metadata`` and write atomically (0600 if
    ``private``)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = st_save(clean, metadata=metadata)
    return write_bytes_atomic(path, data, overwrite=overwrite, what=what, private=private)


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
