"""Shared test setup: offline, hermetic caches, deterministic, few threads; fixtures for the tiny model."""

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="seal-test-cache-")
os.environ.setdefault("SEAL_DIFFUSION_CACHE", _CACHE)
from seal_diffusion.cpu import short_openmp_spin  # noqa: E402

short_openmp_spin()  # OpenMP threads that spin long while idle make small ops many times slower on shared cores
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
from small_owner import fixed_scrypt_salt  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dir():
    """The cached diffusers folder of the embedded default (built once per test session)."""
    from seal_diffusion.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture()
def tiny_pipe(tiny_dir):
    """A fresh tiny pipeline (loaded from the cache; tests may modify it)."""
    from seal_diffusion.base_model import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory):
    """The bundled subject (8 PNGs, 64×64) written once per session."""
    from seal_diffusion.subject import write_subject

    return write_subject(tmp_path_factory.mktemp("subject"))


@pytest.fixture(scope="session")
def owner_training(tmp_path_factory, subject_dir):
    """One small SEAL DreamBooth run on the tiny model (rank 4, 60 steps, fixed seed and secret), shared by the claim
    and robustness tests. Returns the trainer's result with its network removed: ``pipeline`` is the clean base."""
    from seal_diffusion.training import parse_args, train

    out = tmp_path_factory.mktemp("owner")
    args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(subject_dir),
                       "--instance_prompt", "a photo of sks cat", "--output_dir", str(out), "--output_name", "cat",
                       "--rank", "4", "--max_train_steps", "60", "--learning_rate", "2e-3", "--seed", "0",
                       "--cache_latents", "--secret", "claim test"])
    with fixed_scrypt_salt():
        result = train(args)
    result["network"].remove()
    return result
