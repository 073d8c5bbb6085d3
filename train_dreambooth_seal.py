"""DreamBooth training of a SEAL-watermarked LoRA for Stable Diffusion 1.5 (argument names as in diffusers'
train_dreambooth_lora.py). Run ``accelerate launch train_dreambooth_seal.py --help``; the work is done by
:mod:`seal_diffusion.training`."""

import os

# idle OpenMP threads that spin make small CPU ops many times slower on a busy machine; set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from seal_diffusion.training import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
