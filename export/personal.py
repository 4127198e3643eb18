"""Training data from a user's own talking-head video: the route to a personal model.

The video's frames are the targets and its soundtrack the audio, prepared exactly as an avatar
is prepared at run time (realtime_avatar.avatar): frames resampled to 25 fps by timestamp,
mediapipe landmarks through the FaceTracker (smoothed), the MuseTalk v1.5 face box, the
256x256 LANCZOS4 crop. The audio windows are the live-streaming features of the soundtrack
(stream_features with LOW_LATENCY), as for the generated clips.

Frames where no face is found are left out of training (their neighbours stay aligned to the
audio: each run of consecutive face frames becomes its own clip, with the windows of the whole
soundtrack). The mouth state used to pick references in another mouth state is the measured
inner-lip gap, scaled so that a wide-open mouth is about 1.

The prepared clips are cached next to the run (keyed by the video's sha256).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from export.evaluate import mouth_opening
from export.train import WHISPER, ClipData, clip_windows, subclip_windows
from realtime_avatar.avatar import crop_face, file_sha256, resample_to_fps, upright
from realtime_avatar.face import FaceTracker, face_bbox
from realtime_avatar.timing import FPS, SAMPLES_PER_FRAME, num_frames

log = logging.getLogger(__name__)

MAX_SECONDS = 600.0  # longer videos are cut: 10 min of 256x256 crops is ~3 GB of RAM
MIN_CLIP_FRAMES = 12  # shorter runs of face frames are dropped (too short to pick references)
OPENING_SCALE_PERCENTILE = 95  # this percentile of the measured gap maps to mouth state 1


class PersonalVideoError(ValueError):
    """The video cannot be used for a personal model; the message says why and what to do."""


def video_frames(path: Path, fps: float = FPS, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Upright BGR frames of the first video stream, resampled to `fps` by timestamp (PyAV)."""
    import av

    limit = max_frames if max_frames is not None else int(MAX_SECONDS * fps)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise PersonalVideoError(f"{path}: cannot be opened as a video ({e})") from e
    with container:
        if not container.streams.video:
            raise PersonalVideoError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or fps)
        timed = ((f.time if f.time is not None else i / rate, f) for i, f in enumerate(container.decode(stream)))
        for frame in resample_to_fps(timed, fps, limit):
            yield upright(frame.to_ndarray(format="bgr24"), frame.rotation or 0.0)


def face_runs(found: np.ndarray, min_length: int = MIN_CLIP_FRAMES) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive True values at least min_length long."""
    runs, start = [], None
    for i, ok in enumerate(list(found) + [False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if i - start >= min_length:
                runs.append((start, i))
            start = None
    return runs


def prepare_video(video: Path, cache: Path, subclips: int = 8, encoder=None) -> list[ClipData]:
    """ClipData for a talking-head video (cached in `cache` by the video's sha256)."""
    from realtime_avatar.audio_sources import AudioSourceError, read_audio_file

    video = Path(video)
    if not video.is_file():
        raise PersonalVideoError(f"{video}: no such file")
    cache.mkdir(parents=True, exist_ok=True)
    key = f"video-{file_sha256(video)[:16]}"
    cached = sorted(cache.glob(f"{key}-*.npz"))
    if cached:
        clips = [ClipData.load(p) for p in cached]
        if all(c is not None for c in clips):
            return clips  # type: ignore[return-value]

    try:
        audio = read_audio_file(video)
    except AudioSourceError as e:
        raise PersonalVideoError(f"{video}: a personal model needs the video's soundtrack ({e})") from e
    n_audio = num_frames(len(audio))
    crops, openings, found = [], [], []
    with FaceTracker(fps=FPS, warn_multiple=False) as tracker:
        for i, frame in enumerate(video_frames(video, max_frames=n_audio)):
            lm = tracker.update(frame, timestamp=i / FPS)
            if lm is None:
                crops.append(None)
                openings.append(0.0)
                found.append(False)
                continue
            crops.append(crop_face(frame, face_bbox(lm.points, frame.shape)))
            openings.append(mouth_opening(lm.points))
            found.append(True)
    n = len(crops)
    runs = face_runs(np.array(found, bool))
    if not runs:
        raise PersonalVideoError(
            f"{video}: no run of {MIN_CLIP_FRAMES}+ frames with a face in {n} frames; use a video of "
            "one clearly visible, roughly frontal talking face"
        )
    log.info("%s: %d frames, face in %d, %d usable runs", video.name, n, sum(found), len(runs))

    if encoder is None:
        from realtime_avatar.whisper_weights import load_whisper

        encoder = load_whisper(WHISPER).encoder
    windows = clip_windows(encoder, audio, n)
    opening = np.array(openings, np.float32)
    scale = max(float(np.percentile(opening[np.array(found)], OPENING_SCALE_PERCENTILE)), 1e-3)
    rng = np.random.default_rng(0)
    clips = []
    for k, (start, end) in enumerate(runs):
        frames = np.stack(crops[start:end])
        own = audio[start * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME]
        clip = ClipData(
            name=f"{key}-{k:03d}",
            frames=frames,
            windows=windows[start:end],
            subclips=subclip_windows(encoder, own, end - start, rng, subclips),
            mouth=(opening[start:end] / scale)[:, None],
            photos=np.zeros((0,) + frames.shape[1:], np.uint8),
        )
        clip.save(cache / f"{clip.name}.npz")
        clips.append(clip)
    return clips
