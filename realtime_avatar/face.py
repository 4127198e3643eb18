"""Face landmarks: 478 mediapipe face-mesh points per frame, named index groups, the face box.

mediapipe 0.10.21 is the last release that ships its face models in the wheel and keeps the
legacy `mp.solutions.face_mesh` API; with refine_landmarks=True it gives 468 mesh points plus
10 iris points. Single images go through `detect_face_landmarks`; videos through `FaceTracker`,
which uses mediapipe's tracking mode and smooths the points over time (One-Euro filter) so that
boxes and masks built from them do not jitter.

mediapipe is imported lazily: the geometry here (index groups, `BBox`, `face_bbox`) is used by
modules that never run the detector and should not pay its import time.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from realtime_avatar.timing import FPS

NUM_LANDMARKS = 478  # 468 face-mesh points + 10 iris points (refine_landmarks=True)
MAX_FACES = 2  # ask mediapipe for two faces so that a second one can be noticed and warned about

# Named index groups (mediapipe face-mesh topology). Polygons are ordered around their outline;
# tests check them against mediapipe's own FACEMESH_* edge sets.
# "Right"/"left" are the subject's: the subject's right eye is on the image's left.
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # clockwise in the image from the top of the forehead
JAW = FACE_OVAL[7:30]  # 356 .. 152 .. 127: the oval below the temples, like iBUG-68 points 0-16
LIPS_OUTER = (
    61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185,
)  # from the right mouth corner along the lower lip, back along the upper lip
LIPS_INNER = (
    78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191,
)
RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)  # outer corner -> inner corner
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
LEFT_EYE_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
LEFT_EYE_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)
RIGHT_BROW = (46, 53, 52, 65, 55, 70, 63, 105, 66, 107)
LEFT_BROW = (276, 283, 282, 295, 285, 300, 293, 334, 296, 336)
RIGHT_IRIS = (468, 469, 470, 471, 472)  # centre first, then the four rim points
LEFT_IRIS = (473, 474, 475, 476, 477)
NOSE_TIP = 1
NOSE_BRIDGE_MID = 195  # on the nose ridge between the eyes and the tip, like iBUG-68 point 29
CHIN = 152  # lowest point of the face oval
FOREHEAD_TOP = 10
UPPER_LIP_INNER_MID = 13
LOWER_LIP_INNER_MID = 14
MOUTH_CORNERS = (61, 291)


@dataclass(frozen=True)
class BBox:
    """An integer pixel box [x1, x2) x [y1, y2) in frame coordinates; may extend past the frame."""

    x1: int
    y1: int
    x2: int
    y2: int

    def __post_init__(self) -> None:
        if self.x2 <= self.x1 or self.y2 <= self.y1:
            raise ValueError(f"empty box {self}: need x2 > x1 and y2 > y1")

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x1, self.y1, self.x2, self.y2)

    def clip(self, frame_shape: tuple[int, ...]) -> "BBox | None":
        """The part inside a frame of frame_shape (H, W, ...), or None when they do not meet."""
        h, w = frame_shape[:2]
        x1, y1 = max(self.x1, 0), max(self.y1, 0)
        x2, y2 = min(self.x2, w), min(self.y2, h)
        if x2 <= x1 or y2 <= y1:
            return None
        return BBox(x1, y1, x2, y2)


@dataclass(frozen=True)
class FaceLandmarks:
    """One face: 478 landmark points in pixel coordinates of the image they were found in."""

    points: np.ndarray  # [478, 2] float32 (x, y) pixels; may lie outside the image near edges
    image_shape: tuple[int, int]  # (height, width) of that image
    faces_found: int = 1  # how many faces mediapipe saw (the largest one is kept)

    def __post_init__(self) -> None:
        if self.points.shape != (NUM_LANDMARKS, 2):
            raise ValueError(f"landmarks must be [{NUM_LANDMARKS}, 2], got {self.points.shape}")

    def group(self, indices: tuple[int, ...] | list[int]) -> np.ndarray:
        """The points of a named index group, e.g. `lm.group(LIPS_OUTER)` -> [k, 2]."""
        return self.points[list(indices)]

    def point(self, index: int) -> np.ndarray:
        return self.points[index]


def face_extent(points: np.ndarray) -> float:
    """Size of a face in pixels: the larger side of its landmarks' bounding rectangle."""
    span = points.max(axis=0) - points.min(axis=0)
    return float(span.max())


