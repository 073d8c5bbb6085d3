"""RFC 3161 trusted timestamps of a key's commitment: a third party's signed statement that the key existed then.

**What is stamped.** The key's commitment (:meth:`seal_diffusion.core.keyfile.SealKey.commitment`) is a SHA-256 in hex.
The request's message imprint is SHA-256 over the 32 bytes that hex encodes (RFC 3161 timestamps a hash of the data;
the data here is the commitment itself). The key never leaves the machine, and anyone can check a reply with nothing
but the published commitment and the TSA's CA certificate, with plain OpenSSL::

    printf %s COMMITMENT | xxd -r -p > commitment.bin
    openssl ts -verify -data commitment.bin -in NAME.tsr -CAfile tsa-ca.pem

**Files.** ``NAME.tsq`` (the request, DER) and ``NAME.tsr`` (the TSA's reply, DER) beside ``NAME.sealkey``. Both are
public: they hold only the hash of the commitment, the TSA's signature and its certificates.

**Checking a reply** (:func:`check_reply`): it must be a granted reply; its imprint must be this commitment's; its CMS
signature must verify; the signer's certificate must chain to a certificate of the given CA file, carry the critical
extended key usage *timeStamping*, and be valid at the reply's genTime; genTime is reported in UTC. Any failure is one
plain-sentence :class:`StampError` (a :class:`~seal_diffusion.errors.UserError`) whose ``kind`` says which: ``unreadable``,
``refused``, ``another commitment`` (a reply made for another key, e.g. replayed), ``tampered`` (the signature does not
match the contents), ``untrusted`` (signed by an authority that does not chain to the CA file), ``invalid time`` (the
signer's certificate was not valid at the stated time: expired, or the time was altered) or ``not a TSA`` (no
timeStamping usage). A dispute turns each of these into "this claim has no date" (:mod:`seal_diffusion.ownership.dispute`).
The key file is only read (to compute its commitment).

**A reply is never replaced.** The first ``.tsr`` is the evidence that wins a dispute, and a later stamp has a later
date. ``timestamp --tsa`` with ``NAME.tsr`` already there keeps it and writes the new reply as ``NAME-2.tsr`` (the next
free number), and says so. ``force=True`` (CLI ``--force``, where the command offers it) replaces ``NAME.tsr`` only if
it is not a granted reply for this key (a damaged file, another key's reply): a reply for this key is never replaced.

**Library.** `rfc3161-client` (Trail of Bits; the TSP implementation sigstore uses; Rust ASN.1 parsing on top of
`cryptography`). Compared with the two suggested options:

* `rfc3161ng` (pyasn1): last release 2020; its ``check_timestamp`` verifies the signature against one given
  certificate but builds no chain to a CA and does not check the EKU or the validity period — we would have to add
  those ourselves;
* `asn1crypto` + `cryptography`: well-made parsing (asn1crypto's last release is 2022), but CMS SignedData
  verification (signed attributes, message-digest attribute, signer identification, chain building at genTime) would
  be our own code in the one place where a mistake silently accepts a forged date;
* `rfc3161-client`: maintained (2026 releases), installs as a binary wheel here, and its ``Verifier`` does all of the
  above in one reviewed place — PKCS#7 signature and chain to the given roots *at genTime*, signer identified by the
  signed issuer/serial, critical timeStamping EKU, imprint, nonce. It builds requests too.

So we pick `rfc3161-client`; no DER is parsed by hand here. One known cost: it parses strict DER, so a reply whose
certificate SET is not in DER order (seen with some TSAs that send a whole chain) is refused as unreadable — the
error names the parse failure; such a reply can still be checked with ``openssl ts -verify``.

The TSA is contacted with the standard library's ``urllib`` (HTTP POST, ``Content-Type:
application/timestamp-query``), only when a URL is given.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path

from cryptography import x509
from rfc3161_client import (HashAlgorithm, PKIStatus, TimestampRequestBuilder, VerificationError, VerifierBuilder,
                            decode_timestamp_response)
from rfc3161_client._rust import parse_timestamp_request

from ..errors import UserError
from ..fileio import write_bytes_atomic
from ..core.keyfile import SealKey

TSQ_SUFFIX = ".tsq"
TSR_SUFFIX = ".tsr"
CONTENT_TYPE_QUERY = "application/timestamp-query"
EXAMPLE_TSA = "https://freetsa.org/tsr"


class StampError(UserError):
    """A timestamp reply that does not check; ``kind`` says why (see the module docstring)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Stamp:
    """A checked timestamp: when (UTC), by whom, of what."""

    gen_time: str  # ISO 8601, UTC ("2026-12-02T08:47:09Z")
    tsa: str  # the signer certificate's subject (RFC 4514)
    serial: int
    commitment: str
    path: str = ""


