"""The training loop: :func:`train` runs one DreamBooth training of a SEAL LoRA (or a plain LoRA through the same
code) and returns the paths, the key's commitment, the losses and timings. The UI and the CLI both call it.

Order of work: every input is checked before anything is written; the passports come from the secret (identical on
all processes); after the loop the secret per-module coin picks the released passport; then the key is written
first and the public files after it (:mod:`.outputs`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..core import passport as passports_mod
from ..core.network import init_from_lora
from ..models.base_model import is_sdxl, load_pipeline, resolve_base
from ..errors import UserError
from ..models.conditioning import encode_text
from ..evaluation.heldout import default_resolution, training_noise_scheduler, vae_scale_factor
from ..models.images import scan_image_dir
from ..formats.kohya_meta import training_metadata
from ..formats.model_card import public_base_label
from ..core.network import SealNetwork, target_modules, text_encoders_of
from .args import check_args, warn
from .compat import (apply_to_pipeline, custom_text_encoding, encode_prompt_ids, resample_filter,
                     running_training_summary, scheduler_kwargs)
from .checkpoints import read_checkpoint_passports, read_checkpoint_state, resolve_checkpoint, save_checkpoint
from .data import DreamBoothDataset, EpochSampler, ImageSet, collate, derived_seed, generator_for
from .hub import push_public_files
from .loss import LossSetup, TextEncoding, param_groups
from .outputs import check_writable, open_train_log, refuse_to_replace, write_outputs
from .validation import ensure_class_images, run_validation

TRAIN_LOG = "train_log.jsonl"

ProgressCallback = Callable[[int, int, float, float], object]


def _report_to(requested: str | None) -> str | None:
    def have(mod: str) -> bool:
        return importlib.util.find_spec(mod) is not None

    if requested is None:
        return "tensorboard" if have("tensorboard") or have("tensorboardX") else None
    if requested == "none":
        return None
    if requested == "tensorboard" and not (have("tensorboard") or have("tensorboardX")):
        warn("--report_to tensorboard: tensorboard is not installed; logging to logs/train_log.jsonl only")
        return None
    if requested == "wandb" and not have("wandb"):
        warn("--report_to wandb: wandb is not installed; logging to logs/train_log.jsonl only")
        return None
    return requested



def train(args: argparse.Namespace, progress_callback: ProgressCallback | None = None) -> dict:
    """Run one DreamBooth training (see the module docstring); returns paths, commitment, losses and timings.

    ``progress_callback(step, max_steps, loss, seconds_left)`` is called on the main process after every step.
    """
    args = check_args(args)
    t_start = time.time()
    seal = args.method == "seal"
    output_dir = Path(args.output_dir).expanduser()
    logs_dir = output_dir / getattr(args, "logging_dir", "logs")
    key_path = output_dir / f"{args.output_name}.sealkey"
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
    check_writable(output_dir)
    if seal and key_path.exists() and not args.force:
        raise UserError(f"{key_path}: key file already exists; refusing to train over it (pass --force to replace "
                        "it, or choose another --output_name/--output_dir)")
    if not seal and (args.secret is not None or args.passport_source != "random"):
        warn("--method lora: passport arguments are ignored")

    # -- everything that can fail on input is checked before anything is written ----------------------------------
    instance_files = scan_image_dir(args.instance_data_dir, "--instance_data_dir", warn)
    src = resolve_base(args.pretrained_model_name_or_path, allow_pickle=args.allow_pickle)
    resume = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    ckpt_state = read_checkpoint_state(resume) if resume is not None else None
    if ckpt_state is not None:
        for field in ("method", "rank", "alpha", "train_text_encoder"):
            if ckpt_state.get(field, False if field == "train_text_encoder" else None) != getattr(args, field, False):
                raise UserError(f"--resume_from_checkpoint {resume}: checkpoint has {field}={ckpt_state.get(field)!r},"
                                f" this run has {getattr(args, field)!r}")

    report_to = _report_to(args.report_to)
    # torchrun/accelerate with several processes on a machine without CUDA: accelerate's MULTI_CPU (gloo) needs cpu=True
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    try:
        accelerator = Accelerator(
            cpu=multi_cpu,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logs_dir)),
        )
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"accelerate: {str(exc).splitlines()[0]} (check --mixed_precision / accelerate config)") from exc
    main_proc = accelerator.is_main_process
    warn_main = warn if main_proc else (lambda m: None)

    # seed and secret: chosen on the main process when not given, identical everywhere
    seed = args.seed if args.seed is not None else (ckpt_state or {}).get("seed")
    secret, secret_kdf = passports_mod.owner_secret(args.secret if seal else None, ckpt_state, warn_main)
    shared = [seed if seed is not None else int.from_bytes(os.urandom(4), "little"), secret, secret_kdf]
    if accelerator.num_processes > 1:
        broadcast_object_list(shared, from_process=0)
    seed, secret, secret_kdf = shared
    set_seed(seed)

    if getattr(args, "allow_tf32", False):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pipe = load_pipeline(src, config=args.config, allow_pickle=args.allow_pickle, revision=args.revision,
                         variant=getattr(args, "variant", None))
    unet, vae = pipe.unet, pipe.vae
    apply_to_pipeline(args, pipe, accelerator.device, warn_main)  # --tokenizer_name, xformers, warnings
    if custom_text_encoding(args) and is_sdxl(pipe):
        raise UserError("--tokenizer_max_length/--text_encoder_use_attention_mask: SD 1.x bases only (as in diffusers)")
    resolution = args.resolution or default_resolution(pipe)
    if resolution % vae_scale_factor(vae):
        raise UserError(f"--resolution {resolution}: must be a multiple of {vae_scale_factor(vae)} for this VAE")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    resample = resample_filter(args)
    instance_set = ImageSet(instance_files, resolution, warn_main, f"--instance_data_dir {args.instance_data_dir}",
                            resample)
    class_set = None
    if args.with_prior_preservation:
        ensure_class_images(args, pipe, accelerator, seed)
        class_set = ImageSet(scan_image_dir(args.class_data_dir, "--class_data_dir", warn_main), resolution, warn_main,
                             f"--class_data_dir {args.class_data_dir}", resample)

    # -- passports ------------------------------------------------------------------------------------------------
    train_te = bool(getattr(args, "train_text_encoder", False))
    adapted_encoders = text_encoders_of(pipe) if train_te else {}  # their layers come after the UNet's
    module_names = list(target_modules(unet, adapted_encoders))
    passports = None
    if seal:
        if resume is not None:
            passports = read_checkpoint_passports(resume)
            if args.secret is not None:
                fresh = passports_mod.make_passports(module_names, args.rank, secret, args.passport_source,
                                                     args.passport_std)
                if any(not torch.equal(fresh[m][0], passports[m][0]) for m in module_names):
                    raise UserError(f"--secret does not match the passports of checkpoint {resume}")
        else:
            passports = passports_mod.make_passports(module_names, args.rank, secret, args.passport_source,
                                                     args.passport_std)
    init_gen = passports_mod.init_generator(secret) if seal else None  # A's init follows the secret, not --seed
    del secret, shared
    refuse_to_replace(output_dir, args.output_name, args.force)  # after the checkpoint checks, before any write
    if passports is not None:  # an image passport gives every module the same tensor: own copies (safetensors)
        passports = {m: (c.clone(), c_p.clone()) for m, (c, c_p) in passports.items()}

    # -- frozen model, network -----------------------------------------------------------------------------------
    text_encoders = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False)
    for m in (unet, vae, *text_encoders):
        m.to(device) if weight_dtype == torch.float32 else m.to(device, dtype=weight_dtype)
    # SD 1.x: the text encoder's hidden states; SDXL: both encoders', the pooled embedding and the size/crop time ids
    # (--train_text_encoder: encoded again every step, with grad through the adapted encoders; these are unused then)
    with torch.no_grad():
        encode = (lambda p: encode_prompt_ids(pipe, p, device, args)) if custom_text_encoding(args) \
            else (lambda p: encode_text(pipe, p, device, size=resolution))
        instance_emb = encode(args.instance_prompt)
        class_emb = encode(args.class_prompt) if args.with_prior_preservation else None
    if not args.validation_prompt and not train_te:
        for te in text_encoders:
            te.to("cpu")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(derived_seed(seed, "init") % (2**32))
    network = SealNetwork(unet, args.rank, args.alpha, passports, generator=init_gen,  # fp32, on the models' device
                          text_encoders=adapted_encoders, dropout=getattr(args, "lora_dropout", 0.0))
    network.secret_kdf = secret_kdf  # the passphrase's salt: only into the private key and checkpoint state
    if getattr(args, "init_lora", None):
        init_from_lora(network, args.init_lora)  # a resumed run's checkpoint overrides these factors later
    unet.train()

    dataset = DreamBoothDataset(instance_set, class_set, resolution, args.center_crop, args.random_flip, seed)
    if args.cache_latents:
        if not args.center_crop:
            warn_main("--cache_latents: images are center-cropped once (random crops need uncached latents)")
        dataset.cache_latents(vae, device, weight_dtype)
    sampler = EpochSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=args.dataloader_num_workers)

    if args.max_train_steps is None:  # --num_train_epochs: passes over the data, as in diffusers
        batches = math.ceil(math.ceil(len(dataset) / args.train_batch_size) / accelerator.num_processes)
        args.max_train_steps = args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps)
    if getattr(args, "scale_lr", False):
        args.scale_lr = False  # once: the model card then shows the rate actually used
        factor = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        args.learning_rate *= factor
        if getattr(args, "text_encoder_lr", None):
            args.text_encoder_lr *= factor
    adamw = torch.optim.AdamW
    if getattr(args, "use_8bit_adam", False):
        import bitsandbytes  # optional, checked by check_args: only this flag needs it

        adamw = bitsandbytes.optim.AdamW8bit
    optimizer = adamw(param_groups(network, args), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 **scheduler_kwargs(args))
    model, optimizer, loader, lr_scheduler = accelerator.prepare(network, optimizer, loader, lr_scheduler)
    noise_scheduler = training_noise_scheduler(pipe)

    batches_per_epoch = len(loader)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = int(ckpt_state["global_step"])
        first_epoch = global_step // steps_per_epoch
        steps_into_epoch = global_step - first_epoch * steps_per_epoch
        skip_batches = min(steps_into_epoch * args.gradient_accumulation_steps, batches_per_epoch)
        if main_proc:
            print(f"resuming from {resume} at step {global_step}", file=sys.stderr)

    if main_proc:
        output_dir.mkdir(parents=True, exist_ok=True)
        logs_dir.mkdir(parents=True, exist_ok=True)
        if report_to:
            accelerator.init_trackers("dreambooth-lora", config={
                k: getattr(args, k) for k in ("rank", "learning_rate", "max_train_steps", "train_batch_size",
                                              "gradient_accumulation_steps", "lr_scheduler")})
    log_file = open_train_log(logs_dir / TRAIN_LOG, global_step) if main_proc else None
    if main_proc:
        running_training_summary(
            num_examples=len(dataset), batches_per_epoch=batches_per_epoch, num_epochs=num_epochs,
            batch_size=args.train_batch_size, accumulation=args.gradient_accumulation_steps,
            total_batch_size=args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
            max_steps=args.max_train_steps)

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="Steps", disable=not main_proc,
                    dynamic_ncols=True)
    losses: list[float] = []
    validation_images: list[str] = []
    first_step = global_step
    t_loop = time.time()
    step_loss = 0.0

    def state() -> dict:
        return {"global_step": global_step, "seed": seed, "method": args.method, "rank": args.rank,
                "alpha": args.alpha, "passport_schedule": args.passport_schedule, "targets": list(network.targets),
                "secret_kdf": secret_kdf, "train_text_encoder": train_te}

    validation_epochs = getattr(args, "validation_epochs", None)
    step_setup = LossSetup(network, vae, noise_scheduler, instance_emb, class_emb, args.prior_loss_weight,
                            args.passport_schedule if seal else None, dataset.latent_cache is not None, device,
                            weight_dtype, TextEncoding(pipe, args.instance_prompt, args.class_prompt, resolution)
                            if train_te else None, class_labels=bool(getattr(args, "class_labels_conditioning", None)))
    try:
        for epoch in range(first_epoch, num_epochs):
            sampler.use_epoch(epoch)
            epoch_loader = loader
            start_batch = 0
            if epoch == first_epoch and skip_batches:
                epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
                start_batch = skip_batches
            for batch_idx, batch in enumerate(epoch_loader, start=start_batch):
                with accelerator.accumulate(model):
                    gen = generator_for(seed, "step", epoch, batch_idx, accelerator.process_index)
                    loss = step_setup.loss(model, batch, gen, global_step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(network.trainable_parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().item() / args.gradient_accumulation_steps

                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                lr = lr_scheduler.get_last_lr()[0]
                losses.append(step_loss)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if main_proc:
                    log_file.write(json.dumps({"step": global_step, "loss": step_loss, "lr": lr,
                                               "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                                               "elapsed_s": round(time.time() - t_start, 3)}) + "\n")
                    log_file.flush()
                    if report_to:
                        accelerator.log({"loss": step_loss, "lr": lr}, step=global_step)
                    if progress_callback is not None:
                        done = global_step - first_step
                        left = (time.time() - t_loop) / done * (args.max_train_steps - global_step)
                        progress_callback(global_step, args.max_train_steps, step_loss, left)
                    if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                        path = save_checkpoint(accelerator, network, output_dir, global_step, state(),
                                               args.checkpoints_total_limit)
                        progress.write(f"saved checkpoint {path} (private: holds the passports)")
                    if (args.validation_prompt and not validation_epochs and global_step % args.validation_steps == 0
                            and global_step < args.max_train_steps):
                        validation_images += run_validation(pipe, network, args, seed, f"step-{global_step:06d}",
                                                            output_dir / "validation", accelerator.autocast)
                step_loss = 0.0
                if global_step >= args.max_train_steps:
                    break
            if global_step >= args.max_train_steps:
                break
            if main_proc and args.validation_prompt and validation_epochs and (epoch + 1) % validation_epochs == 0:
                validation_images += run_validation(pipe, network, args, seed, f"epoch-{epoch + 1:04d}",
                                                    output_dir / "validation", accelerator.autocast)
    finally:
        progress.close()
        if log_file is not None:
            log_file.close()

    network.eval()  # training is over: no --lora_dropout from here on (validation, export)
    train_seconds = time.time() - t_loop
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        _check_lock_step(network, accelerator)
    result: dict = {}
    if seal and args.passport_source == "random":
        network.assign_release_passports()  # the secret coin, after training: what makes verification exact
    if main_proc:
        network.set_passport("C" if seal else "identity")
        datasets = {"instance": (args.instance_prompt, len(instance_set))}
        if class_set is not None:
            datasets["class"] = (args.class_prompt, len(class_set))
        facts = training_metadata(resolution=resolution, num_images=len(instance_set), prompts=datasets,
                                  started_at=t_start, prediction_type=noise_scheduler.config.prediction_type,
                                  sd_model_name=public_base_label(src), unet_lr=args.learning_rate)
        if train_te:  # kohya's field: the text encoder's learning rate (the model card shows the rates anyway)
            facts["ss_text_encoder_lr"] = str(args.text_encoder_lr or args.learning_rate)
        result = write_outputs(network, args, src, output_dir, global_step, resolution, facts)
        if getattr(args, "push_to_hub", False):
            result["hub_url"] = push_public_files([result["lora_path"], result["diffusers_path"], result["model_card"]],
                                                  args.hub_model_id or output_dir.resolve().name, token=args.hub_token)
        if args.validation_prompt:
            validation_images += run_validation(pipe, network, args, seed, "final", output_dir / "validation",
                                                accelerator.autocast)
    if report_to:
        accelerator.end_training()
    steps_run = global_step - first_step
    result.update(
        method=args.method,
        output_dir=str(output_dir),
        steps=global_step,
        final_loss=losses[-1] if losses else None,
        losses=losses,
        validation_images=validation_images,
        train_log=str(logs_dir / TRAIN_LOG),
        train_seconds=train_seconds,
        steps_per_second=steps_run / train_seconds if train_seconds > 0 else float("nan"),
        total_seconds=time.time() - t_start,
        resolution=resolution,
        num_processes=accelerator.num_processes,
        is_main_process=main_proc,
    )
    result["network"] = network
    result["pipeline"] = pipe
    if accelerator.num_processes == 1:
        _reset_accelerate_state()
    return result



def _network_digest(network) -> str:
    h = hashlib.sha256()
    tensors = list(network.factors().items()) + (list(network.passports().items()) if network.is_seal else [])
    for name, pair in tensors:
        h.update(name.encode())
        for t in pair:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_lock_step(network, accelerator) -> None:
    """All processes must end with the same passports and factors (DDP keeps A, B in sync; C, C_p come from the
    broadcast secret). A mismatch would mean a wrong key, so it is an error, not a warning."""
    digests = gather_object([_network_digest(network)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes disagree on the trained network ({len(set(digests))} distinct states)")


def _reset_accelerate_state() -> None:
    """Let the next :func:`train` in this process (tests, the UI) use other accelerate settings."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

