"""The Gradio app (ui/app.py) driven through its named endpoints with gradio_client, on the embedded default."""

import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

STEPS = 6
RANK = 4
IMAGE_RANK = 8  # an image passport is one shared C for all layers: its evidence is that of one layer, so rank ≥ 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sandbox():
    """GRADIO_TEMP_DIR and TMPDIR in a fresh folder for this module (restored and removed afterwards)."""
    root = Path(tempfile.mkdtemp(prefix="seal-ui-test-"))
    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "TMPDIR")}
    saved_tempdir = tempfile.tempdir
    (root / "gradio").mkdir()
    (root / "tmp").mkdir()
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    os.environ["TMPDIR"] = str(root / "tmp")
    tempfile.tempdir = str(root / "tmp")
    yield root
    tempfile.tempdir = saved_tempdir
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(sandbox, tiny_dir):
    from ui.app import launch

    port = free_port()
    demo = launch(port=port, base="tiny", block=False, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    yield demo, url
    demo.close()
    demo.seal_workspace.cleanup()


@pytest.fixture(scope="module")
def client(server, sandbox):
    return Client(server[1], verbose=False, download_files=str(sandbox / "downloads"))


@pytest.fixture(scope="module")
def logo(sandbox):
    """A bold black-and-white 'logo' for an image passport: valid (non-singular) once shrunk to RANK × RANK."""
    from seal_diffusion.core.passport import load_passport_frames, passport_problem

    rng = np.random.default_rng(3)
    path = sandbox / "logo.png"
    while True:
        bits = rng.integers(0, 2, (IMAGE_RANK, IMAGE_RANK))
        Image.fromarray(np.kron(bits * 255, np.ones((8, 8))).astype(np.uint8)).save(path)
        if passport_problem(load_passport_frames(path, IMAGE_RANK)[0]) is None:
            return path


@pytest.fixture(scope="module")
def trained(client, logo):
    """One short training through /train (bundled cat, image passport, text encoder too), watching the live
    progress; the other tests export, compare and verify its key (UNet and text-encoder modules) through the app."""
    job = client.submit(None, True, "a photo of sks cat", "tiny", STEPS, IMAGE_RANK, "image", handle_file(str(logo)),
                        "ui_lora", "", "64", "1", "0", True, api_name="/train")
    descs = []
    while not job.done():
        status = job.status()
        for unit in status.progress_data or []:
            if unit.desc:
                descs.append(unit.desc)
        time.sleep(0.05)
    summary, kohya, diffusers, key, commitment, stamp_files = job.result()
    return dict(summary=summary, kohya=Path(kohya), diffusers=Path(diffusers), key=Path(key), commitment=commitment,
                progress=descs, stamp_files=[Path(f) for f in stamp_files or []])


def test_named_endpoints(client):
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/train", "/export", "/compare", "/verify", "/challenge", "/verify_images", "/dispute", "/timestamp",
            "/verify_functional"} <= set(named)


def test_train_outputs(trained):
    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.formats.lora_file import read_lora

    assert "Done" in trained["summary"] and "ui_lora.sealkey" in trained["summary"]
    assert trained["kohya"].name == "ui_lora.safetensors"
    assert trained["diffusers"].name == "pytorch_lora_weights.safetensors"
    key = SealKey.load(trained["key"])
    assert key.commitment() == trained["commitment"]
    assert key.rank == IMAGE_RANK and key.passport_source.startswith("image:")
    lora = read_lora(trained["kohya"])
    assert lora.layout == "kohya" and len(lora.entries) == len(key.modules)
    te = [m for m in key.modules if m.startswith("text_encoder.")]  # the "train the text encoder" box was ticked
    assert len(te) == 20 and sum(s.startswith("lora_te_") for s in lora.entries) == 20
    assert not any("passport" in k for k in lora.metadata)
    # live progress: step, loss and time left reached the client while training ran
    pattern = re.compile(rf"Training: step \d+ of {STEPS} · loss \d+\.\d+ · about .+ left")
    assert any(pattern.fullmatch(d) for d in trained["progress"]), trained["progress"]


