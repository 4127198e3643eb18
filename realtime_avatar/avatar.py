"""The avatar cache: everything per cached frame that the real-time loop must not recompute.

A source (a video, or a still image from which a short idle cycle is synthesised) becomes, per
frame at 25 fps: the frame itself, its smoothed face landmarks, the MuseTalk face box, the
256x256 face crop's latents (masked lower half and reference, concatenated as render() takes
them) and the blending region (crop box + soft mask). Frames play as a ping-pong cycle (the
frames, then the same frames reversed), as MuseTalk does, so the loop has no jump.

On disk an avatar is a directory, written to a temporary sibling and renamed into place only
when complete (a crash never leaves a half-written cache):

    manifest.json   format version, source sha256, model id + weights hash, settings, sizes
    frames.npy      [N, H, W, 3] uint8 BGR. Raw, not an mp4: exact pixels (the blend pastes
                    into them; codec noise would flicker around the mouth), memory-mapped at
                    load time with no decoding, shared by every session through the page cache.
                    The cost is disk: 10 s of 720p is ~0.7 GB.
    latents.npy     [N, 2C, h, w] float32
    landmarks.npy   [N, 478, 2] float32
    boxes.npy       [N, 2, 4] int32: face box and crop box (x1, y1, x2, y2) per frame
    masks.npz       one uint8 [crop_h, crop_w] mask per frame ("0", "1", ...), compressed

The cache is reused as long as the manifest's key (format, source hash, model, settings) is
unchanged; any change recomputes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import cv2
import numpy as np
import torch

from realtime_avatar import __version__
from realtime_avatar.blending import CROP_EXPAND, Blender, BlendRegion, blend_region
from realtime_avatar.face import (
    FACE_OVAL,
    LEFT_EYE_LOWER,
    LEFT_EYE_UPPER,
    RIGHT_EYE_LOWER,
    RIGHT_EYE_UPPER,
    BBox,
    FaceChoice,
    FaceChoiceError,
    FaceTracker,
    MultipleFacesWarning,
    detect_face_landmarks,
    face_bbox,
    face_extent,
)
from realtime_avatar.models.base import PATCH_SIZE, RendererModel, mask_lower_half
from realtime_avatar.timing import FPS

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump whenever what is stored or how it is computed changes
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ENCODE_BATCH = 16  # crops per model.encode call: bounds memory on long videos
_HASH_CHUNK = 1 << 20  # 1 MiB reads when hashing the source


class AvatarError(ValueError):
    """The avatar source cannot be turned into an avatar; the message says why and what to do."""


class AvatarSourceError(AvatarError):
    """The source file is missing, unreadable, or has no video."""


class NoFaceError(AvatarError):
    """No face in a frame of the source."""

    def __init__(self, source: Path, frame_index: int):
        self.frame_index = frame_index
        super().__init__(
            f"{source}: no face found in frame {frame_index} (at {frame_index / FPS:.2f} s after "
            f"resampling to {FPS} fps). Every frame of an avatar needs one clearly visible, "
            "roughly frontal face: trim the video or pick another source."
        )


class FaceTooSmallError(AvatarError):
    """The face is too small in a frame to give a usable 256x256 crop."""

    def __init__(self, source: Path, frame_index: int, face_px: int, min_px: int):
        self.frame_index, self.face_px, self.min_px = frame_index, face_px, min_px
        super().__init__(
            f"{source}: frame {frame_index}: face is {face_px} px, at least {min_px} px needed: "
            "use a closer crop (or a higher-resolution source)"
        )


class FaceNotChosenError(AvatarError):
    """--face / --face-box names a face that is not in the source."""


class AvatarCacheError(AvatarError):
    """An avatar directory is incomplete or inconsistent."""


# -- settings and manifest ----------------------------------------------------------------------


@dataclass(frozen=True)
class AvatarSettings:
    """Everything that changes what is cached (part of the cache key)."""

    max_seconds: float = 10.0  # video sources: keep at most this much (from the start)
    idle_seconds: float = 3.0  # image sources: length of the synthesised idle cycle (one way)
    idle_motion: bool = True  # image sources: head sway and a blink; False: one still frame
    extra_margin: int = 10  # MuseTalk v1.5: pixels added below the chin (face box y2)
    crop_expand: float = CROP_EXPAND  # blending crop box half-side factor
    min_face_px: int = 64  # smaller faces are rejected: the 256 crop would be mostly blur
    fps: int = FPS
    face_index: int | None = None  # --face N: the N-th face from the left in the first frame
    face_box: tuple[int, int, int, int] | None = None  # --face-box x,y,w,h in the first frame
    background: str = "#808080"  # transparent pixels are composited onto this (#rrggbb)
    # image sources: the avatar rests with its lips together. A photo's open mouth (a smile with
    # teeth) is closed by the procedural teacher before the idle cycle is made: the model takes
    # its mouth reference from these frames and, on faces it never saw, copies an open one into
    # silence (held-out faces, bench_lipsync: 5 of 20 smiling photos never closed).
    close_mouth: bool = True

    def __post_init__(self) -> None:
        if self.max_seconds <= 0 or self.idle_seconds <= 0:
            raise ValueError("max_seconds and idle_seconds must be positive")
        object.__setattr__(self, "background", normalize_color(self.background))
        if self.face_box is not None:
            object.__setattr__(self, "face_box", tuple(int(v) for v in self.face_box))
        self.face_choice()  # validates index/box

    def face_choice(self) -> FaceChoice:
        return FaceChoice(index=self.face_index, box=self.face_box)


NAMED_COLORS = {"grey": "#808080", "gray": "#808080", "black": "#000000", "white": "#ffffff",
                "green": "#00ff00", "blue": "#0000ff", "red": "#ff0000"}


def normalize_color(text: str) -> str:
    """'#rgb', '#rrggbb', 'R,G,B' (0-255) or a name (grey, black, white, green, blue, red) ->
    '#rrggbb'. Raises ValueError naming the text."""
    t = str(text).strip().lower()
    t = NAMED_COLORS.get(t, t)
    if t.startswith("#") and len(t) in (4, 7):
        digits = t[1:] if len(t) == 7 else "".join(c * 2 for c in t[1:])
        try:
            int(digits, 16)
            return "#" + digits
        except ValueError:
            pass
    parts = t.split(",")
    if len(parts) == 3:
        try:
            rgb = [int(p) for p in parts]
        except ValueError:
            rgb = []
        if len(rgb) == 3 and all(0 <= v <= 255 for v in rgb):
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    raise ValueError(f"colour {text!r}: use #rrggbb, R,G,B (0-255) or one of {', '.join(NAMED_COLORS)}")


def color_bgr(color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (b, g, r) ints."""
    c = normalize_color(color)
    r, g, b = (int(c[i : i + 2], 16) for i in (1, 3, 5))
    return (b, g, r)


