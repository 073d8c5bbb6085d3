"""The training-step harness shared by bench_training.py and bench_vs_peft.py.

A "config" fixes the UNet, latent size, batch and precision; a "method" puts a LoRA on it:

* ``seal``  — :class:`seal_diffusion.core.network.SealNetwork` with random passports, C on even steps and C_p on odd steps
  (the ``alternate`` schedule the trainer uses);
* ``lora``  — the same class with ``passports=None`` (plain LoRA through our code: mode ``identity``, no r×r product);
* ``peft``  — diffusers' own PEFT LoRA, ``unet.add_adapter(LoraConfig(...))``, trainable params cast to fp32 as
  diffusers' ``train_dreambooth_lora.py`` does under mixed precision.

One step = what the trainer does per batch with cached latents: forward of the UNet on (noisy latents, timesteps,
text embeddings) under the config's autocast, MSE to a target, backward, AdamW step, zero_grad. The inputs are random
tensors prepared beforehand (identical for every method), so the step times the model only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json

import torch
import torch.nn.functional as F

CONFIGS = {
    # the embedded default (fp32, as the trainer runs it without --mixed_precision); trainer default batch 4
    "tiny": dict(unet="tiny", latent=32, batch=4, bf16=False, label="tiny default, 32² latents (64² px), fp32, batch 4"),
    # the real SD 1.5 architecture, random weights, bf16 weights + bf16 autocast (= --mixed_precision bf16)
    "sd15-256": dict(unet="sd15", latent=32, batch=1, bf16=True, label="SD 1.5 arch, 32² latents (256² px), bf16, batch 1"),
    "sd15-512": dict(unet="sd15", latent=64, batch=1, bf16=True, label="SD 1.5 arch, 64² latents (512² px), bf16, batch 1"),
    # SDXL: tiny-xl (SDXL block layout and module names, 560 targets, tiny widths) and the real SDXL base architecture
    # at a size a CPU can step (256² px; SDXL trains at 1024² on a GPU)
    "tiny-xl": dict(unet="tiny-xl", latent=32, batch=4, bf16=False, label="tiny-xl, 32² latents (64² px), fp32, batch 4"),
    "sdxl-256": dict(unet="sdxl", latent=32, batch=1, bf16=True, label="SDXL arch, 32² latents (256² px), bf16, batch 1"),
}
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    from seal_diffusion.models.tiny import TINY_UNET_CONFIG, TINY_XL_UNET_CONFIG, build_sd15_unet, build_sdxl_unet

    torch.manual_seed(seed)
    if kind in ("tiny", "tiny-xl"):
        unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if kind == "tiny" else TINY_XL_UNET_CONFIG))
    else:
        unet = (build_sdxl_unet if kind == "sdxl" else build_sd15_unet)("cpu", torch.bfloat16)
    unet.requires_grad_(False)
    unet.train()
    return unet


def make_inputs(unet, cfg: dict, n: int = 2, seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    c = unet.config
    out = []
    for _ in range(n):
        x = torch.randn(cfg["batch"], c.in_channels, cfg["latent"], cfg["latent"], generator=g).to(dtype)
        t = torch.randint(0, 1000, (cfg["batch"],), generator=g)
        ehs = torch.randn(cfg["batch"], 77, c.cross_attention_dim, generator=g).to(dtype)
        target = torch.randn(cfg["batch"], c.out_channels, cfg["latent"], cfg["latent"], generator=g)
        added = None
        if c.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 time ids
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            added = {"text_embeds": torch.randn(cfg["batch"], pooled, generator=g).to(dtype),
                     "time_ids": torch.tensor([[8.0 * cfg["latent"]] * 2 + [0.0, 0.0] + [8.0 * cfg["latent"]] * 2]
                                              * cfg["batch"]).to(dtype)}
        out.append((x, t, ehs, target, added))
    return out


class Adapter:
    """A LoRA method on a UNet, with activate/deactivate (for sharing one UNet) and the per-step passport switch."""

    def __init__(self, name, unet, params, activate=None, deactivate=None, set_step=None, n_modules=0):
        self.name, self.unet, self.params = name, unet, params
        self._activate, self._deactivate, self._set_step = activate, deactivate, set_step
        self.n_modules = n_modules

    def activate(self):
        if self._activate:
            self._activate()

    def deactivate(self):
        if self._deactivate:
            self._deactivate()

    def set_step(self, i: int):
        if self._set_step:
            self._set_step(i)


def make_adapter(method: str, unet, rank: int) -> Adapter:
    """Install ``method`` on ``unet``. ``seal``/``lora`` come back *deactivated* (unpatched) so several can share one
    UNet; ``peft`` changes the module tree and so needs a UNet of its own (it is always active)."""
    if method in ("seal", "lora"):
        from seal_diffusion.core.network import SealNetwork, find_target_modules
        from seal_diffusion.core.passport import make_passports

        passports = None
        if method == "seal":
            passports = make_passports(list(find_target_modules(unet)), rank, b"benchmark-secret")
        net = SealNetwork(unet, rank, rank, passports)
        net.remove()

        def activate():
            for layer in net.layers:
                layer.patch()

        def set_step(i):
            if method == "seal":
                net.set_passport("C" if i % 2 == 0 else "C_p")

        return Adapter(method, unet, net.trainable_parameters(), activate, net.remove, set_step, len(net.layers))
    if method == "peft":
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=PEFT_TARGETS))
        cast_training_params(unet, dtype=torch.float32)
        params = [p for p in unet.parameters() if p.requires_grad]
        return Adapter("peft", unet, params, n_modules=len(params) // 2)
    raise ValueError(method)


def make_step(adapter: Adapter, inputs: list[tuple], bf16: bool, lr: float = 1e-4):
    """A closure running one training step of ``adapter`` (the adapter must be active when it is called)."""
    opt = torch.optim.AdamW(adapter.params, lr=lr, weight_decay=1e-2)
    unet = adapter.unet
    state = {"i": 0}

    def step():
        i = state["i"]
        adapter.set_step(i)
        x, t, ehs, target, added = inputs[i % len(inputs)]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            pred = unet(x, t, ehs, added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["i"] = i + 1
        return float(loss.detach())

    return step


def memory_worker(config: str, method: str, rank: int, steps: int) -> dict:
    """In a fresh process: build, install, then reset the peak-RSS counter and run 1 + ``steps`` training steps.

    Reports RSS after setup (model + adapter), the peak RSS during the steps, and their difference (optimizer state,
    gradients, activations and whatever the allocator keeps), all in MiB.
    """
    import time

    from _common import peak_rss_kib, reset_peak_rss, rss_kib

    cfg = CONFIGS[config]
    unet = build_unet(cfg["unet"])
    adapter = make_adapter(method, unet, rank)
    adapter.activate()
    inputs = make_inputs(unet, cfg)
    step = make_step(adapter, inputs, cfg["bf16"])
    gc.collect()
    setup = rss_kib()
    ok = reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(1 + steps):
        step()
    elapsed = time.perf_counter() - t0
    peak = peak_rss_kib()
    return dict(config=config, method=method, rank=rank, steps=1 + steps, setup_mib=setup / 1024,
                peak_mib=peak / 1024, delta_mib=(peak - setup) / 1024, peak_reset=ok, seconds=elapsed,
                n_modules=adapter.n_modules)


def copy_unet(unet):
    return copy.deepcopy(unet)


# -- the command line both step benchmarks share ----------------------------------------------------------------------
def step_bench_parser(description: str, sd15_res_default: list[str], sd15_res_help: str) -> argparse.ArgumentParser:
    """Options of bench_training.py and bench_vs_peft.py: configs, rank, repetitions, memory, JSON, worker mode."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny default model only")
    p.add_argument("--sd15", action="store_true", help="also the real SD 1.5 architecture (random weights)")
    p.add_argument("--sd15-res", nargs="+", default=sd15_res_default, choices=["256", "512"], help=sd15_res_help)
    p.add_argument("--sdxl", action="store_true",
                   help="also SDXL: tiny-xl, and the real SDXL base architecture at 256² (random weights, ~10 GB RAM)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--reps", type=int, default=None, help="timed steps per method (default 12 tiny, 3 SD 1.5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the per-process peak-memory measurement")
    p.add_argument("--json", metavar="OUT", help="write results as JSON")
    p.add_argument("--_worker", nargs=4, metavar=("CONFIG", "METHOD", "RANK", "STEPS"), help=argparse.SUPPRESS)
    return p


def start(args) -> tuple[dict, list[str]] | None:
    """Worker mode (``--_worker``): run :func:`memory_worker`, print its JSON and return None. Otherwise print the
    machine and return (machine info, the configs to run)."""
    import _common as C

    if args._worker:
        config, method, rank, steps = args._worker
        print(json.dumps(memory_worker(config, method, int(rank), int(steps))))
        return None
    info = C.machine_info()
    C.print_machine(info)
    configs = ["tiny"] + ([f"sd15-{r}" for r in args.sd15_res] if args.sd15 and not args.quick else [])
    configs += ["tiny-xl"] + (["sdxl-256"] if not args.quick else []) if args.sdxl else []
    return info, configs


def reps_for(args, config: str) -> int:
    return args.reps or (12 if config.startswith("tiny") else 3)
