"""The weight test's per-module contrast, side by side: the earlier form d_m = ⟨Ĉ_m, D_m⟩/(σ√2·‖Ĉ_m‖) against the
shipped t_m = ⟨Ĉ_m, D_m⟩/(‖D_m‖·τ_m) (:func:`seal_diffusion.detection.verify.contrast_t`), on the same recovered
passports. Both feed the same exact two-sided sign-flip test, so both are valid; this measures which has more power.

Per subject (the bundled cat, ``skimage.data.coffee()``, ``astronaut()``) it trains an owner (tiny, rank 4, 60 steps at
2e-3 at 64 px, the test fixture's settings but its 32 px) and, as innocents, a plain LoRA and a SEAL LoRA under another secret (same subject,
same seed); then

* thieves: SEAL runs on top of the release (``--method seal --init_lora``, the cat images, as a thief with his own
  data): 30 steps at 1e-3 (two seeds; bench_dispute.py's setting), 60 steps at 1e-3, 30 steps at 2e-3;
* file attacks: factor noise 1–4× RMS, magnitude pruning 80/90 % (factors, and ΔW re-factored), the release merged
  with the plain LoRA at 3× and 10× its weight;

and prints −log10 p (two-sided, floor 14.1 on tiny) for each form, each suspect.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_drift_statistic.py [--subjects cat,coffee,astronaut]
        [--thieves 4] [--threads 2]

Not a test; writes into a temporary folder. One subject with four thieves: ~10 min on one busy core.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_machine  # noqa: E402

PROMPTS = {"cat": "a photo of sks cat", "coffee": "a photo of sks cup", "astronaut": "a photo of sks person"}
THIEVES = [(30, 1e-3, 3001), (30, 1e-3, 3002), (60, 1e-3, 3003), (30, 2e-3, 3004)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", default="cat,coffee,astronaut", help="comma-separated of cat, coffee, astronaut")
    p.add_argument("--thieves", type=int, default=4, help="thief runs per owner, of the four settings (default 4)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    subjects = args.subjects.split(",")
    if set(subjects) - set(PROMPTS):
        p.error(f"--subjects {args.subjects}: expected a comma-separated subset of {', '.join(PROMPTS)}")

    import torch

    torch.set_num_threads(args.threads)
    from seal_diffusion.attacks import file_attacks as fa
    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.detection.recovery import passport_std, recover_passports, two_sided_neg_log10_p
    from seal_diffusion.detection.verify import contrast_t, load_suspect, lora_suspect
    from seal_diffusion.formats.lora_file import read_lora
    from seal_diffusion.models.subject import write_photo_subject, write_subject
    from seal_diffusion.training import parse_args, train

    print_machine(machine_info())
    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    cat = write_subject(work / "subject-cat")

    def run(out, data, prompt, *extra):
        r = train(parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(data),
                              "--instance_prompt", prompt, "--output_dir", str(out), "--output_name", "lora",
                              "--cache_latents", *extra]))
        r["network"].remove()
        return r

    def both(key, suspect) -> tuple[float, float]:
        c_hat = recover_passports(key, suspect)
        old, new = [], []
        sigma = passport_std(key)
        for name, c in c_hat.items():
            mk = key.modules[name]
            cc, cp, c = mk.passport.double(), mk.passport_p.double(), c.double()
            d = cc - cp
            old.append(float((c * d).sum() / (sigma * math.sqrt(2) * c.norm())) if c.norm() > 0 else 0.0)
            new.append(float(contrast_t(c[None], d[None], (cc + cp)[None] / 2)[0]))
        return two_sided_neg_log10_p(old), two_sided_neg_log10_p(new)

    rows = []

    def row(subject, suspect_label, key, suspect):
        old, new = both(key, suspect)
        rows.append((subject, suspect_label, old, new))
        print(f"{subject:10s} {suspect_label:34s} earlier {old:5.2f}   t {new:5.2f}", flush=True)

    for subject in subjects:
        data = cat if subject == "cat" else write_photo_subject(work / f"subject-{subject}", subject)
        common = ["--rank", "4", "--max_train_steps", "60", "--learning_rate", "2e-3", "--seed", "0"]
        owner = run(work / subject / "release", data, PROMPTS[subject], *common, "--secret", f"owner {subject}")
        plain = run(work / subject / "plain", data, PROMPTS[subject], *common, "--method", "lora")
        other = run(work / subject / "otherkey", data, PROMPTS[subject], *common, "--secret", f"other {subject}")
        key = SealKey.load(owner["key_path"])
        release = read_lora(owner["lora_path"])
        for steps, lr, seed in THIEVES[:args.thieves]:
            top = run(work / subject / f"thief{seed}", cat, PROMPTS["cat"], "--method", "seal", "--init_lora",
                      owner["lora_path"], "--max_train_steps", str(steps), "--learning_rate", str(lr), "--seed", str(seed))
            row(subject, f"thief SEAL on top, {steps} steps at {lr:g}", key, load_suspect(top["lora_path"], key, None))
        attacked = {f"noise {s:g}× RMS": fa.noise(release, s, seed=1) for s in (1.0, 2.0, 3.0, 4.0)}
        attacked.update({f"prune {r:.0%}": fa.prune(release, r) for r in (0.8, 0.9)})
        attacked["prune ΔW 90 %"] = fa.prune(release, 0.9, on="delta")
        attacked.update({f"merged with the plain LoRA ×{w:g}": fa.merge_lora(release, read_lora(plain["lora_path"]),
                                                                            weight=w) for w in (3.0, 10.0)})
        for label, lora in attacked.items():
            row(subject, label, key, lora_suspect(lora, key, label))
        for label, r in (("innocent: plain LoRA", plain), ("innocent: SEAL, another key", other)):
            row(subject, label, key, load_suspect(r["lora_path"], key, None))

    print("\n| subject | suspect | earlier d_m | t_m (shipped) |\n|---|---|---|---|")
    for subject, label, old, new in rows:
        print(f"| {subject} | {label} | {old:.2f} | {new:.2f} |")
    thieves = [(o, n) for _, label, o, n in rows if label.startswith("thief")]
    if thieves:
        print(f"\nthieves: earlier form {min(o for o, _ in thieves):.2f}–{max(o for o, _ in thieves):.2f} "
              f"({sum(o < 3.3 for o, _ in thieves)} of {len(thieves)} below 3.3); t {min(n for _, n in thieves):.2f}–"
              f"{max(n for _, n in thieves):.2f} ({sum(n < 3.3 for _, n in thieves)} below 3.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
