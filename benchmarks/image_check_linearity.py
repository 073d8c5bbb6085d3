"""Why the check from images is weak on some subjects: is it cross-talk between the layers' image directions (which a
least-squares fit would remove, as in the function-level test) or non-linearity (the release is far from the
midpoint the directions are taken at)? Measured on one owner's release with the challenge defaults of the tiny model.

For every key module l, the secant direction J_l = (x(M + D_l) − x(M − D_l)) / 2 (module l at C or C_p, every other
module at the midpoint M; coin-symmetric like the shipped derivative, so each statistic below is still an exact
sign-flip test). r = release − x_mid (8-bit, as a service's PNGs). Prints

* how much of r the linear model explains: cos(r, Σ_l J_l) (1 = linear, 0 = nothing);
* the shipped statistic d = Jᵀr and the least-squares t̂ = (G + λ·diag G)⁻¹ d (G = JᵀJ) as −log10 p (modules leaning
  the released way), also fitted on half the images and tested on the other half; the same for the innocent LoRAs given;
* with ``--vertices K``: the main effects over the passport hypercube instead of the midpoint's secants. K random
  vertices t ∈ {±1}^L (drawn without the coins, so still exact) are rendered; x̄ is their mean and β_l = mean_k
  t_kl·(x_k − x̄) module l's main effect (the degree-1 Fourier coefficient of the image map). Prints how far the
  vertices lie from x̄ and how much of a held-out vertex the main effects predict, and each suspect's score with
  d_l = ⟨y − x̄, β_l⟩.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/image_check_linearity.py --owner RUN_DIR --prompt "a photo of sks cup" \\
        [--innocent DIR …] [--n 16] [--vertices 64] [--threads 1]

RUN_DIR is a training output folder (``NAME.sealkey`` + ``pytorch_lora_weights.safetensors``). Costs 2 renders of the
challenge per key module (48 on tiny: ~4 min for 16 images on one busy core), plus one per vertex. Not a test;
writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owner", required=True, help="training output folder with NAME.sealkey")
    ap.add_argument("--prompt", required=True, help="the release's instance prompt, e.g. 'a photo of sks cup'")
    ap.add_argument("--innocent", action="append", default=[], help="LoRA folder not derived from the owner")
    ap.add_argument("--n", type=int, default=16, help="challenge images (default 16)")
    ap.add_argument("--seed", type=int, default=1, help="draws the challenge's seeds (default 1)")
    ap.add_argument("--vertices", type=int, default=0,
                    help="also measure the main effects over K random vertices (default 0: not measured)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.defaults import CHALLENGE_STEPS
    from seal_diffusion.detection.image_challenge import make_challenge
    from seal_diffusion.detection.image_sampler import PassportLine, render_release, sample, to_compare_space, \
        use_scheduler
    from seal_diffusion.detection.recovery import sign_flip_neg_log10_p
    from seal_diffusion.evaluation.render import generate
    from seal_diffusion.models.base_model import load_pipeline

    key = SealKey.load(next(Path(args.owner).glob("*.sealkey")))
    pipe = load_pipeline("tiny")
    rng = np.random.default_rng(args.seed)
    n, size, cs = args.n, 32, 16
    ch = make_challenge(key, "tiny", args.prompt, n=n, size=size, steps=CHALLENGE_STEPS, compare_size=cs,
                        seeds=[int(s) for s in rng.integers(0, 2 ** 31, n)])

    def rendered(folder):
        pipe.load_lora_weights(str(folder), adapter_name="suspect")
        try:
            use_scheduler(pipe, ch.scheduler)
            ims = generate(pipe, list(zip(ch.prompts, ch.seeds)), steps=ch.steps, guidance_scale=ch.guidance_scale,
                           height=size, width=size, batch_size=16)
        finally:
            pipe.unload_lora_weights()
        x = torch.from_numpy((np.round(ims * 255) / 255).astype(np.float32)).permute(0, 3, 1, 2)
        return to_compare_space(x, cs)

    suspects = {"release": render_release(pipe, key, ch)}
    suspects.update({Path(f).name: rendered(f) for f in args.innocent})
    t0 = time.time()
    with PassportLine(pipe, key) as line, torch.no_grad():
        L = len(line.names)

        def render(t):
            line.set(t)
            return to_compare_space(sample(pipe, ch, list(range(n))), cs).double().flatten(1)

        def render_vertices(k, L):
            t = torch.from_numpy(np.random.default_rng(12345).choice([-1.0, 1.0], size=(k, L))).float()
            return t.double(), torch.stack([render(v) for v in t])

        x_mid = render(torch.zeros(L))
        J = torch.stack([(render(torch.eye(L)[i]) - render(-torch.eye(L)[i])) / 2 for i in range(L)], -1)
        vertices = render_vertices(args.vertices, L) if args.vertices else None
    print(f"{L} modules, {n} images; directions in {time.time() - t0:.0f} s")

    def score(v):
        return f"{sign_flip_neg_log10_p(list(v)):4.1f} ({int((v > 0).sum())}/{v.size})"

    half = n // 2
    for name, x in suspects.items():
        r = x.double().flatten(1) - x_mid
        d = torch.einsum("nd,ndl->l", r, J).numpy()
        G = torch.einsum("ndl,ndm->lm", J, J).numpy()
        cells = [f"{name:12s}", f"cos(r, ΣJ) {float((r * J.sum(-1)).sum() / r.norm() / J.sum(-1).norm()):5.2f}",
                 f"shipped d {score(d)}"]
        for lam in (0.0, 0.1, 1.0):
            cells.append(f"LS λ={lam:g} {score(np.linalg.solve(G + lam * np.diag(np.diag(G)), d))}")
        Ga = torch.einsum("ndl,ndm->lm", J[:half], J[:half]).numpy()
        db = torch.einsum("nd,ndl->l", r[half:], J[half:]).numpy()
        cells.append(f"LS cross-fitted λ=0.1 {score(np.linalg.solve(Ga + 0.1 * np.diag(np.diag(Ga)), db))}")
        print("  ".join(cells), flush=True)
    if args.vertices:
        main_effects(args.vertices, L, vertices, suspects, score)
    return 0


def main_effects(k: int, L: int, vertices, suspects: dict, score) -> None:
    t, X = vertices
    held = min(16, k // 4)
    fit_t, fit_x = t[:-held], X[:-held]
    x_bar = fit_x.mean(0)
    beta = torch.einsum("kl,knd->lnd", fit_t, fit_x - x_bar) / fit_t.shape[0]
    spread = (X - X.mean(0)).flatten(1).norm(dim=1).mean()
    pred = [float((X[i] - x_bar - torch.einsum("l,lnd->nd", t[i], beta)).norm()) for i in range(k - held, k)]
    print(f"{k} vertices: a vertex lies {spread:.2f} from their mean; a held-out vertex {np.mean(pred):.2f} from the "
          f"main effects' prediction (fitted on {k - held}; 0 = additive, ≥ the spread = nothing predicted)")
    for name, x in suspects.items():
        r = x.double().flatten(1) - x_bar
        d = torch.einsum("nd,lnd->l", r, beta).numpy()
        print(f"{name:12s}  |y − x̄| {float(r.norm()):.2f}  main effects d {score(d)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
