"""The tests' timestamp authority: the library's :class:`seal_diffusion.ownership.local_tsa.LocalTSA` plus what only tests need —
an unrelated CA (``other_ca``) and an expired certificate of the same TSA key (``expired.pem``, sign with
``reply(..., signer="expired.pem")``)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from seal_diffusion.ownership.local_tsa import EC, LocalTSA as _LibraryTSA, _openssl


class LocalTSA(_LibraryTSA):
    def __init__(self, folder: Path):
        super().__init__(folder, name="Test TSA")
        _openssl("req", "-x509", *EC, "-keyout", "other-ca.key", "-out", "other-ca.pem", "-days", "30",
                 "-subj", "/CN=Test other-ca", "-config", str(self.config), "-extensions", "ca_ext", cwd=self.dir)
        self.other_ca = self.dir / "other-ca.pem"
        self._expired_cert()

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
