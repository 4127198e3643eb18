"""compact-v1: our own small renderer, fast enough for a 2-core CPU (DESIGN.md section 10).

Same data flow as MuseTalk, smaller everywhere:

    LatentEncoder   [N,3,256,256] -> [N,C,32,32]   PixelUnshuffle + strided convs (avatar prep)
    CompactUNet     [N,2C,32,32] (masked, reference) + [N,50,384] audio -> [N,C,32,32]
                    64/128/256 channels, one ResBlock per level, cross-attention to the audio
                    tokens at 16x16 and 8x8; predicts a residual on the reference latent
    LatentDecoder   [N,C,32,32] -> [N,3,256,256]    light convs at 32/64/128, then a 12-channel
                    conv + PixelShuffle(2) (or at 32/64, then 48 channels + PixelShuffle(4)):
                    no convolution runs at full resolution

C = 8 latent channels (not sd-vae's 4): the decoder is too small to invent detail, so the
latent keeps more of it (256*256*3 / (8*32*32) = 24x compression instead of 48x); the
extra UNet input/output channels cost almost nothing.

Why a residual on the reference latent: at inference the masked and reference inputs come
from the same cached frame, so the answer equals the reference everywhere but the mouth.
The skip hands the network the upper face, background and colours exactly, and it only has
to learn the mouth change (MuseTalk predicts the whole latent and must reproduce them).

Images are BGR in [0, 1] inside this family (what cv2/PyAV give us): no channel flips.
Checkpoints are safetensors with the config as JSON in the metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from realtime_avatar.models.audio_pe import AudioPositionalEncoding
from realtime_avatar.models.base import (
    BLEND_ROWS_FROM,
    PATCH_SIZE,
    ModelLoadError,
    check_crops,
    check_render_inputs,
    check_state_dict,
    state_dict_hash,
)
from realtime_avatar.timing import WHISPER_DIM

MODEL_ID = "compact-v1"
LATENT_DOWNSAMPLE = 8  # 256x256 image <-> 32x32 latent, as MuseTalk
LATENT_SIZE = PATCH_SIZE // LATENT_DOWNSAMPLE  # 32
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class CompactConfig:
    latent_channels: int = 8
    unet_channels: tuple[int, int, int] = (64, 128, 256)  # at 32x32, 16x16, 8x8
    attention_heads: int = 4
    attention_at_16: bool = True  # also attend to audio at 16x16 (~3% more compute)
    norm_groups: int = 16
    encoder_channels: tuple[int, int, int] = (32, 64, 128)  # at 128, 64, 32
    decoder_channels: tuple[int, int, int] = (64, 32, 16)  # at 32, 64, 128
    audio_dim: int = WHISPER_DIM

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompactConfig:
        values = json.loads(text)
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown compact config fields {sorted(unknown)}")
        for key in ("unet_channels", "encoder_channels", "decoder_channels"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


# --------------------------------------------------------------------------------- layers


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1 when the width changes) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AudioCrossAttention(nn.Module):
    """Every latent cell attends to the frame's audio tokens; added back as a residual."""

    def __init__(self, channels: int, audio_dim: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(audio_dim, channels)
        self.value = nn.Linear(audio_dim, channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query(self.norm(x).flatten(2).transpose(1, 2))  # [N, h*w, c]
        k, v = self.key(audio), self.value(audio)  # [N, T, c]

        def split(t: torch.Tensor) -> torch.Tensor:  # [N, L, c] -> [N, heads, L, c/heads]
            return t.reshape(n, -1, self.heads, c // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(q), split(k), split(v))
        attended = self.out(attended.transpose(1, 2).reshape(n, h * w, c))
        return x + attended.transpose(1, 2).reshape(n, c, h, w)


class CompactUNet(nn.Module):
    """[N,2C,32,32] masked+reference latents, [N,50,384] audio -> [N,C,32,32] latent."""

    def __init__(self, config: CompactConfig):
        super().__init__()
        c0, c1, c2 = config.unet_channels
        groups, heads, latent = config.norm_groups, config.attention_heads, config.latent_channels
        self.latent_channels = latent
        self.audio_pe = AudioPositionalEncoding(dim=config.audio_dim)
        # Whisper's five stacked layers differ in scale; normalise each token once
        self.audio_norm = nn.LayerNorm(config.audio_dim)

        self.stem = conv3x3(2 * latent, c0)
        self.enc0 = ResBlock(c0, c0, groups)  # 32x32
        self.down0 = conv3x3(c0, c1, stride=2)
        self.enc1 = ResBlock(c1, c1, groups)  # 16x16
        self.attn1 = AudioCrossAttention(c1, config.audio_dim, heads, groups) if config.attention_at_16 else None
        self.down1 = conv3x3(c1, c2, stride=2)
        self.mid = ResBlock(c2, c2, groups)  # 8x8
        self.mid_attn = AudioCrossAttention(c2, config.audio_dim, heads, groups)
        self.dec1 = ResBlock(c2 + c1, c1, groups)  # 16x16, after upsampling and skip concat
        self.dec0 = ResBlock(c1 + c0, c0, groups)  # 32x32
        self.out_norm = nn.GroupNorm(groups, c0)
        self.out = conv3x3(c0, latent)

    def forward(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        tokens = self.audio_norm(self.audio_pe(audio))
        reference = latents[:, self.latent_channels :]

        skip0 = self.enc0(self.stem(latents))
        skip1 = self.enc1(self.down0(skip0))
        if self.attn1 is not None:
            skip1 = self.attn1(skip1, tokens)
        h = self.mid_attn(self.mid(self.down1(skip1)), tokens)
        h = self.dec1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip1], 1))
        h = self.dec0(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip0], 1))
        return reference + self.out(F.silu(self.out_norm(h)))


