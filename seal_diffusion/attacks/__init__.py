"""Attacks that try to remove the watermark: file attacks (prune, quantize, refactor, merges, …), fine-tuning and
distillation.

It imports :mod:`seal_diffusion.training` (fine-tuning and distillation train), :mod:`~seal_diffusion.ownership`
and the floors below them.
"""
