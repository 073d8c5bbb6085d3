"""A few-step SEAL run on the tiny UNet (alternating C/C_p, random inputs): a key and its kohya export in seconds,
for tests that need a real key but not a DreamBooth run (the session fixture ``owner_training`` is that one)."""

import contextlib

import torch

from seal_diffusion.core.export import export_lora
from seal_diffusion.core.keyfile import SealKey
from seal_diffusion.core.network import SealNetwork, find_target_modules
from seal_diffusion.core import passport
from seal_diffusion.core.passport import make_passports

RANK = 4


def small_owner(folder, secret: str, rank: int = RANK) -> dict:
    """Train 6 steps, save ``owner.sealkey`` and ``owner.safetensors`` (kohya) in ``folder``."""
    from seal_diffusion.models.base_model import load_pipeline

    unet = load_pipeline("tiny").unet
    names = list(find_target_modules(unet))
    torch.manual_seed(0)
    net = SealNetwork(unet, rank, passports=make_passports(names, rank, secret))
    opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    for step in range(6):
        net.set_passport("C" if step % 2 == 0 else "C_p")
        loss = unet(x, torch.tensor([100, 600]), e).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    key = SealKey.from_network(net, "tiny", "random")
    net.remove()
    key_path = key.save(folder / "owner.sealkey")
    kohya = export_lora(key, folder / "owner.safetensors", "kohya", "owner")
    return dict(key=key, key_path=key_path, kohya=kohya, dir=folder, unet=unet)


@contextlib.contextmanager
def fixed_scrypt_salt():
    """The scrypt salt is random in real runs; fixed here so that a test's --secret run is the same every time."""
    saved, passport.new_salt = passport.new_salt, lambda: b"conftest salt 16"
    try:
        yield
    finally:
        passport.new_salt = saved
