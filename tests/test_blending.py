"""Blending a patch into an avatar frame: MuseTalk's box/kernel formulas, exactness outside the
mask, a smooth seam, and faces cut by the frame border. Landmarks come from the real mediapipe
face mesh on the astronaut photo (detected once per module)."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import skimage.data

from realtime_avatar.blending import (
    Blender,
    BlendRegion,
    blend_region,
    blur_kernel_size,
    crop_box,
    edge_feather,
    landmark_face_mask,
)
from realtime_avatar.face import LIPS_OUTER, NOSE_TIP, BBox, detect_face_landmarks, face_bbox
from realtime_avatar.models.base import BLEND_ROWS_FROM


@pytest.fixture(scope="module")
def astronaut_bgr() -> np.ndarray:
    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="module")
def points(astronaut_bgr) -> np.ndarray:
    lm = detect_face_landmarks(astronaut_bgr)
    assert lm is not None
    return lm.points


def _random_patch(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)


def test_crop_box_is_musetalks_get_crop_box():
    # w=92, h=136: centre (225, 120), half-side int(136 // 2 * 1.5) = 102
    assert crop_box(BBox(179, 52, 271, 188)) == BBox(123, 18, 327, 222)
    # odd sizes: centre (50, 25) by floor division, half-side int(101 // 2 * 1.5) = 75
    assert crop_box(BBox(0, 0, 101, 51)) == BBox(-25, -50, 125, 100)
    assert crop_box(BBox(0, 0, 100, 100), expand=1.0) == BBox(0, 0, 100, 100)


def test_blur_kernel_is_musetalks_formula():
    assert blur_kernel_size(204) == 21
    assert blur_kernel_size(326) == 33  # 32.6 // 2 * 2 = 32
    assert blur_kernel_size(96) == 9
    assert all(blur_kernel_size(w) % 2 == 1 for w in range(20, 800, 7))


def test_mask_covers_the_lower_face_only(points, astronaut_bgr):
    bbox = face_bbox(points, astronaut_bgr.shape)
    crop = crop_box(bbox)
    mask = landmark_face_mask(points, bbox, crop)
    assert mask.shape == (crop.height, crop.width) and mask.dtype == np.uint8

    def at(p):
        return mask[int(round(p[1])) - crop.y1, int(round(p[0])) - crop.x1]

    # The lips are fully blended; so is the point between the nose tip and the mouth.
    assert all(at(p) >= 250 for p in points[list(LIPS_OUTER)])
    # Nothing above the crop middle, beyond what the blur spreads.
    k = blur_kernel_size(crop.width)
    assert not mask[: crop.height // 2 - k // 2].any()
    # Nothing outside the face box (the edge window), and a wide zero border around it.
    inside = np.zeros_like(mask, bool)
    inside[bbox.y1 - crop.y1 : bbox.y2 - crop.y1, bbox.x1 - crop.x1 : bbox.x2 - crop.x1] = True
    assert not mask[~inside].any()
    # The eyes (well above the nose tip) stay untouched.
    assert at(points[159]) == 0 and at(points[386]) == 0
    assert points[NOSE_TIP][1] > crop.y1 + crop.height // 2 - k // 2  # the cut lies above the tip


def test_pixels_outside_the_mask_never_change(points, astronaut_bgr):
    region = blend_region(points, face_bbox(points, astronaut_bgr.shape))
    blender = Blender([region], astronaut_bgr.shape)
    out = astronaut_bgr.copy()
    assert blender.blend_into(out, _random_patch(), 0) is None  # in place
    full_mask = np.zeros(astronaut_bgr.shape[:2], np.uint8)
    c = region.crop.clip(astronaut_bgr.shape)
    full_mask[c.y1 : c.y2, c.x1 : c.x2] = region.mask[
        c.y1 - region.crop.y1 : c.y2 - region.crop.y1, c.x1 - region.crop.x1 : c.x2 - region.crop.x1
    ]
    untouched = full_mask == 0
    assert np.array_equal(out[untouched], astronaut_bgr[untouched])
    changed = np.any(out != astronaut_bgr, axis=2)
    assert changed.sum() > 0.8 * (full_mask > 0).sum()


def test_the_blend_never_reads_patch_rows_above_blend_rows_from(points, astronaut_bgr):
    """Compact render graphs leave patch rows above BLEND_ROWS_FROM undrawn: the mask must not
    read them. A real face: the cut changes nothing (its mask starts near row 110). A face box
    far wider than tall (the face squashed to 20% of its height): the cut zeroes the mask's
    upper tail, and a patch with noise above the row composes to exactly the same frame."""
    bbox = face_bbox(points, astronaut_bgr.shape)
    crop = crop_box(bbox)
    assert np.array_equal(landmark_face_mask(points, bbox, crop), landmark_face_mask(points, bbox, crop, rows_from=0))
    assert 100 <= Blender([blend_region(points, bbox)], astronaut_bgr.shape).first_patch_row() < 128

    squashed = points.copy()
    squashed[:, 1] = points[NOSE_TIP, 1] + 0.2 * (points[:, 1] - points[NOSE_TIP, 1])
    wide = face_bbox(squashed, astronaut_bgr.shape)
    assert wide.width > 2 * wide.height
    uncut = Blender([BlendRegion(wide, crop_box(wide), landmark_face_mask(squashed, wide, crop_box(wide), rows_from=0))],
                    astronaut_bgr.shape)
    assert uncut.first_patch_row() < BLEND_ROWS_FROM  # without the cut it would read them
    blender = Blender([blend_region(squashed, wide)], astronaut_bgr.shape)
    assert BLEND_ROWS_FROM <= blender.first_patch_row() < 128
    drawn = _random_patch(2)
    undrawn_top = drawn.copy()
    undrawn_top[:BLEND_ROWS_FROM] = 0
    assert np.array_equal(blender.compose(astronaut_bgr, drawn, 0), blender.compose(astronaut_bgr, undrawn_top, 0))
    assert not np.array_equal(uncut.compose(astronaut_bgr, drawn, 0), uncut.compose(astronaut_bgr, undrawn_top, 0))


def test_fully_masked_pixels_take_the_patch(points, astronaut_bgr):
    bbox = face_bbox(points, astronaut_bgr.shape)
    region = blend_region(points, bbox)
    patch = _random_patch(1)
    out = Blender([region], astronaut_bgr.shape).compose(astronaut_bgr, patch, 0)
    resized = cv2.resize(patch, (bbox.width, bbox.height), interpolation=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(region.mask == 255)
    fy, fx = ys + region.crop.y1, xs + region.crop.x1
    assert len(ys) > 1000
    assert np.array_equal(out[fy, fx], resized[fy - bbox.y1, fx - bbox.x1])


def test_seam_is_smooth(points, astronaut_bgr):
    # Worst case for a seam: a white patch over a black frame. The step between neighbouring
    # pixels must stay far from the 255 of a hard paste, bounded by the blur and edge window.
    bbox = face_bbox(points, astronaut_bgr.shape)
    region = blend_region(points, bbox)
    black = np.zeros_like(astronaut_bgr)
    out = Blender([region], black.shape).compose(black, np.full((256, 256, 3), 255, np.uint8), 0)
    gray = out[:, :, 0].astype(np.int32)
    step = max(np.abs(np.diff(gray, axis=0)).max(), np.abs(np.diff(gray, axis=1)).max())
    k = blur_kernel_size(region.crop.width)
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a kernel of size k
    gaussian_edge = 255 / (sigma * np.sqrt(2 * np.pi))  # steepest slope of a blurred step
    ramp_edge = 1.5 * 255 / edge_feather(k)  # steepest slope of the smoothstep window
    assert step <= gaussian_edge + ramp_edge
    print(f"seam: max step {step}, bound {gaussian_edge + ramp_edge:.1f}")
    assert step < 60  # a hard paste would step by 255


@pytest.mark.parametrize("shift", [(200, 100), (-300, 80), (150, -350), (-300, -340)])
def test_face_cut_by_the_frame_border(points, astronaut_bgr, shift):
    """The same face moved so that the frame edge cuts it (top-left, right, bottom, bottom-right
    corner): the composite is exactly the corresponding part of the uncut composite."""
    dx, dy = shift
    patch = _random_patch(2)
    full_bbox = face_bbox(points, astronaut_bgr.shape, extra_margin=10)
    full = Blender([blend_region(points, full_bbox)], astronaut_bgr.shape).compose(astronaut_bgr, patch, 0)

    # The cut frame: the full image seen through a window offset by (dx, dy).
    x0, y0 = max(dx, 0), max(dy, 0)
    x1, y1 = min(512 + dx, 512), min(512 + dy, 512)
    cut = np.ascontiguousarray(astronaut_bgr[y0:y1, x0:x1])
    shifted_bbox = BBox(full_bbox.x1 - x0, full_bbox.y1 - y0, full_bbox.x2 - x0, full_bbox.y2 - y0)
    region = blend_region(points - np.float32([x0, y0]), shifted_bbox)
    out = Blender([region], cut.shape).compose(cut, patch, 0)
    assert np.array_equal(out, full[y0:y1, x0:x1])


def test_face_box_outside_the_frame_leaves_it_untouched(points, astronaut_bgr):
    bbox = face_bbox(points, astronaut_bgr.shape)
    region = blend_region(points + 600, BBox(bbox.x1 + 600, bbox.y1 + 600, bbox.x2 + 600, bbox.y2 + 600))
    out = Blender([region], astronaut_bgr.shape).compose(astronaut_bgr, _random_patch(), 0)
    assert np.array_equal(out, astronaut_bgr)


def test_bad_inputs_are_rejected(points, astronaut_bgr):
    region = blend_region(points, face_bbox(points, astronaut_bgr.shape))
    blender = Blender([region], astronaut_bgr.shape)
    out = astronaut_bgr.copy()
    with pytest.raises(ValueError, match="patch must be"):
        blender.blend_into(out, np.zeros((128, 128, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="output frame must be"):
        blender.blend_into(out[:100], _random_patch(), 0)
    with pytest.raises(IndexError, match="frame_index 1"):
        blender.blend_into(out, _random_patch(), 1)
    with pytest.raises(ValueError, match="does not match crop box"):
        Blender([BlendRegion(region.bbox, region.crop, region.mask[:10])], astronaut_bgr.shape)


@pytest.mark.parametrize("height, width", [(512, 512), (720, 1280)])
def test_blend_cost_per_frame(astronaut_bgr, height, width):
    face = cv2.resize(astronaut_bgr, (height, height))
    frame = np.zeros((height, width, 3), np.uint8)
    x0 = (width - height) // 2
    frame[:, x0 : x0 + height] = face
    lm = detect_face_landmarks(frame)
    blender = Blender([blend_region(lm.points, face_bbox(lm.points, frame.shape))], frame.shape)
    out, patch = frame.copy(), _random_patch()
    blender.blend_into(out, patch, 0)
    n = 50
    start = time.perf_counter()
    for _ in range(n):
        blender.blend_into(out, patch, 0)
    ms = (time.perf_counter() - start) / n * 1e3
    print(f"blend {height}x{width}: {ms:.3f} ms/frame")
    assert ms < 10.0  # measured ~0.25 ms; generous for a loaded 2-core machine
