"""Compose on the device: rendered patches blended into cached avatar frames in one torch call.

The numpy `Blender` (blending.py) does, per frame: patch -> uint8, cv2 bilinear resize to the
face box, soft-mask blend into a copy of the cached frame, rounding. `ComposeBank` does the
same for a whole batch in torch, on the device the frames live on, so that on a GPU nothing
but the finished uint8 frames crosses to the host (DESIGN.md 11: the host-side blend cost
30-90x the network there).

How one batched call covers frames of different avatars and face boxes: every cached frame
gets a fixed-size *window* (the largest blend region of the bank, placed inside the frame so
that it contains that frame's region) with

    weight [Hm, Wm]     the soft mask there (0 outside the region: those pixels stay exact)
    grid   [Hm, Wm, 2]  where each window pixel samples the 256x256 patch (grid_sample,
                        bilinear, border clamp = cv2.INTER_LINEAR's mapping of the patch onto
                        the face box, (dst + 0.5) * 256 / box - 0.5)

so the batch is: gather the windows' grids/weights/pixels, one grid_sample, one blend, one
scatter back into copies of the cached frames. Windows never overlap their own frame's edges
(they are shifted inside), so the scatter writes each pixel once.

Result: identical to the numpy blend within 1 grey level (cv2 resizes uint8 in 11-bit fixed
point; here the resize is exact float, then rounded like cv2's output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .blending import Blender, _prepare
from .models.base import PATCH_SIZE

FRAME_FORMATS = ("bgr24", "yuv420p")  # what PyAV's VideoFrame.from_ndarray takes


def family_levels(model_id: str, images: torch.Tensor) -> torch.Tensor:
    """A family's float render output [N,3,256,256] -> BGR grey levels 0..255 (float32, whole
    numbers, same device), rounded exactly as the family's own uint8 conversion does:
    compact (BGR in [0,1]): clip then +0.5 truncation (models.compact.tensor_to_crops);
    musetalk (RGB in [-1,1]): half-to-even rounding, channels flipped (vae_output_to_crops)."""
    if model_id.startswith("compact"):
        return torch.floor((images.float() * 255.0).clamp_(0.0, 255.0) + 0.5)
    if model_id.startswith("musetalk"):
        unit = (images / 2 + 0.5).clamp(0, 1).float()
        return torch.round(unit * 255.0).flip(1)
    raise ValueError(f"no output conversion for model family {model_id!r}")


@dataclass(frozen=True)
class _Window:
    top: int
    left: int
    weight: np.ndarray  # [Hm, Wm] float32
    grid: np.ndarray  # [Hm, Wm, 2] float32, x then y in grid_sample's [-1, 1]


def _windows(blender: Blender, frame_shape: tuple[int, int], size: tuple[int, int]) -> list[_Window]:
    """Each frame's window of `size` (Hm, Wm) holding its blend region (see the module doc)."""
    h_frame, w_frame = frame_shape
    hm, wm = size
    rows, cols = np.arange(hm, dtype=np.float64), np.arange(wm, dtype=np.float64)
    out = []
    for region in blender.regions:
        p = _prepare(region, frame_shape)
        weight = np.zeros((hm, wm), np.float32)
        if p is None:  # nothing blended into this frame
            out.append(_Window(0, 0, weight, np.zeros((hm, wm, 2), np.float32)))
            continue
        top = min(p.frame_rows.start, h_frame - hm)
        left = min(p.frame_cols.start, w_frame - wm)
        dy, dx = p.frame_rows.start - top, p.frame_cols.start - left
        weight[dy : dy + p.weight.shape[0], dx : dx + p.weight.shape[1]] = p.weight[:, :, 0]
        box = region.bbox
        # window pixel -> pixel of the face-box-sized patch -> grid_sample's normalised coords
        gy = 2.0 * (top + rows - box.y1 + 0.5) / box.height - 1.0
        gx = 2.0 * (left + cols - box.x1 + 0.5) / box.width - 1.0
        grid = np.stack(np.broadcast_arrays(gx[None, :], gy[:, None]), axis=-1).astype(np.float32)
        out.append(_Window(top, left, weight, grid))
    return out


def _region_size(blender: Blender, frame_shape: tuple[int, int]) -> tuple[int, int]:
    sizes = [(p.frame_rows.stop - p.frame_rows.start, p.frame_cols.stop - p.frame_cols.start)
             for p in (_prepare(r, frame_shape) for r in blender.regions) if p is not None]
    return (max(s[0] for s in sizes), max(s[1] for s in sizes)) if sizes else (1, 1)


