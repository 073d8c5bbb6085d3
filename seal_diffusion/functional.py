"""The function-level ownership test: does the suspect *behave* like the release, on the release coin's side?

Why. The weight test (:mod:`seal_diffusion.verify`) recovers the passport from each layer's ΔW. A thief who
*distils* the release — trains a fresh LoRA to reproduce its noise predictions — keeps the LoRA's effect but not its
per-layer weights, and the weight test finds nothing. The release coin is still in the function, and this module
tests it there.

How. Per key module l let M_l = (C_l + C_p,l)/2 and D_l = (C_l − C_p,l)/2 (C the released passport). The owner's
network with passport M_l + t_l·D_l in every layer (:meth:`SealNetwork.set_interp`) is f(t): t = 1 is the release,
t = 0 the midpoint. On secret probes (noise latents, timesteps, prompts):

* f_mid = f(0) does not depend on the coins (M is symmetric in C, C_p);
* the direction of layer l, g_l = (f(+h·e_l) − f(−h·e_l)) / 2h (a central difference, h = 1 by default: the
  secant from C_p to C; h → 0 gives ∂f/∂t_l), flips sign exactly with layer l's coin and with nothing else;
* the suspect's residual r = f_suspect − f_mid is coin-independent when the suspect does not derive from the release.

The statistic is the least-squares fit of r on all directions at once, t̂ = (GᵀG + λI)⁻¹ Gᵀ r (``ls``, the default):
it removes the cross-talk between layers that makes the plain projections ⟨r, g_l⟩ (``projection``) noisy. With
E = diag(coins), G = G₀·E, so t̂ = E·t̂₀ where t̂₀ depends on nothing coin-related under H0: the signs of t̂ are fair
independent coins and :func:`seal_diffusion.verify.sign_flip_neg_log10_p` gives an **exact** p-value (floor 2^−L).
A copy of the release has t̂ ≈ 1 in every layer.

Probes come from a seed that is SHA-256 over the key's passports, each module's pair hashed in a coin-symmetric order
(so the probes carry no information on the coin, and nobody without C_p can compute them). What the owner needs —
probes, f_mid and the directions G — is computed once per (key, base model, probe settings) and kept **private**
beside the key (:func:`cache_path`; safetensors, mode 0600), bound to the key's commitment and a SHA-256 of the base
UNet's weights; a cache that does not match is recomputed. At verify time only the suspect's forward on the probes
remains.

UNet modules only: the probes are UNet forwards, so a key's text-encoder modules (``--train_text_encoder``) are skipped
here; the weight test covers them.

Combined verdict: with both tests the reported p is Bonferroni's p = min(1, 2·min(p_weight, p_functional)), which
keeps the false-positive rate of "either test fires" at the threshold whatever the dependence between the tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .conditioning import Conditioning, encode_text
from .errors import UserError
from .keyfile import SealKey
from .network import network_from_key

CACHE_FORMAT = "sealkey-functional"
CACHE_VERSION = "1"
DEFAULT_PROBES = 8
DEFAULT_H = 1.0
DEFAULT_RIDGE = 1e-2  # λ relative to the mean diagonal of GᵀG (measured best of 0…1; 0 lets ill-posed layers blow up)
TIMESTEP_RANGE = (50, 950)
STATISTICS = ("ls", "projection")
GENERIC_PROMPTS = (
    "a photo of a cat", "a photo of a dog", "a landscape with mountains", "a portrait of a person",
    "a city street at night", "a bowl of fruit on a table", "an oil painting of a ship", "a red car",
)
LOG10_2 = math.log10(2.0)


# -- secrets and probes ---------------------------------------------------------------------------------------------
def probe_secret(key: SealKey) -> bytes:
    """SHA-256 over every module's passport pair, each pair in byte order (coin-symmetric); needs C_p, so secret."""
    h = hashlib.sha256(b"seal-functional-probes-v1\0")
    for name in sorted(key.modules):
        mk = key.modules[name]
        pair = sorted([mk.passport.float().contiguous().numpy().tobytes(),
                       mk.passport_p.float().contiguous().numpy().tobytes()])
        h.update(name.encode() + b"\0" + pair[0] + pair[1])
    return h.digest()


