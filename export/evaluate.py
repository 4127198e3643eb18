"""Held-out lip-sync metrics of a renderer model, measured through the real runtime path.

Clips come from export.dataset.generate_clip(seed, "heldout"): voices, sentences and speaking
rates never used in training. Each clip's audio drives the model exactly as `render` and live
sessions do: the features the model was trained to hear (its notes name the streaming setting),
per-frame windows, model.render on the prepared avatar's latents (the bundled astronaut with
her own smiling mouth and idle sway), the patch blended into the avatar frame by its soft mask.
The finished frames are then measured:

- mouth opening: mediapipe's inner-lip gap (landmarks 13-14) over the face height (10-152),
  on the composed frame; Pearson r against the teacher's jaw curve of the same clip;
- silence: frames rendered from silent audio (pure silence, the idle frames, and the pauses
  inside the clips, away from speech) count as closed when the gap is below CLOSED_GAP;
- identity: PSNR of the upper half of the rendered 256x256 patch against the avatar's own
  face crop (the model must keep the eyes, nose and skin it is given);
- blending: every pixel outside the blending mask is exactly the avatar frame's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import cv2
import numpy as np
import torch

from realtime_avatar.face import detect_face_landmarks
from realtime_avatar.models.base import MASKED_ROWS_FROM
from realtime_avatar.tuning import mouth_opening, pearson  # noqa: F401 (shared with tuning's face check)
from realtime_avatar.timing import SAMPLE_RATE

# A mouth counts as closed below this gap (fraction of the face height). The teacher opens the
# lips by 0.10 face heights at jaw = 1 ('a') and its lightest speech openings (jaw ~0.2) give
# ~0.02 (median, measured with mediapipe on its frames); its closed mouth measures 0.001-0.002.
CLOSED_GAP = 0.01
SILENCE_MARGIN = 3  # frames: a pause frame counts as silence only this far from any articulation
PURE_SILENCE_SECONDS = 2.0

THRESHOLDS = {"pearson_r": 0.8, "silence_closed": 0.95, "upper_psnr_db": 30.0}


def psnr(mse: float) -> float:
    """PSNR in dB of 8-bit images from their mean squared error."""
    return float("inf") if mse <= 0 else float(10.0 * np.log10(255.0**2 / mse))


def pause_frames(poses: np.ndarray, margin: int = SILENCE_MARGIN) -> np.ndarray:
    """[n] bool: frames whose teacher pose and that of `margin` frames either side are neutral."""
    neutral = np.all(np.abs(poses) < 1e-6, axis=1)
    out = neutral.copy()
    for d in range(1, margin + 1):
        out[d:] &= neutral[:-d]
        out[:-d] &= neutral[d:]
    return out


def measure_openings(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Mouth opening per frame (nan where mediapipe finds no face)."""
    out = np.full(len(frames), np.nan)
    for i, frame in enumerate(frames):
        lm = detect_face_landmarks(frame)
        if lm is not None:
            out[i] = mouth_opening(lm.points)
    return out


def changed_outside_mask(composed: np.ndarray, original: np.ndarray, region) -> int:
    """How many pixels differ from the avatar frame outside the blending mask (must be 0)."""
    allowed = np.zeros(original.shape[:2], bool)
    crop = region.crop
    h, w = original.shape[:2]
    y1, y2, x1, x2 = max(crop.y1, 0), min(crop.y2, h), max(crop.x1, 0), min(crop.x2, w)
    if y2 > y1 and x2 > x1:
        allowed[y1:y2, x1:x2] = region.mask[y1 - crop.y1 : y2 - crop.y1, x1 - crop.x1 : x2 - crop.x1] > 0
    changed = np.any(composed != original, axis=2)
    return int((changed & ~allowed).sum())


