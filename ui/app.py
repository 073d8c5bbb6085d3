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
"""

import atexit
import functools
import html
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr

from seal_diffusion.base_model import TINY_NAMES
from seal_diffusion.errors import UserError
from ui.components import CSS as COMPONENTS_CSS
from ui.components import one_or_many
from ui import functional as ui_functional

log = logging.getLogger("seal_diffusion.ui")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_SIZE = "1gb"  # LoRAs and keys are MBs; a merged SD 1.5 checkpoint in fp16 is about 2 GB (use the CLI)
KEEP_SECONDS = 6 * 3600  # job folders and Gradio's cached downloads are deleted after this long
MAX_PHOTOS = 200
MAX_SUSPECTS = 100
MAX_PROMPTS = 4
MAX_SEEDS = 8
MAX_CHARTS = 6  # per-layer charts drawn for at most this many suspects (the table lists them all)
RANKS = [2, 4, 8, 16, 32, 64, 128]
SHORT_LABELS = {"base": "base model", "C": "passport C", "C_p": "passport C_p", "identity": "no passport",
                "exported": "exported file"}
ABOUT_VARIANTS = {"base": "without your LoRA", "C": "your LoRA as trained", "C_p": "your LoRA with the second "
                  "passport", "identity": "your LoRA with the passport removed", "exported": "the public file, loaded "
                  "as any user would"}
PLAIN_PAIRS = {
    ("exported", "C"): "the file you share gives exactly the pictures you trained (should be identical)",
    ("identity", "base"): "without the secret passport, how close the LoRA stays to the base model",
    ("C", "C_p"): "your two passports give similar pictures (part of the ownership proof)",
    ("C", "base"): "what your LoRA changes",
    ("C_p", "base"): "what your LoRA changes with the second passport",
}
PHOTO_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # = seal_diffusion.images.IMAGE_SUFFIXES

CSS = """
.seal-warning { border: 2px solid #d97706; border-radius: 8px; padding: 4px 14px; background: #fffbeb; }
.seal-warning p, .seal-warning li, .seal-warning strong { color: #78350f !important; }
.seal-note { font-size: 0.92em; opacity: 0.85; }
.seal-verdict { border-radius: 8px; padding: 10px 14px; margin: 6px 0; border-left: 6px solid; color: #1f2937; }
.seal-verdict strong, .seal-verdict span, .seal-verdict sup { color: #1f2937 !important; }
.seal-found { background: #dcfce7; border-color: #16a34a; }
.seal-notfound { background: #fee2e2; border-color: #dc2626; }
.seal-error { background: #f3f4f6; border-color: #6b7280; }
#seal-title h1 { margin-bottom: 0; }
"""


# ==================================================================================================================
# private job folders and clean error messages
# ==================================================================================================================
class Workspace:
    """A private temporary directory with one folder per job (``root/<session>/<job>``)."""

    def __init__(self, keep_seconds: float = KEEP_SECONDS):
        self.root = Path(tempfile.mkdtemp(prefix="seal-diffusion-ui-")).resolve()  # mode 0700
        self.keep_seconds = keep_seconds
        self._lock = threading.Lock()
        atexit.register(self.cleanup)

    def job(self, request: gr.Request | None, kind: str) -> Path:
        session = re.sub(r"[^A-Za-z0-9_-]", "", str(getattr(request, "session_hash", "") or ""))[:64] or "api"
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
        from gradio.utils import get_upload_folder

        for root in {str(self.root), str(Path(get_upload_folder()).resolve()), os.path.abspath(get_upload_folder())}:
            message = re.sub(re.escape(root.rstrip("/")) + r"(?:/[^/\s:'\"()]+)*/([^/\s:'\"()]+)", r"\1", message)
        return message


def _guard(ws: Workspace, fn):
    """Run a handler; UserError → gr.Error with its one line; anything else → logged, short message; never crash."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as exc:
            raise gr.Error(html.escape(ws.clean(str(exc))), title="Please check your input",
                           print_exception=False) from None
        except SystemExit as exc:  # argparse inside the library
            raise gr.Error(f"Invalid settings (code {exc.code}).", print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the server must keep answering
            log.exception("%s failed", fn.__name__)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            detail = f"{type(exc).__name__}: {ws.clean(first)}" if first else type(exc).__name__
            raise gr.Error(html.escape(f"Something went wrong ({detail}). The app is still running; the details are "
                                       "in the terminal where it was started."), print_exception=False) from None

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
    from seal_diffusion.keyfile import SealKey

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


# ==================================================================================================================
# handlers (thin: the work is the library's)
# ==================================================================================================================
class Handlers:
    def __init__(self, base: str, ws: Workspace):
        self.base = base
        self.ws = ws

    # -- 1. watermark & train ------------------------------------------------------------------------------------
    # Every input defaults to None so that API clients may leave out what they do not need (the component's own
    # default applies); the handlers check what is missing and say so.
    def train(self, photos=None, use_example=None, instance_prompt=None, base=None, steps=None, rank=None,
              passport_kind=None, passport_image=None, name=None, learning_rate=None, resolution=None,
              batch_size=None, seed=None, request: gr.Request = None, progress=gr.Progress()):
        from seal_diffusion.base_model import resolve_base
        from seal_diffusion.subject import write_subject
        from seal_diffusion.images import IMAGE_SUFFIXES
        from seal_diffusion.training import parse_args, train

        base = (base or "").strip() or self.base
        src = resolve_base(base)  # a typo'd base fails here, before anything is written
        prompt = (instance_prompt or "").strip()
        _need(bool(prompt), "Instance prompt: describe your subject, e.g. 'a photo of sks cat'.")
        steps = _int(steps, "Training steps", 1, 100_000)
        rank = _int(rank, "Rank", 2, 1024)
        name = _safe_name(name, "my_lora")
        job = self.ws.job(request, "train")
        photos_dir = job / "photos"
        uploads = _paths(photos)
        if use_example:
            write_subject(photos_dir, size=64 if src.kind == "tiny" else 512)
            n_photos = len(list(photos_dir.iterdir()))
        else:
            _need(bool(uploads), "Add some photos of your subject (5 to 20 is typical), or tick "
                                 "'Use the bundled example cat'.")
            _need(len(uploads) <= MAX_PHOTOS, f"{len(uploads)} photos: at most {MAX_PHOTOS} per training")
            for p in uploads:
                _need(p.suffix.lower() in IMAGE_SUFFIXES,
                      f"{p.name}: not an image file (use {', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})")
            n_photos = len(_copy_uploads(uploads, photos_dir))
        _need(passport_kind in (None, "", "random", "image"),
              f"Passport {passport_kind!r}: choose 'random' or 'image'")
        if passport_kind == "image":
            image = _path(passport_image)
            _need(image is not None, "Passport: upload the image to hide (a logo or signature), or choose 'Random'.")
            passport_source = "image:" + str(_copy_uploads([image], job / "passport")[0])
        else:
            passport_source = "random"

        argv = [f"--pretrained_model_name_or_path={base}", f"--instance_data_dir={photos_dir}",
                f"--instance_prompt={prompt}", f"--output_dir={job / 'output'}", f"--output_name={name}",
                f"--max_train_steps={steps}", f"--rank={rank}", f"--passport_source={passport_source}",
                "--report_to=none"]
        learning_rate, resolution, batch_size, seed = (str(v).strip() if v is not None else ""
                                                       for v in (learning_rate, resolution, batch_size, seed))
        if learning_rate:
            try:
                lr = float(learning_rate)
            except ValueError:
                raise UserError(f"Learning rate {learning_rate!r}: not a number (e.g. 1e-4)") from None
            _need(math.isfinite(lr) and lr > 0, f"Learning rate {learning_rate!r}: must be a positive number")
            argv.append(f"--learning_rate={lr!r}")
        if resolution:
            argv.append(f"--resolution={_int(resolution, 'Resolution', 8, 4096)}")
        if batch_size:
            argv.append(f"--train_batch_size={_int(batch_size, 'Images per step', 1, 256)}")
        if seed:
            argv.append(f"--seed={_int(seed, 'Seed', 0, 2**32 - 1)}")
        args = parse_args(argv)

        progress(0, desc="Preparing: loading the base model and your photos…")

        def on_step(step, total, loss, seconds_left):
            progress((step, total), unit="steps",
                     desc=f"Training: step {step} of {total} · loss {loss:.4f} · about {_duration(seconds_left)} left")

        result = train(args, progress_callback=on_step)
        summary = (
            f"### Done: your watermarked LoRA is ready\n"
            f"Trained **{result['steps']} steps** on **{n_photos} photo(s)** in {_duration(result['total_seconds'])} "
            f"(base model `{html.escape(src.label)}`, rank {rank}, final loss {result['final_loss']:.4f}).\n\n"
            f"1. **Share** the public LoRA below: upload the **kohya** file (`{name}.safetensors`) to LoRA sites; "
            f"it also loads in ComfyUI, AUTOMATIC1111 and diffusers. The diffusers file is for "
            f"`pipe.load_lora_weights` only. Both look and work like any other LoRA; the watermark is invisible.\n"
            f"2. **Publish the commitment hash** with it (e.g. in the description). It proves later that your key "
            f"existed when you released the LoRA.\n"
            f"3. **Download the private key `{name}.sealkey` now** and back it up. Only this key can prove the "
            f"LoRA is yours. It has been filled in on the Export, Compare and Verify tabs for you.\n"
        )
        return summary, result["lora_path"], result["diffusers_path"], result["key_path"], result["commitment"]

    # -- 2. export -----------------------------------------------------------------------------------------------
    def export(self, key_file=None, layout=None, name=None, request: gr.Request = None):
        from seal_diffusion.export import export_lora

        _need(layout in ("kohya", "diffusers"), f"Layout {layout!r}: choose kohya or diffusers")
        key, key_path = _load_key(key_file)
        name = _safe_name(name, _safe_name(key_path.stem, "my_lora"))
        job = self.ws.job(request, "export")
        target = job / (f"{name}.safetensors" if layout == "kohya" else "pytorch_lora_weights.safetensors")
        path = export_lora(key, target, layout, name)
        where = ("ComfyUI, AUTOMATIC1111 and most LoRA sites" if layout == "kohya"
                 else "diffusers: `pipe.load_lora_weights(...)`")
        md = (f"Done: rebuilt the public LoRA from your key ({layout} layout, for {where}): {len(key.modules)} layers, "
              f"rank {key.rank}.\n\nKey commitment: `{key.commitment()}` (it should match the one you published).")
        return str(path), md

    # -- 3. compare ----------------------------------------------------------------------------------------------
    def compare(self, key_file=None, base=None, prompts=None, seeds=None, steps=None, request: gr.Request = None,
                progress=gr.Progress()):
        from seal_diffusion.compare import VARIANT_LABELS, compare
        from seal_diffusion.export import public_factors
        from seal_diffusion.plots import plot_spectra

        key, _ = _load_key(key_file)
        base = (base or "").strip() or self.base
        prompt_list = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        _need(bool(prompt_list), "Prompt: write at least one prompt (one per line).")
        _need(len(prompt_list) <= MAX_PROMPTS, f"{len(prompt_list)} prompts: at most {MAX_PROMPTS} at a time")
        seed_list = [_int(s, "Seeds", 0, 2**32 - 1) for s in re.split(r"[\s,;]+", str(seeds or "").strip()) if s]
        _need(bool(seed_list), "Seeds: give at least one whole number, e.g. '0 1'.")
        _need(len(seed_list) <= MAX_SEEDS, f"{len(seed_list)} seeds: at most {MAX_SEEDS} at a time")
        steps = _int(steps, "Inference steps", 1, 500)
        job = self.ws.job(request, "compare")
        progress(0, desc="Loading the base model…")
        result = compare(key, base, prompt_list, seed_list, job / "compare", steps=steps, show_progress=False,
                         progress=lambda done, total, msg: progress((done, total), desc=msg, unit="images"))
        gallery = []
        for i in range(result["n_images"]):
            prompt, seed = prompt_list[i // len(seed_list)], seed_list[i % len(seed_list)]
            which = "" if result["n_images"] == 1 else f" · {prompt} · seed {seed}"  # several rows: say which
            for v in result["variants"]:
                gallery.append((result["images"][v][i], SHORT_LABELS.get(v, VARIANT_LABELS[v]) + which))
        table = []
        for p in result["pairs"]:
            ssim = "identical" if math.isinf(p["psnr_mean"]) else f"{p['ssim_mean']:.4f}"
            psnr = "∞ (identical)" if math.isinf(p["psnr_mean"]) else f"{p['psnr_mean']:.2f}"
            table.append([f"{SHORT_LABELS.get(p['a'], p['a'])} vs {SHORT_LABELS.get(p['b'], p['b'])}", ssim, psnr,
                          PLAIN_PAIRS.get((p["a"], p["b"]), p["what"])])
        loras = {
            "released LoRA (C folded in)": public_factors(key),
            "with passport C_p": {m: key.delta_factors(m, "C_p") for m in key.modules},
            "no passport (C = I)": {m: key.delta_factors(m, "identity") for m in key.modules},
        }
        spectra = plot_spectra(loras, job / "spectra.png", title="Singular values of each layer's weight change")
        rows = "; ".join(f"row {i + 1}: seed {seed_list[i % len(seed_list)]}"
                         + (f", prompt {i // len(seed_list) + 1}" if len(prompt_list) > 1 else "")
                         for i in range(result["n_images"]))
        md = (f"Rendered {len(result['variants'])} versions × {result['n_images']} picture(s) in "
              f"{_duration(result['seconds'])} on `{html.escape(base)}` ({rows}). Columns: "
              + ", ".join(f"**{SHORT_LABELS.get(v, v)}** ({ABOUT_VARIANTS.get(v, VARIANT_LABELS[v])})"
                          for v in result["variants"]) + ".")
        return gallery, table, str(spectra), md

    # -- 4. verify -----------------------------------------------------------------------------------------------
    def verify(self, key_file=None, suspect_files=None, base=None, threshold=None, together=False, commitment=None,
               request: gr.Request = None):
        from seal_diffusion.keyfile import check_commitment
        from seal_diffusion.verify import (DEFAULT_THRESHOLD, combine_suspects, load_suspect, recover_passports,
                                           verify)

        key, _ = _load_key(key_file)
        published = check_commitment(key, commitment, "Published commitment") if (commitment or "").strip() else None
        suspects = _paths(suspect_files)
        _need(bool(suspects), "Add at least one file to check (a LoRA .safetensors you found).")
        _need(len(suspects) <= MAX_SUSPECTS, f"{len(suspects)} files: at most {MAX_SUSPECTS} at a time")
        threshold = DEFAULT_THRESHOLD if threshold in (None, "") else float(threshold)
        _need(math.isfinite(threshold) and threshold > 0, f"Threshold {threshold}: must be a positive number")
        base = (base or "").strip() or self.base
        job = self.ws.job(request, "verify")
        image_passport = key.passport_source.startswith("image:")
        rows, charted, recovered = [], [], []
        lines = [f"<span class='seal-note'>Key checked against your published commitment {published[:16]}….</span>"
                 if published else "<span class='seal-note'>Key not checked against a published commitment (add it "
                 "under Advanced settings to prove this is the key you published).</span>"]
        groups = [suspects] if together and len(suspects) > 1 else [[p] for p in suspects]
        for group in groups:  # loaded together: one suspect, the files' updates added (a LoRA split into parts)
            label = " + ".join(p.name for p in group)
            try:
                suspect = combine_suspects([load_suspect(p, key, base) for p in group])
                report = verify(key, suspect, threshold)
            except UserError as exc:
                msg = self.ws.clean(str(exc))
                rows.append([label, "could not be checked", None, threshold, "", msg])
                lines.append(f"<div class='seal-verdict seal-error'><strong>{html.escape(label)}: could not be "
                             f"checked.</strong> {html.escape(msg)}</div>")
                continue
            n = math.floor(report.neg_log10_p)
            evidence = (f"<br><span class='seal-note'>Evidence score (−log10 p): {report.neg_log10_p:,.1f}; the "
                        f"watermark counts as found from {threshold:g}. {report.n_modules} of "
                        f"{report.n_modules + report.n_modules_missing} layers compared."
                        + (f" With {report.n_modules} layers at most {report.max_neg_log10_p:.1f} is reachable."
                           if report.n_modules_missing and report.max_neg_log10_p is not None else "")
                        + (" Not tested: " + html.escape("; ".join(report.not_tested)) + "."
                           if report.not_tested else "") + "</span>")
            if report.detected:
                verdict = "watermark found"
                lines.append(f"<div class='seal-verdict seal-found'><strong>{html.escape(label)}: this file contains "
                             f"your watermark.</strong> The chance of this happening by accident is below 1 in "
                             f"10<sup>{n:,}</sup>.{evidence}</div>")
            else:
                verdict = "no watermark found"
                lines.append(f"<div class='seal-verdict seal-notfound'><strong>{html.escape(label)}: no sign of your "
                             f"watermark.</strong> Nothing in this file matches your key beyond what chance gives."
                             f"{evidence}</div>")
            rows.append([label, verdict, round(report.neg_log10_p, 2), threshold,
                         f"{report.n_modules}/{report.n_modules + report.n_modules_missing}", report.suspect_format])
            if len(charted) < MAX_CHARTS:
                charted.append((label, report))
                if image_passport:
                    recovered.append((label, recover_passports(key, suspect)))
        chart = _verify_chart(charted, threshold, job / "layers.png") if charted else None
        passport_png = _passport_figure(key, recovered, job / "passport.png") if recovered else None
        if len([r for r in rows if r[1] != "could not be checked"]) > MAX_CHARTS:
            lines.append(f"<span class='seal-note'>The chart shows the first {MAX_CHARTS} files; the table lists "
                         "all of them.</span>")
        verdict_md = "\n\n".join(lines)
        return (verdict_md, rows, str(chart) if chart else None,
                gr.Image(value=str(passport_png) if passport_png else None, visible=passport_png is not None))


# ==================================================================================================================
# figures (presentation only)
# ==================================================================================================================
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mpl_text(text: str) -> str:
    """A file name as plain matplotlib text (a '$' would start math mode)."""
    return text.replace("$", r"\$")


def _verify_chart(items, threshold: float, path: Path) -> Path:
    """Per file: the pooled evidence against the threshold (left) and the evidence of every layer (right)."""
    plt = _pyplot()
    height = 2.7 * len(items) + 0.5
    fig, axes = plt.subplots(len(items), 2, figsize=(9, height), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": [1, 5]})
    for (label, rep), (ax0, ax1) in zip(items, axes):
        color = "#16a34a" if rep.detected else "#dc2626"
        ax0.bar([0], [rep.neg_log10_p], color=color, width=0.6)
        ax0.axhline(threshold, color="black", linestyle="--", linewidth=1)
        ax0.set_xticks([0], ["whole file"])
        ax0.set_ylabel("evidence (−log10 p)")
        ax0.set_ylim(0, max(rep.neg_log10_p, threshold) * 1.25)
        ax0.text(0, rep.neg_log10_p, f"{rep.neg_log10_p:,.1f}", ha="center", va="bottom", fontsize=8)
        vals = [m.neg_log10_p for m in rep.per_module]
        ax1.bar(range(1, len(vals) + 1), vals, color="#6b8fd6", width=0.85)
        ax1.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        ax1.set_xlim(0.3, len(vals) + 0.7)
        ax1.set_xlabel(f"each adapted layer of the model (1…{len(vals)})")
        found = "watermark found" if rep.detected else "no watermark found"
        ax1.set_title(f"{_mpl_text(label)}: {found}. Bars: the evidence of each layer", fontsize=9, color=color)
        ax1.legend(fontsize=8, loc="upper right")
        for ax in (ax0, ax1):
            ax.grid(axis="y", alpha=0.3)
            ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))  # the top band stays free for the app's image label
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _passport_figure(key, items, path: Path) -> Path:
    """The image hidden as passport C next to what each suspect holds (Ĉ averaged over the layers of that frame)."""
    import numpy as np
    import torch

    from seal_diffusion.passport import correlation

    names = list(key.modules)
    first = key.modules[names[0]].passport
    frame = [m for m in names if torch.equal(key.modules[m].passport, first)]  # the layers that hold frame 0
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(items) + 1, figsize=(2.6 * (len(items) + 1), 3.4), dpi=100, squeeze=False)

    def show(ax, mat, title):
        arr = mat.double().numpy()
        lo, hi = np.percentile(arr, [2, 98])
        ax.imshow(arr, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)

    show(axes[0][0], first, "hidden in your key")
    for ax, (label, rec) in zip(axes[0][1:], items):
        mats = [rec[m] for m in frame if m in rec]
        if not mats:
            ax.axis("off")
            ax.set_title(f"{label}\n(no matching layers)", fontsize=8)
            continue
        avg = torch.stack([m.double() for m in mats]).mean(0)
        short = _mpl_text(label if len(label) <= 28 else label[:25] + "…")
        show(ax, avg, f"found in {short}\nmatch {correlation(avg, first):.2f}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / 3.4))  # the top band stays free for the app's image label
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ==================================================================================================================
# the page
# ==================================================================================================================
INTRO = """Hide a secret watermark in a Stable Diffusion 1.5 LoRA while you train it, share the LoRA as usual, and later
check whether a file you found online is a copy of yours.
**1 · Watermark & train** your LoRA → **share** the public LoRA and the commitment hash, **keep** the private key →
**4 · Verify** suspicious files with that key. *Export* rebuilds the public file from the key; *Compare* shows what the
watermark does to the pictures."""

TINY_NOTE = """Note: this app runs on the built-in **tiny demo model**: it trains in seconds and makes random-looking
pictures, so you can try every step. For a real LoRA, type a Stable Diffusion 1.5 model in *Base model* (for example
`stable-diffusion-v1-5/stable-diffusion-v1-5`, a local model folder, or a `.safetensors` checkpoint), or start the
app with `seal-diffusion ui --base MODEL`."""

KEY_WARNING = """**Your private key (`.sealkey`) is the only proof that this LoRA is yours.**
- **Back it up** in two safe places (it cannot be recreated if lost).
- **Never share or upload it** anywhere: whoever holds it can claim the LoRA and rebuild it.
- Share only the public LoRA files and the commitment hash."""


def base_choices(base: str) -> list[str]:
    """The base models offered in the app: the built-in SD 1.5 and SDXL demo models, and the one it was started with."""
    return list(dict.fromkeys([base.strip(), *TINY_NAMES]))


def build_app(base: str = "tiny") -> gr.Blocks:
    """The Blocks app (queued). ``base`` fills the *Base model* fields; users may type another one."""
    ws = Workspace()
    h = Handlers(base, ws)
    tiny = base.strip() in TINY_NAMES
    from seal_diffusion.subject import INSTANCE_PROMPT

    with gr.Blocks(title="seal-diffusion: watermark your LoRA", delete_cache=(1800, KEEP_SECONDS)) as demo:
        gr.Markdown("# seal-diffusion: watermark your LoRA", elem_id="seal-title")
        gr.Markdown(INTRO)
        if tiny:
            gr.Markdown(TINY_NOTE, elem_classes=["seal-note"])

        with gr.Tabs():
            # -- 1 -------------------------------------------------------------------------------------------------
            with gr.Tab("1 · Watermark & train", id="train"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        gr.Markdown("#### Your subject")
                        photos = gr.File(label="Photos of your subject (5–20 images work well)", file_count="multiple",
                                         file_types=list(PHOTO_TYPES), type="filepath", elem_id="train-photos")
                        use_example = gr.Checkbox(label="Use the bundled example cat instead (for a quick try)",
                                                  value=False, elem_id="train-example")
                        prompt = gr.Textbox(label="Instance prompt", value=INSTANCE_PROMPT, elem_id="train-prompt",
                                            info="Describe your subject with a rare made-up word ('sks'); use the "
                                                 "same words later to call it up.")
                        base_in = gr.Dropdown(label="Base model", choices=base_choices(base), value=base,
                                              allow_custom_value=True, elem_id="train-base",
                                              info="'tiny' / 'tiny-xl' = built-in SD 1.5 / SDXL demo models; or type "
                                                   "an SD 1.5 or SDXL model (hub id, folder or .safetensors file).")
                        with gr.Row():
                            steps = gr.Number(label="Training steps", value=100 if tiny else 300, precision=0,
                                              minimum=1, elem_id="train-steps",
                                              info="More steps learn more, and take longer.")
                            rank = gr.Dropdown(label="Rank (size of the LoRA)", choices=RANKS,
                                               value=4 if tiny else 32, elem_id="train-rank",
                                               info="32 is the usual choice for SD 1.5.")
                        gr.Markdown("#### Watermark")
                        passport_kind = gr.Radio(
                            label="Secret passport (what is hidden in the LoRA)",
                            choices=[("Random numbers (recommended: strongest proof)", "random"),
                                     ("My own image (a logo or signature)", "image")],
                            value="random", elem_id="train-passport")
                        passport_image = gr.Image(label="Passport image: a bold logo works best; use rank 16 or more",
                                                  type="filepath",
                                                  sources=["upload"], visible=False, elem_id="train-passport-image",
                                                  height=180)
                        name = gr.Textbox(label="Name of your LoRA (file name)", value="my_lora", elem_id="train-name")
                        with gr.Accordion("Advanced settings", open=False):
                            lr = gr.Textbox(label="Learning rate", placeholder="automatic (1e-5, as in the SEAL "
                                            "paper)", elem_id="train-lr")
                            resolution = gr.Textbox(label="Resolution in pixels", placeholder="automatic (the "
                                                    "model's own: 512 for SD 1.5, 1024 for SDXL, 64 for tiny)",
                                                    elem_id="train-resolution")
                            batch_size = gr.Textbox(label="Images per step (batch size)", placeholder="4 (use 1 if "
                                                    "memory is short)", elem_id="train-batch")
                            seed = gr.Textbox(label="Seed (for a repeatable run)", placeholder="random",
                                              elem_id="train-seed")
                        train_btn = gr.Button("Train my watermarked LoRA", variant="primary", elem_id="train-btn")
                    with gr.Column(scale=1):
                        gr.Markdown("#### Result")
                        train_md = gr.Markdown("Your files will appear here when training is done. A progress bar "
                                               "shows the step, the loss and the time left.", elem_id="train-summary")
                        kohya_out = gr.File(label="Public LoRA: kohya layout (ComfyUI, AUTOMATIC1111, LoRA sites)",
                                            elem_id="train-kohya", interactive=False, height=110)
                        diffusers_out = gr.File(label="Public LoRA: diffusers layout (Python: pipe.load_lora_weights)",
                                                elem_id="train-diffusers", interactive=False, height=110)
                        commitment_out = gr.Textbox(label="Commitment hash: publish it with your LoRA",
                                                    buttons=["copy"], interactive=False, elem_id="train-commitment")
                        gr.Markdown(KEY_WARNING, elem_classes=["seal-warning"])
                        key_out = gr.File(label="PRIVATE key: download it, back it up, never share it",
                                          elem_id="train-key", interactive=False, height=110)

            # -- 2 -------------------------------------------------------------------------------------------------
            with gr.Tab("2 · Export", id="export"):
                gr.Markdown("Rebuild the public LoRA from your private key, in the layout your tool needs.")
                with gr.Row(equal_height=False):
                    with gr.Column():
                        export_key = gr.File(label="Your private key (.sealkey)", type="filepath",
                                             elem_id="export-key")
                        layout = gr.Radio(label="Layout",
                                          choices=[("kohya: ComfyUI, AUTOMATIC1111, LoRA sites", "kohya"),
                                                   ("diffusers: Python, pipe.load_lora_weights", "diffusers")],
                                          value="kohya", elem_id="export-layout")
                        export_name = gr.Textbox(label="Name (empty = the key's file name)", value="",
                                                 elem_id="export-name")
                        export_btn = gr.Button("Export the public LoRA", variant="primary", elem_id="export-btn")
                    with gr.Column():
                        export_file = gr.File(label="Public LoRA", interactive=False, elem_id="export-file")
                        export_md = gr.Markdown(elem_id="export-summary")

            # -- 3 -------------------------------------------------------------------------------------------------
            with gr.Tab("3 · Compare", id="compare"):
                gr.Markdown("See what the watermark does to the pictures: the same prompt and seed with the base "
                            "model, your LoRA with its passport C, with the second passport C_p, with no passport, "
                            "and the exported file.")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        compare_key = gr.File(label="Your private key (.sealkey)", type="filepath",
                                              elem_id="compare-key")
                        compare_base = gr.Dropdown(label="Base model", choices=base_choices(base), value=base,
                                                   allow_custom_value=True, elem_id="compare-base")
                        compare_prompts = gr.Textbox(label="Prompt (one per line)", value=INSTANCE_PROMPT, lines=2,
                                                     elem_id="compare-prompts")
                        compare_seeds = gr.Textbox(label="Seeds (whole numbers, e.g. 0 1)", value="0 1",
                                                   elem_id="compare-seeds")
                        compare_steps = gr.Number(label="Inference steps", value=25, precision=0, minimum=1,
                                                  elem_id="compare-steps")
                        compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                    with gr.Column(scale=2):
                        compare_md = gr.Markdown(elem_id="compare-summary")
                        gallery = gr.Gallery(label="Pictures (each row: one seed)", columns=5, height="auto",
                                             object_fit="contain", elem_id="compare-gallery")
                        table = gr.Dataframe(headers=["pair", "SSIM", "PSNR (dB)", "what it shows"],
                                             label="How similar are the pictures? SSIM: 1 = identical. PSNR: higher "
                                                   "= closer, ∞ = identical.", column_widths=["30%", "12%", "16%", "42%"],
                                             interactive=False, wrap=True, elem_id="compare-table")
                        gr.Markdown("**Spectra.** The strength of each direction a layer changes (singular values of "
                                    "its weight change). The released LoRA has the ordinary shape of a LoRA: nothing "
                                    "in it points at the hidden passport.", elem_classes=["seal-note"])
                        spectra = gr.Image(show_label=False, type="filepath", interactive=False,
                                           elem_id="compare-spectra")

            # -- 4 -------------------------------------------------------------------------------------------------
            with gr.Tab("4 · Verify", id="verify"):
                gr.Markdown("Is a file you found a copy of your LoRA? Add your private key and one or more suspect "
                            "files. Your files stay on the computer that runs this app.")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        verify_key = gr.File(label="Your private key (.sealkey)", type="filepath",
                                             elem_id="verify-key")
                        suspects = one_or_many(gr.File(label="Suspect files (LoRA .safetensors, one or many)",
                                                       file_count="multiple", type="filepath",
                                                       elem_id="verify-suspects"))
                        with gr.Accordion("Advanced settings", open=False):
                            verify_base = gr.Textbox(label="Base model (only for a full model that a LoRA was merged "
                                                           "into)", value=base, elem_id="verify-base")
                            threshold = gr.Number(label="Threshold for −log10 p (3.3 means p < 0.0005, the SEAL "
                                                        "paper's rule)", value=3.3, elem_id="verify-threshold")
                            together = gr.Checkbox(label="The files are used together (added into one LoRA: catches "
                                                         "a LoRA split into parts)", value=False,
                                                   elem_id="verify-together")
                            commitment = gr.Textbox(label="Your published commitment (the key is refused unless it "
                                                          "matches)", value="", elem_id="verify-commitment")
                        functional_box = ui_functional.checkbox()
                        verify_btn = gr.Button("Verify", variant="primary", elem_id="verify-btn")
                    with gr.Column(scale=2):
                        verdict = gr.Markdown("The verdict will appear here.", elem_id="verify-verdict")
                        functional_md = ui_functional.panel()
                        verify_table = gr.Dataframe(headers=["file", "verdict", "evidence (−log10 p)", "threshold",
                                                             "layers compared", "format"], label="Results",
                                                    column_widths=["30%", "18%", "15%", "12%", "13%", "12%"],
                                                    interactive=False, wrap=True, elem_id="verify-table")
                        chart = gr.Image(label="Evidence per layer (left: the whole file, which decides)",
                                         type="filepath",
                                         interactive=False, elem_id="verify-chart")
                        passport_img = gr.Image(label="Your passport image, recovered from the files", type="filepath",
                                                interactive=False, visible=False, elem_id="verify-passport")
            from ui.image_check import image_check_tab

            image_check_tab(ws, base)  # 5 · Check images

            from ui.dispute_tab import dispute_tab

            dispute_tab(ws, base, _guard)  # 5 · Dispute (api_name /dispute)

        # -- events --------------------------------------------------------------------------------------------------
        passport_kind.change(lambda k: gr.Image(visible=k == "image"), passport_kind, passport_image,
                             api_visibility="private", queue=False)
        train_evt = train_btn.click(
            _guard(ws, h.train),
            [photos, use_example, prompt, base_in, steps, rank, passport_kind, passport_image, name, lr, resolution,
             batch_size, seed],
            [train_md, kohya_out, diffusers_out, key_out, commitment_out],
            api_name="train", concurrency_id="heavy", concurrency_limit=1, show_progress_on=[train_md])
        train_evt.success(lambda k: (k, k, k) if k else (gr.skip(),) * 3, key_out,
                          [export_key, compare_key, verify_key], api_visibility="private", queue=False)
        export_btn.click(_guard(ws, h.export), [export_key, layout, export_name], [export_file, export_md],
                         api_name="export", concurrency_limit=4)
        compare_btn.click(_guard(ws, h.compare),
                          [compare_key, compare_base, compare_prompts, compare_seeds, compare_steps],
                          [gallery, table, spectra, compare_md],
                          api_name="compare", concurrency_id="heavy", concurrency_limit=1)
        verify_evt = verify_btn.click(_guard(ws, h.verify),
                                      [verify_key, suspects, verify_base, threshold, together, commitment],
                                      [verdict, verify_table, chart, passport_img], api_name="verify",
                                      concurrency_limit=4)
        ui_functional.hook(verify_evt, verify_key, suspects, verify_base, threshold, functional_box, functional_md,
                           clean=ws.clean)

    demo.queue(max_size=64)
    demo.seal_workspace = ws  # for tests and cleanup
    return demo


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
    from seal_diffusion.base_model import resolve_base

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
