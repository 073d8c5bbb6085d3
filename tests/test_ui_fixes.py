"""The app's rough edges from issue 14 item 16: /verify takes one file as well as a list, the training progress shows
on the summary only, no lingering "Error" badges, no share=True hint, a quiet SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_verify_takes_one_file_and_progress_shows_on_the_summary(owner_training, tmp_path):
    from ui.app import launch, launch_kwargs

    demo = launch(port=_free_port(), base="tiny", block=False, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False, download_files=str(tmp_path))
        verdict, table, _, _ = client.predict(handle_file(owner_training["key_path"]),
                                              handle_file(owner_training["lora_path"]),  # one file, not a list
                                              "tiny", 3.3, api_name="/verify")
        assert [r[1] for r in table["data"]] == ["watermark found"], table
        train = next(d for d in demo.config["dependencies"] if d.get("api_name") == "train")
        summary = next(c["id"] for c in demo.config["components"] if c.get("props", {}).get("elem_id") ==
                       "train-summary")
        assert train["show_progress_on"] == [summary]
        assert '[data-testid="status-tracker"] span.error' in launch_kwargs()["css"]
    finally:
        demo.close()
        demo.seal_workspace.cleanup()


def test_sigterm_stops_the_app_quietly(tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_TEMP_DIR=str(tmp_path / "gradio"), TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "seal_diffusion.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Keyboard interruption" not in out and "share=True" not in out, out
    assert f"127.0.0.1:{port}" in out and "stopped" in out, out
    assert not list(tmp_path.glob("seal-diffusion-ui-*")), "the job folders are removed"


# -- issue 23: errors stay, tabs numbered once, compare says when nothing changed, disputes with more claims ----------
def _by_elem(demo):
    return {c["props"].get("elem_id"): c["id"] for c in demo.config["components"] if c.get("props", {}).get("elem_id")}


def test_every_event_leaves_its_error_on_the_page_and_tabs_are_numbered_once(tiny_dir):
    """Each named event has a failure step that writes the message into its own result area; the toast stays until
    closed (duration None); the message shown is the one of the session's last failure."""
    import gradio as gr
    import pytest

    from seal_diffusion.errors import UserError
    from ui.layout import build_app
    from ui.workspace import _guard

    demo = build_app("tiny")
    try:
        deps = demo.config["dependencies"]
        ids = _by_elem(demo)
        areas = {"train": "train-summary", "export": "export-summary", "compare": "compare-summary",
                 "verify": "verify-verdict", "challenge": "images-make-md", "verify_images": "images-verdict",
                 "dispute": "dispute-verdict", "timestamp": "stamp-summary"}
        for api, area in areas.items():
            i = next(d["id"] for d in deps if d.get("api_name") == api)
            fail = [d for d in deps if d.get("trigger_after") == i and d.get("trigger_only_on_failure")]
            assert fail and fail[0]["outputs"] == [ids[area]], api
        tabs = [c["props"]["label"] for c in demo.config["components"] if c["type"] == "tabitem"]
        numbers = [t.split(" · ")[0] for t in tabs]
        assert numbers == [str(i) for i in range(1, len(tabs) + 1)], tabs

        ws = demo.seal_workspace

        def Req():  # noqa: N802
            return gr.Request(session_hash="abc")

        def bad(x, request=None):
            raise UserError(f"{ws.root}/s/j/thing.sealkey: not a SEAL key file")

        with pytest.raises(gr.Error) as err:
            _guard(ws, bad)(1, Req())
        assert err.value.duration is None
        box = ws.error_box(Req())
        assert "thing.sealkey: not a SEAL key file" in box and str(ws.root) not in box and "Stopped" in box

        assert "thing.sealkey" not in ws.error_box(gr.Request(session_hash="xyz"))  # another browser session sees only its own errors
    finally:
        demo.seal_workspace.cleanup()


def test_compare_says_why_nothing_changed(tiny_dir, tmp_path):
    """A LoRA that changes nothing (B = 0): the SSIM is 1 and the Compare tab says why instead of leaving the artist
    to think training failed; the app trains the tiny models with a learning rate that does change the pictures."""
    import torch

    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.core.keyfile import ModuleKey, SealKey
    from seal_diffusion.core.network import SealNetwork
    from ui.handlers import TINY_LR, Handlers
    from ui.workspace import Workspace

    net = SealNetwork(load_pipeline("tiny").unet, 4, passports=None)
    g = torch.Generator().manual_seed(0)
    modules = {m: ModuleKey(a.detach().clone(), torch.zeros_like(b), torch.randn(4, 4, generator=g),
                            torch.randn(4, 4, generator=g)) for m, (a, b) in net.factors().items()}
    net.remove()
    key = SealKey(modules, 4, 4.0, "tiny").save(tmp_path / "flat.sealkey")
    ws = Workspace()
    try:
        _, table, _, md = Handlers("tiny", ws).compare(str(key), "tiny", "a photo of sks cat", "0", 2)
        assert "does not change these pictures yet" in md and "SSIM 1.0000" in md
    finally:
        ws.cleanup()
    assert TINY_LR == 3e-3
