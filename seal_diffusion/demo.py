"""``seal-diffusion demo``: the whole story on the embedded default model, in about a minute on 2 CPU cores.

1. train a SEAL LoRA on the bundled subject (the cat) — key first, then the public files (kohya + diffusers) — and
   timestamp the key's commitment at a local RFC 3161 timestamp authority (:mod:`seal_diffusion.ownership.local_tsa`);
2. train an *innocent* plain LoRA on the same subject from the same base;
3. verify both exported files (detected), the innocent LoRA (not detected), and attacked copies (90 % pruning, int8,
   re-factorisation…: detected);
4. distil the release into a fresh LoRA trained on its outputs (:mod:`seal_diffusion.attacks.distill`): the weight test has
   little left to find, the function-level test (:mod:`seal_diffusion.detection.functional`) finds it; the innocent LoRA stays
   clean in both;
5. a forger factors the published file into a key of his own and timestamps it after the release; the dispute
   (:mod:`seal_diffusion.ownership.dispute`) checks both claims and the owner wins;
6. measure entanglement (held-out denoising loss with C, C_p, no passport, base) and compare images with and without
   passports (SSIM/PSNR, grid, spectra);
7. print a summary table and write ``DIR/summary.md`` with the pictures (and ``DIR/dispute/dispute.md``).

Every step calls the same library functions as the CLI commands and the app.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .attacks import file_attacks as attacks
from .reports.compare import compare
from .defaults import DEMO_STEPS  # the value --help shows
from .errors import UserError
from .evaluation.heldout import heldout_batch, heldout_denoising_loss
from .fileio import write_text_atomic
from .core.keyfile import SealKey
from .formats.lora_file import read_lora
from .reports.plots import plot_spectra
from .models.subject import write_subject
from .detection.verify import Suspect, verify, verify_path

DEMO_RANK = 4
DEMO_LR = {"seal": 3e-3, "lora": 3e-3}  # the tiny random model needs a bolder step than SD 1.5's 1e-5 / 5e-5
DEMO_PROMPTS = ["a photo of sks cat", "a sks cat wearing a santa hat"]
DEMO_SEEDS = (0,)  # one image per prompt and variant: the compare step is the demo's second-largest cost
HELDOUT_TIMESTEPS = 4  # timesteps of the held-out loss (fixed noise): 4 spread over the schedule separate C/C_p from ∅
PRUNE_RATIO = 0.9
DISTILL_STEPS = 600  # the distilled copy, Adam on 16×16 latents. Each demo run draws a fresh key, and some owners'
# copies are weak: with 150 steps one scored 2.6 on 4 probes (4.5 on 12) and failed the demo's check. With 300, 12
# fresh demo owners 4.0 (4.4 with another distillation seed), 6.2–11.4 (combined −log10 p, the shipped 12 probes,
# threshold 3.3); with 600, eleven of them: the weak one 5.5 (6.6), the others 5.5–11.7, mean 8.9 against 8.0 at 300
# over the same eleven (2026-12-04)
DISTILL_LATENT = 16
FORGER_MODE = "flip"  # seal_diffusion.ownership.forgery: the weak-direction flip forger (docs/dispute.md)
PAIR_LABELS = {  # the summary's words for compare's pairs (compare.md keeps the paper's notation)
    ("exported", "C"): "the shared file vs the trained LoRA with passport C: must be identical",
    ("identity", "base"): "the LoRA without a passport vs the base model: close, the passport does the work",
    ("C", "C_p"): "passport C vs the kept passport C_p: how alike the two make the pictures",
    ("C", "base"): "passport C vs the base model: what the LoRA changes",
    ("C_p", "base"): "passport C_p vs the base model",
}


def _train(out: Path, subject: Path, method: str, seed: int, steps: int, rank: int):
    from .training import parse_args, train  # lazy: training imports accelerate and diffusers (~5 s)

    argv = ["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(subject),
            "--instance_prompt", "a photo of sks cat", "--output_dir", str(out), "--output_name", "cat",
            "--method", method, "--rank", str(rank), "--max_train_steps", str(steps),
            "--learning_rate", str(DEMO_LR[method]), "--seed", str(seed), "--train_batch_size", "1",
            "--cache_latents", "--center_crop"]
    if method == "seal":
        argv.append("--force")  # the demo's own output folder: re-running replaces its key
    return train(parse_args(argv))  # the trainer's own tqdm bar shows step, loss and time left


def _stamp(tsa, key_path: Path, after: str | None = None):
    """Timestamp ``key_path``'s commitment at the local TSA: ``NAME.tsq`` and ``NAME.tsr`` beside the key; the checked
    :class:`~seal_diffusion.ownership.timestamp.Stamp`. ``after``: a genTime this stamp must be later than (1 s resolution)."""
    from .ownership.timestamp import check_reply, reply_path, write_request

    for _ in range(3):
        tsq, _ = write_request(key_path)
        tsr = tsa.reply(tsq, reply_path(key_path))
        stamp = check_reply(tsr, SealKey.load(key_path).commitment(), tsa.ca)
        if after is None or stamp.gen_time > after:
            return stamp
        time.sleep(1.05)
    raise UserError(f"demo: the local TSA's clock did not move past {after}")


def _distill_and_test(out: Path, key_path: str, release: str, innocent: str, pipe, say) -> tuple[list[dict], object]:
    """Step 4: a distilled copy of the release; the weight test and the function-level test on it and on the
    innocent LoRA. Rows for the summary (``expected`` None: shown for information)."""
    from .attacks.distill import distill_lora
    from .detection.functional import verify_both

    res = distill_lora(release, out / "distilled" / "cat_distilled.safetensors", base="tiny", rank=DEMO_RANK,
                       steps=DISTILL_STEPS, batch=2, latent_size=DISTILL_LATENT, fidelity_inputs=8, overwrite=True)
    say(f"      distilled copy: {res.steps} steps, keeps {res.fidelity:.0%} of the release's effect on the model")
    rows = []
    for label, path, expect in (("distilled copy (re-trained on the release's outputs)", res.path, True),
                                ("innocent plain LoRA, same subject", innocent, False)):
        # the shipped defaults (12 probes at 16×16): with 4 probes a weak demo owner's copy once scored 2.6 (12: 4.5)
        both = verify_both(key_path, path, "tiny", pipe=pipe)
        rows.append(dict(case=f"{label}: weight test", detected=both.weight.detected,
                         neg_log10_p=both.weight.neg_log10_p, expected=None if expect else False,
                         ok=expect or not both.weight.detected))
        rows.append(dict(case=f"{label}: both tests (`verify --functional`)", detected=both.detected,
                         neg_log10_p=both.neg_log10_p, expected=expect, ok=both.detected == expect))
    return rows, res


def _dispute(out: Path, tsa, owner_stamp, seal: dict, subject: Path, pipe) -> dict:
    """Step 5: the forger's key from the published file, stamped after the release; the dispute between the two."""
    from .ownership.dispute import ClaimInput, dispute
    from .ownership.forgery import forge, public_modules

    forged = forge(public_modules(seal["diffusers_path"]), FORGER_MODE, seed=3)
    forger_key = forged.save(out / "forger" / "forger.sealkey", force=True)
    forger_stamp = _stamp(tsa, Path(forger_key), after=owner_stamp.gen_time)
    owner_key = Path(seal["key_path"])
    report = dispute(seal["lora_path"], [ClaimInput(str(forger_key), str(forger_stamp.path)),
                                         ClaimInput(str(owner_key), str(owner_stamp.path))],
                     base="tiny", data=subject, prompt="a photo of sks cat", ca=str(tsa.ca), pipe=pipe)
    md = write_text_atomic(out / "dispute" / "dispute.md", report.markdown())
    claims = {Path(c.key).name: c for c in report.claims}
    return dict(winner=Path(report.winner).name if report.winner else None, reason=report.reason,
                owner_wins=report.winner == str(owner_key), report=str(md), owner_time=owner_stamp.gen_time,
                forger_time=forger_stamp.gen_time, ca=str(tsa.ca),
                valid={name: c.valid for name, c in claims.items()},
                failed={name: [k.name for k in c.checks if not k.passed] for name, c in claims.items()})