def face_bbox(points: np.ndarray, frame_shape: tuple[int, ...], extra_margin: int = 10) -> BBox:
    """The face box MuseTalk v1.5 crops, resizes to 256x256 and pastes back, from mediapipe points.

    MuseTalk takes 68 face landmarks and uses their x extent and their lowest point (the chin),
    but not their top: it mirrors the chin about landmark 29 (on the nose ridge) so that the box
    starts about at the brows: top = y29 - (y_chin - y29). We do the same with mediapipe's
    equivalents: the jaw part of the face oval plus the brows for the x extent (the iBUG-68 set
    has no forehead, and using the full oval would widen nothing but could raise the top), point
    195 for point 29, and the chin (the lowest jaw point). v1.5 then adds `extra_margin` pixels
    below the chin, clamped to the frame, so that an opening jaw stays inside the box.

    The box is not clipped otherwise: a face cut by the frame edge gives a box that extends past
    it, and the cropper pads (border replicate) instead of squashing the face.
    """
    frame_h = frame_shape[0]
    contour = points[list(JAW + RIGHT_BROW + LEFT_BROW)]
    x1 = math.floor(float(contour[:, 0].min()))
    x2 = math.ceil(float(contour[:, 0].max()))
    y_chin = float(points[list(JAW), 1].max())
    y_mid = float(points[NOSE_BRIDGE_MID, 1])
    y1 = math.floor(y_mid - (y_chin - y_mid))
    y2 = math.ceil(y_chin)
    # v1.5: extra margin below the chin, never past the frame (MuseTalk clamps with min(y2, H)).
    y2 = max(y2, min(y2 + extra_margin, frame_h))
    if y2 - y1 < 2 or x2 - x1 < 2:
        raise ValueError(f"degenerate face landmarks give an empty box ({x1},{y1},{x2},{y2})")
    return BBox(x1, y1, x2, y2)


def _largest_face(faces: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """The face with the largest landmark rectangle (area), and how many faces there were."""
    areas = [float(np.prod(f.max(axis=0) - f.min(axis=0))) for f in faces]
    return faces[int(np.argmax(areas))], len(faces)


class MultipleFacesWarning(UserWarning):
    """More than one face was found; the largest is used."""


def _to_pixels(results, image_shape: tuple[int, int]) -> list[np.ndarray]:
    """mediapipe's normalised landmarks of each face -> [478, 2] float32 pixel arrays."""
    h, w = image_shape
    faces = []
    for face in results.multi_face_landmarks or []:
        xy = np.array([(p.x, p.y) for p in face.landmark], dtype=np.float32)
        xy *= np.array([w, h], dtype=np.float32)
        faces.append(xy)
    return faces


def _check_image(image_bgr: np.ndarray) -> None:
    if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        shape = getattr(image_bgr, "shape", type(image_bgr).__name__)
        raise ValueError(f"expected an HxWx3 BGR image, got {shape}")
    if image_bgr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image_bgr.dtype}")


def _new_face_mesh(static_image_mode: bool):
    import mediapipe as mp  # lazy: ~1 s to import, and only the detector needs it

    return mp.solutions.face_mesh.FaceMesh(
        static_image_mode=static_image_mode,
        max_num_faces=MAX_FACES,
        refine_landmarks=True,
        min_detection_confidence=0.5,
        min_tracking_confidence=0.5,
    )


_static_mesh_lock = threading.Lock()  # a mediapipe graph runs one image at a time


@lru_cache(maxsize=1)
def _static_face_mesh():
    # Building the graph takes ~50 ms; one per process, reused by every detect_face_landmarks.
    return _new_face_mesh(static_image_mode=True)


