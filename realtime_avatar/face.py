"""Face landmarks: 478 mediapipe face-mesh points per frame, named index groups, the face box.

mediapipe 0.10.21 is the last release that ships its face models in the wheel and keeps the
legacy `mp.solutions.face_mesh` API; with refine_landmarks=True it gives 468 mesh points plus
10 iris points.

Finding faces is two passes, so that a face is found wherever it is and whatever the frame size
(up to 4K, landscape or portrait): mediapipe's full-range face detector (`model_selection=1`,
made for small faces far from the camera) finds face boxes in the whole frame, then in
overlapping tiles when the whole frame gives none; the face mesh then runs on a square crop
around each box. Run on a whole wide frame, the face mesh's own short-range detector misses
ordinary faces (a 110 px face in an 832x512 frame, when it sits left of centre).

Single images go through `detect_face_landmarks` (the largest face); `find_faces` gives every
face. Videos go through `FaceTracker`: it chooses one face in the first frame (`choose_face`:
the largest, ties to the most central, or one the caller names), then follows that face from
frame to frame by box overlap (IoU), so that a second face of similar size never takes over,
and smooths the points over time (One-Euro filter) so that boxes and masks built from them do
not jitter.

mediapipe is imported lazily: the geometry here (index groups, `BBox`, `face_bbox`) is used by
modules that never run the detector and should not pay its import time.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from realtime_avatar.timing import FPS

log = logging.getLogger(__name__)

NUM_LANDMARKS = 478  # 468 face-mesh points + 10 iris points (refine_landmarks=True)
MAX_FACES = 2  # faces the mesh looks for in one crop: a neighbour's face can share the crop
DETECTOR_FULL_RANGE = 1  # mediapipe face_detection model_selection: 1 = full range (faces up to ~5 m)
DETECTOR_MIN_SCORE = 0.5  # mediapipe's default; false boxes are dropped when the mesh finds no face
CROP_FACTOR = 3.0  # the mesh runs on a square crop this many face-box sides wide, centred on the box
MESH_CROP_MIN = 384  # px: smaller crops are upscaled so the mesh's own detector sees the face
MESH_CROP_MAX = 1024  # px: larger crops are downscaled (the mesh works on a 192 px face anyway)
MIN_TILE = 192  # px: the smallest detector tile (the detector's own input size); tiles halve down to it
SAME_FACE_IOU = 0.3  # box overlap above which two boxes are the same face (dedup, tracking)
TIE_TOLERANCE = 0.1  # faces whose sizes differ by less than this fraction count as equally large

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

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0)

    def iou(self, other: "BBox") -> float:
        """Intersection over union of two boxes, 0..1."""
        w = min(self.x2, other.x2) - max(self.x1, other.x1)
        h = min(self.y2, other.y2) - max(self.y1, other.y1)
        if w <= 0 or h <= 0:
            return 0.0
        inter = w * h
        return inter / (self.width * self.height + other.width * other.height - inter)

    @staticmethod
    def around(points: np.ndarray) -> "BBox":
        """The smallest integer box holding all points ([k, 2] pixels)."""
        x1, y1 = np.floor(points.min(axis=0)).astype(int)
        x2, y2 = np.ceil(points.max(axis=0)).astype(int)
        return BBox(int(x1), int(y1), max(int(x2), int(x1) + 1), max(int(y2), int(y1) + 1))

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


class MultipleFacesWarning(UserWarning):
    """More than one face was found; one was chosen (the message says which and how to pick)."""


class FaceChoiceError(ValueError):
    """The face the caller asked for (`--face N` / `--face-box`) is not among the faces found."""


@dataclass(frozen=True)
class FaceChoice:
    """Which face to use when a frame holds several.

    index: the N-th face counted from the left of the first frame (0 = leftmost).
    box: (x, y, w, h) pixels in the first frame; the face overlapping it most is used.
    Neither: the largest face, ties (sizes within TIE_TOLERANCE) to the one nearest the centre.
    """

    index: int | None = None
    box: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.index is not None and self.box is not None:
            raise ValueError("give a face index or a face box, not both")
        if self.index is not None and self.index < 0:
            raise ValueError(f"face index must be >= 0, got {self.index}")
        if self.box is not None and (len(self.box) != 4 or self.box[2] <= 0 or self.box[3] <= 0):
            raise ValueError(f"face box must be x,y,w,h with w, h > 0, got {self.box}")

    @staticmethod
    def parse_box(text: str) -> tuple[int, int, int, int]:
        """'x,y,w,h' (pixels) -> a tuple; raises ValueError naming the text."""
        try:
            x, y, w, h = (int(round(float(v))) for v in text.split(","))
        except ValueError:
            raise ValueError(f"face box {text!r}: expected four numbers x,y,w,h (pixels)") from None
        if w <= 0 or h <= 0:
            raise ValueError(f"face box {text!r}: width and height must be positive")
        return (x, y, w, h)


def _check_image(image_bgr: np.ndarray) -> None:
    if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        shape = getattr(image_bgr, "shape", type(image_bgr).__name__)
        raise ValueError(f"expected an HxWx3 BGR image, got {shape}")
    if image_bgr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image_bgr.dtype}")


_mp_lock = threading.Lock()  # a mediapipe graph runs one image at a time


@lru_cache(maxsize=1)
def _static_face_mesh():
    import mediapipe as mp  # lazy: ~1 s to import, and only the detector needs it

    # Building the graph takes ~50 ms; one per process, reused by every call.
    return mp.solutions.face_mesh.FaceMesh(
        static_image_mode=True,
        max_num_faces=MAX_FACES,
        refine_landmarks=True,
        min_detection_confidence=0.5,
    )


@lru_cache(maxsize=1)
def _full_range_detector():
    import mediapipe as mp

    return mp.solutions.face_detection.FaceDetection(
        model_selection=DETECTOR_FULL_RANGE, min_detection_confidence=DETECTOR_MIN_SCORE
    )


def tile_grid(frame_shape: tuple[int, ...], min_tile: int = MIN_TILE) -> list[list[BBox]]:
    """Detector tiles per level: level k has square tiles of side short/2**k (k = 1, 2; side >=
    min_tile), overlapping by half, covering the frame. The full-range detector resizes its
    input to 192x192, so a face must fill about a tenth of the image to be found: halving the
    tile doubles the face's share, and a quarter of the short side finds faces of about 1/40 of
    it (54 px in 4K, 13 px in 512 px) in at most ~110 tiles. Level 0 (the whole frame) is not
    listed."""
    h, w = frame_shape[:2]
    levels = []
    side = min(h, w) // 2
    while side >= max(min_tile, min(h, w) // 4):
        stride = side // 2
        xs = list(range(0, max(w - side, 0) + 1, stride))
        ys = list(range(0, max(h - side, 0) + 1, stride))
        if xs[-1] + side < w:
            xs.append(w - side)
        if ys[-1] + side < h:
            ys.append(h - side)
        levels.append([BBox(x, y, x + side, y + side) for y in ys for x in xs])
        side //= 2
    return levels


def _detect_boxes(rgb: np.ndarray, tile: BBox | None = None) -> list[tuple[BBox, float]]:
    """Full-range detector boxes (frame pixels) and scores, in the whole image or one tile."""
    x0, y0 = (tile.x1, tile.y1) if tile is not None else (0, 0)
    part = rgb if tile is None else np.ascontiguousarray(rgb[tile.y1 : tile.y2, tile.x1 : tile.x2])
    h, w = part.shape[:2]
    with _mp_lock:
        results = _full_range_detector().process(part)
    boxes = []
    for d in results.detections or []:
        r = d.location_data.relative_bounding_box
        x1, y1 = x0 + r.xmin * w, y0 + r.ymin * h
        x2, y2 = x1 + r.width * w, y1 + r.height * h
        if x2 - x1 >= 2 and y2 - y1 >= 2:
            boxes.append((BBox(int(x1), int(y1), int(math.ceil(x2)), int(math.ceil(y2))), float(d.score[0])))
    return boxes


def _mesh_in_crop(rgb: np.ndarray, box: BBox, factor: float = CROP_FACTOR) -> list[np.ndarray]:
    """Face-mesh points ([478, 2] frame pixels) of the faces in a square crop `factor` times
    the box's larger side around the box; the part of the crop outside the frame is grey."""
    cx, cy = box.center
    side = max(int(factor * max(box.width, box.height)), 16)
    x1, y1 = int(round(cx - side / 2)), int(round(cy - side / 2))
    crop_box = BBox(x1, y1, x1 + side, y1 + side)
    inside = crop_box.clip(rgb.shape)
    if inside is None:
        return []
    crop = np.full((side, side, 3), 128, np.uint8)
    crop[inside.y1 - y1 : inside.y2 - y1, inside.x1 - x1 : inside.x2 - x1] = rgb[
        inside.y1 : inside.y2, inside.x1 : inside.x2
    ]
    scale = 1.0
    if side < MESH_CROP_MIN or side > MESH_CROP_MAX:
        target = MESH_CROP_MIN if side < MESH_CROP_MIN else MESH_CROP_MAX
        scale = side / target
        interp = cv2.INTER_CUBIC if side < target else cv2.INTER_AREA
        crop = cv2.resize(crop, (target, target), interpolation=interp)
    with _mp_lock:
        results = _static_face_mesh().process(crop)
    faces = []
    n = crop.shape[0]
    for face in results.multi_face_landmarks or []:
        xy = np.array([(p.x, p.y) for p in face.landmark], dtype=np.float32) * n
        faces.append(xy * scale + np.array([x1, y1], np.float32))
    return faces


