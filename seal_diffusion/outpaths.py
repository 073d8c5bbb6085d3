"""Output paths checked before any work: nothing replaced silently, nothing lost to a path that cannot be written.

Every command that writes calls :func:`check_outputs` first (the CLI right after parsing, before it loads a model or
renders anything), so that a bad ``--json``/``--out`` costs a second, not the minutes of the work before it:

* the path's folder can be written: the nearest existing ancestor is a folder and a probe file can be created in it
  (missing parent folders are made for the probe and removed again), so ``/proc/x/r.md`` or a read-only mount fail
  at once — ``os.access`` alone says yes to root everywhere;
* a file output is not a folder, a folder output is not a file;
* an existing output is replaced only with ``force`` (``--force``/``--overwrite``); a folder output is refused when it
  already holds one of the names the command writes into it;
* some files are never replaced, not even with ``force``: the command's own inputs (the key, a suspect, a challenge),
  a SEAL key file (unless the output is itself a key, e.g. a forged key) and a model card (``README.md`` with a
  front matter, or beside a ``.sealkey``: ``verify --functional`` and ``challenge`` read the prompt from it);
* two outputs of one command are different paths.

Nothing here writes a file that stays: the probe is deleted at once. The actual writes stay atomic
(:mod:`seal_diffusion.fileio`), so a file created by someone else between this check and the write is still refused
there (``overwrite=False``).
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

FORCE_HINT = "pass --force to replace it"


@dataclass(frozen=True)
class Output:
    """One output of a command. ``option``: how the user named it (``--json``), for the message. ``folder``: the
    output is a folder; ``writes``: the names the command writes into it (refused if present, without ``force``);
    (none given: any content counts); ``whole``: the folder is replaced as a whole (then with ``force`` only if it holds ``marker``, i.e. it is one the
    tool wrote). ``key``: the output is a SEAL key (may replace a key with ``force``)."""

    path: str | os.PathLike | None
    option: str = "output"
    folder: bool = False
    writes: tuple[str, ...] = ()
    whole: bool = False
    marker: str | None = None
    key: bool = False


def _label(out: Output, path: Path) -> str:
    return f"{out.option} {path}" if out.option and out.option != "output" else str(path)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def is_key_file(path: Path) -> bool:
    """A SEAL key (safetensors metadata ``format=sealkey``), read from the header only; False for anything else."""
    try:
        if not path.is_file() or path.stat().st_size < 8:
            return False
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return (fh.metadata() or {}).get("format") == "sealkey"
    except Exception:  # not a safetensors file at all: not a key
        return False


def is_model_card(path: Path) -> bool:
    """A LoRA's model card: ``README.md`` that starts with a YAML front matter or sits beside a ``.sealkey``."""
    if path.name.lower() != "readme.md" or not path.is_file():
        return False
    if any(path.parent.glob("*.sealkey")):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"---\n"
    except OSError:
        return False


def probe_writable(folder: Path, label: str) -> None:
    """Fail now if files cannot be created in ``folder`` (made for the probe if missing, then removed again)."""
    folder = Path(os.path.abspath(folder))
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        kind = "a file, not a folder" if existing.is_file() else "not a folder"
        raise UserError(f"{label}: {existing} is {kind}, so nothing can be written under it")
    made: list[Path] = []
    try:
        missing = []
        p = folder
        while p != existing:
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            os.mkdir(p)
            made.append(p)
        fd, tmp = tempfile.mkstemp(prefix=".seal-probe.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        raise UserError(f"{label}: cannot write there ({reason})") from None
    finally:
        for p in reversed(made):
            try:
                os.rmdir(p)
            except OSError:
                pass


def _protected(path: Path, out: Output, label: str, inputs: list[tuple[str, Path]]) -> None:
    """Refuse, even with --force, to write over an input, a key or a model card."""
    for what, inp in inputs:
        if _same(path, inp):
            raise UserError(f"{label}: is the {what} this command reads; choose another path")
    if not out.key and is_key_file(path):
        raise UserError(f"{label}: is a SEAL key file; a key is never replaced by a report (choose another path)")
    if is_model_card(path):
        raise UserError(f"{label}: is a model card (README.md of a LoRA); choose another path")


def check_output(out: Output, *, force: bool = False, inputs: list[tuple[str, Path]] = ()) -> Path | None:
    """Check one output (see the module docstring); returns its path, or None when it was not given."""
    if out.path is None or str(out.path) == "":
        return None
    path = Path(out.path).expanduser()
    label = _label(out, path)
    inputs = [(w, Path(p).expanduser()) for w, p in inputs if p is not None]
    if not out.folder:
        if path.is_dir():
            raise UserError(f"{label}: is a folder; expected a file path")
        probe_writable(path.parent, label)
        if os.path.lexists(path):
            _protected(path, out, label, inputs)
            if not force:
                raise UserError(f"{label}: already exists; refusing to overwrite it ({FORCE_HINT})")
        return path
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{label}: is a file; expected a folder")
    probe_writable(path, label)
    if not path.is_dir():
        return path
    for what, inp in inputs:
        if _same(path, inp) and out.whole:
            raise UserError(f"{label}: is the {what} this command reads; choose another path")
    if out.whole:
        content = list(path.iterdir())
        if not content:
            return path
        if any(is_key_file(p) for p in content):
            raise UserError(f"{label}: holds a SEAL key; refusing to replace the folder (choose another path)")
        for what, inp in inputs:
            if inp.exists() and path.resolve() in inp.resolve().parents:
                raise UserError(f"{label}: holds the {what} this command reads; choose another path")
        if not force:
            raise UserError(f"{label}: already exists; refusing to replace the folder ({FORCE_HINT})")
        if out.marker and not (path / out.marker).exists():
            raise UserError(f"{label}: is not a folder this tool wrote (no {out.marker}); refusing to replace it even "
                            "with --force (choose another path)")
        return path
    found = ([n for n in out.writes if os.path.lexists(path / n)] if out.writes
             else sorted(p.name for p in path.iterdir())[:3])  # no names given: any content counts
    for n in found:
        if is_key_file(path / n) and not out.key:
            raise UserError(f"{label}: {n} is a SEAL key file; choose another folder")
        for what, inp in inputs:
            if _same(path / n, inp) or (inp.exists() and (path / n).resolve() in inp.resolve().parents):
                raise UserError(f"{label}: would replace {n}, the {what} this command reads; choose another folder")
    if found and not force:
        raise UserError(f"{label}: already holds {', '.join(found)} (an earlier run's outputs); refusing to replace "
                        f"them (pass --force, or choose another folder)")
    return path


def check_outputs(*outs: Output, force: bool = False, inputs: dict[str, object] | None = None) -> list[Path | None]:
    """Check every output of one command before it does any work; returns their paths (None where not given).

    ``inputs``: ``{"key": path, "suspect": [paths], ...}``: files the command reads; none of them is ever written
    over. Raises :class:`UserError` (one line, exit 2) on the first problem."""
    pairs: list[tuple[str, Path]] = []
    for what, value in (inputs or {}).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and isinstance(v, (str, os.PathLike)) and str(v):
                pairs.append((what, Path(v)))
    paths = [check_output(o, force=force, inputs=pairs) for o in outs]
    seen: dict[str, str] = {}
    for o, p in zip(outs, paths):
        if p is None:
            continue
        k = os.path.abspath(p)
        if k in seen:
            raise UserError(f"{o.option} {p}: is also {seen[k]}; give each output its own path")
        seen[k] = o.option
    return paths