@dataclass
class Rendered:
    frames: list[np.ndarray]  # composed avatar frames
    upper_sq_error: float  # summed squared error of the patches' upper halves vs the avatar crops
    upper_values: int  # how many values that sum covers
    outside_changed: int  # pixels changed outside the blending masks


def render_through_avatar(model, avatar, windows: np.ndarray, batch_size: int = 8) -> Rendered:
    """The runtime's render path (AvatarRenderer.render): latents of cycle positions 0..n-1,
    model.render, blend into the avatar frames; plus the identity and blending checks."""
    from realtime_avatar.avatar import crop_face

    frames, sq, count, outside = [], 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        positions = list(range(start, min(start + batch_size, len(windows))))
        latents = avatar.latents_at(positions)
        with torch.inference_mode():
            patches = model.render(latents, torch.from_numpy(np.ascontiguousarray(windows[start : start + len(positions)])))
        for patch, position in zip(patches, positions):
            j = avatar.cycle_index(position)
            original = np.asarray(avatar.frames[j])
            region = avatar.blender.regions[j]
            crop = crop_face(original, region.bbox)
            diff = patch[:MASKED_ROWS_FROM].astype(np.float64) - crop[:MASKED_ROWS_FROM]
            sq += float((diff * diff).sum())
            count += diff.size
            composed = avatar.compose_into(avatar.new_frame_buffer(), patch, position)
            outside += changed_outside_mask(composed, original, region)
            frames.append(composed)
    return Rendered(frames, sq, count, outside)


@dataclass
class ClipScore:
    name: str
    frames: int
    detected: int
    pearson_r: float
    pause_frames: int
    pause_closed: int
    upper_psnr_db: float