def composite_over(bgra: np.ndarray, background_bgr: tuple[int, int, int]) -> np.ndarray:
    """[H, W, 4] uint8 BGRA (straight alpha) -> [H, W, 3] uint8 BGR over a flat background:
    out = a * colour + (1 - a) * background, rounded. Whatever colour a fully transparent
    pixel holds, it shows the background."""
    alpha = bgra[..., 3:4].astype(np.float32) / 255.0
    out = bgra[..., :3].astype(np.float32) * alpha + np.float32(background_bgr) * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class AvatarManifest:
    format_version: int
    source_name: str
    source_sha256: str
    source_kind: str  # "image" | "video"
    model_id: str
    weights_hash: str
    latent_channels: int
    latent_size: int
    settings: dict[str, Any]
    frame_count: int
    frame_height: int
    frame_width: int
    created: str  # ISO 8601, UTC
    package_version: str = __version__

    def cache_key(self) -> dict[str, Any]:
        """What must match for a cache to be reused."""
        return _cache_key(self.source_sha256, self.model_id, self.weights_hash, self.settings,
                          self.format_version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AvatarManifest":
        data = json.loads(text)
        return cls(**data)


def _cache_key(source_sha256: str, model_id: str, weights_hash: str, settings: dict[str, Any],
               format_version: int = FORMAT_VERSION) -> dict[str, Any]:
    return {
        "format_version": format_version,
        "source_sha256": source_sha256,
        "model_id": model_id,
        "weights_hash": weights_hash,
        # through JSON so that a tuple and a list, or 10 and 10.0 written back, compare equal
        "settings": json.loads(json.dumps(settings)),
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- pure index math ----------------------------------------------------------------------------


def cycle_index(i: int, n_frames: int) -> int:
    """Cached frame shown at position i of the ping-pong cycle [0 .. n-1, n-1 .. 0] (period 2n).

    The end frames appear twice in a row, exactly as MuseTalk's frame_list + frame_list[::-1].
    """
    if n_frames <= 0:
        raise ValueError("an avatar has at least one frame")
    if i < 0:
        raise ValueError(f"cycle position must be >= 0, got {i}")
    k = i % (2 * n_frames)
    return k if k < n_frames else 2 * n_frames - 1 - k


T = TypeVar("T")


def resample_to_fps(timed: Iterable[tuple[float, T]], fps: float, max_frames: int) -> Iterator[T]:
    """Resample a stream of (timestamp seconds, item) to a constant rate by nearest timestamp.

    Output frame k (time t0 + k/fps, t0 the first timestamp) is the item whose timestamp is
    nearest: items are dropped when the source is faster, repeated when it is slower, and a
    variable frame rate is handled. Streams: holds one item, stops after max_frames. The last
    item lasts as long as the interval before it.
    """
    period = 1.0 / fps
    eps = 1e-6 * period  # timestamps are often rounded to the stream time base
    k = 0
    t0: float | None = None
    prev: T | None = None
    prev_t = 0.0
    last_dt = period
    have_prev = False
    for t, item in timed:
        if t0 is None:
            t0 = t
        if have_prev:
            if t <= prev_t:  # out-of-order or repeated timestamp: keep the newer picture
                prev = item
                continue
            boundary = (prev_t + t) / 2.0
            while k < max_frames and t0 + k * period < boundary - eps:
                yield prev  # type: ignore[misc]
                k += 1
            last_dt = t - prev_t
            if k >= max_frames:
                return
        prev, prev_t, have_prev = item, t, True
    if not have_prev:
        return
    end = prev_t + last_dt / 2.0
    while k < max_frames and (k == 0 or t0 + k * period < end - eps):  # type: ignore[operator]
        yield prev  # type: ignore[misc]
        k += 1


def pad_amounts(bbox: BBox, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixels the frame lacks to contain bbox."""
    h, w = frame_shape[:2]
    return max(0, -bbox.y1), max(0, bbox.y2 - h), max(0, -bbox.x1), max(0, bbox.x2 - w)


def crop_face(frame: np.ndarray, bbox: BBox) -> np.ndarray:
    """The face box resized to 256x256 (LANCZOS4, as MuseTalk); a box past the frame edge is
    filled by replicating the border rather than squashing the face."""
    top, bottom, left, right = pad_amounts(bbox, frame.shape)
    if top or bottom or left or right:
        frame = cv2.copyMakeBorder(frame, top, bottom, left, right, cv2.BORDER_REPLICATE)
    crop = frame[bbox.y1 + top : bbox.y2 + top, bbox.x1 + left : bbox.x2 + left]
    return cv2.resize(crop, (PATCH_SIZE, PATCH_SIZE), interpolation=cv2.INTER_LANCZOS4)


# -- reading sources ----------------------------------------------------------------------------


def _read_image(path: Path, background: str = AvatarSettings.background) -> np.ndarray | None:
    """A BGR uint8 image, upright (EXIF orientation applied); an image with an alpha channel
    (RGBA, grey+alpha, a palette with a transparent colour) is composited onto `background`."""
    data = np.fromfile(path, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        return None
    unchanged = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    has_alpha = unchanged is not None and unchanged.ndim == 3 and unchanged.shape[2] == 4
    if not has_alpha and path.suffix.lower() in (".png", ".webp", ".tif", ".tiff"):
        has_alpha = _pil_has_alpha(path)  # palette transparency: OpenCV may not expand it
    if not has_alpha:
        return image
    bgra = _read_bgra(path)
    if bgra is None:
        return image
    log.info("%s has transparency: composited onto %s (set with --background COLOR)", path, background)
    return composite_over(bgra, color_bgr(background))


def _pil_has_alpha(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    except Exception:
        return False


def _read_bgra(path: Path) -> np.ndarray | None:
    """[H, W, 4] uint8 BGRA, EXIF orientation applied (Pillow: it reads every alpha flavour and
    16-bit depths; OpenCV's IMREAD_UNCHANGED ignores the orientation)."""
    try:
        from PIL import Image, ImageOps

        with Image.open(path) as im:
            rgba = np.asarray(ImageOps.exif_transpose(im).convert("RGBA"))
    except Exception:
        return None
    return np.ascontiguousarray(rgba[..., [2, 1, 0, 3]])


def upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """Apply a video's display rotation (degrees counterclockwise, as FFmpeg's display matrix
    reports it and players apply it): phone videos are stored sideways with such a tag."""
    k = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(image, k)) if k else image


def _open_video(path: Path, fps: float, max_frames: int,
                background: str = AvatarSettings.background) -> tuple[Iterator[np.ndarray], int]:
    """Decoded, upright BGR frames resampled to fps by their timestamps (PyAV), and an estimate
    of how many there will be (for the progress bar). Frames with an alpha channel are
    composited onto `background`."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise AvatarSourceError(
            f"{path}: cannot be opened as an image or a video ({e}). Use a PNG/JPEG image or a "
            "video file FFmpeg can decode."
        ) from e
    if not container.streams.video:
        container.close()
        raise AvatarSourceError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = float(stream.average_rate or stream.guessed_rate or fps)
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        seconds = max_frames / fps
    estimate = max(1, min(max_frames, round(seconds * fps)))

    def timed() -> Iterator[tuple[float, Any]]:
        try:
            for i, frame in enumerate(container.decode(stream)):
                yield (frame.time if frame.time is not None else i / rate), frame
        except av.FFmpegError as e:
            raise AvatarSourceError(f"{path}: video decoding failed ({e})") from e

    pix_fmt = stream.codec_context.pix_fmt
    has_alpha = bool(pix_fmt) and any(c.is_alpha for c in av.VideoFormat(pix_fmt).components)
    if has_alpha:
        log.info("%s has transparency (%s): composited onto %s (set with --background COLOR)", path,
                 stream.codec_context.pix_fmt, background)
    bg = color_bgr(background)

    def frames() -> Iterator[np.ndarray]:
        with container:
            for frame in resample_to_fps(timed(), fps, max_frames):
                image = composite_over(frame.to_ndarray(format="bgra"), bg) if has_alpha else \
                    frame.to_ndarray(format="bgr24")
                yield upright(image, frame.rotation or 0.0)

    return frames(), estimate


@dataclass
class _Source:
    kind: str  # "image" | "video"
    frames: Iterator[np.ndarray]
    expected_frames: int | None  # for the progress bar
    chosen_box: tuple[int, int, int, int] | None = None  # image sources: the face already chosen


def _open_source(path: Path, settings: AvatarSettings) -> _Source:
    if not path.is_file():
        raise AvatarSourceError(f"{path}: no such file")
    image = _read_image(path, settings.background) if path.suffix.lower() in IMAGE_SUFFIXES else None
    if path.suffix.lower() in IMAGE_SUFFIXES and image is None:
        raise AvatarSourceError(
            f"{path}: cannot be decoded as an image (corrupt or not really {path.suffix}). "
            "Re-save it as PNG or JPEG."
        )
    if image is None:
        max_frames = max(1, math.floor(settings.max_seconds * settings.fps))
        frames, estimate = _open_video(path, settings.fps, max_frames, settings.background)
        first = next(frames, None)
        if first is None:
            raise AvatarSourceError(f"{path}: the video has no frames")
        second = next(frames, None)
        if second is None:  # a one-frame "video" (e.g. an image format FFmpeg reads) is a still
            image = first
        else:
            return _Source("video", _chain([first, second], frames), estimate)
    with warnings.catch_warnings():  # the preparation loop reports several faces once
        warnings.simplefilter("ignore", MultipleFacesWarning)
        try:
            lm = detect_face_landmarks(image, settings.face_choice())
        except FaceChoiceError as e:
            raise FaceNotChosenError(f"{path}: {e}") from None
    if lm is None:
        raise NoFaceError(path, 0)
    n = max(1, round(settings.idle_seconds * settings.fps)) if settings.idle_motion else 1
    if settings.close_mouth:
        image = _closed_mouth(image, lm)
    return _Source("image", iter(synthesize_idle_cycle(image, lm.points, n)), n, _face_box(lm.points))


def _closed_mouth(image: np.ndarray, landmarks) -> np.ndarray:
    """The photo with its mouth closed at rest (the teacher's neutral pose; only the lower face
    changes). A face the teacher cannot work on is kept as it is, with a warning."""
    from .teacher import MouthTeacher

    try:
        return MouthTeacher(image, landmarks).neutral
    except (ValueError, cv2.error) as exc:
        warnings.warn(f"the photo's mouth could not be closed for the avatar's rest pose ({exc}); "
                      "it keeps the photo's own mouth", stacklevel=2)
        return image


def _face_box(points: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a face's landmarks: how the chosen face of a still is handed to the
    tracker of its idle cycle."""
    b = BBox.around(points)
    return (b.x1, b.y1, b.width, b.height)


def _chain(head: list[np.ndarray], rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield from head
    yield from rest


# -- idle cycle from a still image --------------------------------------------------------------


@dataclass(frozen=True)
class IdleMotion:
    """A subtle idle: a pendulum head sway with a slight dip, and one blink per pass."""

    sway_degrees: float = 1.2  # head roll from -a to +a over one pass of the cycle
    dip: float = 0.008  # head moves down by this fraction of the face size mid-pass
    blink_at: float = 0.62  # blink centre, as a fraction of the pass
    blink_seconds: float = 0.28  # lid closing + opening
    fps: int = FPS


def _lid_curve(points: np.ndarray, lid: tuple[int, ...], xs: np.ndarray) -> np.ndarray:
    p = points[list(lid)]
    order = np.argsort(p[:, 0])
    return np.interp(xs, p[order, 0], p[order, 1])


def _blink_map(shape: tuple[int, int], points: np.ndarray, closure: float) -> tuple[np.ndarray, np.ndarray]:
    """Source-coordinate maps (for cv2.remap) that close both upper lids by `closure` (0..1).

    Per image column across an eye: the upper lid line moves down towards the lower lid, the
    skin above it (up to one eye-height higher) is stretched down to follow, and the eye below
    the lid is covered in place, not squashed, as a real lid covers it.
    """
    h, w = shape
    map_x, map_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    if closure <= 0:
        return map_x, map_y
    for upper, lower in ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER)):
        corners = points[[upper[0], upper[-1]]]
        x0, x1 = int(math.floor(corners[:, 0].min())), int(math.ceil(corners[:, 0].max()))
        xs = np.arange(max(x0, 0), min(x1 + 1, w))
        if len(xs) == 0:
            continue
        y_up = _lid_curve(points, upper, xs)
        y_low = np.maximum(_lid_curve(points, lower, xs), y_up)
        eye_h = float((y_low - y_up).max())
        y_top = y_up - eye_h - 1.0  # the lid skin that slides down (stays below the brow)
        y_lid = y_up + closure * 0.95 * (y_low - y_up)  # the lid edge, closed: just above the lower lid
        r0, r1 = max(int(y_top.min()) - 1, 0), min(int(y_lid.max()) + 2, h)
        if r1 <= r0:
            continue
        ys = np.arange(r0, r1, dtype=np.float64)[:, None]
        # Output u in [0, 1] over [y_top, y_lid] reads source u**p over [y_top, y_up]: with
        # p = (y_lid - y_top) / (y_up - y_top) the lash line at the bottom moves down unscaled
        # (a thin dark edge, as on a real closed lid) and the stretch goes to the lid skin above.
        out_h = np.maximum(y_lid - y_top, 1e-3)
        src_h = y_up - y_top
        u = np.clip((ys - y_top) / out_h, 0.0, 1.0)
        stretched = y_top + src_h * u ** (out_h / src_h)
        in_band = (ys >= y_top) & (ys <= y_lid)
        block = map_y[r0:r1, xs[0] : xs[-1] + 1]
        block[...] = np.where(in_band, stretched, ys).astype(np.float32)
    return map_x, map_y


def _head_weight(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """[H, W] float32 weight of the head's motion: 1 over the face and hair, fading to 0 over
    about half a face size, so the background barely bends."""
    oval = points[list(FACE_OVAL)].astype(np.float64)
    centre = oval.mean(axis=0)
    size = face_extent(oval)
    head = centre + (oval - centre) * 1.35  # take in the hair and ears
    head[:, 1] -= 0.1 * size  # more room above (hair) than below
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(head).astype(np.int32).reshape(-1, 1, 2)], 255)
    k = int(size * 0.6) | 1
    return cv2.GaussianBlur(mask, (k, k), 0).astype(np.float32) / 255.0


def _raised_cosine(x: float) -> float:
    """1 at x = 0, 0 for |x| >= 1, smooth in between."""
    return 0.5 * (1.0 + math.cos(math.pi * x)) if abs(x) < 1.0 else 0.0


def synthesize_idle_cycle(
    image_bgr: np.ndarray, points: np.ndarray, n_frames: int, motion: IdleMotion = IdleMotion()
) -> list[np.ndarray]:
    """n_frames of a still face gently alive: head sway and one blink (one pass of the cycle).

    The sway goes from one extreme to the other with zero speed at both ends, so the ping-pong
    playback turns around smoothly. Pixels move by warping only (cv2.remap): nothing is drawn.
    """
    h, w = image_bgr.shape[:2]
    if n_frames == 1:
        return [image_bgr.copy()]
    weight = _head_weight((h, w), points)
    size = face_extent(points[list(FACE_OVAL)])
    chin = points[list(FACE_OVAL)][:, 1].max()
    pivot = (float(points[list(FACE_OVAL), 0].mean()), float(chin + 0.35 * size))  # the neck
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    blink_half = motion.blink_seconds * motion.fps / 2.0  # frames from blink centre to open
    frames = []
    for k in range(n_frames):
        phase = k / (n_frames - 1)
        angle = -motion.sway_degrees * math.cos(math.pi * phase)
        dip = motion.dip * size * 0.5 * (1.0 - math.cos(2.0 * math.pi * phase))
        # Output pixel p shows the source at p + weight(p) * (R^-1 (p - pivot) + pivot - p),
        # with the dip: a small rigid head motion that fades out into the background.
        rot = cv2.getRotationMatrix2D(pivot, -angle, 1.0)  # inverse rotation
        src_x = rot[0, 0] * grid_x + rot[0, 1] * grid_y + rot[0, 2]
        src_y = rot[1, 0] * grid_x + rot[1, 1] * grid_y + rot[1, 2] - dip
        src_x = grid_x + weight * (src_x - grid_x)
        src_y = grid_y + weight * (src_y - grid_y)
        closure = _raised_cosine((k - motion.blink_at * (n_frames - 1)) / max(blink_half, 1.0))
        if closure > 0.02:
            blink_x, blink_y = _blink_map((h, w), points, closure)
            src_x, src_y = (
                cv2.remap(blink_x, src_x, src_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
                cv2.remap(blink_y, src_x, src_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
            )
        frames.append(cv2.remap(image_bgr, src_x.astype(np.float32), src_y.astype(np.float32),
                                cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    return frames


# -- the default avatar -------------------------------------------------------------------------


def avatar_cache_root() -> Path:
    """Where default avatar sources and caches live: $REALTIME_AVATAR_CACHE, else
    $XDG_CACHE_HOME/realtime-avatar, else ~/.cache/realtime-avatar."""
    override = os.environ.get("REALTIME_AVATAR_CACHE")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "realtime-avatar"


def default_avatar_source() -> Path:
    """The bundled default face: scikit-image's astronaut (Eileen Collins, a public-domain NASA
    photo, 512x512), written once as a PNG under the cache root. An idle cycle is synthesised
    from it when the avatar is prepared."""
    import skimage.data

    path = avatar_cache_root() / "sources" / "astronaut.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.png")
        ok = cv2.imwrite(str(tmp), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"could not write {tmp}")
        os.replace(tmp, path)
    return path


def default_avatar_dir(source: Path, model: RendererModel) -> Path:
    """A cache directory per (source, model): switching models does not evict the other."""
    digest = file_sha256(source)[:12]
    return avatar_cache_root() / "avatars" / f"{source.stem}-{digest}-{model.model_id}-{model.weights_hash()[:12]}"


# -- the avatar ---------------------------------------------------------------------------------


@dataclass
class Avatar:
    """A prepared avatar, ready for the real-time loop.

    Positions `i` below count frames of the ping-pong cycle from 0 upwards without bound;
    `cycle_index` maps them to cached frames.
    """

    path: Path
    manifest: AvatarManifest
    frames: np.ndarray  # [N, H, W, 3] uint8 BGR, cached order (memory-mapped when loaded)
    latents: torch.Tensor  # [N, 2C, h, w] float32: masked then reference latents
    landmarks: np.ndarray  # [N, 478, 2] float32
    blender: Blender
    _frame_shape: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.frames)
        if not (len(self.latents) == len(self.landmarks) == len(self.blender) == n) or n == 0:
            raise AvatarCacheError(
                f"{self.path}: frames ({n}), latents ({len(self.latents)}), landmarks "
                f"({len(self.landmarks)}) and masks ({len(self.blender)}) disagree"
            )
        self._frame_shape = tuple(self.frames.shape[1:])  # type: ignore[assignment]

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def cycle_length(self) -> int:
        return 2 * self.num_frames

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self._frame_shape

    def cycle_index(self, i: int) -> int:
        return cycle_index(i, self.num_frames)

    def frame(self, i: int) -> np.ndarray:
        """The cached frame at cycle position i (a read-only view: copy before drawing)."""
        return self.frames[self.cycle_index(i)]

    def latents_at(self, positions: Sequence[int]) -> torch.Tensor:
        """[len(positions), 2C, h, w] latents for cycle positions, ready for model.render()."""
        return self.latents[[self.cycle_index(i) for i in positions]]

    def new_frame_buffer(self) -> np.ndarray:
        return np.empty(self.frame_shape, np.uint8)

    def check_model(self, model: RendererModel) -> None:
        """Raise AvatarCacheError unless the latents were encoded by this model's weights
        (latents of another model render garbage without any error)."""
        m = self.manifest
        if (m.model_id, m.weights_hash) != (model.model_id, model.weights_hash()):
            raise AvatarCacheError(
                f"{self.path}: prepared for model {m.model_id} ({m.weights_hash[:12]}), not for "
                f"{model.model_id} ({model.weights_hash()[:12]}). Prepare the avatar again with "
                "this model, or give its source image/video instead of the directory."
            )

    def compose_into(self, out: np.ndarray, patch_256_bgr: np.ndarray, i: int) -> np.ndarray:
        """Fill `out` with the frame at cycle position i and blend the rendered patch into it."""
        j = self.cycle_index(i)
        np.copyto(out, self.frames[j])
        self.blender.blend_into(out, patch_256_bgr, j)
        return out


# -- preparing ----------------------------------------------------------------------------------


def _progress(frames: Iterator[np.ndarray], total: int | None, enabled: bool, desc: str) -> Iterator[np.ndarray]:
    if not enabled:
        return frames
    from tqdm import tqdm

    return iter(tqdm(frames, total=total, desc=desc, unit="frame", leave=False))


def _encode_batch(model: RendererModel, crops: list[np.ndarray]) -> torch.Tensor:
    batch = np.stack(crops)
    with torch.no_grad():
        masked = model.encode(mask_lower_half(batch))
        reference = model.encode(batch)
    return torch.cat([masked, reference], dim=1).float().cpu()


_NPY_HEADER_BYTES = 128  # npy 1.0 header with room for any [N, H, W, 3] shape; keeps data 64-aligned


def npy_header(shape: tuple[int, ...], total_len: int = _NPY_HEADER_BYTES) -> bytes:
    """An .npy (format 1.0) header for a C-order uint8 array of `shape`, padded with spaces to
    exactly total_len bytes (the format allows padding), so it can be written before the count
    of frames is known and rewritten in place after."""
    magic = b"\x93NUMPY\x01\x00"
    body_len = total_len - len(magic) - 2  # 2: the uint16 header length
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    if len(text) + 1 > body_len:
        raise ValueError(f"shape {shape} does not fit a {total_len}-byte npy header")
    return magic + body_len.to_bytes(2, "little") + text.ljust(body_len - 1) + b"\n"


class _NpyFramesWriter:
    """Streams [N, H, W, 3] uint8 frames into an .npy file one at a time, so preparing a long
    video never holds two copies of it; the header gets the real N on close."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.shape: tuple[int, int, int] | None = None
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        if self.shape is None:
            self.shape = tuple(frame.shape)  # type: ignore[assignment]
            self._f.write(npy_header((0,) + self.shape))
        elif frame.shape != self.shape:
            raise AvatarSourceError(
                f"frame {self.count} is {frame.shape[1]}x{frame.shape[0]}, earlier frames "
                f"{self.shape[1]}x{self.shape[0]}: the video changes resolution mid-stream"
            )
        self._f.write(np.ascontiguousarray(frame, np.uint8).tobytes())
        self.count += 1

    def close(self) -> None:
        if self.shape is not None:
            self._f.seek(0)
            self._f.write(npy_header((self.count,) + self.shape))
        self._f.close()


def prepare_avatar(
    source: Path,
    out_dir: Path,
    model: RendererModel,
    settings: AvatarSettings = AvatarSettings(),
    *,
    progress: bool = True,
    on_frame: Callable[[int], None] | None = None,
) -> Avatar:
    """Build the avatar cache for `source` with `model` into `out_dir` (replacing what is there)
    and return the loaded avatar. Raises AvatarError subclasses for bad sources.

    on_frame: called with each frame index after it is processed (progress reporting).
    """
    source, out_dir = Path(source), Path(out_dir)
    start = time.perf_counter()
    opened = _open_source(source, settings)
    source_sha = file_sha256(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        frames_writer = _NpyFramesWriter(tmp / "frames.npy")
        landmarks, boxes, masks, latents = [], [], {}, []
        crops: list[np.ndarray] = []
        choice = FaceChoice(box=opened.chosen_box) if opened.chosen_box else settings.face_choice()
        tracker = FaceTracker(fps=settings.fps, warn_multiple=False, choice=choice)
        try:
            with tracker:
                frames = _progress(opened.frames, opened.expected_frames,
                                   progress and opened.kind == "video", f"preparing {source.name}")
                for i, frame in enumerate(frames):
                    try:
                        lm = tracker.update(frame, timestamp=i / settings.fps)
                    except FaceChoiceError as e:
                        raise FaceNotChosenError(f"{source}: {e}") from None
                    if lm is None:
                        raise NoFaceError(source, i)
                    bbox = face_bbox(lm.points, frame.shape, settings.extra_margin)
                    if min(bbox.width, bbox.height) < settings.min_face_px:
                        raise FaceTooSmallError(source, i, min(bbox.width, bbox.height), settings.min_face_px)
                    region = blend_region(lm.points, bbox, settings.crop_expand)
                    frames_writer.write(frame)
                    landmarks.append(lm.points)
                    boxes.append([bbox.as_tuple(), region.crop.as_tuple()])
                    masks[str(i)] = region.mask
                    crops.append(crop_face(frame, bbox))
                    if len(crops) == ENCODE_BATCH:
                        latents.append(_encode_batch(model, crops))
                        crops = []
                    if on_frame is not None:
                        on_frame(i)
            if crops:
                latents.append(_encode_batch(model, crops))
        finally:
            frames_writer.close()
        if tracker.chosen is not None and tracker.chosen[2] > 1:
            k, box, n = tracker.chosen
            how = "as asked" if (settings.face_index is not None or settings.face_box is not None) \
                else "the largest face is used, ties to the most central"
            warnings.warn(
                f"{source}: {n} faces in the first frame; following face {k} (counted from the left) "
                f"at x,y,w,h {box.x1},{box.y1},{box.width},{box.height} in every frame ({how}); "
                "choose another with --face N or --face-box x,y,w,h",
                MultipleFacesWarning,
                stacklevel=2,
            )
        all_latents = torch.cat(latents)
        np.save(tmp / "latents.npy", all_latents.numpy())
        np.save(tmp / "landmarks.npy", np.stack(landmarks).astype(np.float32))
        np.save(tmp / "boxes.npy", np.asarray(boxes, np.int32))
        np.savez_compressed(tmp / "masks.npz", **masks)
        assert frames_writer.shape is not None
        manifest = AvatarManifest(
            format_version=FORMAT_VERSION,
            source_name=source.name,
            source_sha256=source_sha,
            source_kind=opened.kind,
            model_id=model.model_id,
            weights_hash=model.weights_hash(),
            latent_channels=int(all_latents.shape[1] // 2),
            latent_size=int(all_latents.shape[-1]),
            settings=asdict(settings),
            frame_count=frames_writer.count,
            frame_height=frames_writer.shape[0],
            frame_width=frames_writer.shape[1],
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared avatar %s: %d frames in %.1f s", out_dir, manifest.frame_count,
             time.perf_counter() - start)
    return load_avatar(out_dir)


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished `new` to `target`; an existing target is moved aside first and removed
    after, so `target` is at every moment either the old complete cache or the new one."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(avatar_dir: Path) -> AvatarManifest | None:
    """The manifest of an avatar directory, or None when absent or unreadable."""
    try:
        return AvatarManifest.from_json((Path(avatar_dir) / MANIFEST).read_text())
    except (OSError, ValueError, TypeError):
        return None


def load_avatar(avatar_dir: Path, *, mmap: bool = True) -> Avatar:
    """Load a prepared avatar directory (frames memory-mapped unless mmap=False)."""
    avatar_dir = Path(avatar_dir)
    manifest = read_manifest(avatar_dir)
    if manifest is None:
        raise AvatarCacheError(f"{avatar_dir}: no readable {MANIFEST}; prepare the avatar again")
    if manifest.format_version != FORMAT_VERSION:
        raise AvatarCacheError(
            f"{avatar_dir}: cache format {manifest.format_version}, this version reads "
            f"{FORMAT_VERSION}; prepare the avatar again"
        )
    try:
        frames = np.load(avatar_dir / "frames.npy", mmap_mode="r" if mmap else None)
        latents = torch.from_numpy(np.load(avatar_dir / "latents.npy"))
        landmarks = np.load(avatar_dir / "landmarks.npy")
        boxes = np.load(avatar_dir / "boxes.npy")
        with np.load(avatar_dir / "masks.npz") as masks:
            regions = [
                BlendRegion(BBox(*map(int, boxes[i, 0])), BBox(*map(int, boxes[i, 1])), masks[str(i)])
                for i in range(len(boxes))
            ]
    except (OSError, ValueError, KeyError) as e:
        raise AvatarCacheError(f"{avatar_dir}: damaged cache ({e}); prepare the avatar again") from e
    if len(frames) != manifest.frame_count:
        raise AvatarCacheError(
            f"{avatar_dir}: manifest says {manifest.frame_count} frames, frames.npy has {len(frames)}"
        )
    return Avatar(
        path=avatar_dir,
        manifest=manifest,
        frames=frames,
        latents=latents,
        landmarks=landmarks,
        blender=Blender(regions, frames.shape[1:]),
    )


def load_or_prepare_avatar(
    source: Path,
    out_dir: Path,
    model: RendererModel,
    settings: AvatarSettings = AvatarSettings(),
    *,
    progress: bool = True,
) -> Avatar:
    """The cached avatar in out_dir when it was made from this source (same bytes), this model
    (same weights) and these settings; otherwise prepare it again."""
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_file():
        raise AvatarSourceError(f"{source}: no such file")
    manifest = read_manifest(out_dir)
    if manifest is not None:
        wanted = _cache_key(file_sha256(source), model.model_id, model.weights_hash(), asdict(settings))
        if manifest.cache_key() == wanted:
            try:
                return load_avatar(out_dir)
            except AvatarCacheError as e:
                log.warning("%s; rebuilding it", e)
        else:
            log.info("avatar cache %s is stale (source, model or settings changed); rebuilding", out_dir)
    return prepare_avatar(source, out_dir, model, settings, progress=progress)


# -- command line -------------------------------------------------------------------------------


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `realtime-avatar prepare`."""
    defaults = AvatarSettings()
    parser.add_argument("source", nargs="?", type=Path, default=None,
                        help="image (PNG/JPEG) or video of one face; default: the bundled astronaut photo")
    parser.add_argument("--out", type=Path, default=None,
                        help="avatar directory (default: one per source and model under the cache root)")
    parser.add_argument("--model", default="default",
                        help="renderer model spec: 'default', 'compact:FILE' or 'musetalk-v15:DIR'")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="with the default model and no trained weights, use random ones (plumbing tests)")
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds,
                        help=f"video sources: use at most this many seconds (default {defaults.max_seconds:g})")
    parser.add_argument("--idle-seconds", type=float, default=defaults.idle_seconds,
                        help=f"image sources: idle cycle length (default {defaults.idle_seconds:g})")
    parser.add_argument("--still", action="store_true", help="image sources: no idle motion (one frame)")
    parser.add_argument("--keep-mouth", action="store_true",
                        help="image sources: keep the photo's own mouth at rest (default: an open mouth, e.g. a "
                             "smile with teeth, is closed by the procedural teacher, so the avatar listens with "
                             "closed lips; on faces the model never saw it otherwise keeps them apart in silence)")
    parser.add_argument("--extra-margin", type=int, default=defaults.extra_margin,
                        help=f"pixels below the chin in the face box (default {defaults.extra_margin}, MuseTalk v1.5)")
    add_face_arguments(parser)
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching cache exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tune", type=float, default=None, metavar="MINUTES",
                        help="then fine-tune a copy of the (compact) model to this face for MINUTES on this "
                             "CPU: the procedural mouth teacher animates the photo, no video needed. The tuned "
                             "weights are kept with the avatar cache and used automatically; Ctrl+C keeps the "
                             "last checkpoint")