def base_fingerprint(unet: torch.nn.Module) -> str:
    """SHA-256 over the base UNet's weights (name, shape, dtype, bytes): the cache is valid for this base only."""
    h = hashlib.sha256(b"seal-base-unet-v1\0")
    for name, t in unet.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def instance_prompt_near(key_path: str | os.PathLike | None) -> str | None:
    """The instance prompt of the model card (``README.md``) beside the key, if there is one."""
    if key_path is None:
        return None
    card = Path(key_path).with_name("README.md")
    if not card.is_file():
        return None
    for line in card.read_text(errors="replace").splitlines()[:30]:
        if line.startswith("instance_prompt:"):
            value = line.partition(":")[2].strip()
            try:
                value = json.loads(value)
            except ValueError:
                pass
            return str(value) or None
    return None


def probe_prompts(instance_prompt: str | None, extra: list[str] | None = None) -> list[str]:
    """The prompt pool: the instance prompt (when known) and ``extra`` first, then generic prompts."""
    first = [p for p in ([instance_prompt] if instance_prompt else []) + list(extra or []) if p]
    return first + [p for p in GENERIC_PROMPTS if p not in first]


def probe_size(unet) -> int:
    """Default probe latent side: the model's sample size (32 on the tiny default, 64 on SD 1.5). Half of it costs
    ~4× less per probe and, on the tiny default, ~1.5 less −log10 p at 8 probes (measured: 11.8 vs 13.3)."""
    cfg = unet.config
    return int(cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0])


def check_probe_size(unet, size: int) -> int:
    step = 2 ** (len(unet.config.block_out_channels) - 1)
    if size < step or size % step:
        raise UserError(f"--probe-size {size}: must be a positive multiple of {step} for this UNet")
    return size


