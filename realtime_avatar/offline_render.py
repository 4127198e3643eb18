"""Offline render: a whole audio file -> an MP4 of the avatar speaking it (H.264 + AAC).

The non-streaming path, as MuseTalk's scripts work: features of the whole clip first (for
MuseTalk weights each 30 s segment encoded in one pass; for our own models the features the live
encoder gives, which they were trained on), windows for every frame, batched rendering. Frame
count is floor(duration x 25), so video and audio lengths agree within one frame (40 ms)
whatever the input's sample rate: the audio is resampled by soxr to 16 kHz for the features,
and the MP4's soundtrack is the original audio re-encoded at its own rate (never reinterpreted).
"""

from __future__ import annotations

import fractions
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
from tqdm import tqdm

from .audio_sources import AudioSourceError, read_audio_file
from .frame_windows import offline_frame_windows
from .renderer import AvatarRenderer
from .timing import FPS, MUSETALK_WINDOW, SAMPLE_RATE, AudioWindow, num_frames
from .video_encoding import H264_CRF, add_h264_stream, video_frame

AAC_BITRATE = 128_000


@dataclass
class RenderResult:
    path: Path
    frames: int
    audio_seconds: float
    features_seconds: float  # time to encode the whole clip's features
    render_seconds: float
    first_frame_seconds: float  # time from start until the first frame was rendered


def _original_audio(path: Path) -> tuple[np.ndarray, int]:
    """The file's first audio track as float32 planar [channels, n] at its own rate."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise AudioSourceError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        layout = "stereo" if (stream.channels or 1) >= 2 else "mono"
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = []
        for frame in container.decode(stream):
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
    return np.concatenate(chunks, axis=1), rate


def render_clip(
    renderer: AvatarRenderer,
    clip_features: Callable[[np.ndarray], np.ndarray],
    audio_path: str | Path,
    out_path: str | Path,
    *,
    progress: bool = True,
    window: AudioWindow = MUSETALK_WINDOW,
) -> RenderResult:
    """Render audio_path to out_path. `window`: the model's audio window (Runtime.window)."""
    audio_path, out_path = Path(audio_path), Path(out_path)
    t_start = time.perf_counter()
    audio16 = read_audio_file(audio_path)
    n_frames = num_frames(len(audio16))
    if n_frames == 0:
        raise AudioSourceError(f"{audio_path}: shorter than one video frame (40 ms)")
    features = clip_features(audio16)
    windows = offline_frame_windows(features, n_frames, window)
    t_features = time.perf_counter()

    original, rate = _original_audio(audio_path)
    # The soxr-decoded length and the original agree to within a sample; cut the soundtrack to
    # the true duration so no stray tail outlasts the video by more than one frame.
    original = original[:, : int(round(len(audio16) / SAMPLE_RATE * rate))]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    first_frame_at = None
    height, width = renderer.avatar.frame_shape[:2]
    with av.open(str(tmp), mode="w", format="mp4") as container:
        video = add_h264_stream(container, width, height, crf=H264_CRF, what=str(out_path))
        sound = container.add_stream("aac", rate=rate)
        sound.layout = "stereo" if original.shape[0] == 2 else "mono"
        sound.bit_rate = AAC_BITRATE

        bar = tqdm(total=n_frames, unit="frame", desc="render", disable=not progress)
        for i in range(0, n_frames, renderer.batch_size):
            positions = list(range(i, min(n_frames, i + renderer.batch_size)))
            for n, image in zip(positions, renderer.render(positions, windows[positions[0] : positions[-1] + 1])):
                if first_frame_at is None:
                    first_frame_at = time.perf_counter()
                container.mux(video.encode(video_frame(image, n)))
            bar.update(len(positions))
        bar.close()
        container.mux(video.encode(None))

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(original, dtype=np.float32), format="fltp",
                                           layout=sound.layout.name)
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = fractions.Fraction(1, rate)
        container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
    tmp.replace(out_path)  # never leave a half-written MP4 under the requested name
    t_end = time.perf_counter()
    return RenderResult(
        path=out_path,
        frames=n_frames,
        audio_seconds=len(audio16) / SAMPLE_RATE,
        features_seconds=t_features - t_start,
        render_seconds=t_end - t_features,
        first_frame_seconds=(first_frame_at or t_end) - t_start,
    )