def _mesh_whole(rgb: np.ndarray) -> list[np.ndarray]:
    """Face-mesh points of the faces the mesh finds in the whole image by itself (its own
    short-range detector: faces that fill a good part of the image)."""
    h, w = rgb.shape[:2]
    with _mp_lock:
        results = _static_face_mesh().process(rgb)
    scale = np.array([w, h], np.float32)
    return [np.array([(p.x, p.y) for p in face.landmark], dtype=np.float32) * scale
            for face in results.multi_face_landmarks or []]


def _landmark_box(points: np.ndarray) -> BBox:
    return BBox.around(points[list(FACE_OVAL)])


def _dedupe(faces: list[np.ndarray]) -> list[np.ndarray]:
    """Drop faces whose landmark box overlaps an earlier one's (the same face seen twice)."""
    kept: list[np.ndarray] = []
    for f in faces:
        if all(_landmark_box(f).iou(_landmark_box(k)) < SAME_FACE_IOU for k in kept):
            kept.append(f)
    return kept


def _faces_around(rgb: np.ndarray, boxes: list[BBox], whole: list[np.ndarray] = ()) -> list[np.ndarray]:
    """Mesh points of the face each detector box holds (boxes the mesh cannot confirm are
    dropped: the full-range detector's false positives), deduplicated. A box that one of
    `whole` (the mesh's faces in the whole image) covers keeps those points, so that faces the
    whole-image mesh already found get exactly the landmarks they always had."""
    faces = []
    for box in boxes:
        same = [f for f in whole if _landmark_box(f).iou(box) >= SAME_FACE_IOU]
        if same:
            faces.append(max(same, key=lambda f: _landmark_box(f).iou(box)))
            continue
        found = _mesh_in_crop(rgb, box)
        if found:  # the face in the crop whose box best matches the detector's
            faces.append(max(found, key=lambda f: _landmark_box(f).iou(box)))
    return _dedupe(faces)