@dataclass
class Probes:
    latents: torch.Tensor  # n × c × h × w
    timesteps: torch.Tensor  # n (int64)
    cond: Conditioning  # the prompts' UNet conditioning (SD 1.x: text states; SDXL: + pooled text, time ids)
    prompts: list[str]  # the prompt of each probe

    @property
    def n(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def make_probes(pipe, key: SealKey, n: int, prompts: list[str], size: int | None = None) -> Probes:
    """``n`` probes from the key's secret: N(0, I) latents (``size``² each; default the model's sample size),
    timesteps in [50, 950], prompts — half the probes use the first prompt of the pool (the instance prompt), the
    rest are drawn from the whole pool."""
    if n < 1:
        raise UserError(f"--probes {n}: need at least 1 probe")
    seed = int.from_bytes(probe_secret(key)[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    size = size or probe_size(pipe.unet)
    latents = torch.randn((n, cfg.in_channels, size, size), generator=gen)
    timesteps = torch.randint(TIMESTEP_RANGE[0], TIMESTEP_RANGE[1] + 1, (n,), generator=gen)
    picks = torch.randint(0, len(prompts), (n,), generator=gen).tolist()
    chosen = [prompts[0] if i % 2 == 0 else prompts[k] for i, k in enumerate(picks)]
    device = next(pipe.text_encoder.parameters()).device
    cache: dict[str, Conditioning] = {}
    cond = Conditioning.cat([cache.setdefault(p, encode_text(pipe, p, device).to("cpu", torch.float32))
                             for p in chosen])
    return Probes(latents, timesteps, cond, chosen)


# -- the owner's side: f_mid and the directions ---------------------------------------------------------------------
def owner_network(unet, key: SealKey):
    """The key's SEAL network (raw A, B; both passports) on ``unet`` — its UNet modules only, a key's text-encoder
    modules are skipped; remove it with ``.remove()``."""
    net = network_from_key(key, unet, text_encoders=False)
    p = next(unet.parameters())
    net.to(p.device)
    return net


def _unet_out(unet, latents, timesteps, cond: Conditioning) -> torch.Tensor:
    p = next(unet.parameters())
    out = unet(latents.to(p.device, p.dtype), timesteps.to(p.device), **cond.to(p.device, p.dtype).unet_kwargs()).sample
    return out.float().cpu()


@torch.no_grad()
def owner_directions(unet, key: SealKey, probes: Probes, h: float = DEFAULT_H, chunk: int = 128,
                     progress=None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(f_mid: n × out, G: L × n × out, module names) with the central differences of the module docstring.

    Every probe runs 2L + 1 passport settings (t = 0, +h·e_l, −h·e_l) batched with one t per sample."""
    net = owner_network(unet, key)
    try:
        names = net.module_names
        L = len(names)
        configs = torch.zeros(L, 2 * L + 1)
        for l in range(L):
            configs[l, 1 + l] = h
            configs[l, 1 + L + l] = -h
        p = next(unet.parameters())
        f_mid, dirs = [], []
        for i in range(probes.n):
            outs = []
            for s in range(0, 2 * L + 1, chunk):
                t = configs[:, s:s + chunk]
                net.set_interp(t.to(p.device, p.dtype))
                k = t.shape[1]
                outs.append(_unet_out(unet, probes.latents[i:i + 1].expand(k, -1, -1, -1),
                                      probes.timesteps[i:i + 1].expand(k), probes.cond.index(slice(i, i + 1)).expand(k)))
            out = torch.cat(outs)
            f_mid.append(out[0])
            dirs.append((out[1:1 + L] - out[1 + L:]) / (2 * h))
            if progress:
                progress(i + 1, probes.n)
        return torch.stack(f_mid), torch.stack(dirs, 1), names
    finally:
        net.remove()


# -- the private cache ----------------------------------------------------------------------------------------------
@dataclass
class OwnerCache:
    probes: Probes
    f_mid: torch.Tensor  # n × out
    directions: torch.Tensor  # L × n × out
    modules: list[str]
    h: float
    commitment: str
    base: str  # base fingerprint

    @property
    def n_modules(self) -> int:
        return len(self.modules)


def cache_path(key_path: str | os.PathLike, base_fp: str) -> Path:
    """``NAME.sealkey`` → ``NAME.sealkey.functional-<base fingerprint[:12]>.safetensors`` (private, beside it)."""
    key_path = Path(key_path)
    return key_path.with_name(f"{key_path.name}.functional-{base_fp[:12]}.safetensors")


def _settings(n: int, prompts: list[str], h: float, size: int) -> str:
    return json.dumps({"n": n, "prompts": prompts, "h": h, "t": list(TIMESTEP_RANGE), "size": size})


def save_cache(cache: OwnerCache, path: str | os.PathLike, settings: str) -> Path:
    """Write atomically with mode 0600 (set on the temp file before the rename)."""
    from safetensors.torch import save

    from .fileio import atomic_write

    cond = cache.probes.cond
    tensors = {"latents": cache.probes.latents, "timesteps": cache.probes.timesteps, "hidden": cond.encoder_hidden_states,
               "f_mid": cache.f_mid, "directions": cache.directions}
    if cond.text_embeds is not None:  # SDXL
        tensors.update(text_embeds=cond.text_embeds, time_ids=cond.time_ids)
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "commitment": cache.commitment, "base": cache.base,
            "settings": settings, "modules": json.dumps(cache.modules),
            "probe_prompts": json.dumps(cache.probes.prompts),
            "h": repr(cache.h)}
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    with atomic_write(path, what="functional cache", private=True) as tmp:  # 0600, like the key
        tmp.write_bytes(data)
    return Path(path)


def load_cache(path: str | os.PathLike, commitment: str, base_fp: str, settings: str) -> OwnerCache | None:
    """The cache at ``path`` if it exists and is bound to this key, base and settings; else None."""
    from .fileio import load_safetensors

    path = Path(path)
    if not path.is_file():
        return None
    try:
        t, meta = load_safetensors(path, what="functional cache")
    except UserError:
        return None
    if (meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION
            or meta.get("commitment") != commitment or meta.get("base") != base_fp or meta.get("settings") != settings):
        return None
    try:
        cond = Conditioning(t["hidden"], t.get("text_embeds"), t.get("time_ids"))
        probes = Probes(t["latents"], t["timesteps"], cond, json.loads(meta["probe_prompts"]))
        return OwnerCache(probes, t["f_mid"], t["directions"], json.loads(meta["modules"]), float(meta["h"]),
                          commitment, base_fp)
    except (KeyError, ValueError):
        return None


def cached(key: SealKey, unet, key_path, *, n_probes: int = DEFAULT_PROBES, prompts: list[str] | None = None,
           h: float = DEFAULT_H, base_fp: str | None = None, size: int | None = None) -> OwnerCache | None:
    """The private cache beside ``key_path`` if it matches (key, base UNet, settings) — needs only the UNet."""
    if key_path is None:
        return None
    prompts = prompts or probe_prompts(instance_prompt_near(key_path))
    base_fp = base_fp or base_fingerprint(unet)
    size = check_probe_size(unet, size or probe_size(unet))
    return load_cache(cache_path(key_path, base_fp), key.commitment(), base_fp, _settings(n_probes, prompts, h, size))


def load_unet(base: str, config=None):
    """Only the base UNet (no text encoder, no transformers import) for a tiny/folder base; else the pipeline's."""
    from .base_model import load_pipeline, resolve_base

    src = resolve_base(base)
    if src.kind in ("tiny", "folder"):
        from diffusers import UNet2DConditionModel

        if src.kind == "tiny":
            from .tiny import tiny_model_dir

            location = tiny_model_dir()
        else:
            location = src.location
        try:
            return UNet2DConditionModel.from_pretrained(location, subfolder="unet", local_files_only=True)
        except Exception:  # an unusual folder: let the full loader explain what is wrong
            pass
    return load_pipeline(base, config=config).unet


def owner_cache(key: SealKey, pipe, *, key_path=None, n_probes: int = DEFAULT_PROBES, prompts: list[str] | None = None,
                h: float = DEFAULT_H, base_fp: str | None = None, use_cache: bool = True, progress=None,
                size: int | None = None) -> OwnerCache:
    """The owner's probes, f_mid and directions: from the private cache beside ``key_path`` when it matches, else
    computed (and cached when ``key_path`` is given and ``use_cache``)."""
    prompts = prompts or probe_prompts(instance_prompt_near(key_path))
    base_fp = base_fp or base_fingerprint(pipe.unet)
    commitment = key.commitment()
    size = check_probe_size(pipe.unet, size or probe_size(pipe.unet))
    settings = _settings(n_probes, prompts, h, size)
    path = cache_path(key_path, base_fp) if key_path is not None else None
    if path is not None and use_cache:
        cached = load_cache(path, commitment, base_fp, settings)
        if cached is not None:
            return cached
    probes = make_probes(pipe, key, n_probes, prompts, size)
    f_mid, dirs, names = owner_directions(pipe.unet, key, probes, h, progress=progress)
    cache = OwnerCache(probes, f_mid, dirs, names, h, commitment, base_fp)
    if path is not None and use_cache:
        save_cache(cache, path, settings)
    return cache


# -- the suspect's side ---------------------------------------------------------------------------------------------
def merge_lora_into(unet, path) -> dict[str, torch.Tensor]:
    """Add a LoRA file's ΔW = up·down (scale in up) to the matching Linear layers of ``unet``; returns the original
    weights of the changed layers (for :func:`restore_weights`)."""
    from .lora_file import read_lora

    lora = read_lora(path)
    linears = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    found = lora.by_module(list(linears))
    originals = {}
    with torch.no_grad():
        for name, (down, up) in found.items():
            w = linears[name].weight
            if tuple(w.shape) != (up.shape[0], down.shape[1]):
                raise UserError(f"{path}: {name} is {down.shape[1]}→{up.shape[0]}, the base layer is "
                                f"{w.shape[1]}→{w.shape[0]} (another base model?)")
            originals[name] = w.detach().clone()
            w.add_((up.double() @ down.double()).to(w.dtype).to(w.device))
    if not found:
        raise UserError(f"{path}: none of its layers match the base model's UNet (wrong base?)")
    return originals


@torch.no_grad()
def restore_weights(unet, originals: dict[str, torch.Tensor]) -> None:
    for name, w in originals.items():
        unet.get_submodule(name).weight.copy_(w)


@torch.no_grad()
def suspect_outputs(unet, probes: Probes, chunk: int = 16) -> torch.Tensor:
    """The suspect UNet's noise predictions on the probes (n × out)."""
    return torch.cat([_unet_out(unet, probes.latents[s:s + chunk], probes.timesteps[s:s + chunk],
                                probes.cond.index(slice(s, s + chunk))) for s in range(0, probes.n, chunk)])


# -- the test ---------------------------------------------------------------------------------------------------------
@dataclass
class FunctionalReport:
    detected: bool
    neg_log10_p: float
    threshold: float
    statistic: str
    n_probes: int
    n_modules: int
    n_positive: int
    per_module: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"neg_log10_p": self.neg_log10_p, "detected": self.detected, "threshold": self.threshold,
                "statistic": self.statistic, "n_probes": self.n_probes, "n_modules": self.n_modules,
                "n_positive": self.n_positive, "per_module": self.per_module}


def module_stats(cache: OwnerCache, f_suspect: torch.Tensor, statistic: str = "ls", ridge: float = DEFAULT_RIDGE,
                 n_probes: int | None = None) -> torch.Tensor:
    """Per-module statistic d (length L) whose signs are fair coins under H0 (see module docstring)."""
    if statistic not in STATISTICS:
        raise UserError(f"functional statistic {statistic!r}: expected one of {', '.join(STATISTICS)}")
    n = n_probes or cache.probes.n
    g = cache.directions[:, :n].reshape(cache.n_modules, -1).double()  # L × N
    r = (f_suspect[:n] - cache.f_mid[:n]).reshape(-1).double()
    gr = g @ r
    if statistic == "projection":
        return gr / g.norm(dim=1).clamp_min(1e-30)
    gram = g @ g.T
    lam = ridge * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), gr)


def functional_test(cache: OwnerCache, f_suspect: torch.Tensor, threshold: float = 3.3, statistic: str = "ls",
                    n_probes: int | None = None) -> FunctionalReport:
    from .verify import sign_flip_neg_log10_p

    d = module_stats(cache, f_suspect, statistic, n_probes=n_probes)
    nlp = sign_flip_neg_log10_p(d.tolist())
    per = [{"module": m, "stat": float(v)} for m, v in zip(cache.modules, d)]
    return FunctionalReport(nlp >= threshold, nlp, threshold, statistic, n_probes or cache.probes.n,
                            cache.n_modules, int((d > 0).sum()), per)


def combined_neg_log10_p(*nlps: float) -> float:
    """Bonferroni over k tests: p = min(1, k·min p) → −log10 p = max(0, max −log10 p_i − log10 k)."""
    return max(0.0, max(nlps) - math.log10(len(nlps)))


def verify_functional(key: SealKey | str | os.PathLike, suspect_path: str | os.PathLike, base: str, *,
                      threshold: float = 3.3, n_probes: int = DEFAULT_PROBES, prompts: list[str] | None = None,
                      statistic: str = "ls", config=None, key_path=None, use_cache: bool = True,
                      pipe=None, size: int | None = None) -> FunctionalReport:
    """Load the base, get the owner's cache, load the suspect into the base UNet and run the test.

    ``suspect_path``: a LoRA file/folder (merged into the base UNet) or a full model (its UNet is used)."""
    from .base_model import load_pipeline
    from .verify import _is_checkpoint_path

    if isinstance(key, (str, os.PathLike)):
        key_path = key_path or key
        key = SealKey.load(key)
    if not base:
        raise UserError("--functional needs --base MODEL (the base model the LoRA was trained on)")
    suspect_path = Path(suspect_path)
    if not suspect_path.exists():
        raise UserError(f"{suspect_path}: suspect not found")
    base_unet = pipe.unet if pipe is not None else load_unet(base, config)  # enough when the cache is warm
    fp = base_fingerprint(base_unet)
    cache = cached(key, base_unet, key_path, n_probes=n_probes, prompts=prompts, base_fp=fp, size=size) \
        if use_cache else None
    if cache is None:
        pipe = pipe or load_pipeline(base, config=config)
        cache = owner_cache(key, pipe, key_path=key_path, n_probes=n_probes, prompts=prompts, base_fp=fp,
                            use_cache=use_cache, size=size)
        base_unet = pipe.unet
    if _is_checkpoint_path(suspect_path):
        unet = load_unet(str(suspect_path), config)
    else:
        unet = base_unet
        originals = merge_lora_into(unet, suspect_path)
        try:
            f_s = suspect_outputs(unet, cache.probes)
        finally:
            restore_weights(unet, originals)
        return functional_test(cache, f_s, threshold, statistic)
    f_s = suspect_outputs(unet, cache.probes)
    return functional_test(cache, f_s, threshold, statistic)


# -- both tests -------------------------------------------------------------------------------------------------------
@dataclass
class CombinedReport:
    """The weight test and the function-level test of one suspect, and the Bonferroni-combined verdict."""

    weight: object  # seal_diffusion.verify.VerifyReport
    functional: FunctionalReport
    threshold: float

    @property
    def neg_log10_p(self) -> float:
        return combined_neg_log10_p(self.weight.neg_log10_p, self.functional.neg_log10_p)

    @property
    def detected(self) -> bool:
        return self.neg_log10_p >= self.threshold

    def to_json(self) -> dict:
        d = self.weight.to_json()
        d["neg_log10_p"], d["detected"] = self.neg_log10_p, self.detected
        d["correction"] = "bonferroni: p = min(1, 2·min(p_weight, p_functional))"
        d["weight"] = {"neg_log10_p": self.weight.neg_log10_p, "detected": self.weight.detected,
                       "statistic": self.weight.statistic, "n_modules": self.weight.n_modules}
        d["functional"] = self.functional.to_json()
        return d

    def summary(self) -> str:
        w, f = self.weight, self.functional
        verdict = "DETECTED: this is a copy of your LoRA" if self.detected else "not detected"
        return (f"{w.suspect}: {verdict} (combined −log10 p = {self.neg_log10_p:.1f}, threshold {self.threshold})\n"
                f"  weight test:     −log10 p = {w.neg_log10_p:.1f} ({w.n_modules} modules, "
                f"{w.n_modules_missing} missing)\n"
                f"  function test:   −log10 p = {f.neg_log10_p:.1f} ({f.n_positive} of {f.n_modules} layers on the "
                f"release's side, {f.n_probes} probes)"
                + "".join("\n" + line for line in w.summary().splitlines()[1:]))  # floor and commitment notes


def verify_both(key_path: str | os.PathLike, suspect_path: str | os.PathLike, base: str, *,
                threshold: float = 3.3, statistic: str = "contrast", n_probes: int = DEFAULT_PROBES,
                prompts: list[str] | None = None, config=None, use_cache: bool = True, pipe=None,
                size: int | None = None, commitment: str | None = None) -> CombinedReport:
    """``verify --functional``: both tests, each judged at ``threshold`` alone, and the combined verdict.

    ``suspect_path``: one LoRA file/folder or merged model (a one-element list is accepted, as the CLI passes it);
    ``commitment``: the published commitment the key must match.
    """
    from .verify import verify_path

    if not base:
        raise UserError("--functional needs --base MODEL (the base model the LoRA was trained on)")
    paths = [suspect_path] if isinstance(suspect_path, (str, os.PathLike)) else list(suspect_path)
    if len(paths) != 1:
        raise UserError(f"--functional tests one suspect (a LoRA file or folder, or a merged model), got {len(paths)}"
                        "; files used together are tested by verify without --functional")
    suspect_path = paths[0]
    key = SealKey.load(key_path)
    weight = verify_path(key, suspect_path, base=base, threshold=threshold, statistic=statistic, config=config,
                         commitment=commitment)
    func = verify_functional(key, suspect_path, base, threshold=threshold, n_probes=n_probes, prompts=prompts,
                             config=config, key_path=key_path, use_cache=use_cache, pipe=pipe, size=size)
    return CombinedReport(weight, func, threshold)
