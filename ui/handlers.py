"""The app's handlers, one per tab of the first four (train, export, compare, verify): they read the widgets'
values, check them, call the library (:mod:`seal_diffusion`) and turn its results into what the widgets show.
"""

from __future__ import annotations

import html
import math
import re

import gradio as gr

from seal_diffusion.models.base_model import resolve_base
from seal_diffusion.reports.compare import compare
from seal_diffusion.errors import UserError
from seal_diffusion.core.export import export_lora, public_factors
from seal_diffusion.models.images import IMAGE_SUFFIXES
from seal_diffusion.core.keyfile import check_commitment
from seal_diffusion.reports.plots import plot_spectra
from seal_diffusion.evaluation.render import VARIANT_LABELS
from seal_diffusion.models.subject import write_subject
from seal_diffusion.training import parse_args, train
from seal_diffusion.detection.verify import DEFAULT_THRESHOLD, combine_suspects, load_suspect, recover_passports, verify
from ui.figures import _passport_figure, _verify_chart
from ui.workspace import Workspace, _copy_uploads, _duration, _int, _load_key, _need, _path, _paths, _safe_name

MAX_PHOTOS = 200
MAX_SUSPECTS = 100
MAX_PROMPTS = 4
MAX_SEEDS = 8
TINY_LR = 3e-3  # the app's learning rate on the tiny demo models (seal_diffusion.demo's): 1e-5 changes nothing there
UNCHANGED_SSIM = 0.9995  # compare: "your LoRA vs the base" this close to 1 means the pictures did not change
MAX_CHARTS = 6  # per-layer charts drawn for at most this many suspects (the table lists them all)
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


class Handlers:
    def __init__(self, base: str, ws: Workspace):
        self.base = base
        self.ws = ws

    # -- 1. watermark & train ------------------------------------------------------------------------------------
    # Every input defaults to None so that API clients may leave out what they do not need (the component's own
    # default applies); the handlers check what is missing and say so.
    def train(self, photos=None, use_example=None, instance_prompt=None, base=None, steps=None, rank=None,
              passport_kind=None, passport_image=None, name=None, learning_rate=None, resolution=None,
              batch_size=None, seed=None, train_text_encoder=None, request: gr.Request = None,
              progress=gr.Progress()):
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
        elif src.kind == "tiny":  # the paper's 1e-5 leaves the tiny random model's pictures unchanged
            argv.append(f"--learning_rate={TINY_LR!r}")
        if resolution:
            argv.append(f"--resolution={_int(resolution, 'Resolution', 8, 4096)}")
        if batch_size:
            argv.append(f"--train_batch_size={_int(batch_size, 'Images per step', 1, 256)}")
        if seed:
            argv.append(f"--seed={_int(seed, 'Seed', 0, 2**32 - 1)}")
        if train_text_encoder:
            argv.append("--train_text_encoder")
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
            f"LoRA is yours. It has been filled in on the other tabs for you.\n"
            f"4. **Timestamp it** below before you publish (the request `{name}.tsq` is ready).\n"
        )
        tsq = result.get("timestamp_request")
        return (summary, result["lora_path"], result["diffusers_path"], result["key_path"], result["commitment"],
                [tsq] if tsq else None)

    # -- 2. export -----------------------------------------------------------------------------------------------
    def export(self, key_file=None, layout=None, name=None, request: gr.Request = None):
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
        unchanged = next((p for p in result["pairs"] if (p["a"], p["b"]) == ("C", "base")), None)
        note = ("" if unchanged is None or unchanged["ssim_mean"] < UNCHANGED_SSIM else
                f"\n\n<div class='seal-verdict seal-warning'><strong>Your LoRA does not change these pictures yet"
                f"</strong> (SSIM {unchanged['ssim_mean']:.4f} against the base model: 1 = identical). It learned too "
                f"little to show: train more steps or with a higher learning rate (Advanced settings). The watermark "
                f"is there all the same (Verify finds it).</div>")
        rows = "; ".join(f"row {i + 1}: seed {seed_list[i % len(seed_list)]}"
                         + (f", prompt {i // len(seed_list) + 1}" if len(prompt_list) > 1 else "")
                         for i in range(result["n_images"]))
        md = (f"Rendered {len(result['variants'])} versions × {result['n_images']} picture(s) in "
              f"{_duration(result['seconds'])} on `{html.escape(base)}` ({rows}). Columns: "
              + ", ".join(f"**{SHORT_LABELS.get(v, v)}** ({ABOUT_VARIANTS.get(v, VARIANT_LABELS[v])})"
                          for v in result["variants"]) + "." + note)
        return gallery, table, str(spectra), md

    # -- 4. verify -----------------------------------------------------------------------------------------------
    def verify(self, key_file=None, suspect_files=None, base=None, threshold=None, together=False, commitment=None,
               request: gr.Request = None):
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
