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


# The longest files first (measured with --durations; one worker runs a whole file under --dist loadfile): two workers
# that start with the long files end together, instead of one idling while the other runs a long file picked last.
_LONG_FILES = ("test_demo.py", "test_ui_browser.py", "test_image_check.py", "test_claim.py", "test_dispute.py",
               "test_robustness.py", "test_functional.py", "test_training.py", "test_seal_core.py", "test_sdxl.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist would order the files by their number of tests instead
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


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


def _built_once(tmp_path_factory, name: str, build):
    """``build(folder)`` once per test session, shared by pytest-xdist's workers: the first worker to need it builds
    into the session's shared folder, the others wait and read what it wrote (every build is seeded, so the result is
    the same whichever worker makes it). ``build`` returns ``(result, kept)``: ``kept`` (JSON) is what the others get;
    the builder gets ``result``."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))[0]
    import json

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    done = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            result, kept = build(shared / name)
            done.write_text(json.dumps(kept, default=str))
            return result
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def owner_training(tmp_path_factory, subject_dir):
    """One small SEAL DreamBooth run on the tiny model (rank 4, 60 steps at 32 px, fixed seed and secret), shared by
    the claim, dispute, functional, robustness and output tests (built once for all workers). Returns the trainer's
    result with its network removed: ``pipeline`` is the clean base (each worker's own)."""
    from seal_diffusion.models.base_model import load_pipeline

    def build(out):
        result = _train_owner(out, subject_dir)
        return result, {k: v for k, v in result.items() if k not in ("network", "pipeline")}

    result = _built_once(tmp_path_factory, "owner", build)
    return result if "pipeline" in result else dict(result, pipeline=load_pipeline("tiny"))


@pytest.fixture(scope="session")
def distilled_copy(owner_training, tmp_path_factory) -> dict:
    """``attack distill`` of the owner's release, short (150 steps on 16×16 latents, rank 4): a copy that keeps the
    function but not the weights, shared by the function-level and suspect-reader tests. ``path`` and ``fidelity``."""
    from seal_diffusion.attacks.distill import distill_lora

    def build(out):
        out.mkdir(parents=True, exist_ok=True)
        res = distill_lora(owner_training["lora_path"], out / "copy.safetensors", steps=150, rank=4, batch=2,
                           latent_size=16, fidelity_inputs=8)
        kept = dict(path=str(res.path), fidelity=res.fidelity)
        return kept, kept

    return _built_once(tmp_path_factory, "distilled", build)


def _train_owner(out, subject_dir) -> dict:
    from seal_diffusion.training import parse_args, train

    args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(subject_dir),
                       "--instance_prompt", "a photo of sks cat", "--output_dir", str(out), "--output_name", "cat",
                       "--rank", "4", "--max_train_steps", "60", "--learning_rate", "2e-3", "--seed", "0",
                       "--resolution", "32",  # the tiny default is 64 px: 4× the tokens, ~6× the step time
                       "--cache_latents", "--secret", "claim test"])
    with fixed_scrypt_salt():
        result = train(args)
    result["network"].remove()
    return result
