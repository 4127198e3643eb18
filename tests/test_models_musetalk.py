"""MuseTalk v1.5 family: loader of the official release layout, the encode/render contract,
and the audio positional encoding. Models are randomly initialised at reduced width (same
block structure and key names as the release) and written in the official file formats;
one slow test does the key set and a forward pass at full size."""

from __future__ import annotations

import gc
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from realtime_avatar.models.audio_pe import AudioPositionalEncoding, sinusoidal_positions
from realtime_avatar.models.base import PATCH_SIZE, RendererModel, mask_lower_half
from realtime_avatar.models.musetalk import (
    LATENT_CHANNELS,
    MUSETALK_V15_UNET_CONFIG,
    SD_VAE_FT_MSE_CONFIG,
    VAE_SCALING_FACTOR,
    MuseTalkModel,
    crops_to_vae_input,
    load_musetalk_v15,
    locate_release,
    upgrade_legacy_vae_keys,
    vae_output_to_crops,
)
from realtime_avatar.models.registry import ModelLoadError, load_model
from realtime_avatar.timing import AUDIO_TOKENS, WHISPER_DIM

torch.set_num_threads(2)

# Same blocks, layers and attention as the release (so the same key names), narrower. The
# VAE runs at up to 256x256: 8 channels there (and 8 norm groups) keep it fast on 2 cores.
SMALL_UNET_CONFIG = MUSETALK_V15_UNET_CONFIG | {"block_out_channels": [32, 64, 64, 64]}
SMALL_VAE_CONFIG = SD_VAE_FT_MSE_CONFIG | {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8}
# the fields of openai/whisper-tiny's config.json the loader checks (plus a few more)
WHISPER_TINY_CONFIG = {
    "model_type": "whisper",
    "architectures": ["WhisperForConditionalGeneration"],
    "d_model": 384,
    "encoder_layers": 4,
    "decoder_layers": 4,
    "encoder_attention_heads": 6,
    "num_mel_bins": 80,
    "vocab_size": 51865,
}


def legacy_vae_names(state_dict: dict) -> dict:
    """The attention names diffusers used before 0.14, as in sd-vae-ft-mse's released .bin."""
    renamed = {}
    for key, value in state_dict.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            if ".attentions." in key and new in key:
                key = key.replace(new, old)
        renamed[key] = value
    return renamed


