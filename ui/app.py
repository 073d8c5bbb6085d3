"""The seal-diffusion web app: one page, four tabs, for creators who never open a terminal.

* **Watermark & train** — subject photos (or the bundled example cat), prompt, base model, steps, rank, passport
  (random or an image) → live progress → the public LoRA (kohya and diffusers layouts), the private key, the
  commitment hash;
* **Export** — rebuild the public LoRA from the private key;
* **Compare** — images of the base model, the LoRA with C, with C_p, without passport and the exported file;
  SSIM/PSNR table; singular-value spectra;
* **Verify** — one or many suspect files → a verdict in plain words, the evidence (−log10 p) against the threshold,
  a per-layer chart and, for image passports, the recovered image.

Named endpoints ``/train``, ``/export``, ``/compare``, ``/verify`` (scriptable with ``gradio_client``). Everything
here is glue: training, export, verification, comparison and plots are the library's (:mod:`seal_diffusion`).

Safety: binds 127.0.0.1 unless told otherwise; uploads are size-limited; every job writes into its own folder
inside a private temporary directory (mode 0700, removed at exit and pruned after :data:`KEEP_SECONDS`) that the web
server does not serve — only the files a job returns are copied into Gradio's cache (``GRADIO_TEMP_DIR``), which is
pruned on the same schedule. Bad input (:class:`~seal_diffusion.errors.UserError`) becomes one clear message; any
other failure is logged and reported without taking the server down.

Where things are: :mod:`ui.layout` (the page), :mod:`ui.handlers` (tabs 1–4), :mod:`ui.image_check` and
:mod:`ui.dispute_tab` (tabs 5–6), :mod:`ui.figures`, :mod:`ui.workspace` (job folders, error messages, input checks).
This module is the entry point: :func:`launch` (what ``seal-diffusion ui`` calls) and :func:`launch_kwargs`.
"""

import os
import signal
import threading

import gradio as gr

from seal_diffusion.models.base_model import resolve_base
from seal_diffusion.errors import UserError
from ui.components import CSS as COMPONENTS_CSS
from ui.layout import CSS, build_app
from ui.workspace import Workspace

__all__ = ["DEFAULT_HOST", "DEFAULT_MAX_FILE_SIZE", "DEFAULT_PORT", "Workspace", "build_app", "launch",
           "launch_kwargs"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_SIZE = "1gb"  # LoRAs and keys are MBs; a merged SD 1.5 checkpoint in fp16 is about 2 GB (use the CLI)


def launch_kwargs(max_file_size: str | int | None = DEFAULT_MAX_FILE_SIZE) -> dict:
    """The arguments of ``demo.launch`` that make the app safe and look right (also used by the tests)."""
    theme = gr.themes.Soft(font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                           font_mono=["ui-monospace", "Consolas", "monospace"])  # no web fonts: works offline
    return dict(max_file_size=max_file_size, allowed_paths=[], show_error=False, theme=theme, css=CSS + COMPONENTS_CSS,
                footer_links=["api"], ssr_mode=False)


def launch(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, base: str = "tiny", *,
           max_file_size: str | int | None = DEFAULT_MAX_FILE_SIZE, block: bool = True, quiet: bool = False) -> gr.Blocks:
    """Build and serve the app on ``host:port`` (127.0.0.1 by default: only this computer can open it).

    ``block=False`` returns at once with the server running (tests; stop it with ``demo.close()``).
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    resolve_base(base)  # a bad --base is one clear error before the server starts
    demo = build_app(base)
    stop = threading.Event()
    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `kill`: close and clean up like Ctrl+C, quietly
    try:  # quiet: Gradio's banner suggests share=True, which would publish the app (and the keys made in it)
        demo.launch(server_name=host, server_port=int(port), prevent_thread_lock=True, quiet=True,
                    **launch_kwargs(max_file_size))
    except OSError as exc:
        demo.seal_workspace.cleanup()
        raise UserError(f"--host {host} --port {port}: cannot start the server ({exc}); is the port in use?") from exc
    if not quiet:
        print(f"seal-diffusion app running on {demo.local_url} (Ctrl+C to stop)", flush=True)
    if block:
        try:
            while not stop.wait(0.2):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            demo.close()
            demo.seal_workspace.cleanup()
            if not quiet:
                print("seal-diffusion app stopped; its job folders are removed", flush=True)
    return demo
