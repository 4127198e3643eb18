"""The MP4 encoder settings with real libx264 (PyAV): keyframes that do not pulse, odd sizes
padded rather than cropped. Both MP4 writers (offline render, recorder) use these settings; the
recorder is driven here as a live session drives it."""

from __future__ import annotations

import time

import av
import cv2
import numpy as np
import pytest
import skimage.data

from realtime_avatar.recorder import Mp4Recorder
from realtime_avatar.timing import FPS, SAMPLE_RATE
from realtime_avatar.video_encoding import even_size, pad_to_even

TICK_SAMPLES = SAMPLE_RATE // FPS  # 40 ms of audio per video frame


@pytest.fixture(scope="module")
def astronaut_bgr() -> np.ndarray:
    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


MOUTH = (slice(330, 380), slice(200, 260))  # the part that changes every frame, like a lip patch
MOUTH_AND_MARGIN = (slice(300, 410), slice(170, 290))  # left out of the "static background"


def _record(path, frames) -> None:
    recorder = Mp4Recorder(path, frames[0].shape[1], frames[0].shape[0])
    silence = np.zeros(TICK_SAMPLES, np.float32)
    for f in frames:
        recorder.write(f, silence)
        while recorder._queue.qsize() > 8:  # a live session writes at 25 fps: never drop here
            time.sleep(0.01)
    recorder.close()
    assert recorder.dropped == 0


def _decode(path) -> tuple[np.ndarray, list[bool]]:
    frames, keys = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="bgr24"))
            keys.append(bool(frame.key_frame))
    return np.stack(frames), keys


def test_keyframes_do_not_make_the_static_background_pulse(tmp_path, astronaut_bgr):
    # 11 s at 25 fps: libx264 puts a keyframe at 10 s (frame 250). The avatar's background
    # is static; only the mouth changes. Before: the background jumped 1.6 grey levels there.
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(11 * FPS):
        f = astronaut_bgr.copy()
        f[MOUTH] = rng.integers(0, 255, f[MOUTH].shape, dtype=np.uint8)
        frames.append(f)
    _record(tmp_path / "long.mp4", frames)
    decoded, keys = _decode(tmp_path / "long.mp4")
    assert len(decoded) == len(frames)
    later_keys = [i for i, k in enumerate(keys) if k and i > 0]
    assert later_keys, "no keyframe after the first: the clip must be longer than the GOP"
    grey = np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in decoded]).astype(np.float32)
    background = np.ones(grey.shape[1:], bool)
    background[MOUTH_AND_MARGIN] = False
    change = np.abs(np.diff(grey, axis=0))[:, background].mean(axis=1)  # change[i]: frame i -> i+1
    for k in later_keys:
        around = change[max(k - 3, 0) : k + 2]
        assert around.max() < 0.5, f"background changes {around.max():.2f} grey levels at keyframe {k}"


def test_odd_sizes_are_padded_never_cropped(tmp_path, astronaut_bgr, caplog):
    # Before: a 512x425 avatar came out 512x424, its last row dropped without a word.
    odd = np.ascontiguousarray(astronaut_bgr[:425])
    assert even_size(512, 425) == (512, 426) and pad_to_even(odd).shape == (426, 512, 3)
    with caplog.at_level("INFO", logger="realtime_avatar.video_encoding"):
        _record(tmp_path / "odd.mp4", [odd] * 5)
    decoded, _ = _decode(tmp_path / "odd.mp4")
    assert decoded.shape[1:] == (426, 512, 3)
    out = decoded[-1].astype(np.int16)
    aligned = np.abs(out[:425] - odd).mean()  # every source row is there, none shifted
    shifted = np.abs(out[1:425] - odd[:424]).mean()
    assert aligned < 5.0 and aligned < 0.5 * shifted  # (4:2:0 chroma noise on a textured photo)
    assert np.abs(out[425] - odd[424]).mean() < 6.0  # the repeated last row
    said = [r.getMessage() for r in caplog.records if "even sizes" in r.getMessage()]
    assert len(said) == 1 and "512x425" in said[0] and "512x426" in said[0]


def test_live_h264_has_no_keyframe_pulse_and_still_answers_keyframe_requests(astronaut_bgr):
    # The encoder aiortc's RTP sender gets for a peer that negotiated H.264, through the same
    # lookup the sender uses; aiortc's own (ABR, keyframe every 250 frames) jumped 1.34 levels.
    import fractions

    import aiortc.rtcrtpsender
    from aiortc.codecs import get_decoder
    from aiortc.codecs.h264 import H264PayloadDescriptor
    from aiortc.jitterbuffer import JitterFrame
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from realtime_avatar.video_encoding import install_live_h264_settings

    install_live_h264_settings()
    h264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102,
                                 parameters={"packetization-mode": "1", "profile-level-id": "42e01f"})
    encoder, decoder = aiortc.rtcrtpsender.get_encoder(h264), get_decoder(h264)
    rng = np.random.default_rng(0)
    grey, keys = [], []
    for i in range(260):  # past frame 250, where x264's default keyframe interval ends
        f = astronaut_bgr.copy()
        f[MOUTH] = rng.integers(0, 255, f[MOUTH].shape, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(f, format="bgr24")
        frame.pts, frame.time_base = i * 3600, fractions.Fraction(1, 90000)
        payloads, timestamp = encoder.encode(frame, force_keyframe=(i == 255))
        data = b"".join(H264PayloadDescriptor.parse(p)[1] for p in payloads)
        for out in decoder.decode(JitterFrame(data=data, timestamp=timestamp)):
            grey.append(out.to_ndarray(format="gray").astype(np.float32))
            keys.append(bool(out.key_frame))
    assert len(grey) == 260
    assert [i for i, k in enumerate(keys) if k] == [0, 255]  # no periodic keyframe; PLI honoured
    background = np.ones(grey[0].shape, bool)
    background[MOUTH_AND_MARGIN] = False
    change = np.abs(np.diff(np.stack(grey), axis=0))[:, background].mean(axis=1)
    assert change[240:254].max() < 0.5, change[240:254]  # around frame 250
