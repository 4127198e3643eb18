"""Training losses of the compact renderer, shared by export.train and per-avatar tuning.

Run-time code (realtime_avatar.tuning, `prepare --tune`) fine-tunes a model on the user's
machine, so the losses live here rather than in the build-time trainer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from realtime_avatar.models.base import MASKED_ROWS_FROM, PATCH_SIZE

# Loss weights. The mouth is where the model has work to do; the upper face comes from the
# latents almost for free, so it is weighted low but not zero (identity must hold).
LOWER_HALF_WEIGHT = 2.0  # extra weight on rows 128..255 (the masked half)
MOUTH_WEIGHT = 6.0  # extra weight, a Gaussian around the mouth
MOUTH_CENTRE = (0.5, 0.64)  # (x, y) of the mouth in the MuseTalk face box, fractions of the crop
MOUTH_SIGMA = (0.16, 0.09)
GRADIENT_WEIGHT = 0.5


def loss_weight_map(size: int = PATCH_SIZE) -> torch.Tensor:
    """[1, 1, size, size] per-pixel loss weight: 1, plus the lower half, plus the mouth."""
    ys = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    xs = ys.clone()
    gauss_y = torch.exp(-0.5 * ((ys - MOUTH_CENTRE[1]) / MOUTH_SIGMA[1]) ** 2)
    gauss_x = torch.exp(-0.5 * ((xs - MOUTH_CENTRE[0]) / MOUTH_SIGMA[0]) ** 2)
    weight = 1.0 + MOUTH_WEIGHT * gauss_y[:, None] * gauss_x[None, :]
    weight[MASKED_ROWS_FROM * size // PATCH_SIZE :] += LOWER_HALF_WEIGHT
    return (weight / weight.mean())[None, None]


def image_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted L1 on pixels plus GRADIENT_WEIGHT x weighted L1 on horizontal and vertical
    differences (keeps edges: lip lines, teeth, eyes)."""
    pixel = (weight * (pred - target).abs()).mean()
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    grad = (weight[..., :, 1:] * (dx(pred) - dx(target)).abs()).mean()
    grad = grad + (weight[..., 1:, :] * (dy(pred) - dy(target)).abs()).mean()
    return pixel + GRADIENT_WEIGHT * grad


def latent_weight_map(size: int = PATCH_SIZE // 8) -> torch.Tensor:
    """loss_weight_map averaged down to the latent grid (32x32)."""
    return F.avg_pool2d(loss_weight_map(), PATCH_SIZE // size)


def cosine_lr(base: float, progress: float, warmup: float = 0.03, floor: float = 0.05) -> float:
    """Learning rate at `progress` (0..1 of a stage's time): linear warm-up, cosine decay."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base * max(progress / warmup, 0.02)
    t = (progress - warmup) / (1.0 - warmup)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))
