"""A local certificate authority and RFC 3161 timestamp authority made with the ``openssl`` command (no network).

``LocalTSA(folder)`` writes a CA, a TSA certificate (critical EKU timeStamping) signed by it, an expired TSA
certificate and an unrelated CA; ``reply(tsq, ...)`` answers a request with ``openssl ts -reply``; ``serve()`` runs it
as an HTTP TSA on 127.0.0.1 (the protocol's POST of application/timestamp-query).
"""

from __future__ import annotations

import datetime as dt
import http.server
import subprocess
import threading
from pathlib import Path

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


def _run(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class LocalTSA:
    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "tsa.cnf"
        self.config.write_text(CONFIG.format(dir=self.dir))
        (self.dir / "serial").write_text("01\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        for ca in ("ca", "other-ca"):
            _run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "30",
                 "-subj", f"/CN=Test {ca}", "-config", str(self.config), "-extensions", "ca_ext", cwd=self.dir)
        _run("req", *ec, "-keyout", "tsa.key", "-out", "tsa.csr", "-subj", "/CN=Test TSA", cwd=self.dir)
        _run("x509", "-req", "-in", "tsa.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "tsa.pem", "-days", "30", "-extfile", str(self.config), "-extensions", "tsa_ext", cwd=self.dir)
        self._expired_cert()
        self.ca = self.dir / "ca.pem"
        self.other_ca = self.dir / "other-ca.pem"

    def _expired_cert(self) -> None:
        """The same TSA key, certified by the same CA for a period that ended yesterday (openssl 3.0's x509 command
        cannot backdate, so ``cryptography`` signs this one)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        ca_cert = x509.load_pem_x509_certificate((self.dir / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        tsa = x509.load_pem_x509_certificate((self.dir / "tsa.pem").read_bytes())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(tsa.subject).issuer_name(ca_cert.subject)
                .public_key(tsa.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=10)).not_valid_after(now - dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
                .sign(ca_key, hashes.SHA256()))
        (self.dir / "expired.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def reply(self, tsq: Path, out: Path, signer: str = "tsa.pem") -> Path:
        _run("ts", "-reply", "-config", str(self.config), "-queryfile", str(tsq), "-signer", signer,
             "-inkey", "tsa.key", "-out", str(out), cwd=self.dir)
        return out

    def serve(self):
        """Start an HTTP TSA on 127.0.0.1 (a daemon thread); returns (url, server) — call ``server.shutdown()``."""
        tsa = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Type") != "application/timestamp-query":
                    self.send_response(415)
                    self.end_headers()
                    return
                q, r = tsa.dir / "http.tsq", tsa.dir / "http.tsr"
                q.write_bytes(body)
                data = tsa.reply(q, r).read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}/tsr", server