def add_face_arguments(parser: argparse.ArgumentParser) -> None:
    """--face, --face-box and --background: wherever an avatar source is given."""
    defaults = AvatarSettings()
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--face", type=int, default=None, metavar="N",
                       help="with several faces, use the N-th counted from the left in the first frame "
                            "(0 = leftmost; the faces found are logged). Default: the largest, ties to the "
                            "most central. The chosen face is followed through a video")
    group.add_argument("--face-box", default=None, metavar="X,Y,W,H",
                       help="with several faces, use the one overlapping this pixel box in the first frame")
    parser.add_argument("--background", default=defaults.background, metavar="COLOR",
                        help="images/videos with transparency are composited onto this colour: #rrggbb, "
                             f"R,G,B or a name (grey, black, white, green, blue, red) (default {defaults.background}, "
                             "a neutral grey)")


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> AvatarSettings:
    """AvatarSettings from --face/--face-box/--background (and any overrides); raises
    AvatarError with a one-line message for a malformed value."""
    try:
        box = FaceChoice.parse_box(args.face_box) if getattr(args, "face_box", None) else None
        return AvatarSettings(face_index=getattr(args, "face", None), face_box=box,
                              background=getattr(args, "background", AvatarSettings.background), **overrides)
    except ValueError as e:
        raise AvatarError(str(e)) from None


