"""Single-file (LDM / CompVis) export: exact round trip through diffusers' own loader, and SD 1.5 key names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seal_diffusion.formats.checkpoint import (
    is_ldm_checkpoint,
    pipeline_to_ldm,
    save_single_file,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from seal_diffusion.errors import UserError
from seal_diffusion.fileio import load_safetensors, read_safetensors_metadata
from seal_diffusion.models.tiny import build_added_kv_unet, build_sd15_unet, build_tiny_pipeline, write_tiny_model

# The SD 1.x KL VAE (stable-diffusion-v1-5/vae/config.json), built on the meta device below for its names/shapes.
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)


@pytest.fixture(scope="module")
def reseeded_pipe():
    """The tiny pipeline with weights that differ from the folder's (another seed), so loads prove their source."""
    return build_tiny_pipeline(seed=1234)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A diffusers folder of the tiny architecture (default seed): the ``config=`` for ``from_single_file``."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_file(reseeded_pipe, tmp_path_factory) -> Path:
    return save_single_file(reseeded_pipe, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _assert_state_dicts_equal(expected: dict, actual: dict, what: str) -> None:
    assert set(actual) == set(expected), f"{what}: key sets differ: {sorted(set(actual) ^ set(expected))[:10]}"
    for key, value in expected.items():
        got = actual[key]
        assert got.shape == value.shape and got.dtype == value.dtype, f"{what}: {key}"
        assert torch.equal(got, value), f"{what}: {key} differs"


def test_from_single_file_round_trip_is_exact(reseeded_pipe, tiny_folder, tiny_file, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = StableDiffusionPipeline.from_single_file(str(tiny_file), config=str(tiny_folder), local_files_only=True)

    folder_unet = StableDiffusionPipeline.from_pretrained(str(tiny_folder)).unet.state_dict()
    assert not torch.equal(folder_unet["conv_in.weight"], reseeded_pipe.unet.state_dict()["conv_in.weight"])

    for name in ("unet", "vae", "text_encoder"):
        _assert_state_dicts_equal(getattr(reseeded_pipe, name).state_dict(), getattr(loaded, name).state_dict(), name)


def test_file_layout_and_no_unused_keys(reseeded_pipe, tiny_file):
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    tensors, metadata = load_safetensors(tiny_file)
    assert metadata == {"format": "pt"} == read_safetensors_metadata(tiny_file)
    assert is_ldm_checkpoint(tensors)
    assert CHECKPOINT_KEY_NAMES["clip"] in tensors  # how diffusers recognises an SD 1.x CLIP text encoder
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in tensors)
    # LDM VAE attention projections are 1x1 convolutions
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert tensors["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert tensors["first_stage_model.decoder.mid.attn_1.norm.weight"].shape == (64,)

    # diffusers' converters map the file back to exactly the original state dicts, and use every key in it
    unet = convert_ldm_unet_checkpoint(tensors, dict(reseeded_pipe.unet.config))
    vae = convert_ldm_vae_checkpoint(tensors, dict(reseeded_pipe.vae.config))
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(tensors).items()}
    _assert_state_dicts_equal(reseeded_pipe.unet.state_dict(), unet, "unet")
    _assert_state_dicts_equal(reseeded_pipe.vae.state_dict(), vae, "vae")
    _assert_state_dicts_equal(reseeded_pipe.text_encoder.state_dict(), clip, "text_encoder")
    assert len(unet) + len(vae) + len(clip) == len(tensors)
    assert len(pipeline_to_ldm(reseeded_pipe)) == len(tensors)


def test_sd15_unet_maps_to_ldm_names():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, infer_diffusers_model_type

    unet = build_sd15_unet()  # meta device: names and shapes only
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config)

    assert len(ldm) == len(state) == 686  # the UNet key count of the original v1-5-pruned checkpoint
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # level without attention
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),  # after the attention
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(ldm[key].shape) == shape, key
    assert not any("output_blocks.11.2" in k or "input_blocks.12" in k for k in ldm)
    assert infer_diffusers_model_type(ldm) == "v1"

    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)  # every LDM name leads back to its own tensor


def test_sd15_vae_maps_to_ldm_names():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    state = vae.state_dict()
    ldm = vae_to_ldm(state, vae.config)

    assert len(ldm) == len(state) == 248  # the VAE key count of the original v1-5-pruned checkpoint
    shapes = {
        "first_stage_model.encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
        "first_stage_model.encoder.mid.attn_1.k.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.norm_out.weight": (512,),
        "first_stage_model.decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),  # diffusers up_blocks.0
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),  # diffusers up_blocks.3
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    }
    for key, shape in shapes.items():
        assert tuple(ldm[key].shape) == shape, key
    assert not any("decoder.up.0.upsample" in k or "encoder.down.3.downsample" in k for k in ldm)

    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)


def test_text_encoder_prefix_handles_both_clip_layouts():
    weight = torch.zeros(2)
    flat = text_encoder_to_ldm({"final_layer_norm.weight": weight, "embeddings.position_ids": torch.zeros(1)})
    nested = text_encoder_to_ldm({"text_model.final_layer_norm.weight": weight})
    expected = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": weight}
    assert flat == nested == expected
    with pytest.raises(UserError, match="CLIPTextModel"):
        text_encoder_to_ldm({"text_projection.weight": weight})


