"""DreamBooth training of a SEAL LoRA (or a plain LoRA through the same code) on Stable Diffusion 1.5.

The flow and the argument names follow diffusers' ``examples/dreambooth/train_dreambooth_lora.py``, so anyone who has
trained a DreamBooth LoRA knows the knobs. What SEAL adds:

* every adapted projection computes ``W x + (α/r)·B·C_t·A·x`` (:class:`~seal_diffusion.core.network.SealNetwork`) where
  C_t is the secret passport C or the second passport C_p. ``--passport_schedule alternate`` switches C ↔ C_p every
  optimizer step; ``split`` runs the first half of every batch with C and the rest with C_p. The schedule depends
  only on the global step, so all accelerate processes stay in lock-step;
* the passports *and A's initialisation* come from a secret (32 random bytes from the OS that live nowhere but in the
  passports, or scrypt(``--secret``, random salt) with the salt kept in the private key) and are identical on every
  process; ``--seed`` only orders data and draws noise, so a published seed confirms nothing about the release;
* the outputs: the private key ``NAME.sealkey`` first (raw A, B, C, C_p), then the public files built from it
  (``NAME.safetensors`` kohya layout, ``pytorch_lora_weights.safetensors`` diffusers layout, ``README.md``). The
  public files are ordinary LoRA files: C is folded into the factors, nothing names the method.

Checkpoints (``checkpoint-STEP/``) hold the accelerate state *and* the passports (``seal_passports.safetensors``),
so a resumed run gets exactly the same passports. **Checkpoints are private**, like the key: never publish them.

Reproducibility: every random draw of a step (data order, crop/flip, noise, timesteps, VAE sampling) comes from a
generator seeded by (seed, epoch/step, process), never from the global RNG, so resuming from a checkpoint gives the
same final factors as an uninterrupted run.

The library entry points are :func:`train` (also used by the UI) and :func:`main` (the command line). Where the rest is:
``args`` (parser and checks), ``data`` (dataset, sampler), ``loss`` (the passport schedule's loss), ``checkpoints``,
``validation`` (validation and class images), ``outputs`` (key, public files; the output folder's checks, the training
log), ``loop`` (:func:`train`), ``command`` (:func:`main`). Held-out evaluation is :mod:`seal_diffusion.evaluation.heldout`; the
fine-tuning attack is :mod:`seal_diffusion.attacks.finetune`.

A floor of its own: it imports :mod:`~seal_diffusion.ownership` (the timestamp request written after training) and
the floors below it; the attacks, reports, demo, app and command import it.
"""

from .args import build_parser, check_args, parse_args
from .command import main
from .loop import train

__all__ = ["build_parser", "check_args", "main", "parse_args", "train"]