def find_faces(image_bgr: np.ndarray) -> list[np.ndarray]:
    """Every face in a uint8 BGR image as [478, 2] float32 pixel points, ordered left to right.

    The full-range detector runs on the whole image; only when it finds no face that the mesh
    confirms does it run on tiles (halving sizes, see `tile_grid`), stopping at the first level
    that finds one. A 110 px face is found anywhere in a 3840x2160 or 2160x3840 frame.
    """
    _check_image(image_bgr)
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    whole = _mesh_whole(rgb)
    faces = _faces_around(rgb, [b for b, _ in _detect_boxes(rgb)], whole)
    if not faces:
        for tiles in tile_grid(image_bgr.shape):
            boxes = [b for tile in tiles for b, _ in _detect_boxes(rgb, tile)]
            faces = _faces_around(rgb, boxes)
            if faces:
                break
    if not faces:
        # Last resort, the mesh's own finds: a large face that the frame edge cuts (the
        # full-range detector wants a whole face).
        faces = _dedupe(whole)
    return sorted(faces, key=lambda f: float(f[:, 0].mean()))


def describe_faces(faces: list[np.ndarray]) -> str:
    """'0: (x,y,w,h), 1: ...' for messages: the numbers `--face N` and `--face-box` take."""
    parts = []
    for i, f in enumerate(faces):
        b = _landmark_box(f)
        parts.append(f"{i}: ({b.x1},{b.y1},{b.width},{b.height})")
    return ", ".join(parts)


