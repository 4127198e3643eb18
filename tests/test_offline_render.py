"""Offline render to MP4: frame count, A/V duration match at every input rate, no lip stretching."""

from __future__ import annotations

import av
import numpy as np
import pytest

from realtime_avatar.offline_render import render_clip
from realtime_avatar.audio_sources import read_audio_file
from realtime_avatar.timing import FPS, SAMPLE_RATE
from tests.speech import espeak_wav

TEXT = "Five big boxes moved quickly."


def probe(path):
    """Decode the MP4: (video frames as arrays, video seconds, audio seconds, audio rate).

    The audio length is what a player plays: the decoder output trimmed to the length the MP4
    declares (AAC codes whole 1024-sample frames, so the last one is padded)."""
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
        rate = c.streams.audio[0].rate
    return frames, len(frames) / FPS, len(read_audio_file(path)) / SAMPLE_RATE, rate


@pytest.fixture(scope="module")
def rendered(runtime, tmp_path_factory):
    out = {}
    d = tmp_path_factory.mktemp("render")
    for rate in (8000, 16000, 22050, 44100, 48000):
        wav = espeak_wav(TEXT, d / f"in{rate}.wav", rate=rate)
        result = render_clip(runtime.renderer, runtime.clip_features, wav, d / f"out{rate}.mp4", progress=False)
        out[rate] = (wav, result, probe(result.path))
    return out


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_frame_count_and_av_durations(rendered, rate):
    wav, result, (frames, video_s, audio_s, audio_rate) = rendered[rate]
    with av.open(str(wav)) as c:
        s = c.streams.audio[0]
        true_s = sum(f.samples for f in c.decode(s)) / s.rate
    assert result.frames == int(true_s * FPS) == len(frames)
    assert audio_rate == rate  # the soundtrack keeps its own rate: never reinterpreted
    assert abs(audio_s - true_s) < 0.005
    assert 0 <= audio_s - video_s < 0.04  # video = floor(duration x 25) frames
    assert frames[0].shape == (512, 512, 3)


def test_input_rate_never_stretches_the_lips(rendered):
    """The same speech at 16 and 44.1 kHz renders the same mouths frame for frame."""
    a = rendered[16000][2][0]
    b = rendered[44100][2][0]
    assert len(a) == len(b)
    face = (slice(150, 260), slice(170, 290))  # the mouth area of the bundled avatar
    diffs = [np.abs(x[face].astype(int) - y[face].astype(int)).mean() for x, y in zip(a, b)]
    shifted = [np.abs(x[face].astype(int) - y[face].astype(int)).mean() for x, y in zip(a[3:], b)]
    assert np.mean(diffs) < 3.0
    assert np.mean(diffs) <= np.mean(shifted) + 1e-6


def test_missing_audio_file_names_it(runtime, tmp_path):
    from realtime_avatar.audio_sources import AudioSourceError

    with pytest.raises(AudioSourceError, match="nope.wav"):
        render_clip(runtime.renderer, runtime.clip_features, tmp_path / "nope.wav", tmp_path / "o.mp4", progress=False)
    assert not (tmp_path / "o.mp4").exists()
