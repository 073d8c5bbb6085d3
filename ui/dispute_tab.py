"""The app's *Dispute* tab: who owns a suspect LoRA? A thin layer over :func:`seal_diffusion.ownership.dispute.dispute`.

Hooked into :func:`ui.layout.build_app` with one call (:func:`dispute_tab`) inside its ``gr.Tabs``; api_name ``/dispute``.
Up to :data:`MAX_CLAIMS` claims, each: the claimant's key, its timestamp reply (.tsr), the commitment the claimant
published and the file the claimant published (each optional but the key). The tab shows docs/dispute.md in place.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from seal_diffusion.ownership.dispute import ClaimInput, dispute
from seal_diffusion.fileio import write_json_atomic, write_text_atomic
from ui.workspace import _copy_uploads, _need, _path, _paths

MAX_CLAIMS = 4  # the handler below lists the fields of 4 claims
DOCS = Path(__file__).resolve().parent.parent / "docs" / "dispute.md"


def run_claims(suspect, claims, ca=None, photos=None, prompt=None, base=None, *, ws, default_base="tiny",
               request: gr.Request = None):
    """``claims``: (key, tsr, commitment, published file) per claim, any of them None. Returns (the decision as
    Markdown, the full report as Markdown, the JSON report's path)."""
    _need(_path(suspect) is not None, "Add the suspect LoRA file (the one in dispute).")
    inputs, names, paths = [], {}, {str(_path(suspect)): _path(suspect).name}
    for i, (key, tsr, commitment, published) in enumerate(claims):
        if _path(key) is None:
            _need(_path(tsr) is None and _path(published) is None and not (commitment or "").strip(),
                  f"Claim {i + 1}: a timestamp, commitment or file was added without its key: add the claimant's "
                  ".sealkey too.")
            continue
        c = ClaimInput(str(_path(key)), str(_path(tsr)) if _path(tsr) else None,
                       (commitment or "").strip() or None, str(_path(published)) if _path(published) else None)
        inputs.append(c)
        names[c.key] = f"claim {i + 1} ({_path(key).name})"
        for p in (c.timestamp, c.file):
            if p:
                paths[p] = Path(p).name
    _need(bool(inputs), "Add at least one claimant's key (.sealkey).")
    job = ws.job(request, "dispute")
    data = None
    if _paths(photos):
        data = job / "subject"
        _copy_uploads(_paths(photos), data)
    report = dispute(_path(suspect), inputs, base=(base or "").strip() or default_base, data=data,
                     prompt=(prompt or "").strip() or "a photo of sks cat", ca=str(_path(ca)) if _path(ca) else None)
    if report.winner:
        head = (f"<div class='seal-verdict seal-found'><strong>{names[report.winner]} wins.</strong> "
                f"{_named(report.reason, names, paths)}.</div>")
    else:
        head = (f"<div class='seal-verdict seal-notfound'><strong>Cannot decide.</strong> "
                f"{_named(report.reason, names, paths)}.</div>")
    md = _named(report.markdown(), names, paths)
    json_path = write_json_atomic(job / "dispute.json", report.to_json())
    write_text_atomic(job / "dispute.md", md)
    return head, md, str(json_path)


def _named(text: str, names: dict, paths: dict) -> str:
    """Server paths → what the user knows: "claim 2 (bob.sealkey)" and the uploaded files' names."""
    for key, label in names.items():
        text = text.replace(key, label)
    for path, name in paths.items():
        text = text.replace(path, name)
    return text


def run_dispute(suspect=None, key1=None, tsr1=None, key2=None, tsr2=None, ca=None, photos=None, prompt=None,
                base=None, *more, ws=None, default_base="tiny", request: gr.Request = None):
    """The ``/dispute`` endpoint's order: claims 1–2 (key, tsr), CA, images, prompt, base, then the commitment and file
    of claims 1–2 and all four fields of claims 3–4 (``more``)."""
    more = list(more) + [None] * (4 + 4 * (MAX_CLAIMS - 2) - len(more))
    claims = [(key1, tsr1, more[0], more[1]), (key2, tsr2, more[2], more[3])]
    rest = more[4:]
    claims += [tuple(rest[4 * i:4 * i + 4]) for i in range(MAX_CLAIMS - 2)]
    return run_claims(suspect, claims, ca, photos, prompt, base, ws=ws, default_base=default_base, request=request)


def _claim_fields(i: int) -> list:
    gr.Markdown(f"**Claim {i}**")
    key = gr.File(label=f"Claim {i}: key (.sealkey)", type="filepath", elem_id=f"dispute-key{i}", height=90)
    tsr = gr.File(label=f"Claim {i}: timestamp (.tsr)", type="filepath", elem_id=f"dispute-tsr{i}", height=90)
    commitment = gr.Textbox(label=f"Claim {i}: the commitment this claimant published (optional)",
                            elem_id=f"dispute-commitment{i}")
    published = gr.File(label=f"Claim {i}: the LoRA this claimant published (optional)", type="filepath",
                        elem_id=f"dispute-file{i}", height=90)
    return [key, tsr, commitment, published]


def dispute_tab(ws, default_base: str, guard, number: int = 6) -> None:
    """Build the tab (call inside ``gr.Tabs``) and wire its button."""
    with gr.Tab(f"{number} · Dispute", id="dispute"):
        gr.Markdown("Two or more people claim the same LoRA? Add the disputed file and, for each claimant, the key and "
                    "(if they have one) the timestamp of the key (.tsr). The earliest valid, timestamped claim wins; "
                    "see [How to win a dispute](#dispute-docs) below.")
        with gr.Row(equal_height=False):
            with gr.Column():
                suspect = gr.File(label="Disputed LoRA (.safetensors)", type="filepath", elem_id="dispute-suspect",
                                  height=90)
                ca = gr.File(label="Timestamp authority's CA certificate (.pem)", type="filepath",
                             elem_id="dispute-ca", height=90)
            with gr.Column():
                photos = gr.File(label="The subject's images (the claim check needs them)", file_count="multiple",
                                 type="filepath", elem_id="dispute-photos", height=90)
                prompt = gr.Textbox(label="The subject's prompt", value="a photo of sks cat",
                                    elem_id="dispute-prompt")
                base = gr.Textbox(label="Base model", value=default_base, elem_id="dispute-base")
        fields = []
        with gr.Row(equal_height=False):
            for i in (1, 2):
                with gr.Column():
                    fields.append(_claim_fields(i))
        with gr.Accordion(f"More claims ({', '.join(str(i) for i in range(3, MAX_CLAIMS + 1))})", open=False,
                          elem_id="dispute-more"):
            with gr.Row(equal_height=False):
                for i in range(3, MAX_CLAIMS + 1):
                    with gr.Column():
                        fields.append(_claim_fields(i))
        btn = gr.Button("Decide", variant="primary", elem_id="dispute-btn")
        verdict = gr.Markdown("The decision will appear here.", elem_id="dispute-verdict")
        report = gr.Markdown(elem_id="dispute-report")
        json_out = gr.File(label="Report (JSON)", elem_id="dispute-json")
        with gr.Accordion("How to win a dispute (docs/dispute.md)", open=False, elem_id="dispute-docs"):
            gr.Markdown(DOCS.read_text() if DOCS.is_file() else "See docs/dispute.md in the seal-diffusion sources.")

    def handler(suspect=None, key1=None, tsr1=None, key2=None, tsr2=None, ca=None, photos=None, prompt=None,
                base=None, commitment1=None, file1=None, commitment2=None, file2=None, key3=None, tsr3=None,
                commitment3=None, file3=None, key4=None, tsr4=None, commitment4=None, file4=None,
                request: gr.Request = None):  # explicit: Gradio places the request by its position in the signature
        return run_dispute(suspect, key1, tsr1, key2, tsr2, ca, photos, prompt, base, commitment1, file1,
                           commitment2, file2, key3, tsr3, commitment3, file3, key4, tsr4, commitment4, file4, ws=ws,
                           default_base=default_base, request=request)

    (k1, t1, c1, f1), (k2, t2, c2, f2), *rest = fields
    inputs = [suspect, k1, t1, k2, t2, ca, photos, prompt, base, c1, f1, c2, f2, *(x for r in rest for x in r)]
    btn.click(guard(ws, handler), inputs, [verdict, report, json_out], api_name="dispute", concurrency_id="heavy",
              concurrency_limit=1).failure(ws.error_box, None, verdict, api_visibility="private", queue=False)
