"""The app's page (Gradio Blocks): the tabs, their widgets, and which handler each button calls.

The handlers are :mod:`ui.handlers` (tabs 1–4), :mod:`ui.image_check` and :mod:`ui.dispute_tab`; the page only
places widgets and wires events. Named endpoints: ``/train``, ``/export``, ``/compare``, ``/verify``, ``/challenge``,
``/verify_images``, ``/dispute``, ``/timestamp``. A failed event leaves its message in its result area
(``event.failure(ws.error_box, …)``) as well as in a toast that stays until closed.
"""

from __future__ import annotations

import gradio as gr

from seal_diffusion.models.base_model import TINY_NAMES
from seal_diffusion.models.subject import INSTANCE_PROMPT
from ui import functional as ui_functional
from ui.components import one_or_many
from ui.dispute_tab import dispute_tab
from ui.handlers import TINY_LR, Handlers
from ui.image_check import image_check_tab
from ui.timestamp_step import timestamp_section
from ui.workspace import KEEP_SECONDS, Workspace, _guard

RANKS = [2, 4, 8, 16, 32, 64, 128]
PHOTO_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # = seal_diffusion.models.images.IMAGE_SUFFIXES

CSS = """
.seal-warning { border: 2px solid #d97706; border-radius: 8px; padding: 4px 14px; background: #fffbeb; }
.seal-warning p, .seal-warning li, .seal-warning strong { color: #78350f !important; }
.seal-note { font-size: 0.92em; opacity: 0.85; }
.seal-verdict { border-radius: 8px; padding: 10px 14px; margin: 6px 0; border-left: 6px solid; color: #1f2937; }
.seal-verdict strong, .seal-verdict span, .seal-verdict sup { color: #1f2937 !important; }
.seal-found { background: #dcfce7; border-color: #16a34a; }
.seal-notfound { background: #fee2e2; border-color: #dc2626; }
.seal-error { background: #f3f4f6; border-color: #6b7280; }
.seal-verdict.seal-warning { background: #fffbeb; border-color: #d97706; }
#dispute-report table { table-layout: auto; }
#dispute-report th, #dispute-report td { word-break: normal !important; overflow-wrap: normal !important;
  hyphens: none !important; }
#dispute-report td:last-child { overflow-wrap: anywhere !important; }
#seal-title h1 { margin-bottom: 0; }
"""

INTRO = """Hide a secret watermark in a Stable Diffusion LoRA (SD 1.5 or SDXL) while you train it, share the LoRA as
usual, and later check whether a file you found online is a copy of yours.
**1 · Watermark & train** your LoRA (and timestamp its key) → **share** the public LoRA and the commitment hash, **keep**
the private key → **4 · Verify** suspicious files with that key. *Export* rebuilds the public file from the key;
*Compare* shows what the watermark does to the pictures; *Check images* tests a service from its pictures alone;
*Dispute* decides between two or more claims to one LoRA."""

TINY_NOTE = """Note: this app runs on the built-in **tiny demo model**: it trains in seconds and makes random-looking
pictures, so you can try every step. For a real LoRA, type a Stable Diffusion 1.5 or SDXL model in *Base model* (for
example `stable-diffusion-v1-5/stable-diffusion-v1-5`, `stabilityai/stable-diffusion-xl-base-1.0`, a local model
folder, or a `.safetensors` checkpoint), or start the app with `seal-diffusion ui --base MODEL`."""

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
                            lr = gr.Textbox(label="Learning rate", placeholder="automatic (1e-5 as in the SEAL paper;"
                                            f" {TINY_LR:g} on the tiny demo models)", elem_id="train-lr")
                            resolution = gr.Textbox(label="Resolution in pixels", placeholder="automatic (the "
                                                    "model's own: 512 for SD 1.5, 1024 for SDXL, 64 for tiny)",
                                                    elem_id="train-resolution")
                            batch_size = gr.Textbox(label="Images per step (batch size)", placeholder="4 (use 1 if "
                                                    "memory is short)", elem_id="train-batch")
                            seed = gr.Textbox(label="Seed (for a repeatable run)", placeholder="random",
                                              elem_id="train-seed")
                            train_te = gr.Checkbox(label="Also train the text encoder (watermarked too; the LoRA "
                                                   "then holds text-encoder layers, as kohya's do)", value=False,
                                                   elem_id="train-text-encoder")
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
                        stamp_key, stamp_files, stamp_md, stamp_evt = timestamp_section(ws, _guard)

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
            images_key = image_check_tab(ws, base, number=5)  # api_name /challenge, /verify_images
            dispute_tab(ws, base, _guard, number=6)  # api_name /dispute

        # -- events --------------------------------------------------------------------------------------------------
        passport_kind.change(lambda k: gr.Image(visible=k == "image"), passport_kind, passport_image,
                             api_visibility="private", queue=False)
        train_evt = train_btn.click(
            _guard(ws, h.train),
            [photos, use_example, prompt, base_in, steps, rank, passport_kind, passport_image, name, lr, resolution,
             batch_size, seed, train_te],
            [train_md, kohya_out, diffusers_out, key_out, commitment_out, stamp_files],
            api_name="train", concurrency_id="heavy", concurrency_limit=1, show_progress_on=[train_md])
        keys = [export_key, compare_key, verify_key, images_key, stamp_key]
        train_evt.success(lambda k: (k,) * len(keys) if k else (gr.skip(),) * len(keys), key_out, keys,
                          api_visibility="private", queue=False)
        export_evt = export_btn.click(_guard(ws, h.export), [export_key, layout, export_name], [export_file, export_md],
                                      api_name="export", concurrency_limit=4)
        compare_evt = compare_btn.click(_guard(ws, h.compare),
                                        [compare_key, compare_base, compare_prompts, compare_seeds, compare_steps],
                                        [gallery, table, spectra, compare_md],
                                        api_name="compare", concurrency_id="heavy", concurrency_limit=1)
        verify_evt = verify_btn.click(_guard(ws, h.verify),
                                      [verify_key, suspects, verify_base, threshold, together, commitment],
                                      [verdict, verify_table, chart, passport_img], api_name="verify",
                                      concurrency_limit=4)
        for evt, area in ((train_evt, train_md), (export_evt, export_md), (compare_evt, compare_md),
                          (verify_evt, verdict), (stamp_evt, stamp_md)):  # the error stays in the result area
            evt.failure(ws.error_box, None, area, api_visibility="private", queue=False)
        ui_functional.hook(verify_evt, verify_key, suspects, verify_base, threshold, functional_box, functional_md,
                           clean=ws.clean)

    demo.queue(max_size=64)
    demo.seal_workspace = ws  # for tests and cleanup
    return demo
