"""seal-diffusion: SEAL entangled white-box watermarks for Stable Diffusion 1.5 and SDXL LoRAs.

The package in floors, bottom to top (each sub-package imports only the ones above it in this list; the README's
*Development* section lists every module):

* top-level helpers — :mod:`~seal_diffusion.errors`, :mod:`~seal_diffusion.fileio`, :mod:`~seal_diffusion.progress`,
  :mod:`~seal_diffusion.cpu`, :mod:`~seal_diffusion.quiet`;
* :mod:`seal_diffusion.models` — base models (SD 1.5, SDXL, the embedded tiny default) and their inputs;
* :mod:`seal_diffusion.formats` — LoRA files in every layout frontends load, metadata, model card, checkpoints;
* :mod:`seal_diffusion.core` — the passports, the SEAL layer and network, the fold, the private key, the export;
* :mod:`seal_diffusion.evaluation` — held-out loss, SSIM/PSNR/CLIP/DINO, rendering with a key's network;
* :mod:`seal_diffusion.detection` — the weight test, the function-level test, the check from images;
* :mod:`seal_diffusion.ownership` — timestamps, claims, forgeries, disputes;
* :mod:`seal_diffusion.training` — the DreamBooth trainer;
* :mod:`seal_diffusion.attacks` — file attacks, fine-tuning, distillation;
* :mod:`seal_diffusion.reports` — the robustness matrix, compare, the σ sweep, every plot;
* :mod:`~seal_diffusion.demo`, then the app (:mod:`ui`) and the command (:mod:`seal_diffusion.cli`).
"""

__version__ = "0.1.0"
