"""Face landmarks on the real astronaut photo with the real mediapipe face mesh."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import skimage.data

from realtime_avatar import face
from realtime_avatar.face import (
    CHIN,
    FACE_OVAL,
    JAW,
    LIPS_INNER,
    LIPS_OUTER,
    NOSE_TIP,
    BBox,
    FaceLandmarks,
    FaceTracker,
    MultipleFacesWarning,
    OneEuroFilter,
    detect_face_landmarks,
    face_bbox,
)


@pytest.fixture(scope="module")
def astronaut_bgr() -> np.ndarray:
    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="module")
def astronaut_landmarks(astronaut_bgr) -> FaceLandmarks:
    lm = detect_face_landmarks(astronaut_bgr)
    assert lm is not None
    return lm


def _polygon_edges(poly: tuple[int, ...]) -> set[frozenset[int]]:
    return {frozenset((a, b)) for a, b in zip(poly, poly[1:] + poly[:1])}


@pytest.mark.parametrize(
    "group, mp_name",
    [(FACE_OVAL, "FACEMESH_FACE_OVAL"), (LIPS_OUTER + LIPS_INNER, "FACEMESH_LIPS")],
)
def test_index_polygons_follow_mediapipe_topology(group, mp_name):
    import mediapipe as mp

    mp_edges = {frozenset(e) for e in getattr(mp.solutions.face_mesh, mp_name)}
    if mp_name == "FACEMESH_LIPS":
        ours = _polygon_edges(LIPS_OUTER) | _polygon_edges(LIPS_INNER)
    else:
        ours = _polygon_edges(group)
    assert ours == mp_edges


def test_eye_lids_follow_mediapipe_topology():
    import mediapipe as mp

    fm = mp.solutions.face_mesh
    for upper, lower, mp_edges in [
        (face.RIGHT_EYE_UPPER, face.RIGHT_EYE_LOWER, fm.FACEMESH_RIGHT_EYE),
        (face.LEFT_EYE_UPPER, face.LEFT_EYE_LOWER, fm.FACEMESH_LEFT_EYE),
    ]:
        ours = {frozenset(e) for lid in (upper, lower) for e in zip(lid, lid[1:])}
        assert ours == {frozenset(e) for e in mp_edges}


def test_astronaut_landmarks_are_anatomically_placed(astronaut_landmarks, astronaut_bgr):
    lm = astronaut_landmarks
    assert lm.points.shape == (478, 2) and lm.points.dtype == np.float32
    assert lm.image_shape == astronaut_bgr.shape[:2]
    assert lm.faces_found == 1
    oval = lm.group(FACE_OVAL)
    # The astronaut's face is in the upper-left quarter of the 512x512 photo.
    assert (oval >= 0).all() and (oval[:, 0] < 300).all() and (oval[:, 1] < 250).all()
    # The chin is the lowest oval point; the nose tip lies inside the oval, above the lips.
    assert lm.points[CHIN, 1] == pytest.approx(oval[:, 1].max(), abs=2.0)
    assert cv2.pointPolygonTest(oval.reshape(-1, 1, 2), tuple(map(float, lm.point(NOSE_TIP))), False) > 0
    assert lm.point(NOSE_TIP)[1] < lm.group(LIPS_OUTER)[:, 1].min()
    # The inner lips lie within the outer lip outline.
    outer = lm.group(LIPS_OUTER).reshape(-1, 1, 2)
    inside = [cv2.pointPolygonTest(outer, tuple(map(float, p)), False) >= 0 for p in lm.group(LIPS_INNER)]
    assert all(inside)


def test_no_face_gives_none():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    assert detect_face_landmarks(noise) is None
    assert detect_face_landmarks(np.full((64, 64, 3), 128, np.uint8)) is None


def test_bad_image_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="HxWx3"):
        detect_face_landmarks(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        detect_face_landmarks(np.zeros((64, 64, 3), np.float32))


@pytest.mark.parametrize("big_on_left", [True, False])
def test_two_faces_warn_and_keep_the_largest(astronaut_bgr, big_on_left):
    big = astronaut_bgr[:320, 60:380]  # face about 90 px wide
    small = cv2.resize(big, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    canvas = np.full((320, 320 + small.shape[1], 3), 200, np.uint8)
    if big_on_left:
        canvas[:, :320] = big
        canvas[: small.shape[0], 320:] = small
    else:
        canvas[:, small.shape[1]:] = big
        canvas[: small.shape[0], : small.shape[1]] = small
    with pytest.warns(MultipleFacesWarning, match="2 faces"):
        lm = detect_face_landmarks(canvas)
    assert lm is not None and lm.faces_found == 2
    oval_x = lm.group(FACE_OVAL)[:, 0]
    if big_on_left:
        assert oval_x.max() < 320
    else:
        assert oval_x.min() > small.shape[1]


def test_face_bbox_follows_musetalk_rules():
    # Synthetic landmarks: jaw x from 100 to 200, chin at y=300, nose ridge point 195 at y=220.
    pts = np.zeros((478, 2), np.float32)
    pts[:] = (150, 200)
    pts[list(JAW), 0] = np.linspace(100, 200, len(JAW))
    pts[list(JAW), 1] = 250
    pts[CHIN, 1] = 300
    pts[face.NOSE_BRIDGE_MID] = (150, 220)
    box = face_bbox(pts, (480, 640, 3))
    assert box == BBox(100, 140, 200, 310)  # top mirrors the chin about point 195; +10 below
    # The margin is clamped to the frame ...
    assert face_bbox(pts, (305, 640, 3)).y2 == 305
    # ... but a chin already below the frame keeps the box past it (the cropper pads).
    assert face_bbox(pts, (290, 640, 3)).y2 == 300
    assert face_bbox(pts, (480, 640, 3), extra_margin=0).y2 == 300


def test_face_bbox_on_the_astronaut_covers_brows_to_chin(astronaut_landmarks, astronaut_bgr):
    lm = astronaut_landmarks
    box = face_bbox(lm.points, astronaut_bgr.shape)
    brows = lm.group(face.RIGHT_BROW + face.LEFT_BROW)
    assert box.y1 <= brows[:, 1].min() and box.y2 == int(np.ceil(lm.points[CHIN, 1])) + 10
    assert box.x1 <= lm.group(LIPS_OUTER)[:, 0].min() and box.x2 >= lm.group(LIPS_OUTER)[:, 0].max()
    assert 60 < box.width < 140 and 0.8 < box.height / box.width < 1.8


def test_bbox_clip():
    assert BBox(-10, -5, 50, 40).clip((30, 40)) == BBox(0, 0, 40, 30)
    assert BBox(50, 50, 60, 60).clip((30, 40)) is None
    with pytest.raises(ValueError):
        BBox(5, 5, 5, 10)


def test_one_euro_filter_removes_jitter_and_follows_motion():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 200, (478, 2)).astype(np.float32)
    f = OneEuroFilter()
    out = []
    for k in range(50):
        out.append(f(base + rng.normal(0, 1.0, base.shape).astype(np.float32), k / 25, scale=200.0))
    still = np.std(np.stack(out[10:]), axis=0).mean()
    assert still < 0.5  # raw jitter std is 1.0 px
    # A sustained move of 5 px/frame: the filter catches up to within 2 frames' motion.
    for k in range(50, 80):
        moved = f(base + (k - 49) * 5.0, k / 25, scale=200.0)
    lag = float(np.abs(moved - (base + 30 * 5.0)).mean())
    assert lag < 10.0


def test_tracker_smooths_detector_jitter(astronaut_bgr):
    # Re-encoding noise in each frame makes the raw detector jitter; the tracker output moves less.
    rng = np.random.default_rng(2)
    frames = [
        np.clip(astronaut_bgr.astype(np.int16) + rng.normal(0, 6, astronaut_bgr.shape), 0, 255).astype(np.uint8)
        for _ in range(12)
    ]
    raw = np.stack([detect_face_landmarks(f).points for f in frames])
    with FaceTracker() as tracker:
        tracked = np.stack([tracker.update(f).points for f in frames])
    raw_motion = np.abs(np.diff(raw[4:], axis=0)).mean()
    tracked_motion = np.abs(np.diff(tracked[4:], axis=0)).mean()
    assert tracked_motion < raw_motion
    assert np.abs(tracked.mean(0) - raw.mean(0)).mean() < 2.0  # smoothing, not drifting


def test_tracker_loses_and_refinds_a_face_without_warnings(astronaut_bgr):
    with FaceTracker() as tracker:
        assert tracker.update(np.full((200, 200, 3), 90, np.uint8)) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert tracker.update(astronaut_bgr) is not None


# -- finding faces anywhere (field report: an ordinary face beside a grey strip was "no face") ----


def _placed(face_bgr: np.ndarray, canvas_hw: tuple[int, int], top_left: tuple[int, int]) -> np.ndarray:
    canvas = np.full(canvas_hw + (3,), 128, np.uint8)
    y, x = top_left
    canvas[y : y + face_bgr.shape[0], x : x + face_bgr.shape[1]] = face_bgr
    return canvas


@pytest.mark.parametrize(
    "canvas_hw, top_left",
    [
        ((512, 832), (0, 0)),  # the field report's input: a 320 px grey strip on the right
        ((512, 832), (0, 320)),  # the same strip on the left
        ((2160, 3840), (0, 0)),  # 4K landscape, top-left corner
        ((2160, 3840), (1648, 3328)),  # 4K landscape, bottom-right corner
        ((3840, 2160), (3328, 1648)),  # 4K portrait, bottom-right corner
        ((3840, 2160), (1600, 800)),  # 4K portrait, middle
    ],
)
def test_a_face_is_found_wherever_it_is_in_frames_up_to_4k(astronaut_bgr, astronaut_landmarks, canvas_hw, top_left):
    lm = detect_face_landmarks(_placed(astronaut_bgr, canvas_hw, top_left))
    assert lm is not None, f"no face found in {canvas_hw[1]}x{canvas_hw[0]} at {top_left}"
    assert lm.image_shape == canvas_hw
    # The same landmarks as in the photo alone, moved by the offset (within a few pixels).
    moved = astronaut_landmarks.points + np.array(top_left[::-1], np.float32)
    assert np.abs(lm.group(FACE_OVAL) - moved[list(FACE_OVAL)]).mean() < 4.0


def test_tile_grid_covers_the_frame_with_halving_tiles():
    levels = face.tile_grid((2160, 3840))
    assert [tiles[0].width for tiles in levels] == [1080, 540]
    for tiles in levels:
        covered = np.zeros((2160, 3840), bool)
        for t in tiles:
            assert t.width == t.height and t.x1 >= 0 and t.y1 >= 0 and t.x2 <= 3840 and t.y2 <= 2160
            covered[t.y1 : t.y2, t.x1 : t.x2] = True
        assert covered.all()
    assert face.tile_grid((512, 832))[0][0].width == 256
    assert face.tile_grid((300, 300)) == []  # a small frame is searched whole only


def test_choose_face_takes_the_largest_then_the_most_central():
    def square(x, y, side):  # a fake face: points spread over a square (only its box matters)
        pts = np.zeros((478, 2), np.float32)
        pts[:, 0] = np.linspace(x, x + side, 478)
        pts[:, 1] = np.linspace(y, y + side, 478)[::-1]
        return pts

    frame = (400, 1000, 3)
    big, small = square(700, 100, 120), square(100, 100, 80)
    assert face.choose_face([small, big], frame) == 1  # largest wins wherever it is
    off, central = square(50, 100, 100), square(430, 100, 104)  # 4 % apart: a tie on size
    assert face.choose_face([off, central], frame) == 1  # the tie goes to the most central
    assert face.choose_face([off, central], frame, face.FaceChoice(index=0)) == 0
    assert face.choose_face([off, central], frame, face.FaceChoice(box=(40, 90, 100, 100))) == 0
    with pytest.raises(face.FaceChoiceError, match=r"face 2 asked for, but 2 found \(numbered from the left: 0: \(5\d,"):
        face.choose_face([off, central], frame, face.FaceChoice(index=2))
    with pytest.raises(face.FaceChoiceError, match="no face overlaps the face box 900,300,10,10"):
        face.choose_face([off, central], frame, face.FaceChoice(box=(900, 300, 10, 10)))
    assert face.FaceChoice.parse_box("10,20,30,40") == (10, 20, 30, 40)
    with pytest.raises(ValueError, match="four numbers"):
        face.FaceChoice.parse_box("10,20,30")


def test_tracker_keeps_the_chosen_face_of_two_equal_ones(astronaut_bgr):
    # Two copies of one head: equal size, equally far from the centre. Chosen once, then kept.
    head = astronaut_bgr[30:250, 135:315]
    canvas = np.full((260, 420, 3), 200, np.uint8)
    canvas[20:240, 20:200] = head
    canvas[20:240, 220:400] = head
    rng = np.random.default_rng(5)
    frames = [np.clip(canvas + rng.normal(0, 4, canvas.shape), 0, 255).astype(np.uint8) for _ in range(8)]
    with FaceTracker(warn_multiple=False) as tracker:
        centres = [float(tracker.update(f).group(FACE_OVAL)[:, 0].mean()) for f in frames]
        assert tracker.chosen is not None and tracker.chosen[0] == 0 and tracker.chosen[2] == 2
    assert max(centres) - min(centres) < 3.0 and centres[0] < 210
    with FaceTracker(warn_multiple=False, choice=face.FaceChoice(index=1)) as tracker:
        right = [float(tracker.update(f).group(FACE_OVAL)[:, 0].mean()) for f in frames]
    assert min(right) > 210 and max(right) - min(right) < 3.0