@dataclass
class LipSyncReport:
    pearson_r: float  # pooled over every detected speech-clip frame
    pearson_r_mean: float  # mean of the per-clip values
    silence_closed: float  # fraction of all silent frames measured closed
    silence_frames: int
    pure_silence_closed: float
    idle_closed: float
    pause_closed: float  # pauses inside the clips
    upper_psnr_db: float  # pooled over every rendered patch
    outside_mask_changed: int
    frames: int
    undetected: int
    seconds: float
    clips: list[ClipScore] = field(default_factory=list)

    def passes(self) -> dict[str, bool]:
        return {
            "pearson_r": self.pearson_r >= THRESHOLDS["pearson_r"],
            "silence_closed": self.silence_closed >= THRESHOLDS["silence_closed"],
            "upper_psnr_db": self.upper_psnr_db >= THRESHOLDS["upper_psnr_db"],
            "outside_mask_unchanged": self.outside_mask_changed == 0,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passes"] = self.passes()
        d["thresholds"] = dict(THRESHOLDS, closed_gap=CLOSED_GAP)
        return d

    def table(self) -> str:
        rows = [f"{'clip':<16}{'frames':>7}{'r':>8}{'pauses':>8}{'closed':>8}{'PSNR':>8}"]
        for c in self.clips:
            rows.append(f"{c.name:<16}{c.frames:>7}{c.pearson_r:>8.3f}{c.pause_frames:>8}{c.pause_closed:>8}"
                        f"{c.upper_psnr_db:>8.2f}")
        p = self.passes()
        rows += [
            "",
            f"pearson r (pooled)       {self.pearson_r:.3f}   (>= {THRESHOLDS['pearson_r']})  {'PASS' if p['pearson_r'] else 'FAIL'}",
            f"silence closed           {self.silence_closed:.3f}   (>= {THRESHOLDS['silence_closed']}, "
            f"{self.silence_frames} frames: pure {self.pure_silence_closed:.3f}, idle {self.idle_closed:.3f}, "
            f"pauses {self.pause_closed:.3f})  {'PASS' if p['silence_closed'] else 'FAIL'}",
            f"upper-half PSNR          {self.upper_psnr_db:.2f} dB (>= {THRESHOLDS['upper_psnr_db']})  "
            f"{'PASS' if p['upper_psnr_db'] else 'FAIL'}",
            f"changed outside mask     {self.outside_mask_changed} px  {'PASS' if p['outside_mask_unchanged'] else 'FAIL'}",
            f"{self.frames} frames, {self.undetected} without a detected face, {self.seconds:.1f} s",
        ]
        return "\n".join(rows)


def closed_fraction(openings: np.ndarray) -> tuple[int, int]:
    """(closed, total) counting undetected frames as not closed."""
    return int(np.sum(np.nan_to_num(openings, nan=1.0) < CLOSED_GAP)), len(openings)


def evaluate(
    model,
    encoder,
    avatar,
    seeds: Sequence[int],
    idle_frames: Sequence[np.ndarray] | None = None,
    clip_features=None,
    batch_size: int = 8,
    keep_frames: bool = False,
) -> tuple[LipSyncReport, dict]:
    """Score `model` on held-out clips `seeds` rendered on `avatar`.

    clip_features: audio16k -> [T,5,384], the way the runtime computes them for this model
    (default: realtime_avatar.runtime.model_streaming_config's choice). idle_frames: the
    renderer's listening frames, checked for a closed mouth too. Returns the report and, with
    keep_frames, the rendered frames and curves per clip (for contact sheets).
    """
    from export.dataset import generate_clip
    from realtime_avatar.frame_windows import offline_frame_windows
    from realtime_avatar.models.audio_contract import model_audio_contract
    from realtime_avatar.runtime import model_streaming_config
    from realtime_avatar.streaming_whisper import offline_features, stream_features

    window = model_audio_contract(model).window  # the frames hear what the model was trained on

    if clip_features is None:
        config, offline = model_streaming_config(model)

        def clip_features(audio):
            return offline_features(encoder, audio) if offline else stream_features(encoder, audio, config)

    t0 = time.perf_counter()
    kept: dict = {"clips": []}
    scores, all_open, all_jaw = [], [], []
    sq, count, outside, n_frames, undetected = 0.0, 0, 0, 0, 0
    pause_closed = pause_total = 0
    for seed in seeds:
        clip = generate_clip(seed, "heldout")
        windows = offline_frame_windows(clip_features(clip.audio), clip.n_frames, window)
        rendered = render_through_avatar(model, avatar, windows, batch_size)
        openings = measure_openings(rendered.frames)
        poses = clip.curves.as_array()
        jaw = poses[:, 0]
        ok = ~np.isnan(openings)
        pauses = pause_frames(poses)
        closed, total = closed_fraction(openings[pauses])
        pause_closed, pause_total = pause_closed + closed, pause_total + total
        all_open.append(openings[ok])
        all_jaw.append(jaw[ok])
        sq, count, outside = sq + rendered.upper_sq_error, count + rendered.upper_values, outside + rendered.outside_changed
        n_frames += clip.n_frames
        undetected += int((~ok).sum())
        scores.append(ClipScore(
            name=f"heldout-{seed}", frames=clip.n_frames, detected=int(ok.sum()),
            pearson_r=pearson(openings[ok], jaw[ok]), pause_frames=total, pause_closed=closed,
            upper_psnr_db=psnr(rendered.upper_sq_error / max(rendered.upper_values, 1)),
        ))  # fmt: skip
        if keep_frames:
            kept["clips"].append({"seed": seed, "frames": rendered.frames, "jaw": jaw, "openings": openings})

    silence = np.zeros(int(PURE_SILENCE_SECONDS * SAMPLE_RATE), np.float32)
    silent_windows = offline_frame_windows(clip_features(silence), None, window)
    silent = render_through_avatar(model, avatar, silent_windows, batch_size)
    outside += silent.outside_changed
    pure_closed, pure_total = closed_fraction(measure_openings(silent.frames))
    idle_closed, idle_total = closed_fraction(measure_openings(list(idle_frames or [])))
    if keep_frames:
        kept["silence"] = silent.frames

    closed_all = pure_closed + idle_closed + pause_closed
    total_all = pure_total + idle_total + pause_total
    report = LipSyncReport(
        pearson_r=pearson(np.concatenate(all_open), np.concatenate(all_jaw)) if all_open else 0.0,
        pearson_r_mean=float(np.mean([s.pearson_r for s in scores])) if scores else 0.0,
        silence_closed=closed_all / max(total_all, 1),
        silence_frames=total_all,
        pure_silence_closed=pure_closed / max(pure_total, 1),
        idle_closed=idle_closed / max(idle_total, 1) if idle_total else float("nan"),
        pause_closed=pause_closed / max(pause_total, 1) if pause_total else float("nan"),
        upper_psnr_db=psnr(sq / max(count, 1)),
        outside_mask_changed=outside,
        frames=n_frames,
        undetected=undetected,
        seconds=time.perf_counter() - t0,
        clips=scores,
    )
    return report, kept


def contact_sheet(
    frames: Sequence[np.ndarray], labels: Sequence[str], box: tuple[int, int, int, int], columns: int = 8,
    tile: tuple[int, int] = (160, 120),
) -> np.ndarray:
    """Tiles of frames[y1:y2, x1:x2] (box = x1, y1, x2, y2) with a label each, in a grid."""
    x1, y1, x2, y2 = box
    tiles = []
    for frame, label in zip(frames, labels):
        t = cv2.resize(np.ascontiguousarray(frame[y1:y2, x1:x2]), tile, interpolation=cv2.INTER_AREA)
        cv2.putText(t, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(t, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(t)
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def mouth_box(avatar, scale: float = 1.0) -> tuple[int, int, int, int]:
    """A box around the lower face of the avatar's first frame (for contact sheets)."""
    b = avatar.blender.regions[0].bbox
    cx, cy = (b.x1 + b.x2) // 2, b.y1 + int(0.68 * b.height)
    half_w, half_h = int(0.42 * b.width * scale), int(0.3 * b.width * scale)
    h, w = avatar.frame_shape[:2]
    return max(cx - half_w, 0), max(cy - half_h, 0), min(cx + half_w, w), min(cy + half_h, h)


def load_for_evaluation(model_spec: str = "default", idle_seconds: float = 3.0, cache_dir=None, threads: int = 2):
    """(model, encoder, avatar, idle frames) as the runtime builds them for the bundled face."""
    import tempfile
    from pathlib import Path

    from realtime_avatar.avatar import AvatarSettings, default_avatar_source, load_or_prepare_avatar
    from realtime_avatar.models.registry import load_model
    from realtime_avatar.renderer import AvatarRenderer, silence_window
    from realtime_avatar.whisper_weights import load_whisper

    torch.set_num_threads(threads)
    encoder = load_whisper("tiny.en").encoder
    model = load_model(model_spec)
    out = Path(cache_dir or tempfile.mkdtemp(prefix="lipsync-avatar-"))
    avatar = load_or_prepare_avatar(default_avatar_source(), out / "avatar", model,
                                    AvatarSettings(idle_seconds=idle_seconds), progress=False)
    renderer = AvatarRenderer(model, avatar, silence_window(encoder), batch_size=8)
    idle = [renderer.idle_frame(i) for i in range(avatar.num_frames)]
    return model, encoder, avatar, idle


# ------------------------------------------------------------------------ faces never trained on

SPEECH_JAW = 0.3  # frames whose teacher jaw is at least this count as speech (clearly open)
FACE_THRESHOLDS = {"median_r": 0.75, "worst_r": 0.55, "gap_ratio": 0.7, "silence_closed": 0.95,
                   "upper_psnr_db": 30.0}  # the any-face issue's targets


@dataclass
class FaceScore:
    """One held-out face: the model against the teacher on the same avatar and audio."""

    name: str
    frames: int
    undetected: int
    pearson_r: float  # model's lip gap vs the teacher's jaw curve
    teacher_r: float  # the teacher's own lip gap vs its jaw curve (the ceiling)
    speech_gap: float  # median model lip gap in speech frames (face heights)
    teacher_speech_gap: float  # the same on the teacher's frames
    gap_ratio: float  # speech_gap / teacher_speech_gap
    silence_closed: float  # pure silence + pauses
    silence_frames: int
    upper_psnr_db: float
    outside_mask_changed: int
    seconds: float


def speech_for(seed: int, split: str = "heldout"):
    """(audio 16 kHz, VisemeCurves) of held-out clip `seed` without rendering any face."""
    from realtime_avatar.tuning import speech_clip

    return speech_clip(np.random.default_rng([seed, 11]), split)


def evaluate_face(model, encoder, avatar, name: str, seeds: Sequence[int], clip_features=None,
                  batch_size: int = 8) -> FaceScore:
    """Score `model` on one prepared avatar: held-out speech through the runtime path, and the
    teacher's frames of the same avatar and curves as the reference."""
    from realtime_avatar.frame_windows import offline_frame_windows
    from realtime_avatar.runtime import model_streaming_config
    from realtime_avatar.streaming_whisper import offline_features, stream_features
    from realtime_avatar.tuning import AvatarTeacher

    if clip_features is None:
        config, offline = model_streaming_config(model)

        def clip_features(audio):
            return offline_features(encoder, audio) if offline else stream_features(encoder, audio, config)

    t0 = time.perf_counter()
    teacher = AvatarTeacher(avatar.frames, avatar.landmarks)
    opens, teacher_opens, jaws, pauses = [], [], [], []
    sq, count, outside, n_frames = 0.0, 0, 0, 0
    for seed in seeds:
        audio, curves = speech_for(seed)
        windows = offline_frame_windows(clip_features(audio), len(curves))
        rendered = render_through_avatar(model, avatar, windows, batch_size)
        opens.append(measure_openings(rendered.frames))
        teacher_frames = [teacher.render(avatar.cycle_index(i), curves.at(i)) for i in range(len(curves))]
        teacher_opens.append(measure_openings(teacher_frames))
        poses = curves.as_array()
        jaws.append(poses[:, 0])
        pauses.append(pause_frames(poses))
        sq, count = sq + rendered.upper_sq_error, count + rendered.upper_values
        outside += rendered.outside_changed
        n_frames += len(curves)
    silence = np.zeros(int(PURE_SILENCE_SECONDS * SAMPLE_RATE), np.float32)
    silent = render_through_avatar(model, avatar, offline_frame_windows(clip_features(silence)), batch_size)
    outside += silent.outside_changed
    o, t, j, pz = (np.concatenate(x) for x in (opens, teacher_opens, jaws, pauses))
    ok, tok = ~np.isnan(o), ~np.isnan(t)
    speech = j >= SPEECH_JAW
    speech_gap = float(np.median(o[ok & speech])) if (ok & speech).any() else float("nan")
    teacher_gap = float(np.median(t[tok & speech])) if (tok & speech).any() else float("nan")
    pause_closed, pause_total = closed_fraction(o[pz])
    pure_closed, pure_total = closed_fraction(measure_openings(silent.frames))
    return FaceScore(
        name=name, frames=n_frames, undetected=int((~ok).sum()),
        pearson_r=pearson(o[ok], j[ok]), teacher_r=pearson(t[tok], j[tok]),
        speech_gap=speech_gap, teacher_speech_gap=teacher_gap, gap_ratio=speech_gap / teacher_gap,
        silence_closed=(pause_closed + pure_closed) / max(pause_total + pure_total, 1),
        silence_frames=pause_total + pure_total, upper_psnr_db=psnr(sq / max(count, 1)),
        outside_mask_changed=outside, seconds=time.perf_counter() - t0,
    )  # fmt: skip


def face_summary(scores: Sequence[FaceScore]) -> dict:
    """Aggregate over faces, with the issue's targets and whether each is met."""
    r = np.array([s.pearson_r for s in scores])
    summary = {
        "faces": len(scores),
        "median_r": float(np.median(r)), "worst_r": float(r.min()),
        "worst_face": scores[int(np.argmin(r))].name,
        "median_teacher_r": float(np.median([s.teacher_r for s in scores])),
        "gap_ratio": float(np.median([s.gap_ratio for s in scores])),
        "silence_closed": float(np.mean([s.silence_closed for s in scores])),
        "upper_psnr_db": float(np.median([s.upper_psnr_db for s in scores])),
        "outside_mask_changed": int(sum(s.outside_mask_changed for s in scores)),
    }  # fmt: skip
    summary["passes"] = {
        "median_r": summary["median_r"] >= FACE_THRESHOLDS["median_r"],
        "worst_r": summary["worst_r"] >= FACE_THRESHOLDS["worst_r"],
        "gap_ratio": summary["gap_ratio"] >= FACE_THRESHOLDS["gap_ratio"],
        "silence_closed": summary["silence_closed"] >= FACE_THRESHOLDS["silence_closed"],
        "upper_psnr_db": summary["upper_psnr_db"] >= FACE_THRESHOLDS["upper_psnr_db"],
        "outside_mask_unchanged": summary["outside_mask_changed"] == 0,
    }
    summary["thresholds"] = FACE_THRESHOLDS
    return summary


def face_table(scores: Sequence[FaceScore], summary: dict) -> str:
    rows = [f"{'face':<10}{'frames':>7}{'r':>7}{'teach r':>8}{'gap':>7}{'teach':>7}{'ratio':>7}{'closed':>8}"
            f"{'PSNR':>7}{'outside':>8}"]
    for s in scores:
        rows.append(f"{s.name:<10}{s.frames:>7}{s.pearson_r:>7.3f}{s.teacher_r:>8.3f}{s.speech_gap:>7.3f}"
                    f"{s.teacher_speech_gap:>7.3f}{s.gap_ratio:>7.2f}{s.silence_closed:>8.3f}{s.upper_psnr_db:>7.1f}"
                    f"{s.outside_mask_changed:>8}")
    p, t = summary["passes"], FACE_THRESHOLDS
    mark = lambda k: "PASS" if p[k] else "FAIL"  # noqa: E731
    rows += [
        "",
        f"median r over faces      {summary['median_r']:.3f} (>= {t['median_r']})  {mark('median_r')}",
        f"worst face r             {summary['worst_r']:.3f} ({summary['worst_face']}, >= {t['worst_r']})  {mark('worst_r')}",
        f"speech lip gap / teacher {summary['gap_ratio']:.2f} (median, >= {t['gap_ratio']})  {mark('gap_ratio')}",
        f"silent frames closed     {summary['silence_closed']:.3f} (>= {t['silence_closed']})  {mark('silence_closed')}",
        f"upper-half PSNR          {summary['upper_psnr_db']:.1f} dB (median, >= {t['upper_psnr_db']})  {mark('upper_psnr_db')}",
        f"changed outside mask     {summary['outside_mask_changed']} px  {mark('outside_mask_unchanged')}",
    ]
    return "\n".join(rows)


def prepare_face_avatar(photo, model, cache_dir, idle_seconds: float = 3.0):
    """The avatar `prepare` makes for a face photo (cached under cache_dir by source and model)."""
    from pathlib import Path

    from realtime_avatar.avatar import AvatarSettings, load_or_prepare_avatar

    photo = Path(photo)
    out = Path(cache_dir) / f"{photo.parent.name}-{photo.stem}-{model.weights_hash()[:12]}"
    return load_or_prepare_avatar(photo, out, model, AvatarSettings(idle_seconds=idle_seconds), progress=False)
