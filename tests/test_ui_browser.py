"""The app in a real browser: headless Chromium opens the page, trains on the example cat, verifies the result.

Chromium is driven through its DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON messages on file
descriptors 3/4), so no Python package or chromedriver is needed, only the browser (Debian: ``apt-get install -y
chromium``). Without a browser the test is skipped, unless ``SEAL_REQUIRE_BROWSER=1`` (CI) makes that a failure.
Screenshots go to ``$SEAL_UI_ARTIFACTS`` (default ``.ci/artifacts/``): ``ui-train.png``, ``ui-verify.png`` (the one
README shows as docs/app.png: all tabs in the bar), ``ui-dispute.png``.

Issue 23's visible bullets are checked here, where a user sees them: the timestamp step (.tsq after training, .tsr
from a local TSA, key prefilled), an error that stays in its result area after the toast's old 13 s, the
function-level test's progress, the Check-images tab (key prefilled, prompt marked required, "3 · Check the images"),
Compare's SSIM or its "nothing changed" note, the Dispute tab (names not cut, no word broken in the report's tables,
4 claims with commitment and file fields, the docs link), tab numbers 1–6 all in the bar.
"""

import base64
import itertools
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--window-size=1280,1600"]
TRAIN_STEPS = 8


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """Just enough of the Chrome DevTools protocol: one page, evaluate JS, set file inputs, screenshots."""

    def __init__(self, exe: str, profile: Path):
        cmd_r, self._cmd_w = os.pipe()  # we write commands → chromium reads fd 3
        self._resp_r, resp_w = os.pipe()  # chromium writes fd 4 → we read
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r}- 4>&{resp_w}-', exe, *CHROMIUM_FLAGS,
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(cmd_r, resp_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(profile.parent / "chromium.log", "wb"), env=env)
        os.close(cmd_r)
        os.close(resp_w)
        self._ids = itertools.count(1)
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "DOM.enable"):
            self.call(method, session=self.session)
        self.call("Emulation.setDeviceMetricsOverride", session=self.session, width=1280, height=1600,
                  deviceScaleFactor=1, mobile=False)

    def _read(self):
        buf = b""
        with os.fdopen(self._resp_r, "rb", buffering=0) as fh:
            while True:
                chunk = fh.read(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    msg = json.loads(raw)
                    if "id" in msg:
                        with self._lock:
                            q = self._replies.get(msg["id"])
                        if q is not None:
                            q.put(msg)

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params):
        i = next(self._ids)
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._replies[i] = q
        msg = {"id": i, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=timeout)
        except queue.Empty:
            raise CDPError(f"{method}: no reply in {timeout} s") from None
        finally:
            with self._lock:
                self._replies.pop(i, None)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    # -- page helpers ------------------------------------------------------------------------------------------------
    def js(self, expression: str):
        res = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise CDPError(f"JS error in {expression[:80]!r}: {res['exceptionDetails'].get('text')} "
                           f"{res['exceptionDetails'].get('exception', {}).get('description', '')}")
        return res.get("result", {}).get("value")

    def wait(self, expression: str, timeout: float = 60, what: str = "", on_poll=None):
        end = time.time() + timeout
        while time.time() < end:
            value = self.js(expression)
            if on_poll:
                on_poll()
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what or expression}")

    def goto(self, url: str):
        self.call("Page.navigate", session=self.session, url=url)

    def set_files(self, selector: str, files: list[str]):
        root = self.call("DOM.getDocument", session=self.session, depth=0)["root"]["nodeId"]
        node = self.call("DOM.querySelector", session=self.session, nodeId=root, selector=selector)["nodeId"]
        if not node:
            raise AssertionError(f"no element {selector}")
        self.call("DOM.setFileInputFiles", session=self.session, nodeId=node, files=files)

    def screenshot(self, path: Path) -> Path:
        size = self.call("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        shot = self.call("Page.captureScreenshot", session=self.session, format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            os.close(self._cmd_w)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# JS helpers: set a Svelte-bound input like a user would, click by selector or by text
JS_HELPERS = r"""
window.__seal = {
  set(sel, value) {
    const el = document.querySelector(sel);
    if (!el) throw new Error('no element ' + sel);
    const proto = el.tagName === 'TEXTAREA' ? HTMLTextAreaElement.prototype : HTMLInputElement.prototype;
    Object.getOwnPropertyDescriptor(proto, 'value').set.call(el, String(value));
    el.dispatchEvent(new Event('input', {bubbles: true}));
    el.dispatchEvent(new Event('change', {bubbles: true}));
    el.dispatchEvent(new Event('blur', {bubbles: true}));
    return true;
  },
  click(sel) {
    const el = document.querySelector(sel);
    if (!el) throw new Error('no element ' + sel);
    el.click();
    return true;
  },
  clickText(sel, text) {
    const el = [...document.querySelectorAll(sel)].find(e => e.innerText.trim().includes(text));
    if (!el) throw new Error('no ' + sel + ' with text ' + text);
    el.click();
    return true;
  },
  text(sel) { const el = document.querySelector(sel); return el ? el.innerText : ''; },
  opacity(sel) {  // outputs are dimmed while an event runs: wait for full opacity before a screenshot
    let o = 1;
    for (let e = document.querySelector(sel); e; e = e.parentElement) o *= Number(getComputedStyle(e).opacity);
    return o;
  },
  settled(sels) { return sels.every(s => document.querySelector(s) && this.opacity(s) > 0.99); },
  flat(sel) { return this.text(sel).replace(/\s+/g, ''); },  // file names may be split over several elements
  truncated(sel) {  // elements whose text is cut (ellipsis/overflow) inside sel
    return [...document.querySelectorAll(sel + ' *')].filter(e => e.children.length === 0 && e.innerText &&
      e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflow !== 'visible').map(e => e.innerText);
  },
  brokenWords(sel) {  // words of the table cells (but the last column) laid out over more than one line
    const out = [];
    for (const cell of document.querySelectorAll(sel + ' th, ' + sel + ' td')) {
      if (cell === cell.parentElement.lastElementChild) continue;
      const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
      for (let n = walker.nextNode(); n; n = walker.nextNode()) {
        for (const m of n.textContent.matchAll(/\S+/g)) {
          const r = document.createRange();
          r.setStart(n, m.index); r.setEnd(n, m.index + m[0].length);
          const tops = new Set([...r.getClientRects()].map(x => Math.round(x.top)));
          if (tops.size > 1) out.push(m[0]);
        }
      }
    }
    return out;
  },
};
true
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    exe = find_chromium()
    if exe is None:
        if os.environ.get("SEAL_REQUIRE_BROWSER") == "1":
            pytest.fail("SEAL_REQUIRE_BROWSER=1 but no chromium found (apt-get install -y chromium)")
        pytest.skip("headless browser test: chromium is not installed (Debian: apt-get install -y chromium)")
    return exe


@pytest.fixture(scope="module")
def app_url(chromium, tiny_dir):
    root = Path(tempfile.mkdtemp(prefix="seal-ui-browser-"))
    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "TMPDIR")}
    saved_tempdir = tempfile.tempdir
    for sub in ("gradio", "tmp"):
        (root / sub).mkdir()
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    os.environ["TMPDIR"] = str(root / "tmp")
    tempfile.tempdir = str(root / "tmp")
    from ui.app import launch

    port = _free_port()
    demo = launch(port=port, base="tiny", block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", root
    finally:
        demo.close()
        demo.seal_workspace.cleanup()
        tempfile.tempdir = saved_tempdir
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


def artifacts_dir() -> Path:
    return Path(os.environ.get("SEAL_UI_ARTIFACTS") or ROOT / ".ci" / "artifacts")


def _not_blank(png: Path) -> None:
    from PIL import Image, ImageStat

    with Image.open(png) as im:
        assert im.width >= 1000 and im.height >= 800, im.size
        assert max(ImageStat.Stat(im.convert("L")).stddev) > 10, "screenshot is blank"


def _innocent_lora(key_path: Path, out: Path) -> Path:
    """A LoRA with the key's shapes but unrelated random factors (what someone else's LoRA looks like)."""
    import torch

    from seal_diffusion.core.export import export_lora
    from seal_diffusion.core.keyfile import ModuleKey, SealKey

    key = SealKey.load(key_path)
    g = torch.Generator().manual_seed(7)
    modules = {m: ModuleKey(*(torch.randn(t.shape, generator=g) for t in (mk.lora_A, mk.lora_B, mk.passport,
                                                                            mk.passport_p)))
               for m, mk in key.modules.items()}
    return export_lora(SealKey(modules, key.rank, key.alpha, "tiny"), out, "kohya", out.stem)


def _issue23_checks(browser, root: Path, files: dict, lora: Path) -> None:
    s = "window.__seal"
    # -- the timestamp step (Train tab): .tsq handed out with the key, .tsr from a local TSA, checked with its CA
    from seal_diffusion.ownership.local_tsa import LocalTSA

    browser.js(f"{s}.clickText('button[role=tab]', 'Watermark')")
    browser.wait(f"{s}.flat('#stamp-files').includes('browser_lora.tsq')", timeout=20, what="the .tsq download")
    assert "browser_lora.sealkey" in browser.js(f"{s}.flat('#stamp-key')")
    tsa = LocalTSA(root / "tsa")
    url, server = tsa.serve()
    try:
        browser.js(f"{s}.set('#stamp-url textarea, #stamp-url input', {json.dumps(url)})")
        browser.set_files("#stamp-ca input[type=file]", [str(tsa.ca)])
        browser.wait(f"{s}.flat('#stamp-ca').includes('ca.pem')", timeout=30, what="the CA upload")
        browser.js(f"{s}.click('#stamp-btn')")
        browser.wait(f"{s}.text('#stamp-summary').includes('Timestamped:')", timeout=60, what="the timestamp")
        browser.wait(f"{s}.flat('#stamp-files').includes('browser_lora.tsr')", timeout=20, what="the .tsr download")
        href = browser.js("[...document.querySelectorAll('#stamp-files a')].map(a => a.href)"
                          ".find(h => h.endsWith('.tsr'))")
        with urllib.request.urlopen(href, timeout=30) as resp:
            (root / "downloaded" / "browser_lora.tsr").write_bytes(resp.read())
    finally:
        server.shutdown()
        server.server_close()

    # -- Compare: either the pictures change (SSIM < 0.9995) or the tab says why they did not
    browser.js(f"{s}.clickText('button[role=tab]', 'Compare')")
    browser.js(f"{s}.set('#compare-steps input[type=number]', 2)")
    browser.js(f"{s}.set('#compare-seeds textarea, #compare-seeds input', '0')")
    browser.js(f"{s}.click('#compare-btn')")
    browser.wait(f"{s}.text('#compare-table').includes('passport C vs base model')", timeout=600, what="compare")
    import re

    table = browser.js(f"{s}.text('#compare-table')")
    found = re.search(r"passport C vs base model\s+(identical|[0-9.]+)", table)
    assert found, table
    ssim = 1.0 if found.group(1) == "identical" else float(found.group(1))
    note = "does not change these pictures yet" in browser.js(f"{s}.text('#compare-summary')")
    assert note == (ssim >= 0.9995), (ssim, note)

    # -- Check images: key prefilled, the prompt marked required; an error stays in place after the toast's 13 s
    browser.js(f"{s}.clickText('button[role=tab]', 'Check images')")
    browser.wait(f"{s}.flat('#images-key').includes('browser_lora.sealkey')", timeout=20, what="the prefilled key")
    assert "required" in browser.js(f"{s}.text('#images-prompt')")
    browser.js(f"{s}.click('#images-make-btn')")
    browser.wait(f"{s}.text('#images-make-md').includes('Subject prompt: required')", timeout=30,
                 what="the error in the result area")
    time.sleep(14)
    assert "Subject prompt: required" in browser.js(f"{s}.text('#images-make-md')"), "the error went away"
    browser.js(f"{s}.set('#images-prompt textarea, #images-prompt input', 'a photo of sks cat')")
    browser.js(f"{s}.set('#images-n input', 2)")
    browser.js(f"{s}.click('#images-make-btn')")
    made = browser.wait(f"(t => t.includes('Challenge ready') ? t : '')({s}.text('#images-make-md'))", timeout=180,
                        what="the challenge")
    assert "3 · Check the images" in made and "below" not in made.split("3 · Check the images")[0]

    # -- Dispute: four claims, commitment and file fields, names not cut, table words whole, a real docs link
    browser.js(f"{s}.clickText('button[role=tab]', 'Dispute')")
    browser.wait("!!(document.querySelector('#dispute-btn') && document.querySelector('#dispute-btn').offsetParent)",
                 timeout=30, what="the Dispute tab")  # !!: an element is not returned by value
    for i in (1, 2):
        for field in ("key", "tsr", "commitment", "file"):
            assert browser.js(f"!!document.querySelector('#dispute-{field}{i}')"), (field, i)
    browser.js(f"{s}.clickText('button', 'More claims')")
    browser.wait("!!(document.querySelector('#dispute-key4') && document.querySelector('#dispute-key4').offsetParent)",
                 timeout=30, what="claims 3 and 4")
    assert browser.js("!!document.querySelector('a[href=\"#dispute-docs\"]')")
    assert "How to win a dispute" in browser.js(f"{s}.text('#dispute-docs')")
    browser.set_files("#dispute-suspect input[type=file]", [str(lora)])
    browser.set_files("#dispute-key1 input[type=file]", [str(files["browser_lora.sealkey"])])
    browser.set_files("#dispute-tsr1 input[type=file]", [str(root / "downloaded" / "browser_lora.tsr")])
    browser.set_files("#dispute-ca input[type=file]", [str(tsa.ca)])
    for sel, name in (("#dispute-key1", "browser_lora.sealkey"), ("#dispute-tsr1", "browser_lora.tsr"),
                      ("#dispute-suspect", "browser_lora.safetensors")):
        browser.wait(f"{s}.flat('{sel}').includes('{name}')", timeout=30, what=f"the upload of {name}")
        assert browser.js(f"{s}.truncated('{sel}')") == [], (sel, browser.js(f"{s}.truncated('{sel}')"))
    browser.js(f"{s}.click('#dispute-btn')")
    browser.wait(f"{s}.text('#dispute-report').includes('Ownership dispute report')", timeout=300,
                 what="the dispute report")
    assert "claim 1 (browser_lora.sealkey)" in browser.js(f"{s}.text('#dispute-report')")
    browser.wait(f"{s}.settled(['#dispute-verdict', '#dispute-report'])", timeout=20, what="the report to settle")
    assert browser.js(f"{s}.brokenWords('#dispute-report')") == []
    browser.screenshot(artifacts_dir() / "ui-dispute.png")


def test_train_then_verify_in_the_browser(chromium, app_url):
    url, root = app_url
    browser = Browser(chromium, root / "profile")
    try:
        browser.goto(url)
        browser.wait("document.querySelector('#train-btn') !== null", timeout=90, what="the page to render")
        browser.js(JS_HELPERS)
        s = "window.__seal"
        # -- 1. watermark & train: the example cat, few steps, batch 1 --------------------------------------------
        browser.js(f"{s}.click('#train-example input[type=checkbox]')")
        browser.js(f"{s}.set('#train-steps input', {TRAIN_STEPS})")
        browser.js(f"{s}.set('#train-name textarea, #train-name input', 'browser_lora')")
        browser.js(f"{s}.clickText('button', 'Advanced settings')")
        batch = "#train-batch textarea, #train-batch input"
        browser.wait(f"document.querySelector('{batch}') !== null", timeout=10, what="the advanced settings")
        browser.js(f"{s}.set('{batch}', 1)")
        browser.js(f"{s}.click('#train-btn')")
        seen_progress = []

        def watch():
            text = browser.js("document.body.innerText")
            if "Training: step" in text or "Preparing" in text:
                seen_progress.append(True)

        browser.wait("document.querySelector('#train-key a') !== null && "
                     "document.querySelector('#train-kohya a') !== null", timeout=240,
                     what="training to finish (download links)", on_poll=watch)
        summary = browser.js(f"{s}.text('#train-summary')")
        assert f"Trained {TRAIN_STEPS} steps" in summary, summary
        commitment = browser.js("document.querySelector('#train-commitment textarea, #train-commitment input').value")
        assert len(commitment) == 64
        assert seen_progress, "no progress message was shown while training"
        browser.wait(f"{s}.settled(['#train-summary', '#train-key'])", timeout=20, what="the train outputs to settle")
        browser.screenshot(artifacts_dir() / "ui-train.png")

        # the public LoRA and the key, downloaded as a user would; an unrelated LoRA of the same shape
        files = {}
        for elem, name in (("#train-kohya", "browser_lora.safetensors"), ("#train-key", "browser_lora.sealkey")):
            files[name] = root / "downloaded" / name
            files[name].parent.mkdir(exist_ok=True)
            with urllib.request.urlopen(browser.js(f"document.querySelector('{elem} a').href"), timeout=30) as resp:
                files[name].write_bytes(resp.read())
        lora = files["browser_lora.safetensors"]
        innocent = _innocent_lora(files["browser_lora.sealkey"], root / "downloaded" / "other_lora.safetensors")

        # -- 4. verify: the key is already filled in; add the LoRA -----------------------------------------------
        browser.js(f"{s}.clickText('button[role=tab]', 'Verify')")
        browser.wait("document.querySelector('#verify-btn') !== null && "
                     "document.querySelector('#verify-btn').offsetParent !== null", timeout=10, what="the Verify tab")
        browser.wait(f"{s}.flat('#verify-key').includes('browser_lora.sealkey')", timeout=20, what="the key to be prefilled")
        browser.set_files("#verify-suspects input[type=file]", [str(lora), str(innocent)])
        browser.wait(f"{s}.flat('#verify-suspects').includes('browser_lora.safetensors') && "
                     f"{s}.flat('#verify-suspects').includes('other_lora.safetensors')", timeout=30,
                     what="the suspect uploads")
        browser.js(f"{s}.click('#verify-functional input[type=checkbox]')")  # the function-level test too
        browser.js(f"{s}.click('#verify-btn')")
        verdict = browser.wait(f"(t => t.includes('contains your watermark') ? t : '')({s}.text('#verify-verdict'))",
                               timeout=60, what="the verdict")
        assert "chance of this happening by accident is below 1 in 10" in verdict
        assert "other_lora.safetensors: no sign of your watermark" in verdict
        browser.wait("(i => i && i.complete && i.naturalWidth > 100)(document.querySelector('#verify-chart img'))",
                     timeout=30, what="the per-layer chart")
        assert "watermark found" in browser.js(f"{s}.text('#verify-table')")
        # the function-level test (~20 s the first time): a running note and a progress bar on its panel, then the words
        seen = set()

        def watch_functional():
            text = browser.js(f"{s}.text('#verify-functional-verdict')")
            for needle in ("Function-level test running", "Function-level test:"):
                if needle in text:
                    seen.add(needle)

        browser.wait(f"{s}.text('#verify-functional-verdict').includes('your LoRA — found')", timeout=600,
                     what="the function-level verdict", on_poll=watch_functional)
        assert seen, "nothing was shown while the function-level test ran"
        browser.wait(f"{s}.settled(['#verify-verdict', '#verify-table', '#verify-chart'])", timeout=20,
                     what="the verify outputs to settle")
        tabs = browser.js("[...document.querySelectorAll('button[role=tab]')].filter(b => b.offsetParent !== null)"
                          ".map(b => b.innerText.trim())")
        assert [t.split(" · ")[0] for t in tabs] == ["1", "2", "3", "4", "5", "6"], tabs  # all in the bar, once
        shot = browser.screenshot(artifacts_dir() / "ui-verify.png")  # README's docs/app.png
        _not_blank(shot)
        _issue23_checks(browser, root, files, lora)
    except (AssertionError, CDPError):
        try:  # what the page looked like when it failed: an artefact for CI
            browser.screenshot(artifacts_dir() / "ui-failure.png")
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        browser.close()
