"""What the UNet is conditioned on, for SD 1.x and SDXL alike: one object the trainer and the evaluators pass around.

SD 1.x conditions its UNet on the text encoder's hidden states alone. SDXL (diffusers' ``train_dreambooth_lora_sdxl.py``
does the same) conditions on both text encoders' penultimate hidden states side by side, plus ``added_cond_kwargs``:
the pooled, projected embedding of the second encoder (``text_embeds``) and six *time ids* — original size, crop
top-left, target size — (``time_ids``). :func:`encode_text` builds either from a loaded pipeline through the
pipeline's own ``encode_prompt``, so the conditioning is exactly what generation uses; :meth:`Conditioning.unet_kwargs`
is what ``unet(noisy, t, **cond.unet_kwargs())`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base_model import is_sdxl


@dataclass
class Conditioning:
    """UNet conditioning for a batch: hidden states (n × L × d) and, for SDXL, pooled text (n × p) and time ids (n × 6)."""

    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def expand(self, n: int) -> "Conditioning":
        """The same conditioning for a batch of ``n`` (from a batch of 1), without copying."""
        if self.batch == n:
            return self
        if self.batch != 1:
            raise ValueError(f"cannot expand a conditioning batch of {self.batch} to {n}")
        ex = lambda t: None if t is None else t.expand(n, *t.shape[1:])  # noqa: E731
        return Conditioning(ex(self.encoder_hidden_states), ex(self.text_embeds), ex(self.time_ids))

    def to(self, device=None, dtype=None) -> "Conditioning":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return Conditioning(mv(self.encoder_hidden_states), mv(self.text_embeds), mv(self.time_ids))

    def index(self, idx) -> "Conditioning":
        """Rows ``idx`` of the batch (a slice, an index tensor or a list)."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Conditioning(pick(self.encoder_hidden_states), pick(self.text_embeds), pick(self.time_ids))

    def detach(self) -> "Conditioning":
        det = lambda t: None if t is None else t.detach()  # noqa: E731
        return replace(self, encoder_hidden_states=det(self.encoder_hidden_states), text_embeds=det(self.text_embeds),
                       time_ids=det(self.time_ids))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        first = items[0]
        cat = lambda f: None if getattr(first, f) is None else torch.cat([getattr(c, f) for c in items])  # noqa: E731
        return Conditioning(cat("encoder_hidden_states"), cat("text_embeds"), cat("time_ids"))

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kw


def time_ids(size: int | tuple[int, int], *, crop_top_left: tuple[int, int] = (0, 0),
             original_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """SDXL's six micro-conditioning numbers (original h, w, crop top, left, target h, w) as a 1 × 6 tensor."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    original = target if original_size is None else (
        (original_size, original_size) if isinstance(original_size, int) else tuple(original_size))
    return torch.tensor([[*original, *crop_top_left, *target]], dtype=torch.float32)


def encode_text(pipe, prompt: str | list[str], device=None, *, size: int | None = None,
                grad: bool = False) -> Conditioning:
    """The conditioning for ``prompt`` (a string or a list), as the pipeline computes it for generation.

    For SDXL ``size`` (default: the UNet's native size) fills the time ids: a square, uncropped image at that size,
    as in diffusers' SDXL DreamBooth script with ``--center_crop``. The text encoders are frozen, so by default no
    autograd graph is kept (the result can be reused across steps); ``grad=True`` keeps one.
    """
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return _encode_text(pipe, prompt, device, size)


def _encode_text(pipe, prompt, device, size) -> Conditioning:
    device = device if device is not None else next(pipe.unet.parameters()).device
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if size is None:
            size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
        ids = time_ids(size).to(device).expand(embeds.shape[0], -1)
        return Conditioning(embeds, pooled, ids)
    embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
    return Conditioning(embeds)
