"""The embedded default model: a tiny, SD-1.5-shaped pipeline built offline from configs.

No Stable Diffusion weights can be downloaded everywhere this tool runs (CI, air-gapped machines), so the demo and the
tests use a pipeline with the same module names as SD 1.5 (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
…) but small sizes and *seeded* random weights: every machine builds the same bytes. It is built on first use (about a
second) and cached as an ordinary diffusers folder under ``$SEAL_DIFFUSION_CACHE`` (default
``~/.cache/seal-diffusion``).

``tiny-xl`` is the same idea for SDXL (:func:`build_tiny_xl_pipeline`): the SDXL UNet's block layout and module names
(three levels, 1/2/10 transformer blocks, 140 Attention modules, the ``text_time`` added conditioning), two text
encoders (the second with a projection, giving the pooled embedding) and an Euler scheduler with SDXL's settings, at
tiny widths and with seeded random weights.

Also here, for tests and benchmarks: a tiny UNet whose attention has added K/V projections (SimpleCrossAttn blocks, as
in DeepFloyd IF and Kandinsky), and the real SD 1.5 and SDXL UNet architectures from their configs with random (or
meta) weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_NAME = "tiny"
TINY_XL_NAME = "tiny-xl"
TINY_VERSION = "v1"  # bump when the recipe changes, so old caches are not reused
TINY_SEED = 20250116  # the SEAL paper's arXiv month, nothing deeper

# Stable Diffusion 1.5's scheduler settings (PNDM, scaled-linear betas), shared by tiny and real pipelines.
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
)

# The real SD 1.5 UNet (859.5 M params, 32 Attention modules, 128 to_q/k/v/out.0 Linear layers).
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

TINY_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

# The real SDXL base UNet (2.57 B params, 140 Attention modules, 560 to_q/k/v/out.0 Linear layers).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

# tiny-xl: SDXL's block types and transformer depths (so the same module names), tiny widths. The added conditioning
# is the pooled text embedding (text_encoder_2's projection, 32) plus 6 time ids × 8 = 80 inputs; the cross-attention
# context is both encoders' hidden states side by side (32 + 32 = 64).
TINY_XL_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG,
    sample_size=32,
    block_out_channels=(32, 64, 64),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)

# SDXL's scheduler settings (Euler, scaled-linear betas, leading spacing), shared by tiny-xl and real SDXL pipelines.
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)

TINY_ADDED_KV_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)


def cache_dir() -> Path:
    """Where built models are cached: ``$SEAL_DIFFUSION_CACHE`` or ``~/.cache/seal-diffusion``."""
    env = os.environ.get("SEAL_DIFFUSION_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "seal-diffusion"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_tokenizer():
    """An offline byte-level CLIP tokenizer (256 byte symbols, each also with ``</w>``, plus the two specials)."""
    from transformers import CLIPTokenizer  # lazy: transformers is slow to import

    symbols = _byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_components(seed: int = TINY_SEED) -> dict:
    """Build the tiny pipeline's components from configs with seeded random weights (same bytes on every machine)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel  # lazy: diffusers takes ~5 s to import
    from transformers import CLIPTextModel  # lazy: transformers is slow to import

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    scheduler = PNDMScheduler(**SD15_SCHEDULER)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _tiny_vae(**extra):
    from diffusers import AutoencoderKL  # lazy: diffusers takes ~5 s to import

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        **extra,
    )


def _tiny_text_config(tokenizer, **extra):
    from transformers import CLIPTextConfig  # lazy: transformers is slow to import

    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_xl_components(seed: int = TINY_SEED) -> dict:
    """The tiny-xl pipeline's components (SDXL layout, tiny widths, seeded weights; same bytes on every machine)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel  # lazy: diffusers takes ~5 s to import
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # lazy: transformers is slow to import

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    torch.manual_seed(seed + 10)
    unet = UNet2DConditionModel(**TINY_XL_UNET_CONFIG)
    torch.manual_seed(seed + 11)
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=False)
    torch.manual_seed(seed + 12)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    torch.manual_seed(seed + 13)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, projection_dim=32))
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=scheduler)


def build_tiny_xl_pipeline(seed: int = TINY_SEED):
    """A fresh tiny ``StableDiffusionXLPipeline`` (not cached; no invisible-watermark post-processing)."""
    from diffusers import StableDiffusionXLPipeline  # lazy: diffusers takes ~5 s to import

    return StableDiffusionXLPipeline(**build_tiny_xl_components(seed), add_watermarker=False)


def build_tiny_pipeline(seed: int = TINY_SEED):
    """A fresh tiny ``StableDiffusionPipeline`` (not cached)."""
    from diffusers import StableDiffusionPipeline  # lazy: diffusers takes ~5 s to import

    return StableDiffusionPipeline(
        **build_tiny_components(seed), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def write_tiny_model(out: str | os.PathLike, *, xl: bool = False) -> Path:
    """Write the embedded default (``xl``: tiny-xl) as a diffusers folder that ``StableDiffusionPipeline`` (or
    ``StableDiffusionXLPipeline``) ``.from_pretrained(out)`` loads.

    The folder is written to a temp sibling and renamed into place, so a crash never leaves half a model.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (build_tiny_xl_pipeline() if xl else build_tiny_pipeline()).save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_model_dir(xl: bool = False) -> Path:
    """The cached diffusers folder of the embedded default (``xl``: tiny-xl), built on first use."""
    target = cache_dir() / (f"tiny-sdxl-{TINY_VERSION}" if xl else f"tiny-sd15-{TINY_VERSION}")
    if not (target / "model_index.json").exists():
        try:
            write_tiny_model(target, xl=xl)
        except OSError:
            # another process may have won the race to the rename; use its folder if complete
            if not (target / "model_index.json").exists():
                raise
    return target


def build_added_kv_unet(seed: int = TINY_SEED):
    """A tiny UNet whose Attention modules have ``add_k_proj``/``add_v_proj`` (SimpleCrossAttn blocks)."""
    from diffusers import UNet2DConditionModel  # lazy: diffusers takes ~5 s to import

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_ADDED_KV_UNET_CONFIG)


def build_sd15_unet(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """The real SD 1.5 UNet architecture with random weights; on ``meta`` (default) only names and shapes exist."""
    from diffusers import UNet2DConditionModel  # lazy: diffusers takes ~5 s to import

    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return unet.to(dtype) if device != "meta" else unet


def build_sdxl_unet(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """The real SDXL base UNet architecture with random weights; on ``meta`` (default) only names and shapes exist."""
    from diffusers import UNet2DConditionModel  # lazy: diffusers takes ~5 s to import

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return unet.to(dtype) if device != "meta" else unet
