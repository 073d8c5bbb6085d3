"""A local RFC 3161 timestamp authority for the demo, the app's "try it" mode and the tests — no network.

:class:`LocalTSA` makes, in a folder of its own, a certificate authority (``ca.pem``) and a TSA certificate signed by it
(critical extended key usage *timeStamping*, as RFC 3161 requires), and answers timestamp requests with OpenSSL's
reference TSA (``openssl ts -reply``). Its replies check with :func:`seal_diffusion.ownership.timestamp.check_reply` and with
``openssl ts -verify`` against ``ca.pem``, exactly as a public TSA's do.

**What it proves: nothing to anyone else.** Whoever runs it holds the TSA's private key and can date a reply as he
likes; a judge trusts only a TSA he trusts (a public one: see docs/dispute.md). It exists to show and test the
workflow end to end on one computer. The keys are EC P-256, unencrypted, in the folder (mode 0700).

Needs the ``openssl`` command (OpenSSL ≥ 1.1, present on Linux and macOS); the certificates are built with
``openssl req``/``x509``, the replies by ``openssl ts``. genTime has one-second resolution.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import UserError

CONFIG = """\
[ tsa ]
default_tsa = tsa_config
[ tsa_config ]
dir = {dir}
serial = {dir}/serial
crypto_device = builtin
signer_cert = {dir}/tsa.pem
certs = {dir}/tsa.pem
signer_key = {dir}/tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
other_policies = 1.2.3.4.5
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = no
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
[ ca_ext ]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[ tsa_ext ]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
extendedKeyUsage = critical,timeStamping
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
CONTENT_TYPE_QUERY = "application/timestamp-query"


def _openssl(*args, cwd) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise UserError("local timestamp authority: the `openssl` command is not installed (Debian: apt-get install "
                        "openssl)")
    done = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"local timestamp authority: openssl {args[0]} failed ({last})")


class LocalTSA:
    """A CA and a TSA in ``folder`` (created, mode 0700); ``ca`` is the CA certificate a checker needs."""

    def __init__(self, folder: str | os.PathLike, days: int = 30, name: str = "seal-diffusion local TSA"):
        self.dir = Path(folder).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.config = self.dir / "tsa.cnf"
        self.config.write_text(CONFIG.format(dir=self.dir))
        (self.dir / "serial").write_text("01\n")
        self._lock = threading.Lock()  # openssl ts increments the serial file: one reply at a time
        _openssl("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(days),
                 "-subj", f"/CN={name} CA", "-config", str(self.config), "-extensions", "ca_ext", cwd=self.dir)
        _openssl("req", *EC, "-keyout", "tsa.key", "-out", "tsa.csr", "-subj", f"/CN={name}", cwd=self.dir)
        _openssl("x509", "-req", "-in", "tsa.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
                 "tsa.pem", "-days", str(days), "-extfile", str(self.config), "-extensions", "tsa_ext", cwd=self.dir)
        self.ca = self.dir / "ca.pem"

    def reply(self, tsq: str | os.PathLike, out: str | os.PathLike, signer: str = "tsa.pem") -> Path:
        """Answer the request file ``tsq`` (DER) with a granted reply written to ``out``; returns ``out``."""
        out = Path(out).resolve()
        with self._lock:
            _openssl("ts", "-reply", "-config", str(self.config), "-queryfile", str(Path(tsq).resolve()),
                     "-signer", signer, "-inkey", "tsa.key", "-out", str(out), cwd=self.dir)
        return out

    def reply_bytes(self, request_der: bytes) -> bytes:
        """The reply (DER) to a request given as bytes."""
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            q = Path(tmp) / "q.tsq"
            q.write_bytes(request_der)
            return self.reply(q, Path(tmp) / "r.tsr").read_bytes()

    def serve(self, port: int = 0):
        """Run as an HTTP TSA on 127.0.0.1 (RFC 3161 §3.4: POST of application/timestamp-query) in a daemon thread;
        returns ``(url, server)`` — stop it with ``server.shutdown()`` and free its port with ``server.server_close()``
        (until then a request connects and waits for an answer that never comes)."""
        tsa = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 1 << 16))
                if self.headers.get("Content-Type") != CONTENT_TYPE_QUERY or not body:
                    self.send_response(415)
                    self.end_headers()
                    return
                try:
                    data = tsa.reply_bytes(body)
                except UserError:  # not a request openssl can answer
                    self.send_response(400)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}/tsr", server
