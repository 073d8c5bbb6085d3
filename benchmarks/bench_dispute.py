"""Does each genuine owner win the dispute against every attack of issue 21? N owners × 8 disputes, full checks.

For each of N tiny SEAL runs (seeds 100…, ranks 4 and 8 × passport schedules alternate and split, as
``bench_genuine.py``) the owner stamps his key first with a local test TSA (``tests/tsa_helpers.py``); then:

* the adaptive forger (``forgery.forge(..., "optimised", start="C", repel=1.0, detect=True)`` on the public file:
  his key also detects the file, so it can pass R1) claims the
  release (a) undated, (b) stamped later, (c) with a tampered reply (genTime moved a day earlier), a reply from an
  untrusted TSA, the owner's own reply replayed;
* (d) a thief re-saves the release in fp16, bf16 and int8, makes the adaptive forger's key for his re-save and stamps
  it later; the dispute is over the re-save (the owner gives his release as ``--file``);
* (e) a thief trains his own SEAL run on top of the stolen release (``--method seal --init_lora``), stamps his key
  later; the dispute is over his file.

Every dispute is :func:`seal_diffusion.ownership.dispute.dispute` with the subject's images (R2 measured). Prints one row per
dispute (winner, each claim's validity) and the count of disputes the owner won. Not a timed test: one owner (training,
4 forger fits, one thief training, 8 disputes) took 33 min on one thread beside a full test run (2026-12-04); split
the owners over processes with --first/--runs.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_dispute.py [--runs 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from _common import machine_info, print_machine  # noqa: E402

PROMPT = "a photo of sks cat"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="genuine owners (default 20)")
    p.add_argument("--first", type=int, default=0,
                   help="number of the first owner (default 0): two processes with --first 0 --runs 10 and "
                        "--first 10 --runs 10 --threads 1 together run owners 0-19 on 2 cores")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--steps", type=int, default=60, help="training steps per owner (default 60, as the test fixture)")
    p.add_argument("--forge-steps", type=int, default=60, help="steps of the adaptive forger's fit (default 60)")
    p.add_argument("--thief-steps", type=int, default=30, help="steps of the thief's SEAL run on top (default 30)")
    p.add_argument("--attacks", default="forger,resaves,thief",
                   help="which attacks, comma-separated (default all): forger = (a)–(c), the adaptive forger's five "
                        "disputes; resaves = (d); thief = (e)")
    p.add_argument("--json", help="write every dispute's outcome here (after each owner)")
    args = p.parse_args(argv)
    attacks = set(args.attacks.split(","))
    if not attacks or attacks - {"forger", "resaves", "thief"}:
        p.error(f"--attacks {args.attacks}: expected a comma-separated subset of forger, resaves, thief")

    import torch

    torch.set_num_threads(args.threads)
    from tsa_helpers import LocalTSA

    from seal_diffusion.attacks.file_attacks import quantize
    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.ownership.dispute import ClaimInput, dispute
    from seal_diffusion.ownership.forgery import forge, public_modules
    from seal_diffusion.formats.lora_file import read_lora
    from seal_diffusion.models.subject import write_subject
    from seal_diffusion.ownership.timestamp import write_request
    from seal_diffusion.training import parse_args, train

    info = machine_info()
    print_machine(info)
    work = Path(tempfile.mkdtemp(prefix="bench-dispute-"))
    data = write_subject(work / "subject")
    pipe = load_pipeline("tiny")
    tsa, rogue = LocalTSA(work / "tsa"), LocalTSA(work / "rogue")
    configs = list(itertools.islice(itertools.cycle(itertools.product((4, 8), ("alternate", "split"))),
                                    args.first, args.first + args.runs))
    rows = []

    def stamp(key_path, authority=None):
        return str((authority or tsa).reply(write_request(key_path)[0], Path(key_path).with_suffix(".tsr")))

    def adaptive(public, seed):
        return forge(public, "optimised", seed=seed, base=pipe, data=data, prompt=PROMPT, steps=args.forge_steps,
                     repel=1.0, start="C", detect=True)

    def tampered(tsr, out):
        raw = bytearray(Path(tsr).read_bytes())
        i = raw.find(b"\x18\x0f")
        day = int(raw[i + 8:i + 10])
        raw[i + 8:i + 10] = f"{day - 1 if day > 1 else 28:02d}".encode()
        out.write_bytes(bytes(raw))
        return str(out)

    def run_dispute(run, attack, suspect, owner, other):
        t = time.time()
        report = dispute(suspect, [owner, other], data=data, prompt=PROMPT, ca=tsa.ca, pipe=pipe)
        claims = {c.key: c for c in report.claims}
        o, a = claims[owner.key], claims[other.key]
        row = dict(run=run, attack=attack, winner="owner" if report.winner == owner.key else
                   ("attacker" if report.winner else None), owner_valid=o.valid, attacker_valid=a.valid,
                   attacker_timestamp_problem=a.timestamp_problem, reason=report.reason, seconds=time.time() - t,
                   owner_neg_log10_p=o.measurements.get("neg_log10_p"))
        rows.append(row)
        print(f"run {run:2d}  {attack:24s} winner {row['winner'] or 'none':8s}  owner valid {o.valid!s:5s} "
              f"(his key on the suspect: −log10 p {row['owner_neg_log10_p']:.1f})  attacker valid {a.valid!s:5s}  "
              f"({report.reason})", flush=True)

    for i, (rank, schedule) in enumerate(configs, start=args.first):
        out = work / f"run{i}"
        result = train(parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(data),
                                   "--instance_prompt", PROMPT, "--output_dir", str(out), "--output_name", "cat",
                                   "--rank", str(rank), "--passport_schedule", schedule, "--max_train_steps",
                                   str(args.steps), "--learning_rate", "2e-3", "--seed", str(100 + i),
                                   "--cache_latents", "--secret", f"bench {i}"]))
        result["network"].remove()
        release, key = result["lora_path"], result["key_path"]
        owner = ClaimInput(key, stamp(key), file=release)
        time.sleep(1.1)  # genTime has 1 s resolution: every other stamp is later than the owner's
        if "forger" in attacks:
            forger = str(adaptive(public_modules(result["diffusers_path"]), 1000 + i).save(out / "forger.sealkey"))
            run_dispute(i, "forger undated", release, owner, ClaimInput(forger))
            bad = {"forger tampered reply": tampered(stamp(forger), out / "tampered.tsr"),
                   "forger untrusted reply": None, "forger replayed reply": owner.timestamp}
            bad["forger untrusted reply"] = str(rogue.reply(write_request(forger)[0], out / "rogue.tsr"))
            for attack, tsr in bad.items():
                run_dispute(i, attack, release, owner, ClaimInput(forger, tsr))
            run_dispute(i, "forger stamped later", release, owner, ClaimInput(forger, stamp(forger)))
        if "resaves" in attacks:
            for dtype in ("fp16", "bf16", "int8"):
                resave = quantize(read_lora(result["diffusers_path"]), dtype).save(out / f"resave-{dtype}")
                thief = str(adaptive(public_modules(resave), 2000 + i).save(out / f"thief-{dtype}.sealkey"))
                run_dispute(i, f"thief {dtype} re-save", str(resave), owner, ClaimInput(thief, stamp(thief), file=str(resave)))
        if "thief" in attacks:
            top = train(parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(data),
                                    "--instance_prompt", PROMPT, "--output_dir", str(out / "thief"), "--output_name",
                                    "stolen", "--method", "seal", "--init_lora", release, "--max_train_steps",
                                    str(args.thief_steps), "--learning_rate", "1e-3", "--seed", str(3000 + i),
                                    "--cache_latents"]))
            top["network"].remove()
            run_dispute(i, "thief SEAL on top", top["lora_path"], owner,
                        ClaimInput(top["key_path"], stamp(top["key_path"]), file=top["lora_path"]))
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))

    won = sum(r["winner"] == "owner" for r in rows)
    print(f"\nthe owner won {won} of {len(rows)} disputes ({len(configs)} owners × {args.attacks})")
    by_attack = {}
    for r in rows:
        by_attack.setdefault(r["attack"], []).append(r)
    print("\n| attack | owner wins | attacker's claim valid (R1 and R2 pass) |\n|---|---|---|")
    for attack, rs in by_attack.items():
        print(f"| {attack} | {sum(r['winner'] == 'owner' for r in rs)}/{len(rs)} | "
              f"{sum(r['attacker_valid'] for r in rs)}/{len(rs)} |")
    return 0 if won == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
