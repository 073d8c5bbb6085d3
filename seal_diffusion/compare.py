"""Side-by-side outputs of one SEAL LoRA: base model, passport C, passport C_p, no passport, and the exported file.

For the same prompts and seeds, :func:`compare` renders five variants with one base pipeline (loaded once):

* ``base``      — the base model alone;
* ``C``         — the SEAL network with the secret passport C (what the owner trained and released);
* ``C_p``       — the same factors with the second passport C_p (the claim check: close to C);
* ``identity``  — the passport replaced by I, the paper's N(B, A, ∅) (close to the base when σ is large);
* ``exported``  — the public LoRA rebuilt from the key (:func:`~seal_diffusion.export.export_lora`, diffusers
  layout) and loaded with ``pipe.load_lora_weights``, as any user would — must be the same images as ``C``.

It writes ``OUT/grid.png`` (rows = variants, columns = prompt × seed, labelled), ``OUT/images/<variant>_<i>.png``, and
``OUT/compare.md`` + ``OUT/compare.json``: SSIM and PSNR (mean ± std over the images) for the pairs that matter, as in
the SEAL paper's Table 16, under the one convention of :mod:`seal_diffusion.metrics`. Optional CLIP-T / CLIP-I / DINO
per variant when the user gives scorer models.

Also here: :func:`sigma_sweep`, the Table 16 experiment (train with C ~ N(0, σ²) for several σ through the trainer's
:func:`~seal_diffusion.training.train`, then SSIM/PSNR of N(B, A, ∅) images vs the base model), and the argparse
glue for the ``compare`` and ``sigma-sweep`` commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import metrics
from .errors import UserError

# Progress callable for the UI: progress(done, total, message).
Progress = Callable[[int, int, str], object]

VARIANTS = ("base", "C", "C_p", "identity", "exported")
VARIANT_LABELS = {
    "base": "base model",
    "C": "SEAL, passport C",
    "C_p": "SEAL, passport C_p",
    "identity": "no passport (C = I)",  # the paper's N(B,A,∅); the default font has no ∅ glyph
    "exported": "exported LoRA (diffusers)",
}
# (a, b, what the pair shows)
PAIRS = (
    ("exported", "C", "exported file vs passport C: must be identical"),
    ("identity", "base", "N(B,A,∅) vs base (paper Table 16)"),
    ("C", "C_p", "C vs C_p: the fidelity gap of the claim check"),
    ("C", "base", "C vs base: what the LoRA changes"),
    ("C_p", "base", "C_p vs base"),
)
DEFAULT_SUBJECT = "sks cat"
DEFAULT_SEEDS = (0, 1)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5


# -- prompts -----------------------------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike, subject: str = DEFAULT_SUBJECT) -> list[str]:
    """Prompts from a text file: one per line, blank lines and ``#`` comments skipped, ``{}`` → ``subject``.

    ``path`` may also name a bundled list (``live_subjects`` or ``objects``, see ``prompts/``).
    """
    from .subject import PROMPTS_DIR

    p = Path(path).expanduser()
    if not p.is_file() and (PROMPTS_DIR / f"{path}.txt").is_file():
        p = PROMPTS_DIR / f"{path}.txt"
    if not p.is_file():
        raise UserError(f"--prompts {path}: no such file (or bundled list: live_subjects, objects)")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--prompts {p}: not a readable UTF-8 text file ({exc})") from exc
    prompts = [line.replace("{}", subject) for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"--prompts {p}: holds no prompts (one per line, '#' starts a comment)")
    return prompts


# -- generation --------------------------------------------------------------------------------------------------------
class _Ticker:
    """A tqdm bar (the CLI) and an optional ``progress(done, total, text)`` callback (the app), advanced together."""

    def __init__(self, total: int, desc: str, show: bool, callback: Callable | None,
                 label: Callable[[str, int, int], str] = lambda what, done, total: what, unit: str = "it"):
        from tqdm.auto import tqdm

        self.total, self.done, self.callback, self.label = total, 0, callback, label
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not show)

    def __call__(self, n: int, what: str) -> None:
        self.done += n
        self.bar.update(n)
        self.bar.set_postfix_str(what)
        if self.callback:
            self.callback(self.done, self.total, self.label(what, self.done, self.total))

    def close(self) -> None:
        self.bar.close()


def default_size(pipe) -> int:
    """The model's native image size: UNet sample size × VAE scale factor (512 for SD 1.5, 64 for tiny)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def generate(pipe, jobs: Sequence[tuple[str, int]], *, steps: int, guidance_scale: float, height: int, width: int,
             batch_size: int = 4, on_batch: Callable[[int], object] | None = None) -> np.ndarray:
    """Images (N, H, W, 3) float in [0, 1] for ``jobs`` = [(prompt, seed), …]; image i uses ``Generator(seed)``.

    The same jobs give the same initial noise for every variant, so differences come from the weights only.
    """
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for _, s in chunk]
        res = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                   width=width, generator=gens, output_type="np")
        out.append(np.asarray(res.images, dtype=np.float32))
        if on_batch:
            on_batch(len(chunk))
    return np.concatenate(out)


