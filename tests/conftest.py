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

# pytest-xdist (README: -n 2 --dist loadfile; each test file runs on one worker, so each module fixture is built once,
# and the session fixture ``owner_training`` is trained once for all workers: see there): one torch thread per worker
# when the workers already fill the cores. The tiny model's ops are too small for a second thread to pay (most of a
# step is Python dispatch), two processes are not.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def tiny_dir():
    """The cached diffusers folder of the embedded default (built once per test session)."""
    from seal_diffusion.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture()
def tiny_pipe(tiny_dir):
    """A fresh tiny pipeline (loaded from the cache; tests may modify it)."""
    from seal_diffusion.models.base_model import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory):
    """The bundled subject (8 PNGs, 64×64) written once per session."""
    from seal_diffusion.models.subject import write_subject

    return write_subject(tmp_path_factory.mktemp("subject"))


@pytest.fixture(scope="session")
def owner_training(tmp_path_factory, subject_dir):
    """One small SEAL DreamBooth run on the tiny model (rank 4, 60 steps, fixed seed and secret), shared by the claim
    and robustness tests. Returns the trainer's result with its network removed: ``pipeline`` is the clean base."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _train_owner(tmp_path_factory.mktemp("owner"), subject_dir)
    # pytest-xdist: the first worker to need it trains into the session's shared folder, the others wait and read
    # its files (the run is the same, seeded, either way); only the clean base pipeline is each worker's own
    import json

    from filelock import FileLock

    from seal_diffusion.models.base_model import load_pipeline

    shared = tmp_path_factory.getbasetemp().parent
    done = shared / "owner_training.json"
    with FileLock(str(shared / "owner_training.lock")):
        if not done.exists():
            result = _train_owner(shared / "owner", subject_dir)
            kept = {k: v for k, v in result.items() if k not in ("network", "pipeline")}
            done.write_text(json.dumps(kept, default=str))
            return result
    return dict(json.loads(done.read_text()), pipeline=load_pipeline("tiny"))


def _train_owner(out, subject_dir) -> dict:
    from seal_diffusion.training import parse_args, train

    args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(subject_dir),
                       "--instance_prompt", "a photo of sks cat", "--output_dir", str(out), "--output_name", "cat",
                       "--rank", "4", "--max_train_steps", "60", "--learning_rate", "2e-3", "--seed", "0",
                       "--cache_latents", "--secret", "claim test"])
    with fixed_scrypt_salt():
        result = train(args)
    result["network"].remove()
    return result
