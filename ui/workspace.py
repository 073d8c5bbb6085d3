"""What every tab of the app shares: private job folders, clean error messages, and checks of the user's input.

Every job writes into its own folder inside a private temporary directory (mode 0700, removed at exit and pruned after
:data:`KEEP_SECONDS`) that the web server does not serve. :func:`_guard` turns bad input
(:class:`~seal_diffusion.errors.UserError`) into one clear message and any other failure into a logged, short one,
without taking the server down. The ``_need``/``_int``/``_path`` helpers read Gradio's values and say what is wrong.
"""

from __future__ import annotations

import atexit
import functools
import html
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from seal_diffusion.errors import UserError
from seal_diffusion.core.keyfile import SealKey

log = logging.getLogger("seal_diffusion.ui")

KEEP_SECONDS = 6 * 3600  # job folders and Gradio's cached downloads are deleted after this long


class Workspace:
    """A private temporary directory with one folder per job (``root/<session>/<job>``)."""

    def __init__(self, keep_seconds: float = KEEP_SECONDS):
        self.root = Path(tempfile.mkdtemp(prefix="seal-diffusion-ui-")).resolve()  # mode 0700
        self.keep_seconds = keep_seconds
        self._lock = threading.Lock()
        self._errors: dict[str, str] = {}  # the last error message of each browser session (kept on the page)
        atexit.register(self.cleanup)

    @staticmethod
    def _session(request) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "", str(getattr(request, "session_hash", "") or ""))[:64] or "api"

    def remember_error(self, request, message: str) -> None:
        with self._lock:
            if len(self._errors) > 1000:
                self._errors.clear()
            self._errors[self._session(request)] = message

    def error_box(self, request: gr.Request = None) -> str:
        """What a failed event leaves in its result area (``event.failure``): the message, until the next run."""
        with self._lock:
            message = self._errors.get(self._session(request), "")
        return ("<div class='seal-verdict seal-error' id='seal-error'><strong>Stopped: nothing was done.</strong> "
                f"{message}</div>")

    def job(self, request: gr.Request | None, kind: str) -> Path:
        session = self._session(request)
        self.prune()
        folder = self.root / session / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder

    def prune(self) -> None:
        """Delete job folders older than ``keep_seconds``."""
        cutoff = time.time() - self.keep_seconds
        with self._lock:
            for session in list(self.root.iterdir()) if self.root.is_dir() else []:
                for job in list(session.iterdir()):
                    try:
                        if job.stat().st_mtime < cutoff:
                            shutil.rmtree(job, ignore_errors=True)
                    except OSError:
                        continue

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def clean(self, message: str) -> str:
        """Replace paths inside the workspace or Gradio's upload folder by their file names (what the user knows)."""
        for root in {str(self.root), str(Path(get_upload_folder()).resolve()), os.path.abspath(get_upload_folder())}:
            message = re.sub(re.escape(root.rstrip("/")) + r"(?:/[^/\s:'\"()]+)*/([^/\s:'\"()]+)", r"\1", message)
        return message


def _guard(ws: Workspace, fn):
    """Run a handler; UserError → gr.Error with its one line; anything else → logged, short message; never crash.

    The message stays: the toast until the user closes it (``duration=None``), and the event's result area shows it
    too when the page wires ``event.failure(ws.error_box, None, area)`` (:meth:`Workspace.error_box`)."""

    def fail(request, message: str, title: str = "Error"):
        ws.remember_error(request, message)
        return gr.Error(message, title=title, duration=None, print_exception=False)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            ws.remember_error(request, html.escape(str(exc.message)))
            raise
        except UserError as exc:
            raise fail(request, html.escape(ws.clean(str(exc))), "Please check your input") from None
        except SystemExit as exc:  # argparse inside the library
            raise fail(request, f"Invalid settings (code {exc.code}).") from None
        except Exception as exc:  # noqa: BLE001 - the server must keep answering
            log.exception("%s failed", fn.__name__)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            detail = f"{type(exc).__name__}: {ws.clean(first)}" if first else type(exc).__name__
            raise fail(request, html.escape(f"Something went wrong ({detail}). The app is still running; the details "
                                            "are in the terminal where it was started.")) from None

    return wrapper


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def _path(file) -> Path | None:
    """A Gradio file value (str path, or an object/dict with .path/'path') as a Path."""
    if file is None:
        return None
    if isinstance(file, dict):
        file = file.get("path") or file.get("name")
    elif not isinstance(file, (str, os.PathLike)):
        file = getattr(file, "path", None) or getattr(file, "name", None)
    return Path(file) if file else None


def _paths(files) -> list[Path]:
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    return [p for p in (_path(f) for f in files) if p is not None]


def _load_key(file):
    path = _path(file)
    _need(path is not None, "Upload your private key (the .sealkey file you downloaded after training).")
    try:
        return SealKey.load(path), path
    except UserError as exc:
        msg = str(exc)
        if "not a SEAL key file" in msg or "not a readable safetensors" in msg:
            msg += " — upload the private .sealkey file made by training, not a LoRA or another file"
        raise UserError(msg) from None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _safe_name(text: str, default: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", (text or "").strip()).strip("._") or default
    return name[:80]


def _int(value, what: str, lo: int, hi: int | None = None) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}: {value!r} is not a number") from None
    _need(math.isfinite(number) and number == int(number), f"{what}: {value!r} is not a whole number")
    number = int(number)
    _need(number >= lo and (hi is None or number <= hi),
          f"{what}: {number} must be at least {lo}" + (f" and at most {hi}" if hi is not None else ""))
    return number


def _copy_uploads(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in files:
        _need(src.is_file(), f"{src.name}: upload is missing (try uploading it again)")
        stem, suffix, n = Path(src.name).stem or "file", Path(src.name).suffix, 1
        dst = folder / f"{stem}{suffix}"
        while dst.exists():
            n += 1
            dst = folder / f"{stem}_{n}{suffix}"
        shutil.copyfile(src, dst)
        out.append(dst)
    return out
