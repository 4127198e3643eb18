"""Pasting a rendered 256x256 mouth patch back into its avatar frame through a soft mask.

MuseTalk (realtime, v1.5) resizes the patch to the face box, pastes it into a square "crop box"
around the face (half-side int(max(w, h) // 2 * 1.5)) and blends that through a mask computed
once per cached frame: the face region found by BiSeNet face parsing, restricted to the face
box, the top half of the crop box zeroed (only the lower face talks), blurred with a Gaussian of
size int(0.1 * crop_w // 2 * 2) + 1. No BiSeNet weights can be had here, so the face region is
the mediapipe face-oval polygon with the jaw pushed down a little (an opening mouth lowers the
chin), everything else as MuseTalk.

One difference from MuseTalk, for a seamless result: MuseTalk's blurred mask is still about
one half at the face-box edge (the box ends 10 px below the chin), where the pasted pixels stop
and the frame's begin, so its seam can show a step. Here the blurred mask is also multiplied
by a window that falls smoothly to zero over half a kernel inside the box edge: the mask is
exactly zero outside the face box and every transition is gradual.

A second difference, for speed: the mask is zero wherever the resize would read patch rows above
models.base.BLEND_ROWS_FROM (96), so that compact render graphs need not draw them. MuseTalk's
mask already stops near row 110 for every face box that is not much wider than tall; the cut
only trims the blur's tail on boxes over 1.67x wider than tall.

Everything here is pure array math; `Blender` precomputes per frame what the real-time loop
needs and touches only the pixels the mask covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from realtime_avatar.face import FACE_OVAL, NOSE_TIP, NUM_LANDMARKS, BBox
from realtime_avatar.models.base import BLEND_ROWS_FROM, PATCH_SIZE

CROP_EXPAND = 1.5  # MuseTalk v1.5 realtime: crop box half-side = max(w, h) // 2 * 1.5
UPPER_BOUNDARY_RATIO = 0.5  # the top half of the crop box is never blended
JAW_DROP = 0.1  # push face-oval points below the nose tip down by 10% of their nose distance
_FILL_SHIFT = 4  # cv2 fixed-point bits: polygons drawn at 1/16 px precision


def crop_box(bbox: BBox, expand: float = CROP_EXPAND) -> BBox:
    """MuseTalk's get_crop_box: a square of half-side int(max(w, h) // 2 * expand) around the
    face box centre. Not clipped to the frame: the blend clips."""
    xc, yc = (bbox.x1 + bbox.x2) // 2, (bbox.y1 + bbox.y2) // 2
    s = int(max(bbox.width, bbox.height) // 2 * expand)
    return BBox(xc - s, yc - s, xc + s, yc + s)


def blur_kernel_size(crop_width: int) -> int:
    """MuseTalk's mask blur: int(0.1 * crop_w // 2 * 2) + 1, always odd."""
    return int(0.1 * crop_width // 2 * 2) + 1


def edge_feather(kernel: int) -> int:
    """Width (px) of the window that takes the mask to zero at the face-box edge."""
    return max(2, kernel // 2)


def _smooth_ramp(n: int, feather: int) -> np.ndarray:
    """[n] float32: 0 at both ends, rising to 1 over `feather` samples (smoothstep)."""
    d = np.minimum(np.arange(n) + 0.5, n - 0.5 - np.arange(n)) / feather
    d = np.clip(d, 0.0, 1.0)
    return (d * d * (3.0 - 2.0 * d)).astype(np.float32)


def landmark_face_mask(
    points: np.ndarray,
    bbox: BBox,
    crop: BBox,
    jaw_drop: float = JAW_DROP,
    upper_boundary_ratio: float = UPPER_BOUNDARY_RATIO,
    rows_from: int = BLEND_ROWS_FROM,
) -> np.ndarray:
    """The soft blending mask [crop.height, crop.width] uint8 (255 = patch) from landmarks.

    points: [478, 2] landmarks in frame pixels; bbox: the face box the patch covers; crop: the
    crop box (`crop_box(bbox)`) the mask is defined on. rows_from: the mask is zero wherever
    the bilinear resize would read patch rows above this one (render graphs may leave them
    undrawn; see models.base.BLEND_ROWS_FROM: a no-op for faces whose box is not much wider
    than tall).
    """
    if points.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks must be [{NUM_LANDMARKS}, 2], got {points.shape}")
    oval = points[list(FACE_OVAL)].astype(np.float64)
    nose_y = float(points[NOSE_TIP, 1])
    below = oval[:, 1] > nose_y
    oval[below, 1] = nose_y + (oval[below, 1] - nose_y) * (1.0 + jaw_drop)
    oval -= (crop.x1, crop.y1)

    h, w = crop.height, crop.width
    polygon = np.zeros((h, w), np.uint8)
    fixed = np.round(oval * (1 << _FILL_SHIFT)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(polygon, [fixed], 255, lineType=cv2.LINE_8, shift=_FILL_SHIFT)

    # MuseTalk keeps the parsed face only inside the face box, and only below the crop middle.
    inside = np.zeros_like(polygon)
    bx1, by1 = max(bbox.x1 - crop.x1, 0), max(bbox.y1 - crop.y1, 0)
    bx2, by2 = min(bbox.x2 - crop.x1, w), min(bbox.y2 - crop.y1, h)
    inside[by1:by2, bx1:bx2] = polygon[by1:by2, bx1:bx2]
    inside[: int(h * upper_boundary_ratio)] = 0

    k = blur_kernel_size(w)
    soft = cv2.GaussianBlur(inside, (k, k), 0).astype(np.float32)

    # Our addition: fall to zero smoothly at the face-box edge (see the module docstring).
    window = np.zeros((h, w), np.float32)
    if bx2 > bx1 and by2 > by1:
        feather = edge_feather(k)
        full_w = _smooth_ramp(bbox.width, feather)[bx1 + crop.x1 - bbox.x1 : bx2 + crop.x1 - bbox.x1]
        full_h = _smooth_ramp(bbox.height, feather)[by1 + crop.y1 - bbox.y1 : by2 + crop.y1 - bbox.y1]
        window[by1:by2, bx1:bx2] = np.outer(full_h, full_w)
    window[patch_rows_read(crop.y1 + np.arange(h), bbox) < rows_from] = 0.0
    return np.round(soft * window).astype(np.uint8)


def patch_rows_read(frame_rows: np.ndarray, bbox: BBox) -> np.ndarray:
    """The first 256x256 patch row that cv2's bilinear resize onto the face box reads for each
    frame row: floor((y - y1 + 0.5) * 256 / h - 0.5) (cv2.INTER_LINEAR's mapping; the next row
    is read too). int64, may be negative or past 255 for rows outside the box."""
    source = (np.asarray(frame_rows, np.float64) - bbox.y1 + 0.5) * PATCH_SIZE / bbox.height - 0.5
    return np.floor(source).astype(np.int64)


@dataclass(frozen=True)
class BlendRegion:
    """Where and how one cached frame takes its patch."""

    bbox: BBox  # the face box: the 256x256 patch is resized to it (may extend past the frame)
    crop: BBox  # the crop box the mask is defined on
    mask: np.ndarray  # [crop.height, crop.width] uint8, 255 = patch, 0 = frame untouched


def blend_region(points: np.ndarray, bbox: BBox, expand: float = CROP_EXPAND) -> BlendRegion:
    crop = crop_box(bbox, expand)
    return BlendRegion(bbox=bbox, crop=crop, mask=landmark_face_mask(points, bbox, crop))


@dataclass(frozen=True)
class _Prepared:
    """The precomputed part of a region: the frame rows/cols the mask covers (clipped to the
    frame), the matching slice of the resized patch, and the weights there."""

    frame_rows: slice
    frame_cols: slice
    patch_rows: slice
    patch_cols: slice
    weight: np.ndarray  # [h, w, 1] float32 in [0, 1]
    bbox_size: tuple[int, int]  # (width, height) the patch is resized to


def _intersect(a: BBox, b: BBox) -> BBox | None:
    x1, y1, x2, y2 = max(a.x1, b.x1), max(a.y1, b.y1), min(a.x2, b.x2), min(a.y2, b.y2)
    return BBox(x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _prepare(region: BlendRegion, frame_shape: tuple[int, int]) -> _Prepared | None:
    mask, crop, bbox = region.mask, region.crop, region.bbox
    if mask.shape != (crop.height, crop.width):
        raise ValueError(f"mask {mask.shape} does not match crop box {crop}")
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    # Mask support in frame coordinates, clipped to the frame and to the face box.
    covered = BBox(crop.x1 + int(xs.min()), crop.y1 + int(ys.min()),
                   crop.x1 + int(xs.max()) + 1, crop.y1 + int(ys.max()) + 1)
    box = covered.clip(frame_shape)
    box = None if box is None else _intersect(box, bbox)
    if box is None:  # the face box lies outside the frame
        return None
    weight = mask[box.y1 - crop.y1 : box.y2 - crop.y1, box.x1 - crop.x1 : box.x2 - crop.x1]
    return _Prepared(
        frame_rows=slice(box.y1, box.y2),
        frame_cols=slice(box.x1, box.x2),
        patch_rows=slice(box.y1 - bbox.y1, box.y2 - bbox.y1),
        patch_cols=slice(box.x1 - bbox.x1, box.x2 - bbox.x1),
        weight=(weight.astype(np.float32) / 255.0)[:, :, None],
        bbox_size=(bbox.width, bbox.height),
    )


class Blender:
    """Blends rendered patches into cached avatar frames, one precomputed region per frame.

    frame_index is the index of the cached frame (0 .. len-1), not of the ping-pong cycle.
    """

    def __init__(self, regions: Sequence[BlendRegion], frame_shape: tuple[int, ...]):
        self.regions = list(regions)
        self.frame_shape = tuple(frame_shape[:2]) + (3,)
        self._prepared = [_prepare(r, self.frame_shape[:2]) for r in self.regions]

    def __len__(self) -> int:
        return len(self.regions)

    def first_patch_row(self) -> int:
        """The first row of the 256x256 patch any frame's blend reads (PATCH_SIZE when none
        blends): render graphs that leave rows above their `rows_from` undrawn need it no smaller."""
        rows = [int(patch_rows_read(np.array([p.frame_rows.start]), r.bbox)[0])
                for p, r in zip(self._prepared, self.regions) if p is not None]
        return max(0, min(rows, default=PATCH_SIZE))

    def blend_into(self, frame_out: np.ndarray, patch_256_bgr: np.ndarray, frame_index: int) -> None:
        """Composite the patch into frame_out (a copy of cached frame frame_index) in place.

        Only the pixels under the mask are read or written; where the mask is 0 frame_out keeps
        its exact values.
        """
        if frame_out.shape != self.frame_shape or frame_out.dtype != np.uint8:
            raise ValueError(
                f"output frame must be {self.frame_shape} uint8, got {frame_out.shape} {frame_out.dtype}"
            )
        if patch_256_bgr.shape != (PATCH_SIZE, PATCH_SIZE, 3) or patch_256_bgr.dtype != np.uint8:
            raise ValueError(
                f"patch must be [{PATCH_SIZE}, {PATCH_SIZE}, 3] uint8 BGR, got "
                f"{patch_256_bgr.shape} {patch_256_bgr.dtype}"
            )
        if not 0 <= frame_index < len(self._prepared):
            raise IndexError(f"frame_index {frame_index} outside 0..{len(self._prepared) - 1}")
        p = self._prepared[frame_index]
        if p is None:  # the face box lies entirely outside the frame: nothing to paste
            return
        # MuseTalk resizes with cv2's default (bilinear) to the face box size.
        resized = cv2.resize(patch_256_bgr, p.bbox_size, interpolation=cv2.INTER_LINEAR)
        patch = resized[p.patch_rows, p.patch_cols]
        region = frame_out[p.frame_rows, p.frame_cols]
        # region + w * (patch - region), rounded: w == 0 leaves the frame's values exactly.
        blended = region.astype(np.float32)
        blended += p.weight * (patch.astype(np.float32) - blended)
        np.rint(blended, out=blended)
        region[...] = blended.astype(np.uint8)

    def compose(self, frame: np.ndarray, patch_256_bgr: np.ndarray, frame_index: int) -> np.ndarray:
        """A new frame: a copy of `frame` with the patch blended in."""
        out = frame.copy()
        self.blend_into(out, patch_256_bgr, frame_index)
        return out