def choose_face(faces: list[np.ndarray], frame_shape: tuple[int, ...], choice: FaceChoice = FaceChoice()) -> int:
    """Index into `faces` (ordered left to right, as find_faces gives them) of the face to use.

    Default: the largest (face_extent); faces within TIE_TOLERANCE of the largest tie, and the
    tie goes to the one whose centre is nearest the frame's centre, then to the leftmost.
    Raises FaceChoiceError when `choice` names a face that is not there.
    """
    if not faces:
        raise ValueError("no faces to choose from")
    if choice.index is not None:
        if choice.index >= len(faces):
            raise FaceChoiceError(
                f"face {choice.index} asked for, but {len(faces)} found (numbered from the left: "
                f"{describe_faces(faces)}): pick one of these or use --face-box x,y,w,h"
            )
        return choice.index
    if choice.box is not None:
        x, y, w, h = choice.box
        wanted = BBox(x, y, x + w, y + h)
        overlaps = [_landmark_box(f).iou(wanted) for f in faces]
        best = int(np.argmax(overlaps))
        if overlaps[best] <= 0.0:
            raise FaceChoiceError(
                f"no face overlaps the face box {x},{y},{w},{h}; faces found (x,y,w,h): "
                f"{describe_faces(faces)}"
            )
        return best
    sizes = np.array([face_extent(f) for f in faces])
    frame_h, frame_w = frame_shape[:2]
    centre = np.array([frame_w / 2.0, frame_h / 2.0])
    candidates = [i for i in range(len(faces)) if sizes[i] >= (1.0 - TIE_TOLERANCE) * sizes.max()]
    dist = [float(np.linalg.norm(np.array(_landmark_box(faces[i]).center) - centre)) for i in candidates]
    nearest = min(dist)
    # distances within 1% of the frame diagonal are equal too; then the leftmost (lowest index)
    tol = 0.01 * float(np.hypot(frame_w, frame_h))
    return next(i for i, d in zip(candidates, dist) if d <= nearest + tol)


