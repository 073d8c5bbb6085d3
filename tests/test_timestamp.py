"""RFC 3161 timestamps of a key's commitment, against a local CA and TSA made with the openssl command (no network)."""

import subprocess
from pathlib import Path

import pytest
import torch
from tsa_helpers import LocalTSA

from seal_diffusion.cli import main
from seal_diffusion.errors import UserError
from seal_diffusion.core.keyfile import ModuleKey, SealKey
from seal_diffusion.ownership.timestamp import StampError, check_reply, stamp_key, write_request


@pytest.fixture(scope="module")
def tsa(tmp_path_factory):
    return LocalTSA(tmp_path_factory.mktemp("tsa"))


def _key(folder, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = ModuleKey(torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), torch.randn(4, 4, generator=g),
                   torch.randn(4, 4, generator=g))
    key = SealKey({"m.to_q": mk}, 4, 4.0)
    return key, key.save(folder / f"k{seed}.sealkey")


def _bytes(path):
    return path.read_bytes()


def test_request_reply_roundtrip_and_openssl_agrees(tsa, tmp_path):
    key, path = _key(tmp_path)
    before = _bytes(path)
    tsq, _ = write_request(path)
    assert tsq == path.with_suffix(".tsq")
    tsr = tsa.reply(tsq, path.with_suffix(".tsr"))
    stamp = check_reply(tsr, key.commitment(), tsa.ca)
    assert stamp.gen_time.endswith("Z") and stamp.gen_time[:4].isdigit() and "Test TSA" in stamp.tsa
    # the documented independent check with plain openssl: imprint = SHA-256 of the commitment's 32 bytes
    data = tmp_path / "commitment.bin"
    data.write_bytes(bytes.fromhex(key.commitment()))
    ok = subprocess.run(["openssl", "ts", "-verify", "-data", str(data), "-in", str(tsr), "-CAfile", str(tsa.ca)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "Verification: OK" in ok.stdout
    assert _bytes(path) == before, "the key is never touched"


def test_bad_replies_are_one_clear_line(tsa, tmp_path):
    key, path = _key(tmp_path)
    other, other_path = _key(tmp_path, seed=1)
    tsq, _ = write_request(path)
    good = tsa.reply(tsq, tmp_path / "good.tsr")
    cases = {
        "another hash": (tsa.reply(write_request(other_path)[0], tmp_path / "other.tsr"), tsa.ca),
        "not trusted": (good, tsa.other_ca),
        "expired": (tsa.reply(tsq, tmp_path / "expired.tsr", signer="expired.pem"), tsa.ca),
        "corrupt": (tmp_path / "corrupt.tsr", tsa.ca),
    }
    (tmp_path / "corrupt.tsr").write_bytes(_bytes(good)[: len(_bytes(good)) // 2])
    messages = {}
    for name, (reply, ca) in cases.items():
        with pytest.raises(UserError) as exc:
            check_reply(reply, key.commitment(), ca)
        messages[name] = str(exc.value)
        assert "\n" not in messages[name]
    assert "another hash" in messages["another hash"]
    assert "not trusted" in messages["not trusted"] and "not trusted" in messages["expired"]
    assert "corrupt" in messages["corrupt"]
    # the CLI: exit 2, one line, key untouched
    before = _bytes(path)
    for name, (reply, ca) in cases.items():
        assert main(["timestamp", "--key", str(path), "--reply", str(reply), "--ca", str(ca)]) == 2, name
    assert _bytes(path) == before
    assert main(["timestamp", "--key", str(path), "--reply", str(good), "--ca", str(tsa.ca)]) == 0


def test_http_tsa_end_to_end(tsa, tmp_path, capsys):
    key, path = _key(tmp_path)
    url, server = tsa.serve()
    try:
        done = stamp_key(path, url, tsa.ca)
        assert done["stamp"].commitment == key.commitment()
        assert path.with_suffix(".tsr").is_file() and path.with_suffix(".tsq").is_file()
        check_reply(path.with_suffix(".tsr"), key.commitment(), tsa.ca)
        assert main(["timestamp", "--key", str(path), "--tsa", url, "--ca", str(tsa.ca)]) == 0
        assert "UTC" in capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()
    # an unreachable TSA: one line, exit 2, the request is still written
    path.with_suffix(".tsq").unlink()
    assert main(["timestamp", "--key", str(path), "--tsa", url, "--ca", str(tsa.ca)]) == 2
    assert "not reachable" in capsys.readouterr().err
    assert path.with_suffix(".tsq").is_file()


def test_a_second_stamp_never_replaces_the_first_reply(tsa, tmp_path, capsys):
    """The first reply is the evidence (its date is the earliest): a second ``timestamp --tsa`` keeps it and writes the
    new one as NAME-2.tsr, then NAME-3.tsr, and says so; ``force`` replaces only a NAME.tsr that is no reply for this
    key."""
    key, path = _key(tmp_path)
    url, server = tsa.serve()
    try:
        first = stamp_key(path, url, tsa.ca)
        assert first["reply"] == str(path.with_suffix(".tsr")) and first["kept"] is None
        original = _bytes(path.with_suffix(".tsr"))
        assert main(["timestamp", "--key", str(path), "--tsa", url, "--ca", str(tsa.ca)]) == 0
        out = capsys.readouterr().out
        second = path.with_name(f"{path.stem}-2.tsr")
        assert f"kept the earlier reply {path.with_suffix('.tsr')}" in out and str(second) in out
        assert _bytes(path.with_suffix(".tsr")) == original and second.is_file()
        third = stamp_key(path, url, tsa.ca)
        assert third["reply"] == str(path.with_name(f"{path.stem}-3.tsr"))
        assert third["kept"] == str(path.with_suffix(".tsr")) and _bytes(second) != _bytes(Path(third["reply"]))
        for reply in (path.with_suffix(".tsr"), second, Path(third["reply"])):
            check_reply(reply, key.commitment(), tsa.ca)
        assert _bytes(path.with_suffix(".tsr")) == original
        forced = stamp_key(path, url, tsa.ca, force=True)  # a reply for this key is kept even with force
        assert forced["kept"] == str(path.with_suffix(".tsr")) and forced["reply"].endswith("-4.tsr")
        assert _bytes(path.with_suffix(".tsr")) == original
        path.with_suffix(".tsr").write_bytes(original[:40])  # damaged: force may replace it, nothing else does
        assert stamp_key(path, url, tsa.ca)["reply"].endswith("-5.tsr")
        forced = stamp_key(path, url, tsa.ca, force=True)
        assert forced["reply"] == str(path.with_suffix(".tsr")) and forced["kept"] is None
        check_reply(path.with_suffix(".tsr"), key.commitment(), tsa.ca)
    finally:
        server.shutdown()
        server.server_close()


def test_why_a_reply_does_not_check_is_one_plain_sentence(tsa, tmp_path, capsys):
    """The wrong CA, a tampered reply, an expired TSA certificate, a reply for another key: each a plain sentence
    (never the verifier's raw ``ErrorStack([...])``) and a ``kind`` the dispute reports."""
    key, path = _key(tmp_path)
    other, other_path = _key(tmp_path, seed=1)
    good = tsa.reply(write_request(path)[0], tmp_path / "good.tsr")
    raw = bytearray(_bytes(good))
    policy = raw.find(bytes.fromhex("06042a030401"))  # the policy OID 1.2.3.4.1 inside the signed TSTInfo
    raw[policy + 5] = 2
    (tmp_path / "tampered.tsr").write_bytes(bytes(raw))
    cases = {
        "untrusted": (good, tsa.other_ca, "does not chain to this CA file"),
        "tampered": (tmp_path / "tampered.tsr", tsa.ca, "does not match its contents"),
        "invalid time": (tsa.reply(write_request(path)[0], tmp_path / "exp.tsr", signer="expired.pem"), tsa.ca,
                         "was not valid at the time"),
        "another commitment": (tsa.reply(write_request(other_path)[0], tmp_path / "o.tsr"), tsa.ca, "another key"),
    }
    for kind, (reply, ca, words) in cases.items():
        with pytest.raises(StampError) as exc:
            check_reply(reply, key.commitment(), ca)
        msg = str(exc.value)
        assert exc.value.kind == kind and words in msg, (kind, msg)
        assert "ErrorStack" not in msg and "Error {" not in msg and "\n" not in msg
        assert main(["timestamp", "--key", str(path), "--reply", str(reply), "--ca", str(ca)]) == 2
        err = capsys.readouterr().err
        assert words in err and "ErrorStack" not in err