class ComposeBank:
    """The cached frames of every avatar of one frame size, with their blend windows, on one
    device. Frames are addressed by bank index: `add()` returns an avatar's first index.

    frames [F,H,W,3] uint8, weights [F,Hm,Wm,1] float32, grids [F,Hm,Wm,2] float32,
    tops/lefts [F] int64 - all on `device`. Adding an avatar whose regions are larger than the
    bank's windows rebuilds the windows (done at startup; not on the frame path).
    `add(..., build=False)` only indexes the avatar: a CPU frame engine that composes on the host
    never calls compose(), and the tensors cost ~0.85 MB per cached frame (a 512x512 frame's copy,
    768 KB, plus the float32 weights and grids of its blend window: 62 MB for the bundled
    avatar's 75 frames); compose() builds them the first time it is called.
    """

    def __init__(self, frame_shape: tuple[int, int], device: torch.device):
        self.frame_shape = tuple(frame_shape)
        self.device = torch.device(device)
        self._blenders: list[Blender] = []
        self._sources: list[np.ndarray | None] = []  # each avatar's frames until built
        self._count = 0
        self._built = 0  # avatars whose frames and windows are in the tensors below
        self.size = (1, 1)
        self.frames = torch.empty((0, *self.frame_shape, 3), dtype=torch.uint8, device=self.device)

    def __len__(self) -> int:
        return self._count

    @property
    def built(self) -> bool:
        """Whether the device tensors hold every avatar added (compose() needs nothing more)."""
        return self._built == len(self._blenders)

    def add(self, frames: np.ndarray, blender: Blender, *, build: bool = True) -> int:
        """Put an avatar's cached frames [n,H,W,3] uint8 BGR and its Blender in the bank;
        returns the bank index of its frame 0. build=False defers the device tensors to the
        first compose() (class docstring). Raises ValueError if frames and blender disagree."""
        if tuple(frames.shape[1:3]) != self.frame_shape:
            raise ValueError(f"frames {frames.shape[1:3]} do not fit a bank of {self.frame_shape}")
        if len(frames) != len(blender):
            raise ValueError(f"{len(frames)} frames but {len(blender)} blend regions")
        first = self._count
        self._blenders.append(blender)
        self._sources.append(frames)
        self._count += len(frames)
        if build:
            self._build()
        return first

    def _build(self) -> None:
        if self.built:
            return
        fresh = self._sources[self._built :]
        owned = [torch.from_numpy(np.array(f, np.uint8)).to(self.device) for f in fresh]  # owns a copy
        self.frames = torch.cat([self.frames, *owned])
        for blender in self._blenders[self._built :]:
            size = _region_size(blender, self.frame_shape)
            self.size = (max(self.size[0], size[0]), max(self.size[1], size[1]))
        windows = [w for b in self._blenders for w in _windows(b, self.frame_shape, self.size)]
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        self.weights = as_tensor(np.stack([w.weight for w in windows])[..., None])
        self.grids = as_tensor(np.stack([w.grid for w in windows]))
        self.tops = torch.tensor([w.top for w in windows], dtype=torch.int64, device=self.device)
        self.lefts = torch.tensor([w.left for w in windows], dtype=torch.int64, device=self.device)
        self._rows = torch.arange(self.size[0], device=self.device)
        self._cols = torch.arange(self.size[1], device=self.device)
        self._sources[self._built :] = [None] * len(fresh)  # the device copy is the bank's now
        self._built = len(self._blenders)

    def compose(self, levels: torch.Tensor, frame_ids: torch.Tensor) -> torch.Tensor:
        """Patches [N,3,256,256] BGR grey levels (float, see family_levels) blended into copies
        of bank frames `frame_ids` [N] int64 -> [N,H,W,3] uint8 BGR, on the bank's device."""
        if levels.ndim != 4 or tuple(levels.shape[1:]) != (3, PATCH_SIZE, PATCH_SIZE):
            raise ValueError(f"patches must be [N,3,{PATCH_SIZE},{PATCH_SIZE}], got {tuple(levels.shape)}")
        self._build()  # no-op unless avatars were added with build=False
        n = levels.shape[0]
        ids = frame_ids.to(self.device)
        # cv2.resize of a uint8 patch gives uint8: round the resized patch the same way
        resized = F.grid_sample(levels.float(), self.grids[ids], mode="bilinear",
                                padding_mode="border", align_corners=False)
        resized = torch.round(resized).permute(0, 2, 3, 1)  # [N,Hm,Wm,3]
        out = self.frames[ids]  # a copy: advanced indexing
        batch = torch.arange(n, device=self.device)[:, None, None]
        rows = (self.tops[ids, None] + self._rows)[:, :, None]
        cols = (self.lefts[ids, None] + self._cols)[:, None, :]
        region = out[batch, rows, cols].float()
        blended = torch.round(region + self.weights[ids] * (resized - region)).clamp_(0, 255)
        out[batch, rows, cols] = blended.to(torch.uint8)
        return out


def bgr_to_yuv420p(frames: torch.Tensor) -> torch.Tensor:
    """[N,H,W,3] uint8 BGR (H, W even) -> [N, H*3/2, W] uint8 planar I420, the array layout
    PyAV's VideoFrame.from_ndarray(..., format="yuv420p") takes: the Y plane, then U and V
    (each H/2 x W/2) packed row after row. BT.601 limited range in 8-bit integer arithmetic
    (libswscale's default for bgr24 -> yuv420p); chroma is the mean of each 2x2 block."""
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {w}x{h}")
    bgr = frames.to(torch.int32)
    b, g, r = bgr[..., 0], bgr[..., 1], bgr[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    quad = lambda c: c.reshape(n, h // 2, 2, w // 2, 2).sum(dim=(2, 4))  # noqa: E731
    rs, gs, bs = quad(r), quad(g), quad(b)  # 4x the 2x2 mean
    u = ((-38 * rs - 74 * gs + 112 * bs + 512) >> 10) + 128
    v = ((112 * rs - 94 * gs - 18 * bs + 512) >> 10) + 128
    chroma = torch.stack([u, v], dim=1).reshape(n, h // 2, w)  # U rows then V rows, W/2 each
    return torch.cat([y, chroma], dim=1).clamp_(0, 255).to(torch.uint8)
