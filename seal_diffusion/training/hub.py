"""``--push_to_hub``: upload a finished run's public files to the Hugging Face Hub — the kohya file, the diffusers
file and the model card, nothing else. The key, checkpoints, logs and validation images never leave the machine."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from ..errors import UserError

PRIVATE_SUFFIXES = (".sealkey",)


def push_public_files(paths: list[str | Path], repo_id: str, *, token: str | None = None, api=None) -> str:
    """Create ``repo_id`` if needed and upload ``paths`` (public files only) to its root; returns the repo URL."""
    paths = [Path(p) for p in paths]
    private = [p.name for p in paths if p.suffix in PRIVATE_SUFFIXES or p.name.startswith("checkpoint-")]
    if private:  # a programming error, never a user choice: the key does not leave the machine
        raise ValueError(f"refusing to upload private files: {private}")
    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        for p in paths:
            api.upload_file(path_or_fileobj=str(p), path_in_repo=p.name, repo_id=repo_id)
    except Exception as exc:  # network, auth, rate limits: one line; the files stay on disk
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"--push_to_hub {repo_id}: upload failed ({first}); the files are in the output folder"
        raise UserError(msg) from exc
    return str(url)