def _landmarks_from_results(
    results, image_shape: tuple[int, int], what: str, warn: bool = True
) -> FaceLandmarks | None:
    faces = _to_pixels(results, image_shape)
    if not faces:
        return None
    points, n = _largest_face(faces)
    if n > 1 and warn:
        warnings.warn(
            f"{n} faces found in {what}; using the largest one", MultipleFacesWarning, stacklevel=3
        )
    return FaceLandmarks(points=points, image_shape=image_shape, faces_found=n)


def detect_face_landmarks(image_bgr: np.ndarray) -> FaceLandmarks | None:
    """Face landmarks of the largest face in a single uint8 BGR image, or None if there is none.

    Each call detects from scratch (no tracking state). Warns (MultipleFacesWarning) when more
    than one face is present.
    """
    _check_image(image_bgr)
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    with _static_mesh_lock:
        results = _static_face_mesh().process(rgb)
    return _landmarks_from_results(results, image_bgr.shape[:2], "the image")


class OneEuroFilter:
    """One-Euro filter (Casiez et al., CHI 2012) over a whole landmark set.

    A low-pass whose cutoff rises with speed: at rest it removes the detector's jitter, when the
    head moves it follows with little lag. One speed (the mean over points) drives one cutoff for
    all points, so the face shape is smoothed as a rigid whole rather than point by point.
    Positions are divided by `scale` (the face size) so that the settings do not depend on
    resolution: speeds are in face sizes per second.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 4.0, d_cutoff: float = 1.0):
        self.min_cutoff = min_cutoff  # Hz, cutoff at rest
        self.beta = beta  # Hz per (face size / s): how fast the cutoff rises with speed
        self.d_cutoff = d_cutoff  # Hz, low-pass on the speed estimate itself
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx = 0.0
        self._t: float | None = None

    @staticmethod
    def _alpha(cutoff: float, dt: float) -> float:
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float, scale: float) -> np.ndarray:
        if self._x is None or self._t is None or t <= self._t:
            self._x, self._t, self._dx = x.astype(np.float32, copy=True), t, 0.0
            return self._x.copy()
        dt = t - self._t
        speed = float(np.linalg.norm(x - self._x, axis=-1).mean()) / max(scale, 1e-6) / dt
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * speed + (1.0 - a_d) * self._dx
        a = self._alpha(self.min_cutoff + self.beta * self._dx, dt)
        self._x = (a * x + (1.0 - a) * self._x).astype(np.float32)
        self._t = t
        return self._x.copy()


class FaceTracker:
    """Landmarks through a video: mediapipe in tracking mode plus One-Euro smoothing.

    Feed frames in order with `update`. When the face is lost the filter restarts, so a face
    that reappears elsewhere is not dragged from its old place.
    """

    def __init__(
        self, fps: float = FPS, smoothing: OneEuroFilter | None = None, warn_multiple: bool = True
    ):
        self._mesh = _new_face_mesh(static_image_mode=False)
        self._warn_multiple = warn_multiple  # off when the caller reports several faces itself
        self._filter = smoothing if smoothing is not None else OneEuroFilter()
        self._frame_period = 1.0 / fps
        self._frames_seen = 0

    def update(self, frame_bgr: np.ndarray, timestamp: float | None = None) -> FaceLandmarks | None:
        """Smoothed landmarks of the largest face in the next frame, or None if no face.

        timestamp: seconds; defaults to frame count / fps.
        """
        _check_image(frame_bgr)
        t = self._frames_seen * self._frame_period if timestamp is None else timestamp
        index = self._frames_seen
        self._frames_seen += 1
        results = self._mesh.process(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB))
        found = _landmarks_from_results(
            results, frame_bgr.shape[:2], f"frame {index}", warn=self._warn_multiple
        )
        if found is None:
            self._filter.reset()
            return None
        smoothed = self._filter(found.points, t, scale=face_extent(found.points))
        return FaceLandmarks(smoothed, found.image_shape, found.faces_found)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