def request_path(key_path: str | os.PathLike) -> Path:
    return Path(key_path).with_suffix(TSQ_SUFFIX)


def reply_path(key_path: str | os.PathLike) -> Path:
    return Path(key_path).with_suffix(TSR_SUFFIX)


def _commitment_bytes(commitment: str, what: str = "commitment") -> bytes:
    c = commitment.strip().lower()
    if len(c) != 64:
        raise UserError(f"{what} {commitment!r}: expected a SHA-256 commitment (64 hex digits)")
    try:
        return bytes.fromhex(c)
    except ValueError as exc:
        raise UserError(f"{what} {commitment!r}: not hexadecimal") from exc


def make_request(commitment: str) -> bytes:
    """DER of a timestamp request for ``commitment`` (SHA-256 imprint, random nonce, TSA certificate requested)."""
    req = (TimestampRequestBuilder().data(_commitment_bytes(commitment)).hash_algorithm(HashAlgorithm.SHA256)
           .nonce(nonce=True).cert_request(cert_request=True).build())
    return req.as_bytes()


def write_request(key_path: str | os.PathLike, commitment: str | None = None) -> tuple[Path, bytes]:
    """Write ``NAME.tsq`` beside the key (atomically); returns its path and bytes. The key is only read."""
    commitment = commitment or SealKey.load(key_path).commitment()
    der = make_request(commitment)
    path = request_path(key_path)
    write_bytes_atomic(path, der)
    return path, der


