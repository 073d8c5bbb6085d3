"""seal-diffusion: SEAL entangled white-box watermarks for Stable Diffusion 1.5 LoRAs.

Where things are (the README's *Development* section lists every module in the order data flows):

* :mod:`~seal_diffusion.passport` — the secret r×r passports C and C_p;
* :mod:`~seal_diffusion.layer` / :mod:`~seal_diffusion.network` — the SEAL layer and the patch that installs it on a
  diffusers UNet (Q/K/V/Out, AddK/AddV), with passport switching;
* :mod:`~seal_diffusion.fold` / :mod:`~seal_diffusion.export` / :mod:`~seal_diffusion.lora_file` — SVD fold and the
  public LoRA files (diffusers and kohya layouts);
* :mod:`~seal_diffusion.keyfile` — the owner's private ``.sealkey``;
* :mod:`~seal_diffusion.base_model` / :mod:`~seal_diffusion.tiny` — loading SD 1.5 and the embedded tiny default;
* :mod:`~seal_diffusion.training` — the DreamBooth trainer (a package: args, data, loss, checkpoints, loop…), over
  :mod:`~seal_diffusion.images` and :mod:`~seal_diffusion.evaluation` (the held-out loss claim, demo and compare use);
* :mod:`~seal_diffusion.render` — images with the key's network (base, C, C_p, no passport, exported);
* :mod:`~seal_diffusion.verify` / :mod:`~seal_diffusion.claim` — the ownership test and the claim check;
* :mod:`~seal_diffusion.attacks` / :mod:`~seal_diffusion.finetune` / :mod:`~seal_diffusion.distill` — the attacks;
  :mod:`~seal_diffusion.robustness` runs them all (measures in ``robustness_measures``, report in
  ``robustness_report``);
* :mod:`~seal_diffusion.compare` / :mod:`~seal_diffusion.sigma_sweep` / :mod:`~seal_diffusion.metrics` — outputs
  side by side, the σ sweep, SSIM/PSNR;
* :mod:`~seal_diffusion.cli` — the ``seal-diffusion`` command (a package: one module per group of commands).
"""

__version__ = "0.1.0"
