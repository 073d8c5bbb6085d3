"""The σ sweep (SEAL paper Table 16, ``seal-diffusion sigma-sweep``): how the passport scale σ sets how close the
passport-less model N(B, A, ∅) stays to the base model.

:func:`sigma_sweep` trains one SEAL LoRA per σ through the trainer's :func:`~seal_diffusion.training.train`, renders
the identity-passport and C images (:func:`~seal_diffusion.evaluation.render.render_variants`) and measures them against the
base model's images (SSIM/PSNR, :mod:`seal_diffusion.evaluation.metrics`); :func:`sigma_table_md` is its Markdown report.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

from ..evaluation import metrics
from ..models.base_model import load_pipeline
from .compare import DEFAULT_GUIDANCE, format_mean_std
from ..defaults import SWEEP_BATCH, SWEEP_LR, SWEEP_SIGMAS, SWEEP_TRAIN_STEPS  # noqa: F401 - the values --help shows
from ..errors import UserError
from ..fileio import json_safe
from ..core.keyfile import SealKey
from .plots import plot_sigma_sweep
from ..progress import Progress, Ticker
from ..evaluation.render import default_size, generate, render_variants
from ..models.subject import INSTANCE_PROMPT, load_prompts, write_subject



def sigma_sweep(
    out_dir: str | os.PathLike,
    *,
    base: str = "tiny",
    sigmas: Sequence[float] = SWEEP_SIGMAS,
    instance_data_dir: str | os.PathLike | None = None,
    instance_prompt: str | None = None,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1),
    train_steps: int = SWEEP_TRAIN_STEPS,
    learning_rate: float = SWEEP_LR,
    train_batch_size: int = SWEEP_BATCH,
    rank: int = 4,
    steps: int = 10,
    guidance_scale: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    extra_train_args: Sequence[str] = (),
    progress: Progress | None = None,
    show_progress: bool = True,
) -> dict:
    """Train one SEAL LoRA per σ (C, C_p ~ N(0, σ²)) and measure N(B, A, ∅) vs the base model (paper Table 16).

    Every run uses the trainer's :func:`~seal_diffusion.training.train` with the same data, seed, steps and learning
    rate; only ``--passport_std`` changes. Then, for the same prompts × seeds, SSIM/PSNR of the identity-passport
    images vs the base images (and, for reference, C vs base). The paper's claim: the larger σ, the closer N(B,A,∅)
    is to the base model (SSIM 0.10 at σ 0.01 … 0.998 at σ 100), because the trained B·A must shrink as 1/σ to give
    the same B·C·A. Defaults: tiny model, bundled subject, rank 4, 30 steps of batch 1 (cached latents) at lr 5e-3,
    2 prompts × 2 seeds of 10 steps with CFG 7.5: 5 σ in ~5.5 min wall (3.5 min CPU) on 2 shared, busy CPU cores,
    ~1 min per σ. Writes ``sigma_sweep.md``, ``sigma_sweep.json``, ``sigma_sweep.png``.
    """
    from ..training import parse_args, train  # lazy: accelerate and diffusers (~5 s); the CLI reads SWEEP_* at start-up

    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not (math.isfinite(s) and s > 0) for s in sigmas):
        raise UserError(f"--sigmas {sigmas}: must be positive numbers")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if instance_data_dir is None:
        instance_data_dir = write_subject(out / "subject")
        instance_prompt = instance_prompt or INSTANCE_PROMPT
    if not instance_prompt:
        raise UserError("--instance_prompt: needed with --instance_data_dir")
    prompts = list(prompts) if prompts else load_prompts("live_subjects")[:2]
    jobs = [(p, int(s)) for p in prompts for s in seeds]

    pipe = load_pipeline(base)
    size = default_size(pipe)
    gen = dict(steps=steps, guidance_scale=guidance_scale, height=size, width=size)
    total = len(sigmas) * (train_steps + 2 * len(jobs)) + len(jobs)
    tick = Ticker(total, progress, desc="sigma sweep", show=show_progress)

    rows = []
    t0 = time.time()
    try:
        base_images = generate(pipe, jobs, on_batch=lambda n: tick("base images", n), **gen)
        for sigma in sigmas:
            run_dir = out / f"sigma_{sigma:g}"
            argv = [
                "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(instance_data_dir),
                "--instance_prompt", instance_prompt, "--output_dir", str(run_dir), "--output_name", "seal",
                "--rank", str(rank), "--passport_std", repr(sigma), "--max_train_steps", str(train_steps),
                "--learning_rate", repr(learning_rate), "--train_batch_size", str(train_batch_size),
                "--center_crop", "--cache_latents", "--seed", str(seed), "--secret", f"sigma-sweep-{seed}",
                "--force", *extra_train_args,
            ]
            t_run = time.time()
            res = train(parse_args(argv),
                        progress_callback=lambda step, n, loss, left, s=sigma: tick(f"train σ={s:g}"))
            key = SealKey.load(res["key_path"])
            imgs = render_variants(pipe, key, jobs, ("C", "identity"), tick=lambda n, m, s=sigma: tick(
                f"render σ={s:g}", n), **gen)
            f_id = metrics.fidelity(imgs["identity"], base_images)
            f_c = metrics.fidelity(imgs["C"], base_images)
            rows.append({
                "sigma": sigma,
                "ssim_identity_vs_base": f_id["ssim_mean"], "ssim_identity_vs_base_std": f_id["ssim_std"],
                "psnr_identity_vs_base": f_id["psnr_mean"], "psnr_identity_vs_base_std": f_id["psnr_std"],
                "ssim_C_vs_base": f_c["ssim_mean"], "psnr_C_vs_base": f_c["psnr_mean"],
                "final_loss": res.get("final_loss"), "seconds": time.time() - t_run, "key": res["key_path"],
            })
    finally:
        tick.close()

    settings = {"base": str(base), "rank": rank, "train_steps": train_steps, "learning_rate": learning_rate,
                "train_batch_size": train_batch_size, "seed": seed, "inference_steps": steps, "guidance_scale": guidance_scale, "size": size,
                "prompts": prompts, "seeds": list(seeds), "instance_prompt": instance_prompt}
    result = {"rows": rows, "settings": settings, "convention": metrics.SSIM_CONVENTION,
              "seconds": time.time() - t0, "plot": str(out / "sigma_sweep.png"), "table": str(out / "sigma_sweep.md")}
    plot_sigma_sweep(rows, out / "sigma_sweep.png")
    (out / "sigma_sweep.md").write_text(sigma_table_md(result), encoding="utf-8")
    (out / "sigma_sweep.json").write_text(json.dumps(json_safe(result, nan="nan"), indent=2), encoding="utf-8")
    return result


def sigma_table_md(result: dict) -> str:
    """Markdown report of :func:`sigma_sweep`: one row per σ, paper values alongside."""
    paper = {0.01: "0.10", 0.1: "0.65", 1.0: "0.94", 10.0: "0.99", 100.0: "0.998"}
    s = result["settings"]
    lines = [
        "# Passport scale σ vs N(B,A,∅) fidelity (SEAL paper Table 16)",
        "",
        f"Base `{s['base']}`, rank {s['rank']}, {s['train_steps']} training steps (batch {s['train_batch_size']}, "
        f"cached latents) at lr {s['learning_rate']:g} (seed {s['seed']}), {len(s['prompts'])} prompt(s) × {len(s['seeds'])} seed(s), {s['inference_steps']} "
        f"inference steps, {s['size']}×{s['size']}.",
        "",
        "| σ | SSIM N(B,A,∅) vs base | PSNR N(B,A,∅) vs base (dB) | SSIM C vs base | paper SSIM (SD 1.5) | seconds (train + render) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['sigma']:g} | {format_mean_std(r['ssim_identity_vs_base'], r['ssim_identity_vs_base_std'], 4)} | "
            f"{format_mean_std(r['psnr_identity_vs_base'], r['psnr_identity_vs_base_std'], 2)} | {r['ssim_C_vs_base']:.4f} | "
            f"{paper.get(r['sigma'], '–')} | {r['seconds']:.1f} |"
        )
    lines += ["", f"Convention: {result['convention']}.", "", "![sigma sweep](sigma_sweep.png)"]
    return "\n".join(lines) + "\n"

