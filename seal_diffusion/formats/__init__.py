"""Files that frontends load: LoRA files in every layout (writing kohya/diffusers, reading all), module names
across layouts, kohya/A1111 metadata, the public model card, single-file checkpoints.

It imports only the top-level helpers; nothing here knows about passports or keys.
"""
