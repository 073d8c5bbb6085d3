"""Pieces every writing command shares: the ``--force`` flag and the output check before any work."""

from __future__ import annotations

from ..outpaths import Output, check_outputs

__all__ = ["Output", "add_force", "check_first"]


def add_force(p, what: str = "an existing output") -> None:
    """``--force`` (alias ``--overwrite``, stored as ``overwrite``): the only way to replace ``what``."""
    p.add_argument("--force", "--overwrite", dest="overwrite", action="store_true", help=f"replace {what} (without "
                   "it the command stops before any work; keys, model cards and its own inputs are never replaced)")


def check_first(args, *outs: Output, **inputs) -> None:
    """Check every output path of the command (:func:`seal_diffusion.outpaths.check_outputs`); called from the
    command's ``check`` function, which :func:`seal_diffusion.cli.main` runs before the command itself."""
    check_outputs(*outs, force=bool(getattr(args, "overwrite", False)), inputs=inputs)
