"""Who owns a suspect LoRA? One report over several ownership claims, and a decision rule a third party can follow.

Each claim is a private key, optionally with a trusted timestamp of its commitment (``.tsr``), the commitment the
claimant published (``--commitment``) and the LoRA file the claimant published (``--file``: the *published
original*). Per claim:

* **passports** — C and C_p are an acceptable pair (not equal, not identity-like, not correlated);
* **R1 ownership** — the key *detects* the suspect (the weight test of :func:`seal_diffusion.detection.verify.verify`,
  −log10 p ≥ 3.3) *and* reproduces a published original exactly (s·B·C·A equals its ΔW in every module, relative
  error ≤ 1e-3): the suspect itself, or — when the suspect is a transformed copy (an fp16, bf16, int8 or fp8
  re-save, pruned, fine-tuned) — the claimant's ``--file``. The original is tied to the key whose commitment is
  checked below, and the suspect to the original by the detection; so R1 holds for every transformation ``verify``
  detects, and never for a file the key does not detect;
* **R2 genuine pair** — C_p is a second adapter that differs substantially from C in the directions the LoRA uses,
  spread over them, and works about as well on the subject (:mod:`seal_diffusion.ownership.genuine`; needs ``--data``). It
  rejects the cheap forgeries only: an adaptive forger who fits C̃_p starting next to his C̃ passes it
  (docs/dispute.md), so between valid claims only the timestamps decide;
* **commitment** — the key hashes to the value the claimant published (when given; the key's own hash otherwise);
* **timestamp** — an RFC 3161 reply for that commitment, trusted by ``--ca`` (:mod:`seal_diffusion.ownership.timestamp`). It
  dates the claim, it does not make it valid. A reply that does not check (tampered, from a TSA that ``--ca`` does
  not trust, for another commitment — e.g. another claimant's reply replayed —, unreadable) removes this claim's
  date, with the reason in the report; the dispute goes on;
* **verify** (information) — the key against every *other* claimant's published file: keys can detect each other's
  files (a stolen key re-expressed detects the release; a thief's SEAL run on top of a stolen LoRA is detected by the
  owner's key), which is why verify alone cannot order claims.

**Decision.** A claim is *valid* when passports, R1, R2 and (if given) the commitment pass. Then:

* no valid claim → cannot decide;
* exactly one valid claim → it wins (with or without a timestamp);
* several valid claims, some dated → the strictly earliest trusted timestamp wins; a later-dated claim loses, and an
  undated one loses too (it proves no date, so it cannot outrank one that does); equal earliest times → cannot
  decide;
* several valid claims, none dated → cannot decide (nothing separates them).

Exit codes (CLI): 0 a winner, 1 cannot decide, 2 bad input (a missing or unreadable key or file, ``--timestamp``
without ``--ca``). A claimant's bad timestamp is not bad input: it only costs that claim its date.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..models.base_model import load_pipeline
from ..errors import UserError
from .genuine import check_genuine_pair
from ..core.keyfile import SealKey
from ..core.passport import pair_problem
from .timestamp import Stamp, StampError, check_reply, load_ca
from ..detection.verify import DEFAULT_THRESHOLD, load_suspect, verify

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
    timestamp_problem: str | None = None  # why a given timestamp does not count (None: none given, or it checked)
    outcome: str = ""  # the decision for this claim, in one sentence (set by :func:`dispute`)

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
                         + (f", timestamp {c.timestamp}" if c.timestamp else ", no trusted timestamp")
                         + (f" — {c.outcome}" if c.outcome else ""))
            lines += [f"  [{'ok' if k.passed else 'FAIL' if k.name in VALIDITY else '--'}] {k.name}: {k.detail}"
                      for k in c.checks]
        return "\n".join(lines)

    def markdown(self) -> str:
        out = ["# Ownership dispute report", "",
               f"**Suspect:** `{self.suspect}`  ", "",
               f"**Decision:** {'the claim of `' + self.winner + '` wins' if self.winner else 'cannot decide'} — "
               f"{self.reason}", ""]
        out += ["| claim | valid | trusted timestamp (UTC) | commitment | outcome |", "|---|---|---|---|---|"]
        out += [f"| `{c.key}` | {'yes' if c.valid else 'no'} | "
                f"{c.timestamp or ('none: ' + c.timestamp_problem if c.timestamp_problem else '—')} | "
                f"`{c.commitment[:16]}…` | {c.outcome.replace('|', '/')} |" for c in self.claims]
        for c in self.claims:
            out += ["", f"## Claim `{c.key}`", "", "| check | result | detail |", "|---|---|---|"]
            for k in c.checks:
                res = ("pass" if k.passed else "FAIL") if k.name in VALIDITY else ("yes" if k.passed else "no")
                out.append(f"| {k.name} | {res} | {k.detail.replace('|', '/')} |")
        out += ["", "## What the checks mean", "",
                "* **R1 ownership**: the claimant's key detects the suspect (the weight test, −log10 p ≥ 3.3) and, "
                "multiplied out, gives exactly the weights of a file that side published — the suspect itself, or "
                "the original it was made from (a half-precision or 8-bit re-save, a pruned or fine-tuned copy is "
                "detected but no longer reproduced exactly). Anyone can factor a published file, so this alone "
                "proves nothing.",
                "* **R2 genuine pair**: the key's second passport is a second, different adapter that works about as "
                "well as the first — what training with two passports produces and what the cheap forgeries "
                "(padding, null-space perturbation, weak-direction flip, a second passport fitted from scratch) do "
                "not. It does not stop a forger who fits the second passport starting next to his own first one: "
                "that forger passed it in our tests, so only the timestamps separate him from the owner.",
                "* **commitment / timestamp**: the key's SHA-256 and an RFC 3161 timestamp by a third party: proof "
                "that this exact key existed at that time. A timestamp that does not check (tampered, from an "
                "authority not trusted here, made for another key) gives its claim no date.",
                "* **decision**: among the valid claims, the earliest trusted timestamp wins; a claim without one "
                "cannot outrank a dated claim (it proves no date). Two valid claims without timestamps, or with "
                "the same time, cannot be separated: then no winner is named.",
                "* **verify** rows: shown for information — both keys often detect each other's files, so they "
                "cannot order claims; priority comes from the timestamps, and R2 tells "
                "which keys are not one of the cheap forgeries (docs/dispute.md)."]
        return "\n".join(out) + "\n"


VALIDITY = ("passports", "R1 ownership", "R2 genuine pair", "commitment")


def check_stamp(claim: ClaimInput, commitment: str, ca) -> tuple[Stamp | None, Check, str | None]:
    """The claim's timestamp: (the checked Stamp or None, its report line, why it does not count or None).

    A reply that does not check removes the date and says why; it never stops the dispute."""
    if claim.timestamp is None:
        return None, Check("timestamp", False, "none given: this claim cannot be dated"), None
    try:
        stamp = check_reply(claim.timestamp, commitment, ca)
    except StampError as exc:
        why = {"another commitment": "a reply for another commitment (another key's reply, replayed?)",
               "tampered": "tampered: its signature does not match its contents",
               "untrusted": "from a timestamp authority that --ca does not trust",
               "invalid time": "the authority's certificate was not valid at the time the reply states",
               }.get(exc.kind, exc.kind)
        return None, Check("timestamp", False, f"does not count, this claim has no date — {why}: {exc}"), why
    return stamp, Check("timestamp", True, f"{stamp.gen_time} (UTC) by {stamp.tsa}, serial {stamp.serial}"), None


def r1_check(claim: ClaimInput, suspect_report, original_report) -> Check:
    """R1 ownership (the module docstring): the key detects the suspect and reproduces a published original exactly."""
    s = suspect_report
    err = s.reconstruction_error if s.reconstruction_error is not None else float("inf")
    found = f"detects the suspect (−log10 p {s.neg_log10_p:.1f})" if s.detected else \
        f"does NOT detect the suspect (−log10 p {s.neg_log10_p:.1f} < {s.threshold})"
    if not s.detected:
        return Check("R1 ownership", False, f"the key {found}")
    if err <= R1_TOL and s.n_modules_missing == 0:
        return Check("R1 ownership", True, f"the key {found} and reproduces it exactly (relative error {err:.2e}, "
                     f"max {R1_TOL:g}): the suspect is a file this key made")
    copy = f"the key {found}; the suspect is a transformed copy (relative error {err:.2e} > {R1_TOL:g}" + \
        (f", {s.n_modules_missing} modules missing)" if s.n_modules_missing else ")")
    if original_report is None:
        return Check("R1 ownership", False, f"{copy} — give the file this claimant published with --file to show "
                     "that the key made its original")
    o = original_report
    o_err = o.reconstruction_error if o.reconstruction_error is not None else float("inf")
    ok = o_err <= R1_TOL and o.n_modules_missing == 0
    return Check("R1 ownership", ok, f"{copy}; the published original {Path(claim.file).name} is "
                 + (f"reproduced exactly by this key (relative error {o_err:.2e}): a copy of a file this key made"
                    if ok else f"NOT reproduced by this key (relative error {o_err:.2e}, {o.n_modules_missing} "
                    "modules missing): not shown to be this key's file"))


def check_one(claim: ClaimInput, suspect, *, others: list[ClaimInput], base, data, prompt, ca, config=None,
              pipe=None) -> ClaimResult:
    """All checks of one claim (see the module docstring)."""
    key = SealKey.load(claim.key)
    commitment = key.commitment()
    stamp, stamp_check, stamp_problem = check_stamp(claim, commitment, ca)
    checks: list[Check] = []
    problems = [(n, p) for n, mk in key.modules.items() if (p := pair_problem(mk.passport, mk.passport_p))]
    checks.append(Check("passports", not problems,
                        f"{len(problems)} module(s) with a bad pair, e.g. {problems[0][0]}: {problems[0][1]}"
                        if problems else f"{len(key.modules)} acceptable (C, C_p) pairs"))
    report = verify(key, load_suspect(suspect, key, base, config=config), DEFAULT_THRESHOLD)
    original = verify(key, load_suspect(claim.file, key, base, config=config)) if claim.file else None
    checks.append(r1_check(claim, report, original))
    verdict = check_genuine_pair(key, pipe if pipe is not None else base, data, prompt, config=config)
    checks.append(Check("R2 genuine pair", verdict.passed, verdict.detail))
    if claim.commitment is not None:
        ok = commitment == claim.commitment.strip().lower()
        checks.append(Check("commitment", ok, f"key hashes to {commitment}: "
                            + ("matches the published value" if ok else f"NOT the published {claim.commitment}")))
    else:
        checks.append(Check("commitment", True, f"key hashes to {commitment} (no published value given)"))
    checks.append(stamp_check)
    for other in others:
        if other.file and other is not claim:
            r = verify(key, load_suspect(other.file, key, base, config=config))
            checks.append(Check(f"verify {Path(other.file).name}", r.detected,
                                f"this key on the file published by {other.key}: −log10 p {r.neg_log10_p:.1f} "
                                f"({'detected' if r.detected else 'not detected'})"))
    valid = all(c.passed for c in checks if c.name in VALIDITY)
    err = report.reconstruction_error if report.reconstruction_error is not None else float("inf")
    meas = dict(verdict.measurements, reconstruction_error=err, neg_log10_p=report.neg_log10_p)
    if original is not None:
        meas["original_reconstruction_error"] = original.reconstruction_error
    return ClaimResult(str(claim.key), valid, checks, stamp.gen_time if stamp else None, commitment, meas,
                       stamp_problem)


def decide(claims: list[ClaimResult]) -> tuple[str | None, str]:
    """The decision rule of the module docstring: (winner key or None, the reason in one sentence)."""
    valid = [c for c in claims if c.valid]
    if not valid:
        return None, "no claim is valid"
    if len(valid) == 1:
        return valid[0].key, "it is the only valid claim"
    dated = sorted((c for c in valid if c.timestamp is not None), key=lambda c: c.timestamp)
    undated = [c.key for c in valid if c.timestamp is None]
    if not dated:
        return None, (f"{len(valid)} valid claims and none has a trusted timestamp: nothing shows which key "
                      "existed first")
    if len(dated) > 1 and dated[0].timestamp == dated[1].timestamp:
        return None, f"the two earliest valid claims have the same timestamp ({dated[0].timestamp})"
    parts = []
    if len(dated) > 1:
        parts.append(f"its trusted timestamp {dated[0].timestamp} is earlier than {dated[1].timestamp} "
                     f"({dated[1].key})")
    else:
        parts.append(f"it is the only valid claim with a trusted timestamp ({dated[0].timestamp})")
    if undated:
        parts.append(f"{', '.join(undated)} {'has' if len(undated) == 1 else 'have'} no trusted timestamp and "
                     "cannot outrank a dated claim")
    return dated[0].key, "; ".join(parts)


def outcome(claim: ClaimResult, winner: str | None, claims: list[ClaimResult]) -> str:
    """Why this claim won or lost, in one sentence (for the report)."""
    if not claim.valid:
        failed = [k.name for k in claim.checks if k.name in VALIDITY and not k.passed]
        return f"not valid ({', '.join(failed)} failed)"
    if claim.key == winner:
        return "wins"
    if winner is None:
        return "valid, but not separated from the other valid claims"
    win = next(c for c in claims if c.key == winner)
    if claim.timestamp is None:
        why = f" (its timestamp {claim.timestamp_problem})" if claim.timestamp_problem else ""
        return f"loses: no trusted timestamp{why}, so it cannot outrank the claim dated {win.timestamp}"
    return f"loses: its timestamp {claim.timestamp} is later than the winner's {win.timestamp}"


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
        if c.timestamp is not None and ca is None:
            raise UserError(f"--timestamp {c.timestamp}: pass --ca CAFILE (the timestamp authority's CA "
                            "certificate) to check it")
    if data is not None and not Path(data).is_dir():
        raise UserError(f"--data {data}: not a folder of subject images")
    if ca is not None:
        load_ca(ca)  # the arbiter's CA file: unreadable is bad input, found before any slow check
    for c in claims:  # every key before any slow check: an unreadable or tampered key file is bad input (exit 2)
        SealKey.load(c.key)
    if pipe is None and data is not None:
        pipe = load_pipeline(base or SealKey.load(claims[0].key).base_model, config=config)
    results = [check_one(c, suspect, others=claims, base=base, data=data, prompt=prompt, ca=ca, config=config,
                         pipe=pipe) for c in claims]
    winner, reason = decide(results)
    for r in results:
        r.outcome = outcome(r, winner, results)
    return DisputeReport(str(suspect), winner, reason, results)
