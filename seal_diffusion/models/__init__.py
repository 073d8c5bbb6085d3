"""Base models and the inputs they take: loading SD 1.5 / SDXL (hub id, folder, single file), the embedded tiny
default, what the UNet is conditioned on, image files, the bundled subject.

The bottom floor: it imports only the top-level helpers (``errors``, ``fileio``).
"""