def run_demo(out_dir: str | os.PathLike = "demo-out", *, steps: int = DEMO_STEPS, rank: int = DEMO_RANK,
             compare_steps: int = 10, compare_seeds: tuple[int, ...] = DEMO_SEEDS,
             heldout_timesteps: int = HELDOUT_TIMESTEPS, progress=print) -> dict:
    """Run the demo into ``out_dir``; returns the numbers of the summary."""
    from .ownership.local_tsa import LocalTSA

    say = progress or (lambda *_: None)
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subject = write_subject(out / "subject")
    old_key = out / "seal" / "cat.sealkey"
    if old_key.exists():
        say(f"note: {old_key} from an earlier demo run is replaced by this run's key (demo keys are throwaway; "
            "your own trainings never replace a key without --force)")

    say(f"[1/7] training a SEAL LoRA on the bundled subject ({steps} steps, rank {rank}), then timestamping its key")
    seal = _train(out / "seal", subject, "seal", 0, steps, rank)
    key = SealKey.load(seal["key_path"])
    tsa = LocalTSA(out / "local-tsa")
    owner_stamp = _stamp(tsa, Path(seal["key_path"]))
    say(f"      key timestamped by the local TSA at {owner_stamp.gen_time} (UTC): {Path(owner_stamp.path).name}")

    say("[2/7] training an innocent plain LoRA on the same subject (same base, other seed)")
    innocent = _train(out / "innocent", subject, "lora", 1, steps, rank)

    say("[3/7] verifying the exports, the innocent LoRA, and attacked copies")
    rows = []

    def check(label, report, expected):
        rows.append(dict(case=label, detected=report.detected, neg_log10_p=report.neg_log10_p, expected=expected,
                         ok=report.detected == expected))

    check("exported LoRA, kohya layout", verify_path(key, seal["lora_path"]), True)
    check("exported LoRA, diffusers layout", verify_path(key, seal["diffusers_path"]), True)
    check("innocent plain LoRA, same subject", verify_path(key, innocent["lora_path"]), False)
    release = read_lora(seal["lora_path"])
    for label, attacked in [
        (f"pruned {PRUNE_RATIO:.0%} (smallest weights zeroed)", attacks.prune(release, PRUNE_RATIO)),
        ("quantized to int8", attacks.quantize(release, "int8")),
        ("mixed (factors times a random matrix and its inverse), padded to rank +4",
         attacks.pad_rank(attacks.mix(release, seed=1), 4)),
        ("re-factored by SVD, truncated to rank 2", attacks.refactor_svd(release, rank=2)),
        ("merged 1:1 with the innocent LoRA", attacks.merge_lora(release, read_lora(innocent["lora_path"]))),
    ]:
        path = attacked.save(out / "attacked" / (label.split()[0].strip(",") + ".safetensors"))
        check(label, verify(key, Suspect(str(path), attacked.layout, factors=attacked.by_module(key.modules))), True)

    say("[4/7] measuring entanglement: held-out denoising loss with each passport (fixed noise and timesteps)")
    pipe = seal["pipeline"]
    net = seal["network"]
    latents, ehs = heldout_batch(pipe, subject, "a photo of sks cat")
    losses = {m: heldout_denoising_loss(pipe.unet, net, latents, ehs, m, n_timesteps=heldout_timesteps)
              for m in ("C", "C_p", "identity", "off")}
    net.remove()

    t_distill = time.time()
    say(f"[5/7] distilling the release into a fresh LoRA ({DISTILL_STEPS} steps on its outputs), then the weight test "
        "and the function-level test")
    distill_rows, distilled = _distill_and_test(out, seal["key_path"], seal["lora_path"], innocent["lora_path"], pipe,
                                                say)
    rows += distill_rows

    t_dispute = time.time()
    say("[6/7] a forger claims the release with a key factored from the published file, timestamped after it; "
        "the dispute")
    disp = _dispute(out, tsa, owner_stamp, seal, subject, pipe)
    rows.append(dict(case="dispute: owner (timestamped before release) vs forger (timestamped after)",
                     detected=disp["owner_wins"], neg_log10_p=float("nan"), expected=True, ok=disp["owner_wins"],
                     kind="dispute"))

    t_compare = time.time()
    say("[7/7] comparing images with and without passports")
    cmp = compare(key, pipe, DEMO_PROMPTS, list(compare_seeds), out / "compare", steps=compare_steps,
                  show_progress=False, base_label="tiny")
    spectra = plot_spectra({"plain LoRA (innocent)": read_lora(innocent["lora_path"]).entries,
                            "SEAL release": release.entries}, out / "spectra.png")
    result = dict(rows=rows, losses=losses, pairs=cmp["pairs"], seconds=time.time() - t0,
                  seal_steps_per_s=seal["steps_per_second"], lora_steps_per_s=innocent["steps_per_second"],
                  commitment=seal["commitment"], key_path=seal["key_path"], grid=cmp["grid"], spectra=str(spectra),
                  all_ok=all(r["ok"] for r in rows), n_modules=len(key.modules), dispute=disp,
                  distill_fidelity=distilled.fidelity, timestamp=owner_stamp.gen_time,
                  timestamp_reply=str(owner_stamp.path),
                  phase_seconds=dict(distill_and_function_test=t_dispute - t_distill, dispute=t_compare - t_dispute))
    md = summary_markdown(result, out)
    write_text_atomic(out / "summary.md", md)
    say("")
    say(md)
    if not result["all_ok"]:
        raise UserError(f"demo: some verdicts were not as expected; see {out / 'summary.md'}")
    return result