def write_release(
    root: Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    unet_config: dict,
    vae_config: dict,
    *,
    vae_format: str = "bin",
) -> Path:
    """Write the files as the official release has them (see download_weights.sh)."""
    (root / "models" / "musetalkV15").mkdir(parents=True)
    torch.save(unet.state_dict(), root / "models" / "musetalkV15" / "unet.pth")
    (root / "models" / "musetalkV15" / "musetalk.json").write_text(json.dumps(unet_config, indent=2))
    vae_dir = root / "models" / "sd-vae"
    vae_dir.mkdir(parents=True)
    (vae_dir / "config.json").write_text(json.dumps(vae_config, indent=2))
    if vae_format == "bin":
        torch.save(legacy_vae_names(vae.state_dict()), vae_dir / "diffusion_pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(vae.state_dict(), str(vae_dir / "diffusion_pytorch_model.safetensors"))
    whisper_dir = root / "models" / "whisper"
    whisper_dir.mkdir(parents=True)
    (whisper_dir / "config.json").write_text(json.dumps(WHISPER_TINY_CONFIG))
    # presence is all this module checks; the audio feature code reads the real weights
    torch.save({"model.encoder.conv1.weight": torch.zeros(384, 80, 3)}, whisper_dir / "pytorch_model.bin")
    return root


def small_modules(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(SMALL_UNET_CONFIG), AutoencoderKL.from_config(SMALL_VAE_CONFIG)


@pytest.fixture(scope="module")
def modules():
    return small_modules(seed=0)


@pytest.fixture(scope="module")
def release(modules, tmp_path_factory) -> Path:
    unet, vae = modules
    return write_release(tmp_path_factory.mktemp("musetalk"), unet, vae, SMALL_UNET_CONFIG, SMALL_VAE_CONFIG)


@pytest.fixture(scope="module")
def model(release) -> MuseTalkModel:
    return load_musetalk_v15(release)


def copy_release(release: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release, tmp_path / "release"))


def face_crops(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:PATCH_SIZE, 0:PATCH_SIZE] / PATCH_SIZE
    base = rng.uniform(60, 200, size=(n, 1, 1, 3))
    return (base + 50 * np.stack([xx, yy, xx * yy], -1)[None]).clip(0, 255).astype(np.uint8)


def random_audio(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, AUDIO_TOKENS, WHISPER_DIM, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------- positional encoding


def test_positional_encoding_is_musetalks_sinusoid():
    table = sinusoidal_positions().numpy()
    assert table.shape == (AUDIO_TOKENS, WHISPER_DIM) and table.dtype == np.float32
    # independent float64 formula: even dims sin(p / 10000^(2k/d)), odd dims cos(...)
    p = np.arange(AUDIO_TOKENS)[:, None]
    k = np.arange(WHISPER_DIM // 2)[None, :]
    angle = p / 10000.0 ** (2 * k / WHISPER_DIM)
    assert np.abs(table[:, 0::2] - np.sin(angle)).max() < 2e-5
    assert np.abs(table[:, 1::2] - np.cos(angle)).max() < 2e-5
    assert np.array_equal(table[0, 0::2], np.zeros(WHISPER_DIM // 2))
    assert np.array_equal(table[0, 1::2], np.ones(WHISPER_DIM // 2))
    assert table[7, 0] == pytest.approx(math.sin(7), abs=1e-6)
    assert table[7, 1] == pytest.approx(math.cos(7), abs=1e-6)


def test_positional_encoding_module_adds_the_table_per_token():
    pe = AudioPositionalEncoding()
    assert not pe.state_dict()  # a pure function of the shape: never in checkpoints
    x = random_audio(3)
    assert torch.equal(pe(x), x + sinusoidal_positions())
    assert pe(x.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="audio tokens have shape"):
        pe(torch.zeros(1, 51, WHISPER_DIM))
    with pytest.raises(ValueError, match="audio tokens have shape"):
        pe(torch.zeros(1, 50, 256))


# ---------------------------------------------------------------------------- pixel contract


def test_vae_input_is_rgb_in_minus_one_to_one():
    crops = np.zeros((1, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    crops[..., 0], crops[..., 1], crops[..., 2] = 0, 51, 255  # B, G, R
    x = crops_to_vae_input(crops)
    assert x.shape == (1, 3, PATCH_SIZE, PATCH_SIZE) and x.dtype == torch.float32
    assert x[0, :, 5, 5].tolist() == pytest.approx([1.0, 51 / 127.5 - 1, -1.0])  # R, G, B
    # the masked crop's zeroed lower half is -1 (black), as MuseTalk's half mask gives
    assert (crops_to_vae_input(mask_lower_half(crops))[:, :, PATCH_SIZE // 2 :] == -1).all()


def test_vae_output_to_bgr_uint8():
    images = torch.zeros(1, 3, 2, 4)
    images[0, 0] = torch.tensor([-2.0, -1.0, 0.0, 1.0])  # R: clamped, black, mid, white
    images[0, 2] = 1.0  # B white
    out = vae_output_to_crops(images)
    assert out.shape == (1, 2, 4, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert out[0, 0, :, 2].tolist() == [0, 0, 128, 255]  # R lands last (BGR); 127.5 rounds to even
    assert out[0, 0, :, 0].tolist() == [255] * 4


# ------------------------------------------------------------------------------------ loader


def test_release_loads_every_weight_unchanged(model, modules, release):
    unet, vae = modules
    assert isinstance(model, RendererModel) and model.model_id == "musetalk-v15"
    for loaded, original in ((model.unet, unet), (model.vae, vae)):
        got, want = loaded.state_dict(), original.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert model.release.whisper_dir == release / "models" / "whisper"
    # legacy VAE names in the .bin were upgraded; the hash is that of the same weights in memory
    assert model.weights_hash() == MuseTalkModel(*small_modules(seed=0)).weights_hash()
    assert model.weights_hash() != MuseTalkModel(*small_modules(seed=1)).weights_hash()


def test_models_folder_safetensors_vae_and_registry_spec(modules, tmp_path):
    unet, vae = modules
    root = write_release(tmp_path / "r", unet, vae, SMALL_UNET_CONFIG, SMALL_VAE_CONFIG, vae_format="safetensors")
    from_models_dir = load_musetalk_v15(root / "models")  # the models/ folder itself works too
    via_registry = load_model(f"musetalk-v15:{root}")
    assert isinstance(via_registry, MuseTalkModel)
    assert from_models_dir.weights_hash() == via_registry.weights_hash()
    assert via_registry.release.vae_weights.name == "diffusion_pytorch_model.safetensors"


def test_wrapper_prefix_is_stripped(release, modules, tmp_path):
    root = copy_release(release, tmp_path)
    state = {f"module.{k}": v for k, v in modules[0].state_dict().items()}
    torch.save(state, root / "models" / "musetalkV15" / "unet.pth")
    assert load_musetalk_v15(root).weights_hash() == MuseTalkModel(*small_modules(seed=0)).weights_hash()


def test_legacy_vae_key_upgrade_is_a_pure_rename():
    legacy = {
        "decoder.mid_block.attentions.0.query.weight": torch.ones(2, 2),
        "decoder.mid_block.attentions.0.proj_attn.bias": torch.zeros(2),
        "decoder.mid_block.attentions.0.group_norm.weight": torch.ones(2),
        "encoder.down_blocks.0.resnets.0.conv1.weight": torch.ones(1),
    }
    assert sorted(upgrade_legacy_vae_keys(legacy)) == [
        "decoder.mid_block.attentions.0.group_norm.weight",
        "decoder.mid_block.attentions.0.to_out.0.bias",
        "decoder.mid_block.attentions.0.to_q.weight",
        "encoder.down_blocks.0.resnets.0.conv1.weight",
    ]


def test_missing_files_are_listed_together(release, tmp_path):
    root = copy_release(release, tmp_path)
    (root / "models" / "musetalkV15" / "unet.pth").unlink()
    (root / "models" / "sd-vae" / "diffusion_pytorch_model.bin").unlink()
    shutil.rmtree(root / "models" / "whisper")
    with pytest.raises(ModelLoadError) as info:
        locate_release(root)
    message = str(info.value)
    for fragment in ("musetalkV15/unet.pth", "sd-vae/diffusion_pytorch_model", "whisper/config.json", "whisper/model.safetensors"):
        assert fragment in message
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_musetalk_v15(tmp_path / "nowhere")


def test_bad_unet_weights_name_the_file_and_every_problem(release, modules, tmp_path):
    root = copy_release(release, tmp_path)
    state = dict(modules[0].state_dict())
    del state["conv_out.bias"]
    del state["mid_block.attentions.0.proj_in.weight"]
    state["time_embedding.extra.weight"] = torch.zeros(1)
    state["conv_in.weight"] = torch.zeros(32, 9, 3, 3)  # a 9-channel input: not MuseTalk's
    unet_file = root / "models" / "musetalkV15" / "unet.pth"
    torch.save(state, unet_file)
    with pytest.raises(ModelLoadError) as info:
        load_musetalk_v15(root)
    message = str(info.value)
    assert str(unet_file) in message
    assert "2 missing keys" in message and "conv_out.bias" in message and "mid_block.attentions.0.proj_in.weight" in message
    assert "1 unexpected keys" in message and "time_embedding.extra.weight" in message
    assert "conv_in.weight: file has (32, 9, 3, 3), model expects (32, 8, 3, 3)" in message


def test_bad_vae_weights_and_unreadable_files(release, modules, tmp_path):
    root = copy_release(release, tmp_path)
    vae_file = root / "models" / "sd-vae" / "diffusion_pytorch_model.bin"
    state = legacy_vae_names(modules[1].state_dict())
    state["decoder.conv_out.weight"] = torch.zeros(3, 8, 1, 1)
    torch.save(state, vae_file)
    with pytest.raises(ModelLoadError, match=re.escape(str(vae_file)) + r"(.|\n)*decoder.conv_out.weight: file has \(3, 8, 1, 1\)"):
        load_musetalk_v15(root)
    vae_file.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_musetalk_v15(root)


def test_configs_that_are_not_musetalk_are_refused(release, tmp_path):
    root = copy_release(release, tmp_path)
    unet_json = root / "models" / "musetalkV15" / "musetalk.json"
    unet_json.write_text(json.dumps(SMALL_UNET_CONFIG | {"cross_attention_dim": 768}))
    with pytest.raises(ModelLoadError, match="cross_attention_dim"):
        load_musetalk_v15(root)
    unet_json.write_text("{ not json")
    with pytest.raises(ModelLoadError, match="cannot read JSON"):
        load_musetalk_v15(root)

    root = copy_release(release, tmp_path / "b")
    (root / "models" / "whisper" / "config.json").write_text(json.dumps(WHISPER_TINY_CONFIG | {"d_model": 512}))
    with pytest.raises(ModelLoadError, match="whisper-tiny"):
        load_musetalk_v15(root)


# ------------------------------------------------------------------------- encode and render


def test_encode_shapes_sampling_and_determinism(model):
    crops = face_crops(2)
    latents = model.encode(crops, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, LATENT_CHANNELS, 32, 32) and latents.dtype == torch.float32
    again = model.encode(crops, generator=torch.Generator().manual_seed(0))
    assert torch.equal(latents, again)  # seeded sampling is reproducible
    other = model.encode(crops, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(latents, other)  # and it does sample
    # deterministic mode: the posterior mean, times the scaling factor, by diffusers directly
    mean_model = MuseTalkModel(model.unet, model.vae, sample_latents=False)
    with torch.no_grad():
        expected = model.vae.encode(crops_to_vae_input(crops)).latent_dist.mean * VAE_SCALING_FACTOR
    assert torch.allclose(mean_model.encode(crops), expected, atol=1e-6)


def test_render_follows_the_musetalk_sequence(model):
    crops = face_crops(2)
    latents = torch.cat([model.encode(mask_lower_half(crops)), model.encode(crops)], 1)
    audio = random_audio(2)
    batch = model.render(latents, audio)
    assert batch.shape == (2, PATCH_SIZE, PATCH_SIZE, 3) and batch.dtype == np.uint8
    assert batch.std() > 0
    latents, audio = latents[1:], audio[1:]
    out = model.render(latents, audio)
    # a frame renders the same alone or in a batch, up to float summation order
    assert np.abs(out.astype(int) - batch[1:].astype(int)).max() <= 1
    assert np.array_equal(out, model.render(latents, audio))  # deterministic
    assert not np.array_equal(out, model.render(latents, random_audio(1, seed=1)))  # audio matters

    # the reference sequence, written out step by step as MuseTalk's realtime inference does it
    with torch.no_grad():
        tokens = audio + sinusoidal_positions()
        predicted = model.unet(latents, torch.tensor([0]), encoder_hidden_states=tokens).sample
        image = model.vae.decode(predicted / 0.18215).sample
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        expected = (image * 255).round().astype(np.uint8)[..., ::-1]
    assert np.array_equal(out, expected)


def test_render_rejects_bad_shapes(model):
    with pytest.raises(ValueError, match=r"latents must be \[N,8,32,32\]"):
        model.render(torch.zeros(1, 4, 32, 32), random_audio(1))
    with pytest.raises(ValueError, match="audio must be"):
        model.render(torch.zeros(1, 8, 32, 32), torch.zeros(1, 10, 5, 384))
    with pytest.raises(ValueError, match=r"\[N,256,256,3\]"):
        model.encode(np.zeros((1, 256, 256), np.uint8))


# ------------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_release_key_set_and_forward(tmp_path):
    """The released architecture: ~0.85 G UNet parameters, sd-vae-ft-mse; one frame."""
    # built on the meta device and filled with small seeded values: diffusers' own
    # initialisation of 0.85 G parameters took 10 s of this test's 38 on 2 cores
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(MUSETALK_V15_UNET_CONFIG)
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.uniform_(-0.02, 0.02, generator=generator)
    vae = AutoencoderKL.from_config(SD_VAE_FT_MSE_CONFIG)
    state = unet.state_dict()
    assert not any(b.is_meta for b in unet.buffers()) and all(p.device.type == "cpu" for p in unet.parameters())
    assert sum(p.numel() for p in unet.parameters()) == 849_947_844
    assert len(state) == 686
    assert state["conv_in.weight"].shape == (320, 8, 3, 3)
    assert state["conv_out.weight"].shape == (4, 320, 3, 3)
    # cross-attention reads the 384-wide Whisper tokens at every attention level
    assert state["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 384)
    assert state["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"].shape == (1280, 384)
    assert len(vae.state_dict()) == 248
    write_release(tmp_path, unet, vae, MUSETALK_V15_UNET_CONFIG, SD_VAE_FT_MSE_CONFIG)
    del unet, vae, state
    gc.collect()

    model = load_musetalk_v15(tmp_path)
    latents = torch.randn(1, 2 * LATENT_CHANNELS, 32, 32)
    out = model.render(latents, random_audio(1))
    assert out.shape == (1, PATCH_SIZE, PATCH_SIZE, 3) and out.dtype == np.uint8
