"""The Verify tab's function-level test (``verify --functional``): a tick box, a plain-words panel, one event.

Kept apart from ``ui/layout.py``: the tab calls :func:`checkbox` and :func:`panel` where the widgets go and :func:`hook`
once to run the test after the weight test (the ``/verify`` endpoint keeps its inputs and outputs; this step has its
own endpoint, ``/verify_functional``).
"""

from __future__ import annotations

import html
import math

import gradio as gr

from seal_diffusion.models.base_model import load_pipeline
from seal_diffusion.errors import UserError
from seal_diffusion.detection.functional import verify_both
from seal_diffusion.detection.probes import DEFAULT_PROBES
from seal_diffusion.detection.verify import DEFAULT_THRESHOLD


def checkbox() -> gr.Checkbox:
    return gr.Checkbox(label="Function-level test too (also catches copies re-trained from your LoRA's outputs — "
                             "'distilled'; uses the base model of Advanced settings; slow the first time for a key)",
                       value=False, elem_id="verify-functional")


def panel() -> gr.Markdown:
    return gr.Markdown(visible=False, elem_id="verify-functional-verdict")


def _words(name: str, rep) -> str:
    w, f = rep.weight, rep.functional
    n = math.floor(rep.neg_log10_p)
    head = (f"<strong>{html.escape(name)}: your LoRA — found.</strong> The chance of this by accident is below 1 in "
            f"10<sup>{n:,}</sup> (both tests together)." if rep.detected else
            f"<strong>{html.escape(name)}: no sign of your LoRA</strong> in either test.")
    weights = ("its weights still carry your passport" if w.detected else
               "its weights do not carry your passport (re-trained, distilled or heavily changed)")
    function = (f"it <em>behaves</em> like your release: {f.n_positive} of {f.n_modules} layers lean to the side your "
                f"secret coin chose" if f.detected else
                f"its behaviour does not lean to your release ({f.n_positive} of {f.n_modules} layers, about half "
                f"is what chance gives)")
    cls = "seal-found" if rep.detected else "seal-notfound"
    return (f"<div class='seal-verdict {cls}'>{head}<br>Weight test: {weights} (score {w.neg_log10_p:.1f}). "
            f"Function test: {function} (score {f.neg_log10_p:.1f}, {f.n_probes} secret probes).<br>"
            f"<span class='seal-note'>Scores are −log10 p; found from {rep.threshold:g}. The combined score counts "
            f"two tests (Bonferroni: 2 × the smaller p).</span></div>")


RUNNING = ("<div class='seal-verdict seal-error'><strong>Function-level test running…</strong> The first run for a key "
           "computes its secret probes: about 20 seconds on a CPU for the tiny model, much longer for a real one. The "
           "progress bar on this panel shows which file is being tested.</div>")


def running(enabled, key_file=None, suspect_files=None):
    """Shown at once when the test starts (the panel would otherwise stay empty while the probes are computed)."""
    if not enabled or not key_file or not suspect_files:
        return gr.Markdown(visible=False)
    return gr.Markdown(RUNNING, visible=True)


def run(key_file, suspect_files, base, threshold, enabled, clean=lambda s: s, n_probes: int | None = None,
        size: int | None = None, progress=None):
    """The panel's content: one plain-words verdict per suspect (or hidden when the box is not ticked).
    ``progress``: a ``gr.Progress`` (or any callable taking (fraction or (done, total)), desc=…)."""
    progress = progress or (lambda *a, **k: None)
    if not enabled:
        return gr.Markdown(visible=False)
    base = (base or "").strip()
    if not base:
        return gr.Markdown("The function-level test needs the base model (Advanced settings).", visible=True)
    if not key_file or not suspect_files:
        return gr.Markdown(visible=False)
    threshold = DEFAULT_THRESHOLD if threshold in (None, "") else float(threshold)
    files = suspect_files if isinstance(suspect_files, list) else [suspect_files]
    lines = []
    pipe = None
    for i, f in enumerate(files):
        path = getattr(f, "name", f)
        name = str(path).rsplit("/", 1)[-1]
        try:
            if pipe is None:
                progress(0, desc="Function-level test: loading the base model…")
                pipe = load_pipeline(base)
            progress((i, len(files)), unit="files",
                     desc=f"Function-level test: {name} ({i + 1} of {len(files)}; the first file of a key also "
                          "computes its secret probes)")
            rep = verify_both(key_file, path, base, threshold=threshold, pipe=pipe,
                              n_probes=n_probes or DEFAULT_PROBES, size=size)
            lines.append(_words(name, rep))
        except UserError as exc:
            lines.append(f"<div class='seal-verdict seal-error'><strong>{html.escape(name)}: function test could not "
                         f"run.</strong> {html.escape(clean(str(exc)))}</div>")
    return gr.Markdown("\n\n".join(lines), visible=True)


def hook(event, key, suspects, base, threshold, box, out, clean=lambda s: s) -> None:
    """After the weight test's ``event``: run the function-level test when ``box`` is ticked."""
    def test(key_file, suspect_files, base_model, thr, enabled, progress=gr.Progress()):
        return run(key_file, suspect_files, base_model, thr, enabled, clean=clean, progress=progress)

    event.then(running, [box, key, suspects], out, api_visibility="private", queue=False).then(
        test, [key, suspects, base, threshold, box], out, api_name="verify_functional", concurrency_id="heavy",
        concurrency_limit=1, show_progress_on=[out])