def seal_network_for(pipe, key):
    """A :class:`SealNetwork` on ``pipe.unet`` — and the pipeline's text encoder(s) when the key has text-encoder
    modules — holding the key's raw factors and both passports (mode C)."""
    from .network import network_from_key

    return network_from_key(key, pipe)


def render_variants(pipe, key, jobs, variants=VARIANTS, *, steps: int, guidance_scale: float, height: int,
                    width: int, batch_size: int = 4, tick: Callable[[int, str], object] | None = None) -> dict:
    """``{variant: images}`` for the requested variants with one pipeline; the pipeline is left as it was."""
    from .export import export_lora

    tick = tick or (lambda n, what: None)
    gen = dict(steps=steps, guidance_scale=guidance_scale, height=height, width=width, batch_size=batch_size)
    images: dict[str, np.ndarray] = {}
    if "base" in variants:
        images["base"] = generate(pipe, jobs, on_batch=lambda n: tick(n, "base"), **gen)
    seal_modes = [v for v in ("C", "C_p", "identity") if v in variants]
    if seal_modes:
        net = seal_network_for(pipe, key)
        try:
            for mode in seal_modes:
                with net.passport(mode):
                    images[mode] = generate(pipe, jobs, on_batch=lambda n, m=mode: tick(n, m), **gen)
        finally:
            net.remove()  # the UNet is exactly the base again
    if "exported" in variants:
        with tempfile.TemporaryDirectory(prefix="seal-compare-") as tmp:
            export_lora(key, tmp, "diffusers")
            pipe.load_lora_weights(tmp, adapter_name="seal_export")
            try:
                images["exported"] = generate(pipe, jobs, on_batch=lambda n: tick(n, "exported"), **gen)
            finally:
                pipe.unload_lora_weights()
    return images


# -- the grid ----------------------------------------------------------------------------------------------------------
def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def make_grid(rows: dict[str, Sequence], row_labels: dict[str, str], col_labels: Sequence[str], *,
              cell: int | None = None, font_size: int = 14):
    """A labelled grid image: one row per entry of ``rows`` (label on the left), one column per ``col_labels``.

    Small images are scaled up (nearest neighbour) to at least 128 px so that labels stay readable.
    """
    from PIL import Image, ImageDraw, ImageFont

    first = metrics.to_pil(next(iter(rows.values()))[0])
    cell = cell or max(128, first.width)
    pad = 6
    font = ImageFont.load_default(size=font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(probe.textlength(w, font=font) for lab in row_labels.values() for w in lab.split())) + 2 * pad
    label_w = max(label_w, 150)
    wrapped_rows = {k: _wrap(probe, row_labels.get(k, k), font, label_w - 2 * pad) for k in rows}
    wrapped_cols = [_wrap(probe, c, font, cell - 2 * pad)[:4] for c in col_labels]
    line_h = font_size + 4
    header_h = max(len(w) for w in wrapped_cols) * line_h + 2 * pad
    grid = Image.new("RGB", (label_w + len(col_labels) * (cell + pad) + pad, header_h + len(rows) * (cell + pad) + pad),
                     "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(wrapped_cols):
        x = label_w + pad + j * (cell + pad)
        for k, line in enumerate(lines):
            draw.text((x, pad + k * line_h), line, fill="black", font=font)
    for i, (name, imgs) in enumerate(rows.items()):
        y = header_h + i * (cell + pad)
        lines = wrapped_rows[name]
        y_text = y + (cell - len(lines) * line_h) // 2
        for k, line in enumerate(lines):
            draw.text((pad, y_text + k * line_h), line, fill="black", font=font)
        for j, img in enumerate(imgs):
            tile = metrics.to_pil(img).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + pad + j * (cell + pad), y))
    return grid


