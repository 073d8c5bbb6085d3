"""Quiet library logging for the command-line entry points (``seal-diffusion`` and ``train_dreambooth_seal.py``).

Both entry points call :func:`quiet_libraries` so they behave the same; it lives here, below both, so neither has to
import the other.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

# the modules whose progress bars a command turns off, and how (each library's own switch)
_PROGRESS_SWITCHES = {
    "diffusers.utils.logging": lambda module: module.disable_progress_bar(),
    "transformers.utils.logging": lambda module: module.disable_progress_bar(),  # also huggingface_hub's bars
}


def quiet_libraries() -> None:
    """Library log levels to errors, no model-loading progress bars, no FutureWarnings.

    Importing diffusers and transformers takes seconds (and loads torch), and most commands never load a model
    (``verify`` of a LoRA file, ``export``, ``--help``), so their progress bars are switched off when they are first
    imported, not here: a command that never loads them does not wait for them.
    """
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    for name, switch in _PROGRESS_SWITCHES.items():
        after_import(name, switch)


class _AfterImport:
    """A meta-path finder that runs ``hook(module)`` right after a named module has been executed (once)."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Callable]] = {}

    def find_spec(self, name, path=None, target=None):
        hooks = self.hooks.pop(name, None)
        if hooks is None:
            return None
        for finder in sys.meta_path:  # the spec the import would find without us
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            for hook in hooks:
                hook(module)

        spec.loader.exec_module = exec_then_hook  # this spec's loader instance only
        return spec


_FINDER = _AfterImport()


def after_import(name: str, hook: Callable) -> None:
    """Run ``hook(module)`` once module ``name`` is imported: now if it already is, else right after its import."""
    module = sys.modules.get(name)
    if module is not None:
        hook(module)
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    hooks = _FINDER.hooks.setdefault(name, [])
    if hook not in hooks:
        hooks.append(hook)