class LatentEncoder(nn.Module):
    """[N,3,256,256] in [0,1] -> [N,C,32,32]. Runs once per avatar frame: not speed-critical."""

    def __init__(self, config: CompactConfig):
        super().__init__()
        e0, e1, e2 = config.encoder_channels
        self.layers = nn.Sequential(
            nn.PixelUnshuffle(2),  # 3x256x256 -> 12x128x128 without a full-resolution conv
            conv3x3(12, e0), nn.SiLU(),
            conv3x3(e0, e1, stride=2), nn.SiLU(),  # 64x64
            conv3x3(e1, e1), nn.SiLU(),
            conv3x3(e1, e2, stride=2), nn.SiLU(),  # 32x32
            ResBlock(e2, e2, config.norm_groups),
            conv3x3(e2, config.latent_channels),
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class LatentDecoder(nn.Module):
    """[N,C,32,32] -> [N,3,256,256] in [0,1]. Runs per rendered frame: kept tiny.

    decoder_channels gives one width per resolution, from 32x32 up: three widths (32, 64, 128)
    end in a 12-channel conv + PixelShuffle(2); two widths (32, 64) end in a 48-channel conv +
    PixelShuffle(4), so that no convolution runs at 128x128 (about half the decoder's cost on a
    2-core avx2 CPU, see the model card). Either way no convolution runs at full resolution.
    """

    def __init__(self, config: CompactConfig):
        super().__init__()
        widths = tuple(config.decoder_channels)
        if len(widths) not in (2, 3):
            raise ValueError(f"decoder_channels needs 2 or 3 widths (32x32 up), got {widths}")
        shuffle = PATCH_SIZE // (LATENT_SIZE * 2 ** (len(widths) - 1))  # 2 or 4
        up = nn.Upsample(scale_factor=2.0, mode="nearest")
        layers: list[nn.Module] = [
            conv3x3(config.latent_channels, widths[0]), nn.SiLU(),  # 32x32
            conv3x3(widths[0], widths[0]), nn.SiLU(),
        ]  # fmt: skip
        for before, width in zip(widths, widths[1:]):  # 64x64, then 128x128
            layers += [up, conv3x3(before, width), nn.SiLU()]
        layers += [conv3x3(widths[-1], 3 * shuffle * shuffle), nn.PixelShuffle(shuffle), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(latents)


def decoder_reach(config: CompactConfig) -> int:
    """Latent rows above a latent row that the decoder's pixels of that row depend on.

    Every decoder convolution is 3x3 with zero padding and nothing mixes rows further (no
    normalisation, nearest upsampling, PixelShuffle): a conv at latent scale reaches 1 latent
    row, at 64x64 half a row, at 128x128 a quarter. Both decoder shapes reach 3 rows (two convs
    at 32x32, then one conv per further level plus the last one), so decoding latent rows
    r - 3 .. 31 gives exactly the pixels of rows 8r .. 255 (tests/test_models_compact.py).
    """
    levels = len(config.decoder_channels)
    reach = 2.0  # the two convolutions at 32x32
    reach += sum(0.5**level for level in range(1, levels))  # one conv after each upsampling
    reach += 0.5 ** (levels - 1)  # the conv before PixelShuffle, at the last level
    return math.ceil(reach)


class CompactRenderGraph(nn.Module):
    """The per-frame render graph that draws only patch rows `rows_from`..255 (rows above are
    0): the UNet as CompactNet, the decoder on latent rows rows_from/8 - decoder_reach(..)..31.

    Same inputs and output shape as CompactNet.forward ([N,2C,32,32], [N,50,384] ->
    [N,3,256,256] BGR in [0, 1]), identical pixels from rows_from down. The blend never reads
    rows above BLEND_ROWS_FROM (blending.landmark_face_mask), and the decoder is a third of the
    render on 2 CPU cores (v2.1, ONNX Runtime, batch 8: decoder 3.73 ms of 6.34 a frame; all 32
    rows 3.73 ms, from latent row 10 2.57 ms; session 12).
    """

    def __init__(self, net: "CompactNet", rows_from: int = BLEND_ROWS_FROM):
        super().__init__()
        if rows_from % LATENT_DOWNSAMPLE or not 0 <= rows_from < PATCH_SIZE:
            raise ValueError(f"rows_from must be a multiple of {LATENT_DOWNSAMPLE} in 0..{PATCH_SIZE - 8}, got {rows_from}")
        self.net = net
        self.rows_from = rows_from
        self.first_latent_row = max(0, rows_from // LATENT_DOWNSAMPLE - decoder_reach(net.config))

    def forward(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        predicted = self.net.unet(latents, audio)[:, :, self.first_latent_row :]
        images = self.net.decoder(predicted)
        drawn = images[:, :, self.rows_from - self.first_latent_row * LATENT_DOWNSAMPLE :]
        # rows 0..rows_from-1 are zeros (cat, not F.pad: the exporter's Pad reverses its pads
        # with a step -1 Slice that it warns it cannot fold)
        undrawn = drawn.new_zeros(drawn.shape[0], drawn.shape[1], self.rows_from, drawn.shape[3])
        return torch.cat([undrawn, drawn], dim=2)


class CompactNet(nn.Module):
    """All weights of the family; forward() is the per-frame render graph (UNet + decoder),
    the one benchmarked and exported to ONNX."""

    def __init__(self, config: CompactConfig):
        super().__init__()
        self.config = config
        self.encoder = LatentEncoder(config)
        self.unet = CompactUNet(config)
        self.decoder = LatentDecoder(config)

    def forward(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.unet(latents, audio))


# -------------------------------------------------------------------------- pixel conversion


def crops_to_tensor(crops_bgr: np.ndarray) -> torch.Tensor:
    """[N,256,256,3] uint8 BGR -> [N,3,256,256] float32 BGR in [0, 1]."""
    check_crops(crops_bgr)
    return torch.from_numpy(crops_bgr).permute(0, 3, 1, 2).float() / 255.0


def tensor_to_crops(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] float in [0, 1] (BGR) -> [N,H,W,3] uint8 BGR, clipped, rounded to nearest
    (+0.5 then truncation; compose.family_levels rounds the same way on a GPU).

    One image at a time, channels interleaved by cv2.merge first: numpy's strided
    NCHW->NHWC transpose was half the cost (measured 5.4 -> 2.3 ms per batch of 8 on 2 cores,
    scratch benchmark, session 11). Single-threaded numpy on purpose: torch's multi-threaded
    elementwise ops were 5-30x slower (1-8 ms per patch) whenever other processes held the
    2 cores.
    """
    pixels = images.detach().float().cpu().numpy()
    n, channels, height, width = pixels.shape
    out = np.empty((n, height, width, channels), np.uint8)
    for i in range(n):
        interleaved = cv2.merge(list(pixels[i])).reshape(height, width, channels)  # float32, a new array
        np.clip(interleaved, 0.0, 1.0, out=interleaved)
        interleaved *= 255.0
        interleaved += 0.5
        out[i] = interleaved  # the cast truncates: rounds to nearest after +0.5
    return out


# ------------------------------------------------------------------------------------ model


class CompactModel:
    """RendererModel for compact-v1.

    precision: "fp32", or "bf16"/"fp16" autocast (bf16 is fast on CPUs with avx512_bf16/AMX;
    measure with benchmarks/bench_compact_model.py). channels_last helps the autocast paths.
    rows_from: the first patch row the render graph (`render_graph()`: engines, the frame
    engine) draws; 0 draws all. render() and decode() always draw every row (evaluation
    measures the upper half).
    """

    model_id = MODEL_ID
    latent_size = LATENT_SIZE

    def __init__(
        self,
        net: CompactNet,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        notes: dict[str, str] | None = None,
        rows_from: int = BLEND_ROWS_FROM,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.config = net.config
        self.latent_channels = net.config.latent_channels
        self.device = torch.device(device)
        self.precision = precision
        # how the weights were made (e.g. the Whisper variant and lookahead the training
        # features used: live features must match); saved in the checkpoint metadata
        self.notes = dict(notes or {})
        self.rows_from = rows_from
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._weights_hash = state_dict_hash(net.state_dict())
        self.net = net.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)

    # -- construction and files

    @classmethod
    def random(
        cls, config: CompactConfig | None = None, *, seed: int = 0, **kwargs
    ) -> CompactModel:
        """Randomly initialised weights (PyTorch's default init), reproducible by seed."""
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            net = CompactNet(config or CompactConfig())
        finally:
            torch.random.set_rng_state(generator_state)
        return cls(net, **kwargs)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.net.state_dict().items()}
        metadata = {"model_id": MODEL_ID, "config": self.config.to_json()}
        metadata["notes"] = json.dumps(self.notes, sort_keys=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> CompactModel:
        """Strict load of a compact-v1 safetensors file: config from its metadata, then every
        key and shape checked (ModelLoadError names the file and lists what is wrong)."""
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{path}: compact model weights file does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from exc
        if metadata.get("model_id") != MODEL_ID or "config" not in metadata:
            raise ModelLoadError(
                f"{path}: metadata model_id is {metadata.get('model_id')!r} (need {MODEL_ID!r} and a "
                "'config' entry); was it saved by CompactModel.save()?"
            )
        try:
            config = CompactConfig.from_json(metadata["config"])
            net = CompactNet(config)
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"{path}: bad compact config in metadata ({exc})") from exc
        check_state_dict(net.state_dict(), tensors, path)
        net.load_state_dict(tensors, strict=True)
        notes = json.loads(metadata.get("notes", "{}"))
        return cls(net, notes=notes, **kwargs)

    # -- RendererModel

    def weights_hash(self) -> str:
        return self._weights_hash

    def render_graph(self) -> nn.Module:
        """The per-frame render graph engines are built from: CompactNet, or with rows_from > 0
        a CompactRenderGraph that leaves the rows above rows_from at 0."""
        return CompactRenderGraph(self.net, self.rows_from) if self.rows_from else self.net

    def _autocast(self):
        enabled = self.precision != "fp32"
        dtype = _AUTOCAST_DTYPE.get(self.precision, torch.bfloat16)
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    @torch.no_grad()
    def encode(self, crops_bgr: np.ndarray) -> torch.Tensor:
        """[N,256,256,3] uint8 BGR -> [N,C,32,32] float32 latents (CPU). Always fp32: cached
        latents must not depend on the precision the renderer happens to run at."""
        pixels = crops_to_tensor(crops_bgr).to(self.device, memory_format=self.memory_format)
        return self.net.encoder(pixels).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """[N,C,32,32] latents -> [N,256,256,3] uint8 BGR (autoencoder check, training views)."""
        with self._autocast():
            images = self.net.decoder(latents.to(self.device, memory_format=self.memory_format))
        return tensor_to_crops(images)

    @torch.no_grad()
    def render(self, latents: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
        """[N,2C,32,32] latents + [N,50,384] audio windows -> [N,256,256,3] uint8 BGR."""
        check_render_inputs(latents, audio, self.latent_channels, self.latent_size)
        latents = latents.to(self.device, torch.float32, memory_format=self.memory_format)
        with self._autocast():
            images = self.net(latents, audio.to(self.device, torch.float32))
        return tensor_to_crops(images)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