# -- tables ------------------------------------------------------------------------------------------------------------
def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isinf(mean):
        return "∞ (identical)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _json_safe(obj):
    """inf/nan → strings, so compare.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def pairs_table(pairs: list[dict]) -> str:
    """Markdown table of SSIM / PSNR per pair (mean ± std over images)."""
    lines = ["| pair | SSIM | PSNR (dB) | what it shows |", "|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['a']} vs {p['b']} | {_fmt(p['ssim_mean'], p['ssim_std'], 4)} | "
                     f"{_fmt(p['psnr_mean'], p['psnr_std'], 2)} | {p['what']} |")
    return "\n".join(lines)


def _report_md(result: dict) -> str:
    s = result["settings"]
    md = [
        "# SEAL output comparison",
        "",
        f"Base model `{s['base']}`, {len(result['prompts'])} prompt(s) × {len(result['seeds'])} seed(s) = "
        f"{result['n_images']} images per variant; {s['steps']} steps, guidance {s['guidance_scale']}, "
        f"{s['width']}×{s['height']}.",
        "",
        pairs_table(result["pairs"]),
        "",
        f"Convention: {metrics.SSIM_CONVENTION}. Mean ± std (population) over the images.",
        "",
        "Variants: " + "; ".join(f"`{v}` = {VARIANT_LABELS[v]}" for v in result["variants"]) + ".",
        "",
        "![grid](grid.png)",
    ]
    if result.get("scores"):
        cols = sorted({k for v in result["scores"].values() for k in v})
        md += ["", "| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for v, sc in result["scores"].items():
            md.append(f"| {v} | " + " | ".join(f"{sc[c]:.4f}" if c in sc else "–" for c in cols) + " |")
        md += ["", "CLIP-T: mean cosine(prompt, image); CLIP-I / DINO: mean pairwise cosine, generated vs real images."]
    md += ["", "Prompts:", ""] + [f"{i + 1}. {p}" for i, p in enumerate(result["prompts"])]
    return "\n".join(md) + "\n"


# -- compare -----------------------------------------------------------------------------------------------------------
def compare(
    key,
    base,
    prompts: Sequence[str],
    seeds: Sequence[int] = DEFAULT_SEEDS,
    out_dir: str | os.PathLike = "compare",
    *,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    height: int | None = None,
    width: int | None = None,
    variants: Sequence[str] = VARIANTS,
    batch_size: int = 4,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    clip_model: str | None = None,
    dino_model: str | None = None,
    real_images: str | os.PathLike | Sequence | None = None,
    progress: Progress | None = None,
    show_progress: bool = True,
    base_label: str | None = None,
) -> dict:
    """Render every variant for prompts × seeds and write grid, single images and the SSIM/PSNR table.

    ``key`` is a :class:`~seal_diffusion.keyfile.SealKey` or a path; ``base`` a ``--base`` string (loaded once with
    :func:`~seal_diffusion.base_model.load_pipeline`) or an already loaded pipeline. ``progress(done, total, message)``
    is called after every batch (the UI's progress bar); a tqdm bar is shown on the terminal too.
    ``clip_model`` / ``dino_model`` (folder or hub id) add CLIP-T, and with ``real_images`` CLIP-I and DINO, per
    variant. ``base_label`` names an already loaded pipeline in the report (e.g. ``tiny``). Returns the dict written
    to ``compare.json``.
    """
    from .base_model import load_pipeline
    from .keyfile import SealKey

    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    variants = [v for v in VARIANTS if v in set(variants)]  # canonical order
    prompts = [p for p in prompts if p and p.strip()]
    if not prompts:
        raise UserError("--prompt: no prompt given")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("--seeds: no seed given")
    if steps < 1:
        raise UserError(f"--steps {steps}: must be ≥ 1")
    key = key if isinstance(key, SealKey) else SealKey.load(key)
    if isinstance(base, (str, os.PathLike)):
        base_label = str(base)
        pipe = load_pipeline(base, config=config, allow_pickle=allow_pickle)
    else:
        pipe, base_label = base, base_label or "pipeline"
    size = default_size(pipe)
    height, width = int(height or size), int(width or size)
    if height % 8 or width % 8:
        raise UserError(f"--height/--width {height}×{width}: must be multiples of 8")
    clip = metrics.ClipScorer(clip_model) if clip_model else None
    dino = metrics.DinoScorer(dino_model) if dino_model else None
    real = None
    if real_images is not None and (clip or dino):
        real = metrics.load_images(real_images) if isinstance(real_images, (str, os.PathLike)) else list(real_images)

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(p, s) for p in prompts for s in seeds]
    total = len(jobs) * len(variants)
    tick = _Ticker(total, "compare", show_progress, progress, lambda what, done, total:
                   f"{VARIANT_LABELS[what]}: {done}/{total} images", unit="img")
    t0 = time.time()
    try:
        images = render_variants(pipe, key, jobs, variants, steps=steps, guidance_scale=guidance_scale,
                                 height=height, width=width, batch_size=batch_size, tick=tick)
    finally:
        tick.close()
    seconds = time.time() - t0

    paths: dict[str, list[str]] = {}
    for v, imgs in images.items():
        paths[v] = []
        for i, img in enumerate(imgs):
            p = out / "images" / f"{v}_{i}.png"
            metrics.to_pil(img).save(p)
            paths[v].append(str(p))
    col_labels = [f"{p} (seed {s})" for p, s in jobs]
    grid = make_grid({v: images[v] for v in variants}, VARIANT_LABELS, col_labels)
    grid.save(out / "grid.png")

    pairs = []
    for a, b, what in PAIRS:
        if a in images and b in images:
            f = metrics.fidelity(images[a], images[b])
            pairs.append({"a": a, "b": b, "what": what, **f})
    scores: dict[str, dict[str, float]] = {}
    if clip or dino:
        prompt_per_image = [p for p, _ in jobs]
        for v, imgs in images.items():
            sc = {}
            if clip:
                sc["CLIP-T"] = metrics.clip_t(clip, imgs, prompt_per_image)
                if real:
                    sc["CLIP-I"] = metrics.clip_i(clip, imgs, real)
            if dino and real:
                sc["DINO"] = metrics.dino(dino, imgs, real)
            scores[v] = sc

    result = {
        "variants": list(variants),
        "prompts": list(prompts),
        "seeds": seeds,
        "n_images": len(jobs),
        "settings": {"base": base_label, "steps": steps, "guidance_scale": guidance_scale, "height": height,
                     "width": width, "rank": key.rank, "alpha": key.alpha, "n_modules": len(key.modules)},
        "convention": metrics.SSIM_CONVENTION,
        "pairs": pairs,
        "scores": scores,
        "images": paths,
        "grid": str(out / "grid.png"),
        "table": str(out / "compare.md"),
        "seconds": seconds,
    }
    (out / "compare.md").write_text(_report_md(result), encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(_json_safe(result), indent=2), encoding="utf-8")
    result["arrays"] = images  # in memory only (not in the JSON): the rendered float images
    return result


def pair(result: dict, a: str, b: str) -> dict:
    """The entry of ``result["pairs"]`` for (a, b)."""
    for p in result["pairs"]:
        if (p["a"], p["b"]) == (a, b):
            return p
    raise KeyError(f"no pair {a} vs {b}")


# -- the σ sweep (paper Table 16) ----------------------------------------------------------------------------------------
SWEEP_SIGMAS = (0.01, 0.1, 1.0, 10.0, 100.0)
SWEEP_TRAIN_STEPS = 30
SWEEP_LR = 5e-3
SWEEP_BATCH = 1


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
    from . import plots
    from .base_model import load_pipeline
    from .keyfile import SealKey
    from .subject import INSTANCE_PROMPT, load_prompts, write_subject
    from .training import parse_args, train

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
    tick = _Ticker(total, "sigma sweep", show_progress, progress)

    rows = []
    t0 = time.time()
    try:
        base_images = generate(pipe, jobs, on_batch=lambda n: tick(n, "base images"), **gen)
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
                        progress_callback=lambda step, n, loss, left, s=sigma: tick(1, f"train σ={s:g}"))
            key = SealKey.load(res["key_path"])
            imgs = render_variants(pipe, key, jobs, ("C", "identity"), tick=lambda n, m, s=sigma: tick(
                n, f"render σ={s:g}"), **gen)
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
    plots.plot_sigma_sweep(rows, out / "sigma_sweep.png")
    (out / "sigma_sweep.md").write_text(sigma_table_md(result), encoding="utf-8")
    (out / "sigma_sweep.json").write_text(json.dumps(_json_safe(result), indent=2), encoding="utf-8")
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
            f"| {r['sigma']:g} | {_fmt(r['ssim_identity_vs_base'], r['ssim_identity_vs_base_std'], 4)} | "
            f"{_fmt(r['psnr_identity_vs_base'], r['psnr_identity_vs_base_std'], 2)} | {r['ssim_C_vs_base']:.4f} | "
            f"{paper.get(r['sigma'], '–')} | {r['seconds']:.1f} |"
        )
    lines += ["", f"Convention: {result['convention']}.", "", "![sigma sweep](sigma_sweep.png)"]
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------------------------------
def _seeds(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None


def add_compare_command(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on an argparse subparsers object (the CLI wires it in)."""
    p = subparsers.add_parser("compare", help="images with base / C / C_p / no passport / exported; SSIM, PSNR, grid")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("--base", default="tiny", help="base model: tiny, hub id, diffusers folder or .safetensors")
    p.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file base")
    p.add_argument("--allow_pickle", action="store_true", help="allow a pickle (.ckpt) base checkpoint you trust")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None,
                   help="text file with one prompt per line ('#' comments, '{}' → --subject), or live_subjects/objects")
    p.add_argument("--subject", default=DEFAULT_SUBJECT, help=f"fills '{{}}' in --prompts (default {DEFAULT_SUBJECT!r})")
    p.add_argument("--seeds", nargs="+", type=_seeds, default=list(DEFAULT_SEEDS), help="seeds (default 0 1)")
    p.add_argument("--out", required=True, help="output folder (grid.png, images/, compare.md, compare.json)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"inference steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    p.add_argument("--batch_size", type=int, default=4, help="images per pipeline call")
    p.add_argument("--clip_model", default=None, help="CLIP folder or hub id: adds CLIP-T (and CLIP-I with real images)")
    p.add_argument("--dino_model", default=None, help="DINO ViT folder or hub id: adds DINO (needs --real_images)")
    p.add_argument("--real_images", default=None, help="folder of real subject images for CLIP-I / DINO")
    p.add_argument("--commitment", default=None, metavar="HEX",
                   help="the commitment you published: the key is refused unless it matches")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args) -> int:
    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompts(args.prompts, args.subject)
    if not prompts:
        raise UserError("compare: give --prompt P (repeatable) or --prompts FILE")
    key = args.key
    if getattr(args, "commitment", None):
        from .keyfile import SealKey, check_commitment

        key = SealKey.load(args.key)
        print(f"key matches the published commitment {check_commitment(key, args.commitment)}")
    result = compare(key, args.base, prompts, args.seeds, args.out, steps=args.steps,
                     guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                     batch_size=args.batch_size, config=args.config, allow_pickle=args.allow_pickle,
                     clip_model=args.clip_model, dino_model=args.dino_model, real_images=args.real_images)
    print(pairs_table(result["pairs"]))
    print(f"wrote {result['grid']}, {result['table']}, {Path(args.out) / 'compare.json'} and "
          f"{result['n_images'] * len(result['variants'])} images under {Path(args.out) / 'images'}")
    return 0


