"""Who owns a suspect LoRA? One report over several ownership claims, and a decision rule a third party can follow.

Each claim is a private key, optionally with a trusted timestamp of its commitment (``.tsr``), the commitment the
claimant published (``--commitment``) and the LoRA file the claimant published (``--file``). Per claim:

* **passports** — C and C_p are an acceptable pair (not equal, not identity-like, not correlated);
* **R1 reproduction** — s·B·C·A reproduces the suspect's ΔW in every module (relative error ≤ 1e-3);
* **R2 genuine pair** — C_p is a second adapter that differs substantially from C in the directions the LoRA uses,
  spread over them, and works about as well on the subject (:mod:`seal_diffusion.genuine`; needs ``--data``). It
  rejects the cheap forgeries only: an adaptive forger who fits C̃_p starting next to his C̃ passes it
  (docs/dispute.md), so between valid claims only the timestamps decide;
* **commitment** — the key hashes to the value the claimant published (when given; the key's own hash otherwise);
* **timestamp** — an RFC 3161 reply for that commitment, trusted by ``--ca`` (:mod:`seal_diffusion.timestamp`);
  it dates the claim, it does not make it valid;
* **verify** (information) — the key against the suspect and against every *other* claimant's published file: in a
  dispute both directions often detect (a thief who trains his own SEAL run on top of a stolen LoRA is detected by
  the owner's key *and* detects the owner's file with his), which is why verify alone cannot order claims.

**Decision.** A claim is *valid* when passports, R1, R2 and (if given) the commitment pass. Then:

* no valid claim → cannot decide;
* exactly one valid claim → it wins (with or without a timestamp);
* several valid claims → the one with the strictly earliest trusted timestamp wins, provided every other valid
  claim is dated too; if any valid claim is undated, or the two earliest times are equal, it cannot decide (a
  timestamp proves that a key existed by then, not that an undated one did not exist earlier).

Exit codes (CLI): 0 a winner, 1 cannot decide, 2 bad input (unreadable key or file, a timestamp that does not check:
another hash, an untrusted or expired certificate, a corrupt reply).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .base_model import load_pipeline
from .errors import UserError
from .genuine import check_genuine_pair
from .keyfile import SealKey
from .passport import pair_problem
from .timestamp import check_reply
from .verify import load_suspect, verify

R1_TOL = 1e-3


@dataclass
class ClaimInput:
    key: str
    timestamp: str | None = None
    commitment: str | None = None
    file: str | None = None


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class ClaimResult:
    key: str
    valid: bool
    checks: list[Check]
    timestamp: str | None  # UTC ISO of a trusted timestamp, else None
    commitment: str
    measurements: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["checks"] = [asdict(c) for c in self.checks]
        return d


@dataclass
class DisputeReport:
    suspect: str
    winner: str | None
    reason: str
    claims: list[ClaimResult]

    def to_json(self) -> dict:
        return {"suspect": self.suspect, "winner": self.winner, "reason": self.reason,
                "claims": [c.to_json() for c in self.claims]}

    @property
    def exit_code(self) -> int:
        return 0 if self.winner else 1

    def summary(self) -> str:
        head = (f"WINNER: {self.winner}" if self.winner else "CANNOT DECIDE") + f" — {self.reason}"
        lines = [head]
        for c in self.claims:
            lines.append(f"claim {c.key}: {'VALID' if c.valid else 'not valid'}"
                         + (f", timestamp {c.timestamp}" if c.timestamp else ", no trusted timestamp"))
            lines += [f"  [{'ok' if k.passed else 'FAIL' if k.name in VALIDITY else '--'}] {k.name}: {k.detail}"
                      for k in c.checks]
        return "\n".join(lines)

    def markdown(self) -> str:
        out = ["# Ownership dispute report", "",
               f"**Suspect:** `{self.suspect}`  ", "",
               f"**Decision:** {'the claim of `' + self.winner + '` wins' if self.winner else 'cannot decide'} — "
               f"{self.reason}", ""]
        out += ["| claim | valid | trusted timestamp (UTC) | commitment |", "|---|---|---|---|"]
        out += [f"| `{c.key}` | {'yes' if c.valid else 'no'} | {c.timestamp or '—'} | `{c.commitment[:16]}…` |"
                for c in self.claims]
        for c in self.claims:
            out += ["", f"## Claim `{c.key}`", "", "| check | result | detail |", "|---|---|---|"]
            for k in c.checks:
                res = ("pass" if k.passed else "FAIL") if k.name in VALIDITY else ("yes" if k.passed else "no")
                out.append(f"| {k.name} | {res} | {k.detail.replace('|', '/')} |")
        out += ["", "## What the checks mean", "",
                "* **R1 reproduction**: the claimant's key, multiplied out, gives exactly the weights of the suspect "
                "file. Anyone can factor a published file, so this alone proves nothing.",
                "* **R2 genuine pair**: the key's second passport is a second, different adapter that works about as "
                "well as the first — what training with two passports produces and what the cheap forgeries "
                "(padding, null-space perturbation, weak-direction flip, a second passport fitted from scratch) do "
                "not. It does not stop a forger who fits the second passport starting next to his own first one: "
                "that forger passed it in our tests, so only the timestamps separate him from the owner.",
                "* **commitment / timestamp**: the key's SHA-256 and an RFC 3161 timestamp by a third party: proof "
                "that this exact key existed at that time. The earliest valid, dated claim wins.",
                "* **verify**: does the key detect the file? Shown for information: a thief's key can detect the "
                "owner's file too, so detection does not say who came first.",
                "", "No check can prove who *created* a LoRA; this report shows which key existed first and "
                "which keys are not one of the cheap forgeries (docs/dispute.md)."]
        return "\n".join(out) + "\n"


VALIDITY = ("passports", "R1 reproduction", "R2 genuine pair", "commitment")


def check_one(claim: ClaimInput, suspect, *, others: list[ClaimInput], base, data, prompt, ca, config=None,
              pipe=None) -> ClaimResult:
    """All checks of one claim (see the module docstring)."""
    key = SealKey.load(claim.key)
    commitment = key.commitment()
    # the timestamp first: a reply that does not check is bad input (exit 2), found before the slow checks
    stamp_time = None
    if claim.timestamp is not None:
        if ca is None:
            raise UserError(f"--timestamp {claim.timestamp}: pass --ca CAFILE (the timestamp authority's CA "
                            "certificate) to check it")
        stamp = check_reply(claim.timestamp, commitment, ca)
        stamp_time = stamp.gen_time
        stamp_check = Check("timestamp", True, f"{stamp.gen_time} (UTC) by {stamp.tsa}, serial {stamp.serial}")
    else:
        stamp_check = Check("timestamp", False, "none given: this claim cannot be dated")
    checks: list[Check] = []
    problems = [(n, p) for n, mk in key.modules.items() if (p := pair_problem(mk.passport, mk.passport_p))]
    checks.append(Check("passports", not problems,
                        f"{len(problems)} module(s) with a bad pair, e.g. {problems[0][0]}: {problems[0][1]}"
                        if problems else f"{len(key.modules)} acceptable (C, C_p) pairs"))
    report = verify(key, load_suspect(suspect, key, base, config=config))
    err = report.reconstruction_error if report.reconstruction_error is not None else float("inf")
    checks.append(Check("R1 reproduction", err <= R1_TOL and report.n_modules_missing == 0,
                        f"relative error {err:.2e} (max {R1_TOL:g}); {report.n_modules_missing} modules missing"))
    verdict = check_genuine_pair(key, pipe if pipe is not None else base, data, prompt, config=config)
    checks.append(Check("R2 genuine pair", verdict.passed, verdict.detail))
    if claim.commitment is not None:
        ok = commitment == claim.commitment.strip().lower()
        checks.append(Check("commitment", ok, f"key hashes to {commitment}: "
                            + ("matches the published value" if ok else f"NOT the published {claim.commitment}")))
    else:
        checks.append(Check("commitment", True, f"key hashes to {commitment} (no published value given)"))
    checks.append(stamp_check)
    checks.append(Check("verify suspect", report.detected,
                        f"−log10 p {report.neg_log10_p:.1f} ({'detected' if report.detected else 'not detected'})"))
    for other in others:
        if other.file and other is not claim:
            r = verify(key, load_suspect(other.file, key, base, config=config))
            checks.append(Check(f"verify {Path(other.file).name}", r.detected,
                                f"this key on the file published by {other.key}: −log10 p {r.neg_log10_p:.1f} "
                                f"({'detected' if r.detected else 'not detected'})"))
    valid = all(c.passed for c in checks if c.name in VALIDITY)
    meas = dict(verdict.measurements, reconstruction_error=err, neg_log10_p=report.neg_log10_p)
    return ClaimResult(str(claim.key), valid, checks, stamp_time, commitment, meas)


def decide(claims: list[ClaimResult]) -> tuple[str | None, str]:
    """The decision rule of the module docstring: (winner key or None, the reason in one sentence)."""
    valid = [c for c in claims if c.valid]
    if not valid:
        return None, "no claim is valid"
    if len(valid) == 1:
        return valid[0].key, "it is the only valid claim"
    undated = [c.key for c in valid if c.timestamp is None]
    if len(undated) == len(valid):
        return None, f"{len(valid)} valid claims and none has a trusted timestamp"
    if undated:
        return None, (f"{len(valid)} valid claims; {', '.join(undated)} has no trusted timestamp, so nothing "
                      "shows which key existed first")
    ordered = sorted(valid, key=lambda c: c.timestamp)
    if ordered[0].timestamp == ordered[1].timestamp:
        return None, f"the two earliest valid claims have the same timestamp ({ordered[0].timestamp})"
    return ordered[0].key, (f"its trusted timestamp {ordered[0].timestamp} is earlier than "
                            f"{ordered[1].timestamp} ({ordered[1].key})")


def dispute(suspect: str | os.PathLike, claims: list[ClaimInput], *, base: str | None = None, data=None,
            prompt: str = "a photo of sks cat", ca=None, config=None, pipe=None) -> DisputeReport:
    """Check every claim against ``suspect`` and decide. ``pipe``: an already loaded base pipeline (tests, the app)."""
    if not claims:
        raise UserError("dispute: give at least one --claim KEY")
    if not Path(suspect).exists():
        raise UserError(f"{suspect}: suspect not found")
    for c in claims:
        for what, p in (("--claim", c.key), ("--timestamp", c.timestamp), ("--file", c.file)):
            if p is not None and not Path(p).exists():
                raise UserError(f"{what} {p}: not found")
    for c in claims:  # every timestamp before any slow check: one that does not check is bad input (exit 2)
        if c.timestamp is not None:
            if ca is None:
                raise UserError(f"--timestamp {c.timestamp}: pass --ca CAFILE (the timestamp authority's CA "
                                "certificate) to check it")
            check_reply(c.timestamp, SealKey.load(c.key).commitment(), ca)
    if data is not None and not Path(data).is_dir():
        raise UserError(f"--data {data}: not a folder of subject images")
    if pipe is None and data is not None:
        pipe = load_pipeline(base or SealKey.load(claims[0].key).base_model, config=config)
    results = [check_one(c, suspect, others=claims, base=base, data=data, prompt=prompt, ca=ca, config=config,
                         pipe=pipe) for c in claims]
    winner, reason = decide(results)
    return DisputeReport(str(suspect), winner, reason, results)