def prepare_main(args: argparse.Namespace) -> int:
    """`realtime-avatar prepare [SOURCE]`: build (or reuse) an avatar cache; prints its path."""
    from realtime_avatar.models.registry import load_model

    source = args.source if args.source is not None else default_avatar_source()
    model = load_model(args.model, allow_random=args.allow_random_weights, device=getattr(args, "torch_device", "cpu"))
    settings = settings_from_args(
        args,
        max_seconds=args.max_seconds,
        idle_seconds=args.idle_seconds,
        idle_motion=not args.still,
        close_mouth=not args.keep_mouth,
        extra_margin=args.extra_margin,
    )
    out_dir = args.out if args.out is not None else default_avatar_dir(source, model)
    try:
        if args.force:
            avatar = prepare_avatar(source, out_dir, model, settings, progress=not args.no_progress)
        else:
            avatar = load_or_prepare_avatar(source, out_dir, model, settings, progress=not args.no_progress)
    except AvatarError as e:
        log.error("%s", e)
        return 2
    print(f"{avatar.path}  ({avatar.num_frames} frames, {avatar.frame_shape[1]}x{avatar.frame_shape[0]}, "
          f"cycle {avatar.cycle_length / FPS:.1f} s)")
    if getattr(args, "tune", None) is not None:
        from realtime_avatar.tuning import tune_main

        return tune_main(avatar, model, args.tune, progress=not args.no_progress)
    return 0
