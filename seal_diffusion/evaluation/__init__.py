"""Measuring a model: the held-out denoising loss, SSIM/PSNR and CLIP/DINO metrics, and rendering images with a
key's network (base, C, C_p, no passport, exported).

It imports :mod:`~seal_diffusion.core` and the floors below it.
"""