def add_sigma_sweep_command(subparsers) -> argparse.ArgumentParser:
    """Register ``sigma-sweep`` (paper Table 16) on an argparse subparsers object."""
    p = subparsers.add_parser("sigma-sweep", help="train with several passport scales σ; N(B,A,∅) vs base (Table 16)")
    p.add_argument("--out", required=True, help="output folder (sigma_sweep.md/.json/.png and one run per σ)")
    p.add_argument("--base", default="tiny", help="base model (default: tiny, the embedded default)")
    p.add_argument("--sigmas", nargs="+", type=float, default=list(SWEEP_SIGMAS), help="passport stds")
    p.add_argument("--instance_data_dir", default=None, help="subject images (default: the bundled cat)")
    p.add_argument("--instance_prompt", default=None, help="training prompt (default: 'a photo of sks cat')")
    p.add_argument("--prompt", action="append", default=[], help="evaluation prompt (repeatable)")
    p.add_argument("--seeds", nargs="+", type=_seeds, default=[0, 1], help="evaluation seeds")
    p.add_argument("--train_steps", type=int, default=SWEEP_TRAIN_STEPS, help="training steps per σ")
    p.add_argument("--train_batch_size", type=int, default=SWEEP_BATCH, help="training batch size")
    p.add_argument("--learning_rate", type=float, default=SWEEP_LR, help="learning rate (same for every σ)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--steps", type=int, default=10, help="inference steps of the evaluation images")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.set_defaults(func=cmd_sigma_sweep)
    return p


def cmd_sigma_sweep(args) -> int:
    result = sigma_sweep(args.out, base=args.base, sigmas=args.sigmas, instance_data_dir=args.instance_data_dir,
                         instance_prompt=args.instance_prompt, prompts=args.prompt or None, seeds=args.seeds,
                         train_steps=args.train_steps, learning_rate=args.learning_rate,
                         train_batch_size=args.train_batch_size, rank=args.rank,
                         steps=args.steps, seed=args.seed)
    print(sigma_table_md(result))
    print(f"wrote {result['table']} and {result['plot']}")
    return 0
