"""DreamBooth training of a SEAL-watermarked LoRA for Stable Diffusion 1.5 (argument names as in diffusers'
train_dreambooth_lora.py). Run ``accelerate launch train_dreambooth_seal.py --help``; the work is done by
:mod:`seal_diffusion.training`."""

from seal_diffusion.cpu import short_openmp_spin

short_openmp_spin()  # before torch loads

from seal_diffusion.training import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
