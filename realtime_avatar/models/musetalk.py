"""MuseTalk v1.5: diffusers UNet2DConditionModel (single step, t=0) + the sd-vae-ft-mse VAE.

A user with the official weights must get the official behaviour, so this module follows the
MuseTalk code path exactly (see DESIGN.md section 2):

    encode: BGR->RGB, x/255, (x-0.5)/0.5, vae.encode().latent_dist.sample() * 0.18215
    render: unet(cat[masked, ref], t=0, encoder_hidden_states=audio + PE).sample
            -> vae.decode(x / 0.18215) -> (x/2+0.5).clamp(0,1) * 255 -> round -> RGB->BGR

Weights come from a directory laid out as the official release (`huggingface-cli download
TMElyralab/MuseTalk` plus sd-vae-ft-mse and whisper-tiny, as its download_weights.sh does):

    models/musetalkV15/unet.pth        torch.save of UNet2DConditionModel.state_dict(), no
                                       prefix (MuseTalk loads it with a strict load_state_dict)
    models/musetalkV15/musetalk.json   the UNet2DConditionModel config
    models/sd-vae/config.json + diffusion_pytorch_model.bin|.safetensors   (diffusers format;
                                       the released .bin still uses the pre-0.14 attention
                                       names query/key/value/proj_attn, upgraded here)
    models/whisper/config.json + pytorch_model.bin|model.safetensors    (HF whisper-tiny; read
                                       by the audio feature code, only checked here)

Nothing here downloads anything.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from realtime_avatar.models.audio_pe import AudioPositionalEncoding
from realtime_avatar.models.base import (
    PATCH_SIZE,
    ModelLoadError,
    check_crops,
    check_render_inputs,
    check_state_dict,
    state_dict_hash,
)
from realtime_avatar.timing import WHISPER_DIM, WHISPER_LAYERS

log = logging.getLogger(__name__)

MODEL_ID = "musetalk-v15"
LATENT_CHANNELS = 4  # sd-vae latent channels; the UNet takes 2x (masked + reference)
VAE_DOWNSAMPLE = 8  # sd-vae: 256x256 image <-> 32x32 latent
LATENT_SIZE = PATCH_SIZE // VAE_DOWNSAMPLE  # 32
VAE_SCALING_FACTOR = 0.18215  # sd-vae-ft-mse's scaling_factor (diffusers' AutoencoderKL default)
UNET_TIMESTEP = 0  # MuseTalk runs its UNet as a single denoising step at t=0
ENCODE_BATCH = 8  # frames per VAE encoder call during avatar preparation (bounds memory)

# The released models/musetalkV15/musetalk.json, as reference. `sample_size` says 64 but the
# real input is 32x32 latents; diffusers' UNet takes any size divisible by 8.
MUSETALK_V15_UNET_CONFIG: dict = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": WHISPER_DIM,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 2 * LATENT_CHANNELS,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": LATENT_CHANNELS,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse config.json, as reference.
SD_VAE_FT_MSE_CONFIG: dict = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Config fields the rest of the pipeline depends on: a config that changes them is not
# MuseTalk (other fields, widths included, are taken from the user's file as MuseTalk does).
_UNET_INTERFACE = {
    "in_channels": 2 * LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "cross_attention_dim": WHISPER_DIM,
}
_VAE_INTERFACE = {"in_channels": 3, "out_channels": 3, "latent_channels": LATENT_CHANNELS}


# ---------------------------------------------------------------------------- release layout


@dataclass(frozen=True)
class MuseTalkRelease:
    """Paths of the files of an official MuseTalk v1.5 release directory."""

    models_dir: Path
    unet_weights: Path
    unet_config: Path
    vae_config: Path
    vae_weights: Path
    whisper_config: Path
    whisper_weights: Path

    @property
    def whisper_dir(self) -> Path:
        return self.whisper_config.parent


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def locate_release(root: str | Path) -> MuseTalkRelease:
    """Find the release files under `root` (the MuseTalk checkout, or its `models/` folder).

    Raises ModelLoadError listing every missing file at once, with the expected layout.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"{root}: MuseTalk weights directory does not exist")
    models = root / "models" if (root / "models" / "musetalkV15").is_dir() else root
    vae_dir = models / "sd-vae"
    if not vae_dir.is_dir() and (models / "sd-vae-ft-mse").is_dir():
        vae_dir = models / "sd-vae-ft-mse"  # some mirrors keep the HF repo name

    unet_weights = models / "musetalkV15" / "unet.pth"
    unet_config = models / "musetalkV15" / "musetalk.json"
    vae_config = vae_dir / "config.json"
    vae_weights = _first_existing(
        vae_dir, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    )
    whisper_config = models / "whisper" / "config.json"
    whisper_weights = _first_existing(
        models / "whisper", ("model.safetensors", "pytorch_model.bin")
    )
    missing = [str(p) for p in (unet_weights, unet_config, vae_config, whisper_config) if not p.is_file()]
    if vae_weights is None:
        missing.append(f"{vae_dir}/diffusion_pytorch_model.safetensors (or .bin)")
    if whisper_weights is None:
        missing.append(f"{models / 'whisper'}/model.safetensors (or pytorch_model.bin)")
    if missing:
        raise ModelLoadError(
            f"{root}: not a complete MuseTalk v1.5 release. Missing:\n"
            + "\n".join(f"  {m}" for m in missing)
            + "\nExpected layout (as MuseTalk's download_weights.sh makes it):\n"
            "  models/musetalkV15/{unet.pth,musetalk.json}\n"
            "  models/sd-vae/{config.json,diffusion_pytorch_model.bin}   (stabilityai/sd-vae-ft-mse)\n"
            "  models/whisper/{config.json,pytorch_model.bin}            (openai/whisper-tiny)"
        )
    _check_whisper_config(whisper_config)
    return MuseTalkRelease(
        models, unet_weights, unet_config, vae_config, vae_weights, whisper_config, whisper_weights
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON config ({exc})") from exc


def _check_whisper_config(path: Path) -> None:
    """MuseTalk v1.5 was trained on whisper-tiny hidden states: 384 wide, 4 encoder blocks."""
    config = _read_json(path)
    want = {"model_type": "whisper", "d_model": WHISPER_DIM, "encoder_layers": WHISPER_LAYERS - 1}
    wrong = {k: config.get(k) for k, v in want.items() if config.get(k) != v}
    if wrong:
        raise ModelLoadError(
            f"{path}: not a whisper-tiny config (got {wrong}, need {want}); MuseTalk v1.5 needs "
            "openai/whisper-tiny in models/whisper/"
        )


# ------------------------------------------------------------------------- weights and modules


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch.save'd state dict (.pth/.bin)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:  # mmap keeps the 3.4 GB UNet file out of RAM until copied into the model
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch.save format cannot be mmapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors all raise their own types
        raise ModelLoadError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelLoadError(f"{path}: expected a state dict (name -> tensor), got {type(loaded).__name__}")
    return dict(loaded)


def strip_wrapper_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix that every key shares when a wrapper saved the weights ("module." from
    DataParallel/accelerate, "unet." from a training wrapper). The official file has none."""
    for prefix in ("module.", "unet."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_MODERN_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def upgrade_legacy_vae_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the VAE mid-block attention weights of checkpoints written by diffusers < 0.14
    (sd-vae-ft-mse's diffusion_pytorch_model.bin is one) to today's names. Shapes are equal."""
    upgraded = {}
    for key, value in state_dict.items():
        match = _LEGACY_ATTENTION.match(key)
        if match:
            path, old, kind = match.groups()
            key = f"{path}.{_MODERN_ATTENTION_NAME[old]}.{kind}"
        upgraded[key] = value
    return upgraded


def _check_interface(config: dict, interface: dict, path: Path | str) -> None:
    wrong = {k: config.get(k) for k, v in interface.items() if config.get(k) != v}
    if wrong:
        raise ModelLoadError(f"{path}: config has {wrong}; MuseTalk v1.5 needs {interface}")


def build_unet(config: dict, source: Path | str = "UNet config") -> UNet2DConditionModel:
    """UNet2DConditionModel from a musetalk.json dict (random init, float32)."""
    _check_interface(config, _UNET_INTERFACE, source)
    return UNet2DConditionModel.from_config(config)


def build_vae(config: dict, source: Path | str = "VAE config") -> AutoencoderKL:
    """AutoencoderKL from an sd-vae config dict (random init, float32)."""
    _check_interface(config, _VAE_INTERFACE, source)
    return AutoencoderKL.from_config(config)


def load_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load: every key and shape checked first, ModelLoadError naming the file.

    `module` may live on the meta device (built without random init, see _empty): the file's
    tensors are then assigned, not copied, which saves the 3.4 GB copy of the full UNet.
    """
    check_state_dict(module.state_dict(), state_dict, source)
    module.load_state_dict(state_dict, strict=True, assign=True)
    left_on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left_on_meta:  # a buffer the checkpoint does not hold: cannot happen for these classes
        raise ModelLoadError(f"{source}: no values for {left_on_meta}")


def _empty(build, config: dict, source: Path):
    """Build a module on the meta device: shapes only, no memory, no random init (which
    takes 10-15 s for the 850 M-parameter UNet on 2 cores)."""
    with torch.device("meta"):
        return build(config, source)


# ---------------------------------------------------------------------------- pixel conversion


def crops_to_vae_input(crops_bgr: np.ndarray) -> torch.Tensor:
    """[N,256,256,3] uint8 BGR -> [N,3,256,256] float32 RGB in [-1, 1] (MuseTalk's transform)."""
    check_crops(crops_bgr)
    rgb = torch.from_numpy(np.ascontiguousarray(crops_bgr[..., ::-1]))
    return (rgb.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def vae_output_to_crops(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] VAE output in [-1, 1] (RGB) -> [N,H,W,3] uint8 BGR, rounded as MuseTalk does."""
    unit = (images / 2 + 0.5).clamp(0, 1)  # in the model's dtype and device, as MuseTalk
    rgb = unit.float().cpu().numpy().transpose(0, 2, 3, 1)
    # numpy's round (half to even), as MuseTalk's decode_latents
    return np.ascontiguousarray((rgb * 255).round().astype(np.uint8)[..., ::-1])


# ------------------------------------------------------------------------------------- model


class MuseTalkModel:
    """RendererModel for MuseTalk v1.5 weights (or any UNet/VAE pair of the same design).

    device/dtype: MuseTalk runs fp16 on GPU; on CPU fp32 (fp16 convolutions are slow there).
    sample_latents: MuseTalk caches a *sample* of the VAE posterior; False uses its mean,
    which makes avatar caches reproducible (pass a seeded generator to encode() for the same
    with sampling).
    """

    model_id = MODEL_ID
    latent_channels = LATENT_CHANNELS
    latent_size = LATENT_SIZE

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        sample_latents: bool = True,
        release: MuseTalkRelease | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.sample_latents = sample_latents
        self.release = release
        self.scaling_factor = float(vae.config.get("scaling_factor", VAE_SCALING_FACTOR))
        # hash the weights as loaded (float32, CPU), before the cast to the run dtype
        self._weights_hash = state_dict_hash(
            {f"unet.{k}": v for k, v in unet.state_dict().items()}
            | {f"vae.{k}": v for k, v in vae.state_dict().items()}
        )
        # nn.Module.to, not diffusers' override: that one logs a spurious "modules that should
        # be kept in float32: []" warning on every dtype cast (diffusers 0.42)
        self.unet = torch.nn.Module.to(unet, self.device, self.dtype).eval().requires_grad_(False)
        self.vae = torch.nn.Module.to(vae, self.device, self.dtype).eval().requires_grad_(False)
        self.pe = AudioPositionalEncoding().to(self.device)
        self.timestep = torch.tensor([UNET_TIMESTEP], device=self.device)

    def weights_hash(self) -> str:
        return self._weights_hash

    @torch.no_grad()
    def encode(self, crops_bgr: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """[N,256,256,3] uint8 BGR -> [N,4,32,32] float32 scaled latents (on CPU)."""
        pixels = crops_to_vae_input(crops_bgr)
        latents = []
        for start in range(0, len(pixels), ENCODE_BATCH):
            batch = pixels[start : start + ENCODE_BATCH].to(self.device, self.dtype)
            posterior = self.vae.encode(batch).latent_dist
            sample = posterior.sample(generator=generator) if self.sample_latents else posterior.mean
            latents.append((sample * self.scaling_factor).float().cpu())
        return torch.cat(latents)

    @torch.no_grad()
    def render(self, latents: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
        """[N,8,32,32] latents + [N,50,384] audio windows -> [N,256,256,3] uint8 BGR."""
        check_render_inputs(latents, audio, self.latent_channels, self.latent_size)
        tokens = self.pe(audio.to(self.device, torch.float32)).to(self.dtype)
        predicted = self.unet(
            latents.to(self.device, self.dtype), self.timestep, encoder_hidden_states=tokens
        ).sample
        images = self.vae.decode(predicted / self.scaling_factor).sample
        return vae_output_to_crops(images)


def load_musetalk_v15(
    root: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    sample_latents: bool = True,
) -> MuseTalkModel:
    """Load an official MuseTalk v1.5 release directory (see the module docstring)."""
    release = locate_release(root)

    unet_config = _read_json(release.unet_config)
    if unet_config != MUSETALK_V15_UNET_CONFIG:
        log.info("%s differs from the released musetalk.json; following the file", release.unet_config)
    unet = _empty(build_unet, unet_config, release.unet_config)
    load_weights(unet, strip_wrapper_prefix(read_state_dict(release.unet_weights)), release.unet_weights)

    vae = _empty(build_vae, _read_json(release.vae_config), release.vae_config)
    load_weights(vae, upgrade_legacy_vae_keys(read_state_dict(release.vae_weights)), release.vae_weights)

    log.info("loaded MuseTalk v1.5 from %s (whisper-tiny at %s)", release.models_dir, release.whisper_dir)
    model = MuseTalkModel(
        unet, vae, device=device, dtype=dtype, sample_latents=sample_latents, release=release
    )
    from realtime_avatar.models.audio_contract import read_side_file

    try:  # the official window (2i-4 .. 2i+5) unless the release says otherwise
        model.audio_contract = read_side_file(release.unet_config.parent)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    return model