def fetch_reply(request_der: bytes, url: str, timeout: float = 30.0) -> bytes:
    """POST a request to a TSA (RFC 3161 over HTTP) and return the reply's bytes; one-line errors."""
    if not url.lower().startswith(("http://", "https://")):
        raise UserError(f"--tsa {url!r}: expected an http:// or https:// URL of a timestamp authority")
    req = urllib.request.Request(url, data=request_der, method="POST",
                                 headers={"Content-Type": CONTENT_TYPE_QUERY, "Accept": "application/timestamp-reply"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        raise UserError(f"--tsa {url}: the timestamp authority answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"--tsa {url}: timestamp authority not reachable ({reason})") from exc


def load_ca(ca_file: str | os.PathLike):
    """Trusted certificates (PEM, one or more; or one DER) from ``ca_file``."""
    path = Path(ca_file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"--ca {path}: cannot read ({exc.strerror or exc})") from exc
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise UserError(f"--ca {path}: not a certificate file (PEM or DER)") from exc
    return certs


def check_reply(reply: bytes | str | os.PathLike, commitment: str, ca_file: str | os.PathLike,
                nonce: int | None = None) -> Stamp:
    """Check a timestamp reply for ``commitment`` against the CA file (see the module docstring); a :class:`Stamp`."""
    label = "reply" if isinstance(reply, bytes) else str(reply)
    if not isinstance(reply, bytes):
        try:
            reply = Path(reply).read_bytes()
        except OSError as exc:
            raise UserError(f"{label}: cannot read the timestamp reply ({exc.strerror or exc})") from exc
    want = _commitment_bytes(commitment)
    try:
        resp = decode_timestamp_response(reply)
        status = resp.status
    except Exception as exc:  # the parser raises ValueError and its own types for corrupt DER
        raise StampError(f"{label}: not a readable RFC 3161 timestamp reply (corrupt or wrong file: {exc})",
                         "unreadable") from exc
    if status not in (PKIStatus.GRANTED, PKIStatus.GRANTED_WITH_MODS):
        raise StampError(f"{label}: the timestamp authority refused the request (status {status})", "refused")
    try:
        tst = resp.tst_info
    except Exception as exc:
        raise StampError(f"{label}: not a readable RFC 3161 timestamp reply (corrupt or wrong file: {exc})",
                         "unreadable") from exc
    imprint = tst.message_imprint
    expected = {"2.16.840.1.101.3.4.2.1": hashlib.sha256, "2.16.840.1.101.3.4.2.2": hashlib.sha384,
                "2.16.840.1.101.3.4.2.3": hashlib.sha512}.get(imprint.hash_algorithm.dotted_string)
    if expected is None:
        raise StampError(f"{label}: unsupported imprint hash algorithm {imprint.hash_algorithm.dotted_string}",
                         "unreadable")
    if imprint.message != expected(want).digest():
        raise StampError(f"{label}: is a timestamp of another hash, not of commitment {commitment.strip()[:16]}… "
                         "(a reply made for another key)", "another commitment")
    builder = VerifierBuilder(roots=load_ca(ca_file))
    if nonce is not None:
        builder = builder.nonce(nonce)
    try:
        builder.build().verify_message(resp, want)
    except VerificationError as exc:
        kind, sentence = _why_untrusted(str(exc), ca_file)
        raise StampError(f"{label}: not trusted with --ca {ca_file}: {sentence}", kind) from None
    signer = _signer(resp)
    gen = tst.gen_time
    gen = gen.replace(tzinfo=timezone.utc) if gen.tzinfo is None else gen.astimezone(timezone.utc)
    return Stamp(gen.strftime("%Y-%m-%dT%H:%M:%S") + (f".{gen.microsecond:06d}".rstrip("0") if gen.microsecond else "")
                 + "Z", signer, int(tst.serial_number), commitment.strip().lower(), label)


# OpenSSL's reasons (inside the verifier's ErrorStack text) → (kind, one plain sentence)
_REASONS = (
    (("digest failure", "signature failure", "content verify error"), "tampered",
     "its signature does not match its contents (the reply was altered after signing)"),
    (("unable to get local issuer", "self-signed certificate", "self signed certificate", "unable to get issuer",
      "unable to verify the first certificate"), "untrusted",
     "it was signed by a timestamp authority that does not chain to this CA file (another authority, or the "
     "wrong CA file)"),
    (("has expired", "not yet valid"), "invalid time",
     "the authority's certificate was not valid at the time the reply states (expired, or the time was altered)"),
    (("eku", "timestamping"), "not a TSA",
     "its signer's certificate is not one for timestamps (no critical timeStamping key usage)"),
    (("nonce mismatch",), "unreadable", "it answers another request (nonce mismatch)"),
)


def _why_untrusted(text: str, ca_file) -> tuple[str, str]:
    """The verifier's message (often a raw OpenSSL ErrorStack) as (kind, one plain sentence)."""
    low = text.lower()
    for needles, kind, sentence in _REASONS:
        if any(n in low for n in needles):
            return kind, sentence
    return "untrusted", f"its signature or certificate chain did not verify against {Path(ca_file).name}"


def _signer(resp) -> str:
    try:
        si = next(iter(resp.signed_data.signer_infos))
        for der in resp.signed_data.certificates:
            cert = x509.load_der_x509_certificate(der)
            if cert.issuer == si.issuer and cert.serial_number == si.serial_number:
                return cert.subject.rfc4514_string()
        return si.issuer.rfc4514_string()
    except (StopIteration, ValueError):
        return "unknown"


def new_reply_path(key_path: str | os.PathLike, commitment: str, force: bool = False) -> tuple[Path, Path | None]:
    """Where a new reply goes, and the earlier reply it must not replace (None if there is none):
    ``NAME.tsr``, else ``NAME-2.tsr``, ``NAME-3.tsr``, … (the first free name). ``force`` replaces ``NAME.tsr`` only
    when it is no granted reply for this commitment (damaged, another key's): a reply for this key is never replaced."""
    first = reply_path(key_path)
    if not first.exists() or (force and not _is_reply_for(first, commitment)):
        return first, None
    n = 2
    while (candidate := first.with_name(f"{first.stem}-{n}{TSR_SUFFIX}")).exists():
        n += 1
    return candidate, first


def _is_reply_for(path: Path, commitment: str) -> bool:
    """Whether ``path`` is a granted reply whose imprint is this commitment's (its signature is not checked here)."""
    try:
        _check_untrusted(path.read_bytes(), commitment, str(path))
    except (UserError, OSError):
        return False
    return True


def stamp_key(key_path: str | os.PathLike, tsa: str | None = None, ca_file: str | os.PathLike | None = None,
              reply: str | os.PathLike | None = None, timeout: float = 30.0, *, force: bool = False) -> dict:
    """The ``timestamp`` command: write ``NAME.tsq``; with ``tsa`` fetch the reply, check it (with ``ca_file``) and
    write it — as ``NAME.tsr``, or beside an earlier reply, never over it (``kept``: the earlier one; ``force``:
    replace a ``NAME.tsr`` that is no reply for this key); with ``reply`` check an existing reply instead. Returns what happened (paths, Stamp)."""
    commitment = SealKey.load(key_path).commitment()
    out: dict = {"commitment": commitment, "request": None, "reply": None, "stamp": None, "kept": None}
    if reply is not None:
        if ca_file is None:
            raise UserError("--reply: pass --ca CAFILE (the timestamp authority's CA certificate) to check it")
        out["stamp"] = check_reply(reply, commitment, ca_file)
        out["reply"] = str(reply)
        return out
    path, der = write_request(key_path, commitment)
    out["request"] = str(path)
    if tsa is None:
        return out

    answer = fetch_reply(der, tsa, timeout)
    nonce = parse_timestamp_request(der).nonce
    if ca_file is not None:
        out["stamp"] = check_reply(answer, commitment, ca_file, nonce=nonce)
    else:
        _check_untrusted(answer, commitment, tsa)
    target, kept = new_reply_path(key_path, commitment, force)
    out["reply"] = str(write_bytes_atomic(target, answer, overwrite=force, what="timestamp reply"))
    out["kept"] = str(kept) if kept else None
    return out


def _check_untrusted(answer: bytes, commitment: str, tsa: str) -> None:
    """Without a CA file: at least a granted reply for this commitment (its signature is not trusted yet)."""
    try:
        resp = decode_timestamp_response(answer)
        status, imprint = resp.status, resp.tst_info.message_imprint.message
    except Exception as exc:
        raise UserError(f"--tsa {tsa}: the answer is not an RFC 3161 timestamp reply ({exc})") from exc
    if status not in (PKIStatus.GRANTED, PKIStatus.GRANTED_WITH_MODS):
        raise UserError(f"--tsa {tsa}: the timestamp authority refused the request (status {status})")
    if imprint != hashlib.sha256(_commitment_bytes(commitment)).digest():
        raise UserError(f"--tsa {tsa}: the reply is for another hash")


def stamp_command(key_path: str | os.PathLike) -> str:
    """The one command that gets ``key_path`` stamped (printed after training)."""
    return f"seal-diffusion timestamp --key {key_path} --tsa {EXAMPLE_TSA} --ca TSA_CA.pem"


def after_training(key_path: str | os.PathLike | None, url: str | None = None) -> dict:
    """Called by the trainer once the key is written: write ``NAME.tsq`` and print the command that gets it stamped;
    with ``url`` (``--timestamp_url``) fetch the reply now. A TSA failure never fails training (the key is saved);
    it prints the one line and the command to retry."""
    if key_path is None:
        return {}
    try:
        done = stamp_key(key_path, url) if url else {"request": str(write_request(key_path)[0]), "reply": None}
    except UserError as exc:
        print(f"timestamp: {exc}; retry: {stamp_command(key_path)}")
        return {"timestamp_request": str(request_path(key_path)) if request_path(key_path).exists() else None}
    if done.get("reply"):
        print(f"timestamp reply (public, keep it with the key): {done['reply']} — check it with: "
              f"seal-diffusion timestamp --key {key_path} --reply {done['reply']} --ca TSA_CA.pem")
    else:
        print(f"timestamp request: {done['request']} — get it stamped before you publish: {stamp_command(key_path)}")
    return {"timestamp_request": done["request"], "timestamp_reply": done.get("reply")}
