"""The app's "Check images" tab: the ownership check from generated images alone (:mod:`seal_diffusion.detection.image_check`).

Two steps, as on the command line: make a challenge (download the JSON and give it to the suspect service), then
upload the images the service rendered for it and read the verdict. The owner's private reference is rendered into
the app's private job folder (next to a copy of the key), never into a downloadable file.
"""

from __future__ import annotations

import math
import shutil

import gradio as gr

from seal_diffusion.detection.image_challenge import DEFAULT_N
from seal_diffusion.detection.image_check import create_challenge, verify_images
from ui.workspace import _copy_uploads, _guard, _int, _load_key, _need, _path, _paths

MAX_IMAGES = 256


def _handlers(ws, default_base: str):
    def make(key_file=None, prompt=None, n=None, base=None, request: gr.Request = None):
        _, key_path = _load_key(key_file)
        _need(bool((prompt or "").strip()), "Subject prompt: required — the prompt you trained with, e.g. 'a photo "
                                            "of sks cat' (the challenge's prompts are built around it).")
        n = _int(n if n not in (None, "") else DEFAULT_N, "Number of images", 1, MAX_IMAGES)
        job = ws.job(request, "challenge")
        key_copy = shutil.copyfile(key_path, job / "key.sealkey")
        out = job / "challenge.json"
        ch = create_challenge(key_copy, out, base=(base or "").strip() or default_base,
                              prompt=(prompt or "").strip() or None, n=n, overwrite=True)
        return str(out), (f"Challenge ready: {ch.n} prompts with fixed seeds ({ch.scheduler}, {ch.steps} steps, "
                          f"CFG {ch.guidance_scale:g}, {ch.width}×{ch.height}, LoRA strength 1). Give the JSON file to "
                          f"the service you suspect, ask for all {ch.n} images exactly as listed, then upload them "
                          "under **3 · Check the images** (beside this column on a wide screen, below it on a narrow "
                          "one)."
                          + (f" Self-test: your own release scores {ch.self_test:.1f} on this challenge "
                             "(detected from 3.3); a service's images should be compared with that."
                             if getattr(ch, "self_test", None) is not None else ""))

    def check(key_file=None, challenge_file=None, images=None, base=None, threshold=None,
              request: gr.Request = None):
        _, key_path = _load_key(key_file)
        challenge = _path(challenge_file)
        _need(challenge is not None, "Upload the challenge (.json) the images answer.")
        files = _paths(images)
        _need(bool(files), "Add the images the suspect service rendered for the challenge.")
        _need(len(files) <= MAX_IMAGES, f"{len(files)} images: at most {MAX_IMAGES}")
        threshold = 3.3 if threshold in (None, "") else float(threshold)
        _need(math.isfinite(threshold) and threshold > 0, f"Threshold {threshold}: must be a positive number")
        job = ws.job(request, "check-images")
        key_copy = shutil.copyfile(key_path, job / "key.sealkey")
        files = _copy_uploads(files, job / "images")  # keeps the uploaded names (entry numbers)
        report = verify_images(key_copy, challenge, files, base=(base or "").strip() or None, threshold=threshold)
        odds = f"below 1 in 10<sup>{math.floor(report.neg_log10_p):,}</sup>"
        evidence = (f"<br><span class='seal-note'>Evidence score (−log10 p): {report.neg_log10_p:.1f}; the watermark "
                    f"counts as found from {threshold:g}. {report.n_positive} of {report.n_modules} layers lean the "
                    f"way of your released passport ({report.n_images} images).</span>")
        if report.detected:
            return (f"<div class='seal-verdict seal-found'><strong>These images were made with your LoRA, or with a "
                    f"copy of it.</strong> The chance of this happening by accident is {odds}.{evidence}</div>")
        return ("<div class='seal-verdict seal-notfound'><strong>No sign of your LoRA in these images.</strong> "
                "Either the service does not use it, or it did not render the challenge exactly (same seeds, "
                f"sampler, steps, guidance and size), which this check needs to have power.{evidence}</div>")

    return make, check


def image_check_tab(ws, base: str, number: int = 5):
    """Build the tab inside the app's ``gr.Tabs`` (and wire its events); returns the key input (training fills it)."""
    make, check = _handlers(ws, base)
    with gr.Tab(f"{number} · Check images", id="check-images"):
        gr.Markdown("Found a service or app whose pictures look like your LoRA, but no file? **1.** Make a "
                    "challenge: a list of prompts with fixed seeds. **2.** Ask the service for those images. "
                    "**3.** Upload them here. The check is exact for services that do not use your LoRA: they are "
                    "accused only as often as the threshold allows.")
        with gr.Row(equal_height=False):
            with gr.Column():
                key = gr.File(label="Your private key (.sealkey)", type="filepath", elem_id="images-key")
                prompt = gr.Textbox(label="Subject prompt * (required: the prompt you trained with)",
                                    placeholder="e.g. a photo of sks cat", elem_id="images-prompt")
                n = gr.Number(label=f"Number of images (default {DEFAULT_N})", value=DEFAULT_N, precision=0,
                              elem_id="images-n")
                base_in = gr.Textbox(label="Base model", value=base, elem_id="images-base")
                make_btn = gr.Button("1 · Make a challenge", elem_id="images-make-btn")
                challenge_out = gr.File(label="Challenge (give this to the service)", interactive=False,
                                        elem_id="images-challenge-out")
                make_md = gr.Markdown(elem_id="images-make-md")
            with gr.Column():
                challenge_in = gr.File(label="Challenge (.json)", type="filepath", file_types=[".json"],
                                       elem_id="images-challenge")
                images = gr.File(label="The service's images (PNG/JPEG/WebP; in challenge order or named "
                                 "img_000.png, img_001.png, …)", file_count="multiple", type="filepath",
                                 elem_id="images-files")
                threshold = gr.Number(label="Threshold for −log10 p", value=3.3, elem_id="images-threshold")
                check_btn = gr.Button("3 · Check the images", variant="primary", elem_id="images-check-btn")
                verdict = gr.Markdown("The verdict will appear here.", elem_id="images-verdict")
    make_btn.click(_guard(ws, make), [key, prompt, n, base_in], [challenge_out, make_md], api_name="challenge",
                   concurrency_id="heavy", concurrency_limit=1).failure(ws.error_box, None, make_md,
                                                                       api_visibility="private", queue=False)
    challenge_out.change(lambda f: f, challenge_out, challenge_in, api_visibility="private", queue=False)
    check_btn.click(_guard(ws, check), [key, challenge_in, images, base_in, threshold], verdict,
                    api_name="verify_images", concurrency_id="heavy", concurrency_limit=1).failure(
        ws.error_box, None, verdict, api_visibility="private", queue=False)
    return key

