"""Side-by-side outputs of one SEAL LoRA: base model, passport C, passport C_p, no passport, and the exported file.

For the same prompts and seeds, :func:`compare` renders five variants with one base pipeline (loaded once; the
rendering and the variants are :mod:`seal_diffusion.evaluation.render`):

* ``base``      — the base model alone;
* ``C``         — the SEAL network with the secret passport C (what the owner trained and released);
* ``C_p``       — the same factors with the second passport C_p (the claim check: close to C);
* ``identity``  — the passport replaced by I, the paper's N(B, A, ∅) (close to the base when σ is large);
* ``exported``  — the public LoRA rebuilt from the key (:func:`~seal_diffusion.core.export.export_lora`, diffusers
  layout) and loaded with ``pipe.load_lora_weights``, as any user would — must be the same images as ``C``.

It writes ``OUT/grid.png`` (rows = variants, columns = prompt × seed, labelled), ``OUT/images/<variant>_<i>.png``, and
``OUT/compare.md`` + ``OUT/compare.json``: SSIM and PSNR (mean ± std over the images) for the pairs that matter, as in
the SEAL paper's Table 16, under the one convention of :mod:`seal_diffusion.evaluation.metrics`. Optional CLIP-T / CLIP-I / DINO
per variant when the user gives scorer models.

The σ sweep (Table 16) is :mod:`seal_diffusion.reports.sigma_sweep`; the ``compare`` command is in :mod:`seal_diffusion.cli`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..evaluation import metrics
from ..models.base_model import load_pipeline
from ..defaults import COMPARE_GUIDANCE as DEFAULT_GUIDANCE, COMPARE_SEEDS as DEFAULT_SEEDS, \
    COMPARE_STEPS as DEFAULT_STEPS, COMPARE_SUBJECT as DEFAULT_SUBJECT  # the values --help shows
from ..errors import UserError
from ..fileio import json_safe
from ..core.keyfile import SealKey
from ..progress import Progress, Ticker
from ..evaluation.render import VARIANT_LABELS, VARIANTS, default_size, render_variants
from ..models.subject import PROMPTS_DIR

# (a, b, what the pair shows)
PAIRS = (
    ("exported", "C", "exported file vs passport C: must be identical"),
    ("identity", "base", "N(B,A,∅) vs base (paper Table 16)"),
    ("C", "C_p", "C vs C_p: the fidelity gap of the claim check"),
    ("C", "base", "C vs base: what the LoRA changes"),
    ("C_p", "base", "C_p vs base"),
)


# -- prompts -----------------------------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike, subject: str = DEFAULT_SUBJECT) -> list[str]:
    """Prompts from a text file: one per line, blank lines and ``#`` comments skipped, ``{}`` → ``subject``.

    ``path`` may also name a bundled list (``live_subjects`` or ``objects``, see ``prompts/``).
    """
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
def format_mean_std(mean: float, std: float, digits: int) -> str:
    if math.isinf(mean):
        return "∞ (identical)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"



def pairs_table(pairs: list[dict]) -> str:
    """Markdown table of SSIM / PSNR per pair (mean ± std over images)."""
    lines = ["| pair | SSIM | PSNR (dB) | what it shows |", "|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['a']} vs {p['b']} | {format_mean_std(p['ssim_mean'], p['ssim_std'], 4)} | "
                     f"{format_mean_std(p['psnr_mean'], p['psnr_std'], 2)} | {p['what']} |")
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

    ``key`` is a :class:`~seal_diffusion.core.keyfile.SealKey` or a path; ``base`` a ``--base`` string (loaded once with
    :func:`~seal_diffusion.models.base_model.load_pipeline`) or an already loaded pipeline. ``progress(done, total, message)``
    is called after every batch (the UI's progress bar); a tqdm bar is shown on the terminal too.
    ``clip_model`` / ``dino_model`` (folder or hub id) add CLIP-T, and with ``real_images`` CLIP-I and DINO, per
    variant. ``base_label`` names an already loaded pipeline in the report (e.g. ``tiny``). Returns the dict written
    to ``compare.json``.
    """
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
    tick = Ticker(total, progress, desc="compare", show=show_progress, unit="img",
                  label=lambda what, done, total: f"{VARIANT_LABELS[what]}: {done}/{total} images")
    t0 = time.time()
    try:
        images = render_variants(pipe, key, jobs, variants, steps=steps, guidance_scale=guidance_scale,
                                 height=height, width=width, batch_size=batch_size,
                                 tick=lambda n, what: tick(what, n))
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
    (out / "compare.json").write_text(json.dumps(json_safe(result, nan="nan"), indent=2), encoding="utf-8")
    result["arrays"] = images  # in memory only (not in the JSON): the rendered float images
    return result



def pair(result: dict, a: str, b: str) -> dict:
    """The entry of ``result["pairs"]`` for (a, b)."""
    for p in result["pairs"]:
        if (p["a"], p["b"]) == (a, b):
            return p
    raise KeyError(f"no pair {a} vs {b}")