def test_verify_copies_and_innocent(client, trained, sandbox):
    import torch

    from seal_diffusion.core.export import export_lora
    from seal_diffusion.core.keyfile import ModuleKey, SealKey

    key = SealKey.load(trained["key"])
    g = np.random.default_rng(0)

    def rand(t):
        return torch.from_numpy(g.standard_normal(tuple(t.shape)).astype("float32"))

    other = SealKey({m: ModuleKey(rand(mk.lora_A), rand(mk.lora_B), rand(mk.passport), rand(mk.passport_p))
                     for m, mk in key.modules.items()}, key.rank, key.alpha, "tiny")
    innocent = export_lora(other, sandbox / "innocent.safetensors", "kohya", "innocent")

    verdict, table, chart, passport = client.predict(
        handle_file(str(trained["key"])),
        [handle_file(str(trained["kohya"])), handle_file(str(trained["diffusers"])), handle_file(str(innocent))],
        "tiny", 3.3, api_name="/verify")
    rows = {r[0]: r for r in table["data"]}
    assert rows["ui_lora.safetensors"][1] == "watermark found" and rows["ui_lora.safetensors"][2] > 3.3
    assert rows["pytorch_lora_weights.safetensors"][1] == "watermark found"
    assert rows["innocent.safetensors"][1] == "no watermark found" and rows["innocent.safetensors"][2] < 3.3
    assert "contains your watermark" in verdict and "chance of this happening by accident is below 1 in 10" in verdict
    assert "no sign of your watermark" in verdict
    assert "3.3" in verdict
    with Image.open(chart) as im:
        assert im.width > 300 and im.height > 200
    # image passport → the recovered passport image is shown
    value = passport["value"] if isinstance(passport, dict) and "value" in passport else passport
    path = value["path"] if isinstance(value, dict) else value
    assert path and Path(path).is_file()


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_export_matches_library(client, trained, layout, sandbox):
    from safetensors.torch import load_file

    from seal_diffusion.core.export import export_lora
    from seal_diffusion.core.keyfile import SealKey

    path, md = client.predict(handle_file(str(trained["key"])), layout, "", api_name="/export")
    ref = export_lora(SealKey.load(trained["key"]), sandbox / f"ref-{layout}.safetensors", layout, "ui_lora")
    got, want = load_file(path), load_file(ref)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    assert trained["commitment"] in md


def test_compare(client, trained):
    gallery, table, spectra, md = client.predict(handle_file(str(trained["key"])), "tiny", "a photo of sks cat",
                                                 "0", 2, api_name="/compare")
    assert len(gallery) == 5
    captions = [item["caption"] for item in gallery]
    assert captions == ["base model", "passport C", "passport C_p", "no passport", "exported file"]
    assert all(Path(item["image"]).is_file() for item in gallery)
    rows = {r[0]: r for r in table["data"]}
    assert len(rows) == 5
    exported = rows["exported file vs passport C"]
    assert exported[2] == "∞ (identical)" or float(exported[2]) > 60  # the exported file gives the same images as C
    assert Path(spectra).is_file()


def test_bad_uploads_give_clean_errors_and_server_survives(client, trained, sandbox):
    garbage = sandbox / "garbage.sealkey"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(garbage)), "kohya", "", api_name="/export")
    msg = str(err.value)
    assert "garbage.sealkey" in msg and "not a readable" in msg
    assert str(sandbox) not in msg and "Traceback" not in msg  # one line, no server paths

    # a public LoRA uploaded as the key: the message says what to upload instead
    with pytest.raises(AppError, match="private .sealkey"):
        client.predict(handle_file(str(trained["kohya"])), [handle_file(str(trained["kohya"]))], "tiny", 3.3,
                       api_name="/verify")

    # a garbage suspect is one row of the table, the others are still checked
    bad = sandbox / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    verdict, table, _, _ = client.predict(handle_file(str(trained["key"])),
                                          [handle_file(str(bad)), handle_file(str(trained["kohya"]))],
                                          "tiny", 3.3, api_name="/verify")
    rows = {r[0]: r for r in table["data"]}
    assert rows["broken.safetensors"][1] == "could not be checked"
    assert rows["ui_lora.safetensors"][1] == "watermark found"

    # training input problems: no photos, not an image, unknown base model
    with pytest.raises(AppError, match="photos of your subject"):
        client.predict(None, False, "a photo of sks cat", "tiny", 2, RANK, "random", None, "x", "", "64", "1", "0",
                       api_name="/train")
    notes = sandbox / "notes.txt"
    notes.write_text("not a photo")
    with pytest.raises(AppError, match="Invalid file type|notes.txt"):
        client.predict([handle_file(str(notes))], False, "a photo of sks cat", "tiny", 2, RANK, "random", None, "x",
                       "", "64", "1", "0", api_name="/train")
    with pytest.raises(AppError, match="no-such-model-folder"):
        client.predict(None, True, "a photo of sks cat", "./no-such-model-folder/x.ckpt", 2, RANK, "random", None,
                       "x", "", "64", "1", "0", api_name="/train")

    # and the server still answers
    path, _ = client.predict(handle_file(str(trained["key"])), "kohya", "again", api_name="/export")
    assert Path(path).name == "again.safetensors"


def test_server_is_local_and_serves_only_its_cache(server, trained):
    demo, url = server
    assert demo.server_name == "127.0.0.1"
    assert demo.allowed_paths == []
    ws_files = [p for p in demo.seal_workspace.root.rglob("*.sealkey")]
    assert ws_files, "the job folder holds the key"
    for target in (ws_files[0], ROOT / "README.md", Path("/etc/passwd")):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "gradio_api/file=" + urllib.parse.quote(str(target)), timeout=10)
        assert err.value.code in (403, 404)


