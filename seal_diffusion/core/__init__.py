"""The SEAL mechanism: the passports C and C_p, the SEAL layer, the network that installs it on a UNet and text
encoders, folding C into the factors, the owner's private key file and the public export rebuilt from it.

It imports :mod:`seal_diffusion.models`, :mod:`seal_diffusion.formats` and the top-level helpers.
"""