def test_is_ldm_checkpoint(reseeded_pipe):
    assert not is_ldm_checkpoint(reseeded_pipe.unet.state_dict())
    assert not is_ldm_checkpoint(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    assert not is_ldm_checkpoint([])
    assert is_ldm_checkpoint(iter(["first_stage_model.quant_conv.weight", "model.diffusion_model.out.2.bias"]))


def test_refuses_overwrite_and_unsupported_unets(reseeded_pipe, tiny_file):
    before = tiny_file.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        save_single_file(reseeded_pipe, tiny_file)
    assert tiny_file.read_bytes() == before
    assert save_single_file(reseeded_pipe, tiny_file, overwrite=True) == tiny_file

    added_kv = build_added_kv_unet()  # SimpleCrossAttn blocks have no SD 1.x single-file layout
    with pytest.raises(UserError, match="not supported"):
        unet_to_ldm(added_kv.state_dict(), added_kv.config)
    with pytest.raises(UserError, match="no SD 1.x single-file"):
        state = {**reseeded_pipe.unet.state_dict(), "class_embedding.weight": torch.zeros(1)}
        unet_to_ldm(state, reseeded_pipe.unet.config)


# -- SDXL (SGM layout) -------------------------------------------------------------------------------------------------
def _wider_second_encoder(pipe, seed: int):
    """tiny-xl with text encoder 2 48 wide instead of 32: diffusers' single-file loader tells SDXL's two encoders
    apart by their width (768 vs 1280 in SDXL), so with tiny-xl's equal widths it would load encoder 2 from encoder 1's
    weights. The file itself is right either way (checked with diffusers' own converter below)."""
    from transformers import CLIPTextModelWithProjection

    config = pipe.text_encoder_2.config.to_dict() | {"hidden_size": 48}
    torch.manual_seed(seed)
    pipe.text_encoder_2 = CLIPTextModelWithProjection(type(pipe.text_encoder_2.config)(**config))
    return pipe


def test_sdxl_from_single_file_round_trip_is_exact(tmp_path, monkeypatch):
    """An SDXL pipeline written in the SGM layout loads back through StableDiffusionXLPipeline.from_single_file with
    every tensor of all four models equal; on tiny-xl itself, diffusers' converters give back every tensor."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, convert_ldm_clip_checkpoint,
                                                     convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)

    from seal_diffusion.models.tiny import build_tiny_xl_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    xl = build_tiny_xl_pipeline(seed=1234)  # not the folder's weights
    tensors = pipeline_to_ldm(xl)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                             "conditioner.embedders.1.model.")) for k in tensors)
    for what in ("clip_sdxl", "open_clip_sdxl"):  # how diffusers recognises SDXL's two encoders
        assert CHECKPOINT_KEY_NAMES[what] in tensors
    qkv = tensors["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert qkv.shape == (96, 32)  # q, k, v stacked
    assert "model.diffusion_model.label_emb.0.0.weight" in tensors  # SDXL's added time/text embedding
    unet = convert_ldm_unet_checkpoint(tensors, dict(xl.unet.config))
    vae = convert_ldm_vae_checkpoint(tensors, dict(xl.vae.config))
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(tensors).items()}
    clip_g = convert_open_clip_checkpoint(xl.text_encoder_2, tensors, prefix="conditioner.embedders.1.model.")
    for name, back in (("unet", unet), ("vae", vae), ("text_encoder", clip), ("text_encoder_2", clip_g)):
        state = {k: v for k, v in getattr(xl, name).state_dict().items() if not k.endswith("position_ids")}
        _assert_state_dicts_equal(state, back, name)
    layers = xl.text_encoder_2.config.num_hidden_layers  # each in_proj weight and bias is split in three
    assert len(unet) + len(vae) + len(clip) + len(clip_g) == len(tensors) + 4 * layers  # every key in the file used

    folder_pipe = _wider_second_encoder(build_tiny_xl_pipeline(), 0)
    folder_pipe.save_pretrained(tmp_path / "config")  # the diffusers folder giving the configs
    xl = _wider_second_encoder(build_tiny_xl_pipeline(seed=1234), 1234)
    path = save_single_file(xl, tmp_path / "xl.safetensors")
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tmp_path / "config"),
                                                        local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert not torch.equal(next(iter(getattr(folder_pipe, name).state_dict().values())),
                               next(iter(getattr(xl, name).state_dict().values()))), name
        _assert_state_dicts_equal(getattr(xl, name).state_dict(), getattr(loaded, name).state_dict(), name)


def test_open_clip_names_refuse_unknown_weights():
    from seal_diffusion.formats.checkpoint import open_clip_to_ldm

    w = torch.zeros(2, 2)
    with pytest.raises(UserError, match="OpenCLIP"):
        open_clip_to_ldm({"text_model.encoder.layers.0.self_attn.q_proj.weight": w})  # k, v missing
    with pytest.raises(UserError, match="OpenCLIP"):
        open_clip_to_ldm({"text_model.pooler.weight": w})
