"""The one interface every renderer model family implements.

Avatar preparation calls `encode` once per cached frame; the real-time loop calls `render` per
batch of frames. Images cross this boundary as uint8 BGR (OpenCV's order, what PyAV/cv2 give
us); each family converts to its own tensor convention inside.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

PATCH_SIZE = 256  # face crops and rendered mouth patches are 256x256 (MuseTalk)
MASKED_ROWS_FROM = PATCH_SIZE // 2  # the masked input zeroes rows 128..255 (the lower half)


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