def detect_face_landmarks(image_bgr: np.ndarray, choice: FaceChoice = FaceChoice()) -> FaceLandmarks | None:
    """Face landmarks of one face in a single uint8 BGR image (the largest, ties to the most
    central, unless `choice` says otherwise), or None if there is none.

    Each call detects from scratch (no tracking state). Warns (MultipleFacesWarning) when more
    than one face is present.
    """
    faces = find_faces(image_bgr)
    if not faces:
        return None
    k = choose_face(faces, image_bgr.shape, choice)
    if len(faces) > 1:
        warnings.warn(
            f"{len(faces)} faces found in the image (x,y,w,h from the left: {describe_faces(faces)}); "
            f"using face {k}", MultipleFacesWarning, stacklevel=2,
        )
    return FaceLandmarks(points=faces[k], image_shape=image_bgr.shape[:2], faces_found=len(faces))


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
    """Landmarks of one face through a video: chosen once, followed by box overlap, smoothed.

    The first frame with faces fixes the face (`choose_face` with `choice`); each later frame
    runs the mesh on a crop around where that face was, keeps the face overlapping its last box
    most (IoU >= SAME_FACE_IOU), and only when it is not there searches the whole frame for it
    again. So with two faces of similar size the chosen one is kept in every frame. When the face
    is lost the filter restarts, and the next face found nearest to where it was is taken, so a
    face that reappears elsewhere is not dragged from its old place. `chosen` says which face
    was chosen in the first frame (index from the left, box, how many faces there were).
    Feed frames in order with `update`.
    """

    def __init__(
        self,
        fps: float = FPS,
        smoothing: OneEuroFilter | None = None,
        warn_multiple: bool = True,
        choice: FaceChoice = FaceChoice(),
    ):
        self._warn_multiple = warn_multiple  # off when the caller reports the choice itself
        self._choice = choice
        self._filter = smoothing if smoothing is not None else OneEuroFilter()
        self._frame_period = 1.0 / fps
        self._frames_seen = 0
        self._last_box: BBox | None = None  # the followed face's landmark box, last frame it was seen
        self._tracking = False  # whether it was seen in the previous frame
        self.chosen: tuple[int, BBox, int] | None = None  # (index from the left, box, faces found)

    def _first(self, frame_bgr: np.ndarray, index: int) -> tuple[np.ndarray, int] | None:
        faces = find_faces(frame_bgr)
        if not faces:
            return None
        k = choose_face(faces, frame_bgr.shape, self._choice)
        box = _landmark_box(faces[k])
        self.chosen = (k, box, len(faces))
        how = "as asked" if (self._choice.index is not None or self._choice.box is not None) else (
            "the largest, ties to the most central")
        log.info("frame %d: %d face(s) found (x,y,w,h from the left: %s); following face %d (%s)",
                 index, len(faces), describe_faces(faces), k, how)
        if len(faces) > 1 and self._warn_multiple:
            warnings.warn(
                f"{len(faces)} faces found in frame {index}; following face {k} at "
                f"({box.x1},{box.y1},{box.width},{box.height}) ({how})",
                MultipleFacesWarning, stacklevel=3,
            )
        return faces[k], len(faces)

    def _follow(self, frame_bgr: np.ndarray, last: BBox, tracking: bool) -> tuple[np.ndarray, int] | None:
        if tracking:
            rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
            faces = _mesh_in_crop(rgb, last)
            if faces:
                best = max(faces, key=lambda f: _landmark_box(f).iou(last))
                if _landmark_box(best).iou(last) >= SAME_FACE_IOU:
                    return best, len(faces)
        # Moved too far for the crop, or lost: the face in the whole frame nearest to where the
        # followed face was last seen.
        faces = find_faces(frame_bgr)
        if not faces:
            return None
        best = min(faces, key=lambda f: math.dist(_landmark_box(f).center, last.center))
        if len(faces) > 1 and _landmark_box(best).iou(last) < SAME_FACE_IOU:
            log.info("frame %d: the followed face was not where it was; taking the face nearest to "
                     "its last place of %d", self._frames_seen - 1, len(faces))
        return best, len(faces)

    def update(self, frame_bgr: np.ndarray, timestamp: float | None = None) -> FaceLandmarks | None:
        """Smoothed landmarks of the followed face in the next frame, or None if no face.

        timestamp: seconds; defaults to frame count / fps.
        """
        _check_image(frame_bgr)
        t = self._frames_seen * self._frame_period if timestamp is None else timestamp
        index = self._frames_seen
        self._frames_seen += 1
        if self._last_box is None:
            found = self._first(frame_bgr, index)
        else:
            found = self._follow(frame_bgr, self._last_box, self._tracking)
        if found is None:
            self._filter.reset()
            self._tracking = False
            return None
        points, n = found
        if not self._tracking:
            self._filter.reset()
        self._tracking = True
        self._last_box = _landmark_box(points)
        smoothed = self._filter(points, t, scale=face_extent(points))
        return FaceLandmarks(smoothed, frame_bgr.shape[:2], n)

    def close(self) -> None:
        pass  # the mediapipe graphs are shared per process

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
