"""The Train tab's timestamp step: get the key's commitment stamped by a timestamp authority (RFC 3161) from the app,
and download the request (``.tsq``) and the reply (``.tsr``) to keep with the key.

A thin layer over :func:`seal_diffusion.ownership.timestamp.stamp_key` (what ``seal-diffusion timestamp`` runs). The key is copied
into the job's private folder (the files sit beside it there, named after it); only the public ``.tsq``/``.tsr`` are
returned. Named endpoint ``/timestamp``.
"""

from __future__ import annotations

import html
import shutil

import gradio as gr

from seal_diffusion.ownership.timestamp import EXAMPLE_TSA, stamp_key
from ui.workspace import _load_key, _path, _safe_name

ABOUT = f"""#### Timestamp your key (before you publish)
A timestamp authority (TSA) signs *when* it saw your key's commitment: in a dispute, the earliest timestamped key wins
(see the Dispute tab). Only the commitment's hash leaves this computer, never the key. The default authority is the
free public one, `{EXAMPLE_TSA}`; its CA certificate (to check the reply) is `https://freetsa.org/files/cacert.pem`.
Download the **.tsq** (request) and **.tsr** (reply) and keep them with your key."""


def stamp(ws, key_file=None, tsa_url=None, ca_file=None, request: gr.Request = None):
    """Returns ([.tsq, .tsr] paths, what happened in plain words)."""
    _, key_path = _load_key(key_file)
    url = (tsa_url or "").strip() or EXAMPLE_TSA
    ca = _path(ca_file)
    job = ws.job(request, "timestamp")
    key_copy = shutil.copyfile(key_path, job / f"{_safe_name(key_path.stem, 'my_lora')}.sealkey")
    done = stamp_key(key_copy, tsa=url, ca_file=str(ca) if ca else None)
    files = [p for p in (done.get("request"), done.get("reply")) if p]
    st = done.get("stamp")
    if st is not None:
        md = (f"<div class='seal-verdict seal-found'><strong>Timestamped: {html.escape(st.gen_time)} (UTC)</strong> by "
              f"{html.escape(st.tsa)}, serial {st.serial}. The reply was checked against your CA file. Keep "
              f"<code>{html.escape(_name(done['reply']))}</code> with your key.</div>")
    else:
        md = (f"<div class='seal-verdict seal-warning'><strong>Reply saved, not yet checked</strong> (no CA file was "
              f"given): it is a granted reply for your commitment, but its signature is not verified. Check it with "
              f"<code>seal-diffusion timestamp --key {html.escape(_name(key_copy))} --reply "
              f"{html.escape(_name(done['reply']))} --ca TSA_CA.pem</code>.</div>")
    return files, md


def _name(path) -> str:
    return str(path).rsplit("/", 1)[-1]


def timestamp_section(ws, guard):
    """Build the section (inside the Train tab's result column) and wire its button; returns (key input, files
    output) so that training can fill them in."""
    gr.Markdown(ABOUT)
    key = gr.File(label="Your private key (.sealkey; filled in after training)", type="filepath",
                  elem_id="stamp-key")
    with gr.Row():
        url = gr.Textbox(label="Timestamp authority (URL)", value=EXAMPLE_TSA, elem_id="stamp-url", scale=2)
        ca = gr.File(label="Its CA certificate (.pem, to check the reply)", type="filepath", elem_id="stamp-ca",
                     scale=1, height=110)
    btn = gr.Button("Get a trusted timestamp", elem_id="stamp-btn")
    files = gr.File(label="Timestamp files (public: .tsq request, .tsr reply; keep them with the key)",
                    file_count="multiple", interactive=False, elem_id="stamp-files", height=110)
    md = gr.Markdown(elem_id="stamp-summary")

    def handler(key_file=None, tsa_url=None, ca_file=None, request: gr.Request = None):
        return stamp(ws, key_file, tsa_url, ca_file, request=request)

    evt = btn.click(guard(ws, handler), [key, url, ca], [files, md], api_name="timestamp", concurrency_limit=4)
    return key, files, md, evt
