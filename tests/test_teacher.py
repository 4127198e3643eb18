"""export.teacher: the procedural mouth, checked on real renders with mediapipe's own eyes."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import skimage.data

from export.phonemes import synthesize
from export.teacher import (
    JAW_GAP,
    MouthTeacher,
    displace,
    face_canvas,
    inner_sides,
    lip_profile,
    measure_mouth,
    warp_piecewise_affine,
)
from export.visemes import MouthPose, viseme_curves
from realtime_avatar.face import (
    CHIN,
    FOREHEAD_TOP,
    LOWER_LIP_INNER_MID,
    MOUTH_CORNERS,
    NOSE_TIP,
    UPPER_LIP_INNER_MID,
    FaceLandmarks,
    detect_face_landmarks,
)
from realtime_avatar.timing import FPS

NEUTRAL = MouthPose(0.0, 0.0, 0.0, 0.0, 0.0)
OPEN_A = MouthPose(1.0, 0.35, 0.0, 0.0, 0.0)
ROUND_U = MouthPose(0.25, 0.0, 1.0, 0.0, 0.0)
SPREAD_I = MouthPose(0.22, 0.9, 0.0, 0.0, 0.0)
CLOSED_P = MouthPose(0.05, 0.0, 0.0, 1.0, 0.0)
LABIODENTAL_F = MouthPose(0.1, 0.1, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def astronaut():
    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    found = detect_face_landmarks(photo)
    assert found is not None
    return photo, found


@pytest.fixture(scope="module")
def teacher(astronaut):
    canvas = face_canvas(*astronaut)
    return MouthTeacher(canvas.image, canvas.landmarks)


def measured(image: np.ndarray) -> dict:
    """What mediapipe sees in a rendered frame (gap and width relative to the face height)."""
    found = detect_face_landmarks(image)
    assert found is not None, "mediapipe lost the face in a rendered frame"
    p = found.points
    face = np.linalg.norm(p[CHIN] - p[FOREHEAD_TOP])
    return {
        "gap": float(np.linalg.norm(p[LOWER_LIP_INNER_MID] - p[UPPER_LIP_INNER_MID]) / face),
        "width": float(np.linalg.norm(p[MOUTH_CORNERS[1]] - p[MOUTH_CORNERS[0]]) / face),
    }


# ---------------------------------------------------------------- pure geometry


def test_lip_profile():
    s = np.array([-1.2, -1.0, -0.5, 0.0, 0.5, 1.0])
    p = lip_profile(s, 0.5)
    assert p[3] == 1.0 and p[0] == 0.0 and p[1] == 0.0
    assert p[2] == pytest.approx(p[4])
    assert lip_profile(np.array([0.8]), 0.3)[0] > lip_profile(np.array([0.8]), 1.0)[0]  # boxier


def test_displacement_field_closes_opens_rounds_and_spreads(astronaut):
    photo, found = astronaut
    shape = measure_mouth(found.points)
    assert shape.centre_gap / shape.face_height > 0.05  # she smiles with her teeth showing
    local = shape.frame.to_mouth(found.points.astype(np.float64))
    side = inner_sides()

    def gap(pose):
        moved = displace(shape, pose, local, side)
        return moved[LOWER_LIP_INNER_MID, 1] - moved[UPPER_LIP_INNER_MID, 1]

    def width(pose):
        moved = displace(shape, pose, local, side)
        return moved[MOUTH_CORNERS[1], 0] - moved[MOUTH_CORNERS[0], 0]

    assert abs(gap(NEUTRAL)) < 0.01 * shape.face_height
    assert gap(CLOSED_P) == pytest.approx(0.0, abs=0.05)
    assert gap(OPEN_A) == pytest.approx(JAW_GAP * shape.face_height, rel=0.02)
    assert width(ROUND_U) < 0.8 * width(NEUTRAL)
    assert width(SPREAD_I) > 1.05 * width(NEUTRAL)
    # The chin drops with the jaw; the nose and the eyes never move.
    open_points = displace(shape, OPEN_A, local, side)
    neutral_points = displace(shape, NEUTRAL, local, side)
    assert open_points[CHIN, 1] - neutral_points[CHIN, 1] > 0.03 * shape.face_height
    for index in (NOSE_TIP, FOREHEAD_TOP, 33, 263):
        np.testing.assert_allclose(open_points[index], local[index], atol=0.05)


def test_piecewise_affine_warp_moves_pixels_with_the_mesh():
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (121, 121, 3), dtype=np.uint8), (0, 0), 2)
    ticks = (0, 30, 60, 90, 120)
    grid = np.array([(x, y) for y in ticks for x in ticks], np.float64)
    triangles = []
    for r in range(4):
        for c in range(4):
            k = 5 * r + c
            triangles += [(k, k + 1, k + 6), (k, k + 6, k + 5)]
    triangles = np.array(triangles, np.int32)
    # Nothing moves: nothing changes.
    np.testing.assert_array_equal(warp_piecewise_affine(image, grid, grid, triangles), image)
    # Move the centre point (60, 60) by (4, 3): the pixel content around it follows.
    dst = grid.copy()
    dst[12] += (4.0, 3.0)
    out = warp_piecewise_affine(image, grid, dst, triangles)
    np.testing.assert_allclose(out[63, 64].astype(float), image[60, 60].astype(float), atol=3)
    # Halfway to the fixed corners of its triangles, a point moves about half as far.
    np.testing.assert_allclose(out[46, 47].astype(float), image[45, 45].astype(float), atol=6)
    # Outside the six triangles around the centre point, the image is untouched.
    np.testing.assert_array_equal(out[:29], image[:29])
    np.testing.assert_array_equal(out[:, 92:], image[:, 92:])


# ---------------------------------------------------------------- renders


def test_neutral_closes_her_smile_and_leaves_the_upper_face(teacher):
    photo_gap = measured(teacher.image)["gap"]
    neutral = teacher.neutral
    assert photo_gap > 0.05
    assert measured(neutral)["gap"] < 0.012
    # The eyes and everything above them are never touched.
    nose_y = int(teacher.points[[33, 133, 362, 263], 1].min()) - 3
    np.testing.assert_array_equal(neutral[:nose_y], teacher.image[:nose_y])
    for pose in (OPEN_A, ROUND_U, LABIODENTAL_F):
        np.testing.assert_array_equal(teacher.render(pose)[:nose_y], teacher.image[:nose_y])


def test_poses_look_as_named(teacher):
    neutral = measured(teacher.neutral)
    open_a = measured(teacher.render(OPEN_A))
    round_u = measured(teacher.render(ROUND_U))
    spread_i = measured(teacher.render(SPREAD_I))
    closed_p = measured(teacher.render(CLOSED_P))
    assert open_a["gap"] > 0.06
    assert closed_p["gap"] < 0.012
    assert round_u["width"] < 0.92 * neutral["width"]
    assert spread_i["width"] > neutral["width"]

    # The open mouth is dark inside with the photo's teeth on top; f/v shows teeth only.
    def mouth_pixels(image, pose):
        pts = teacher.landmarks_for(pose)
        x, y = pts[UPPER_LIP_INNER_MID]
        gap = pts[LOWER_LIP_INNER_MID, 1] - y
        return image[int(y + 1) : int(y + gap), int(x - 3) : int(x + 4)].reshape(-1, 3).astype(float)

    inside = mouth_pixels(teacher.render(OPEN_A), OPEN_A)
    brightness = inside.mean(axis=1)
    assert brightness.min() < 50 and brightness.max() > 170  # cavity and teeth
    teeth = mouth_pixels(teacher.render(LABIODENTAL_F), LABIODENTAL_F)
    assert len(teeth) and teeth.mean(axis=1).mean() > 150


def test_measured_gap_follows_the_jaw_curve(teacher):
    utterance = synthesize("Bob moves the map. Who?", voice="en-us")
    n = int(utterance.duration_s * FPS)
    curves = viseme_curves(utterance.phonemes, n)
    frames = list(range(n))
    gaps = np.array([measured(teacher.render(curves.at(i)))["gap"] for i in frames])
    r = np.corrcoef(gaps, curves.jaw[frames])[0, 1]
    assert r >= 0.85, f"Pearson r between mediapipe's lip gap and the jaw curve is {r:.3f}"
    silent = [i for i in frames if curves.as_array()[i].max() < 0.02]
    assert len(silent) >= 2
    assert gaps[silent].max() < 0.012
    print(f"r(jaw, measured gap) = {r:.3f} over {n} frames")


def test_render_speed(teacher):
    poses = [OPEN_A, ROUND_U, CLOSED_P, SPREAD_I, LABIODENTAL_F] * 4
    teacher.render(OPEN_A)
    times = []
    for pose in poses:
        start = time.perf_counter()
        teacher.render(pose)
        times.append(time.perf_counter() - start)
    median_ms = 1000 * float(np.median(times))
    print(f"teacher render: median {median_ms:.1f} ms per {teacher.image.shape[0]} px canvas")
    assert median_ms < 40  # ~5-10 ms on an idle 2-core CPU


def test_other_faces_mirrored_rotated_and_closed_mouth(astronaut, teacher):
    photo, _ = astronaut
    # Mirrored, rotated and smaller: the teacher works on the raw image and its landmarks.
    turned = cv2.flip(cv2.warpAffine(photo, cv2.getRotationMatrix2D((256, 256), 12, 0.8), (512, 512)), 1)
    found = detect_face_landmarks(turned)
    other = MouthTeacher(turned, found)
    assert measured(other.render(OPEN_A))["gap"] > 0.05
    assert measured(other.neutral)["gap"] < 0.02

    # A closed-mouth face (her own neutral render): no teeth in the photo, so they are drawn.
    closed = teacher.neutral.copy()
    closed_teacher = MouthTeacher(closed, detect_face_landmarks(closed))
    assert not closed_teacher.teeth.from_photo
    opened = closed_teacher.render(OPEN_A)
    assert measured(opened)["gap"] > 0.06
    pts = closed_teacher.landmarks_for(OPEN_A)
    x, y = pts[UPPER_LIP_INNER_MID]
    band = opened[int(y + 1) : int(y + 6), int(x - 3) : int(x + 4)].astype(float).mean(axis=(0, 1))
    assert band.mean() > 120  # light drawn teeth under the upper lip


def test_bad_input_is_refused(astronaut):
    photo, found = astronaut
    with pytest.raises(ValueError, match="landmarks were found in a"):
        MouthTeacher(photo[:300], found)
    with pytest.raises(ValueError, match="uint8"):
        MouthTeacher(photo.astype(np.float32), found)
    tiny = FaceLandmarks(found.points * 0.05, found.image_shape)
    with pytest.raises(ValueError, match="too small"):
        MouthTeacher(photo, tiny)
