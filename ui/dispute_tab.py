"""The app's *Dispute* tab: who owns a suspect LoRA? A thin layer over :func:`seal_diffusion.dispute.dispute`.

Hooked into :func:`ui.layout.build_app` with one call (:func:`dispute_tab`) inside its ``gr.Tabs``; api_name ``/dispute``.
"""

from __future__ import annotations

import gradio as gr

from seal_diffusion.dispute import ClaimInput, dispute
from seal_diffusion.fileio import write_json_atomic, write_text_atomic
from ui.workspace import _copy_uploads, _need, _path, _paths


def run_dispute(suspect=None, key1=None, tsr1=None, key2=None, tsr2=None, ca=None, photos=None, prompt=None,
                base=None, *, ws=None, default_base="tiny", request: gr.Request = None):
    """Returns (the decision as Markdown, the full report as Markdown, the JSON report's path)."""
    _need(_path(suspect) is not None, "Add the suspect LoRA file (the one in dispute).")
    claims, names = [], {}
    for i, (key, tsr) in enumerate(((key1, tsr1), (key2, tsr2))):
        if _path(key) is not None:
            claims.append(ClaimInput(str(_path(key)), str(_path(tsr)) if _path(tsr) else None))
            names[claims[-1].key] = f"claim {i + 1} ({_path(key).name})"
        else:
            _need(_path(tsr) is None, "A timestamp was added without its key: add the claimant's .sealkey too.")
    _need(bool(claims), "Add at least one claimant's key (.sealkey).")
    job = ws.job(request, "dispute")
    data = None
    if _paths(photos):
        data = job / "subject"
        _copy_uploads(_paths(photos), data)
    report = dispute(_path(suspect), claims, base=(base or "").strip() or default_base, data=data,
                     prompt=(prompt or "").strip() or "a photo of sks cat", ca=str(_path(ca)) if _path(ca) else None)
    if report.winner:
        head = (f"<div class='seal-verdict seal-found'><strong>{names[report.winner]} wins.</strong> "
                f"{report.reason}.</div>")
    else:
        head = f"<div class='seal-verdict seal-notfound'><strong>Cannot decide.</strong> {report.reason}.</div>"
    md = report.markdown()
    for key, label in names.items():
        md = md.replace(key, label)
    md = md.replace(str(_path(suspect)), _path(suspect).name)
    json_path = write_json_atomic(job / "dispute.json", report.to_json())
    write_text_atomic(job / "dispute.md", md)
    return head, md, str(json_path)


def dispute_tab(ws, default_base: str, guard) -> None:
    """Build the tab (call inside ``gr.Tabs``) and wire its button."""
    with gr.Tab("5 · Dispute", id="dispute"):
        gr.Markdown("Two people claim the same LoRA? Add the disputed file, each claimant's key and, if they have "
                    "one, the timestamp of their key (.tsr). The earliest valid claim wins; see *How to win a "
                    "dispute* in docs/dispute.md.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                suspect = gr.File(label="Disputed LoRA (.safetensors)", type="filepath", elem_id="dispute-suspect")
                with gr.Row():
                    key1 = gr.File(label="Claim 1: key (.sealkey)", type="filepath", elem_id="dispute-key1")
                    tsr1 = gr.File(label="Claim 1: timestamp (.tsr)", type="filepath", elem_id="dispute-tsr1")
                with gr.Row():
                    key2 = gr.File(label="Claim 2: key (.sealkey)", type="filepath", elem_id="dispute-key2")
                    tsr2 = gr.File(label="Claim 2: timestamp (.tsr)", type="filepath", elem_id="dispute-tsr2")
                ca = gr.File(label="Timestamp authority's CA certificate (.pem)", type="filepath",
                             elem_id="dispute-ca")
                photos = gr.File(label="The subject's images (the claim check needs them)", file_count="multiple",
                                 type="filepath", elem_id="dispute-photos")
                prompt = gr.Textbox(label="The subject's prompt", value="a photo of sks cat", elem_id="dispute-prompt")
                base = gr.Textbox(label="Base model", value=default_base, elem_id="dispute-base")
                btn = gr.Button("Decide", variant="primary", elem_id="dispute-btn")
            with gr.Column(scale=2):
                verdict = gr.Markdown("The decision will appear here.", elem_id="dispute-verdict")
                report = gr.Markdown(elem_id="dispute-report")
                json_out = gr.File(label="Report (JSON)", elem_id="dispute-json")
    def handler(suspect=None, key1=None, tsr1=None, key2=None, tsr2=None, ca=None, photos=None, prompt=None,
                base=None, request: gr.Request = None):
        return run_dispute(suspect, key1, tsr1, key2, tsr2, ca, photos, prompt, base, ws=ws,
                           default_base=default_base, request=request)

    btn.click(guard(ws, handler), [suspect, key1, tsr1, key2, tsr2, ca, photos, prompt, base],
              [verdict, report, json_out], api_name="dispute", concurrency_id="heavy", concurrency_limit=1)