def test_upload_size_limit(sandbox, tiny_dir):
    from ui.app import launch

    port = free_port()
    demo = launch(port=port, base="tiny", block=False, quiet=True, max_file_size="2kb")
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(sandbox / "dl2"))
        big = sandbox / "big.sealkey"
        big.write_bytes(os.urandom(8192))
        with pytest.raises(Exception) as err:
            c.predict(handle_file(str(big)), "kohya", "", api_name="/export")
        assert "413" in str(err.value) or "large" in str(err.value).lower() or "size" in str(err.value).lower()
        small = sandbox / "small.sealkey"
        small.write_bytes(b"x" * 100)
        with pytest.raises(AppError, match="small.sealkey"):  # still answers, with the usual clean message
            c.predict(handle_file(str(small)), "kohya", "", api_name="/export")
    finally:
        demo.close()
        demo.seal_workspace.cleanup()


def test_verify_files_used_together_and_commitment(client, trained, sandbox):
    """A LoRA split into A = release + R and B = −R: each alone is clean, together (as the app offers) it is found; a
    published commitment that the key does not match is refused."""
    import torch
    from safetensors.torch import save_file

    from seal_diffusion.formats.lora_file import read_lora

    g = torch.Generator().manual_seed(0)
    a_file, b_file = {}, {}
    for stem, (d, u) in read_lora(trained["kohya"]).entries.items():
        rd, ru = torch.randn(d.shape, generator=g), torch.randn(u.shape, generator=g)
        ru = ru * float((u @ d).norm() / (ru @ rd).norm()) * 1000  # image passport: R must dominate more
        a_file[f"{stem}.lora_down.weight"], a_file[f"{stem}.lora_up.weight"] = torch.cat([d, rd]), torch.cat([u, ru], 1)
        b_file[f"{stem}.lora_down.weight"], b_file[f"{stem}.lora_up.weight"] = rd, -ru.contiguous()
    save_file(a_file, str(sandbox / "part_a.safetensors"))
    save_file(b_file, str(sandbox / "part_b.safetensors"))
    files = [handle_file(str(sandbox / "part_a.safetensors")), handle_file(str(sandbox / "part_b.safetensors"))]
    _, table, _, _ = client.predict(handle_file(str(trained["key"])), files, "tiny", 3.3, False, "", api_name="/verify")
    assert [r[1] for r in table["data"]] == ["no watermark found", "no watermark found"], table["data"]
    verdict, table, _, _ = client.predict(handle_file(str(trained["key"])), files, "tiny", 3.3, True,
                                          trained["commitment"], api_name="/verify")
    assert [r[:2] for r in table["data"]] == [["part_a.safetensors + part_b.safetensors", "watermark found"]]
    assert "checked against your published commitment" in verdict
    with pytest.raises(AppError, match="does not match the published commitment"):
        client.predict(handle_file(str(trained["key"])), files, "tiny", 3.3, True, "0" * 64, api_name="/verify")


def test_timestamp_step_downloads_tsq_and_tsr(client, trained, sandbox):
    """Training hands out the .tsq; the timestamp step gets a reply from a TSA (a local one over HTTP here), checks it
    with the CA file and hands out .tsq and .tsr; without a CA file it says the reply is not checked yet."""
    from rfc3161_client._rust import parse_timestamp_request

    from seal_diffusion.ownership.local_tsa import LocalTSA
    from seal_diffusion.ownership.timestamp import check_reply

    import hashlib

    [tsq] = trained["stamp_files"]
    assert tsq.name == "ui_lora.tsq"
    imprint = parse_timestamp_request(tsq.read_bytes()).message_imprint.message
    assert imprint == hashlib.sha256(bytes.fromhex(trained["commitment"])).digest()
    tsa = LocalTSA(sandbox / "tsa")
    url, srv = tsa.serve()
    try:
        files, md = client.predict(handle_file(str(trained["key"])), url, handle_file(str(tsa.ca)),
                                   api_name="/timestamp")
        names = sorted(Path(f).name for f in files)
        assert names == ["ui_lora.tsq", "ui_lora.tsr"], names
        tsr = next(Path(f) for f in files if f.endswith(".tsr"))
        stamp = check_reply(tsr, trained["commitment"], tsa.ca)
        assert f"Timestamped: {stamp.gen_time} (UTC)" in md and "checked against your CA file" in md
        files, md = client.predict(handle_file(str(trained["key"])), url, None, api_name="/timestamp")
        assert "not yet checked" in md and "--reply ui_lora.tsr" in md
        with pytest.raises(AppError, match="not reachable"):  # a TSA that does not answer: one clear line
            client.predict(handle_file(str(trained["key"])), f"http://127.0.0.1:{free_port()}/tsr", None,
                           api_name="/timestamp")
    finally:
        srv.shutdown()
        srv.server_close()


def test_image_check_needs_the_prompt(client, trained):
    with pytest.raises(AppError, match="Subject prompt: required"):
        client.predict(handle_file(str(trained["key"])), "", 4, "tiny", api_name="/challenge")
