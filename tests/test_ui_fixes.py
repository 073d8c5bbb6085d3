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
