"""Quiet library logging for the command-line entry points (``seal-diffusion`` and ``train_dreambooth_seal.py``).

Both entry points call :func:`quiet_libraries` so they behave the same; it lives here, below both, so neither has to
import the other.
"""

from __future__ import annotations

import os
import warnings


def quiet_libraries() -> None:
    """Library log levels to errors, no model-loading progress bars, no FutureWarnings."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:  # model-loading bars ("Loading pipeline components", "Loading weights") are noise in a CLI
        # imported here, not at the top: loading diffusers/transformers pulls in torch, which cli.main defers until
        # the OpenMP spin setting is made (seal_diffusion.cpu)
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