def entanglement_verdict(losses: dict) -> tuple[bool, str]:
    """Entangled when the LoRA helps with either passport (C and C_p both clearly below ∅ and the base model, and
    close to each other) — the weights only work through a passport."""
    gap = min(losses["identity"], losses["off"]) - max(losses["C"], losses["C_p"])
    ok = gap > 0 and abs(losses["C"] - losses["C_p"]) < gap
    if ok:
        return True, ("**Verdict: entangled.** With either passport the LoRA lowers the loss by about the same amount; "
                      "without a passport it is no better than the base model, so removing the passport removes "
                      "what the LoRA learned.")
    return False, ("**Verdict: not clearly entangled** in this short run: the losses with the two passports are not "
                   "both clearly below the loss without one (train longer: `--steps`).")


def summary_markdown(result: dict, out: Path) -> str:
    def rel(p):
        return os.path.relpath(p, out)

    rows = result["rows"]
    bad = [r for r in rows if not r["ok"]]
    n_modules = result.get("n_modules", 48)
    ceiling = (n_modules - 1) * math.log10(2)  # two-sided: p ≥ 2 · 2^−M
    headline = (f"**All {len(rows)} checks came out as expected.**" if not bad else
                f"**{len(bad)} of {len(rows)} checks did NOT come out as expected** (marked NO below).")
    lines = ["# seal-diffusion demo", "", headline, "",
             "Embedded default model (tiny SD-1.5-shaped, random weights), bundled subject (8 cat images).", "",
             "## Verification", "", "| suspect | verdict | −log10 p | as expected |", "|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "dispute":
            continue
        expected = "(for information)" if r["expected"] is None else "yes" if r["ok"] else "**NO**"
        lines.append(f"| {r['case']} | {'DETECTED' if r['detected'] else 'not detected'} | {r['neg_log10_p']:.1f} | "
                     f"{expected} |")
    l = result["losses"]
    _, verdict = entanglement_verdict(l)
    lines += ["", "Detection threshold: −log10 p ≥ 3.3 (p < 5·10⁻⁴).",
              f"The highest score possible here is {ceiling:.1f}: the test is exact and two-sided, and each of the "
              f"model's {n_modules} LoRA layers is one coin flip, so the smallest possible p-value is 2·2^−{n_modules} "
              f"(−log10 = {ceiling:.1f}). A full SD 1.5 LoRA (128 layers) can reach {127 * math.log10(2):.1f}.", "",
              *_distill_and_dispute_lines(result, rel),
              "## Entanglement (held-out denoising loss on the subject, fixed noise and timesteps; lower is better)",
              "", "C is the secret passport folded into the released file, C_p the second passport the owner keeps.",
              "",
              "| with C | with C_p | no passport | base model (no LoRA) |", "|---|---|---|---|",
              f"| {l['C']:.4f} | {l['C_p']:.4f} | {l['identity']:.4f} | {l['off']:.4f} |", "", verdict, "",
              "## Images with and without passports (SSIM / PSNR, mean over images)", "",
              "The pictures are noise: the default model has random weights (it is a stand-in with the shape of "
              "SD 1.5, built offline). The numbers compare images of the same model with and without passports.", "",
              "| pair | SSIM | PSNR (dB) |", "|---|---|---|"]
    for p in result["pairs"]:
        label = PAIR_LABELS.get((p.get("a"), p.get("b")), p["what"])
        lines.append(f"| {label} | {p['ssim_mean']:.4f} | {p['psnr_mean']:.2f} |")
    lines += ["", f"![grid]({rel(result['grid'])})", "", f"![spectra]({rel(result['spectra'])})", "",
              f"Training speed: SEAL {result['seal_steps_per_s']:.1f} steps/s, plain LoRA "
              f"{result['lora_steps_per_s']:.1f} steps/s. Whole demo: {result['seconds']:.0f} s"
              + ("" if "phase_seconds" not in result else
                 f" (distilled copy and function-level test {result['phase_seconds']['distill_and_function_test']:.0f} s"
                 f", dispute {result['phase_seconds']['dispute']:.0f} s)") + ".", "",
              f"Private key: `{rel(result['key_path'])}` — commitment `{result['commitment']}`."]
    return "\n".join(lines) + "\n"


def _distill_and_dispute_lines(result: dict, rel) -> list[str]:
    d = result.get("dispute")
    if d is None:
        return []
    fid = result.get("distill_fidelity")
    lines = ["## A distilled copy", "",
             "The distilled copy is a fresh plain LoRA trained only to reproduce the release's outputs (`seal-diffusion "
             "attack distill`" + (f"; it keeps {fid:.0%} of the release's effect" if fid is not None else "") + "). "
             "Its weights are new, so the weight test has little to find; the function-level test (`verify "
             "--functional`) asks how the model *behaves* on secret probes, and finds it. The combined score counts "
             "both tests (Bonferroni: 2 × the smaller p).", "",
             "## A dispute against a forged claim, with trusted timestamps", "",
             f"Right after training, the key's commitment was timestamped (RFC 3161) at a local timestamp authority: "
             f"`{rel(result['timestamp_reply'])}`, {d['owner_time']} UTC. A forger then factored the published file "
             f"into a key of his own and had it timestamped too ({d['forger_time']} UTC: he can only do so after the "
             "release). `seal-diffusion dispute` checked both claims against the release:", "",
             "| claim | valid | checks not passed |", "|---|---|---|"]
    for name, valid in d["valid"].items():
        lines.append(f"| {name} | {'yes' if valid else 'no'} | {', '.join(d['failed'][name]) or '—'} |")
    verdict = (f"**The owner wins** ({d['winner']}): {d['reason']}. The owner's timestamp is also the earlier one: "
               "a forger whose key passed every check (docs/dispute.md: the adaptive forger can pass R2) would still "
               "lose on the dates." if d["owner_wins"] else
               f"**NO — the owner did not win** (winner: {d['winner'] or 'none'}): {d['reason']}.")
    lines += ["", verdict, f"Full report: `{rel(d['report'])}`. The local authority (`{rel(d['ca'])}`) shows the "
              "workflow on one computer; real evidence needs a public TSA (docs/dispute.md).", ""]
    return lines

