"""Audio sources: decoding real files of every common kind, soxr resampling, pushed WebRTC frames.

Test audio is made here, not mocked: tones and espeak-ng speech, written by PyAV's real encoders
(wav, flac, mp3, ogg/opus, m4a/aac, an H.264 + AAC mp4) and checked after decoding for length,
pitch and alignment. sox's own resampler is the independent reference for the rate conversion.
"""

from __future__ import annotations

import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from realtime_avatar.audio_ring import AudioRing
from realtime_avatar.audio_sources import (
    AudioChunk,
    AudioSourceError,
    MicrophoneError,
    MicrophoneSource,
    PcmPushSource,
    StreamResampler,
    audio_frame_to_array,
    downmix,
    iter_audio_file,
    read_audio_file,
    to_float32,
)
from realtime_avatar.timing import SAMPLE_RATE
from tests.speech import espeak_wav

RATES = [8000, 16000, 22050, 44100, 48000]
TONE_HZ = 440.0
LENGTH_CHECK_SECONDS = 60
# "within 1 ms per minute of the true duration", at 16 kHz
LENGTH_TOLERANCE = round(0.001 * SAMPLE_RATE * LENGTH_CHECK_SECONDS / 60)
SPEECH_TEXT = "The quick brown fox jumps over the lazy dog, twice."
AIORTC_FRAME_SAMPLES = 960  # 20 ms at 48 kHz: what aiortc hands over per audio frame


# -- helpers -------------------------------------------------------------------------------------


def tone(rate: int, seconds: float, hz: float = TONE_HZ, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def peak_frequency(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """Frequency of the strongest spectral peak, refined by a parabola through log magnitudes."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-20)
    offset = 0.5 * (a - c) / (a - 2 * b + c)
    return (k + offset) * rate / len(x)


def best_lag(reference: np.ndarray, other: np.ndarray) -> tuple[int, float]:
    """Lag (samples) maximising the cross-correlation of other against reference, and the
    correlation coefficient at lag 0 over the common length."""
    n = min(len(reference), len(other))
    a, b = reference[:n].astype(np.float64), other[:n].astype(np.float64)
    size = 1 << (2 * n - 1).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)
    lag = int(np.argmax(xcorr))
    if lag > size // 2:
        lag -= size
    return lag, float(np.corrcoef(a, b)[0, 1])


def write_audio(
    path: Path, signal: np.ndarray, rate: int, channels: int, codec: str, with_video: bool = False
) -> Path:
    """Encode a mono float signal (copied to every channel) with PyAV's encoder for `codec`."""
    pcm = (np.clip(signal, -1, 1) * 32767).astype(np.int16)
    pcm = np.repeat(pcm[:, None], channels, axis=1)
    layout = "mono" if channels == 1 else "stereo"
    block = 1024
    with av.open(str(path), "w") as out:
        video = None
        if with_video:
            video = out.add_stream("libx264", rate=25)
            video.width = video.height = 64
            video.pix_fmt = "yuv420p"
        audio = out.add_stream(codec, rate=rate, layout=layout)
        video_frames = 0
        for start in range(0, len(pcm), block):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(pcm[start : start + block].reshape(1, -1)),
                format="s16",
                layout=layout,
            )
            frame.sample_rate = rate
            frame.pts = start
            for packet in audio.encode(frame):
                out.mux(packet)
            while video is not None and video_frames * rate <= start * 25:
                picture = np.full((64, 64, 3), video_frames % 256, np.uint8)
                vframe = av.VideoFrame.from_ndarray(picture, format="rgb24")
                vframe.pts = video_frames
                for packet in video.encode(vframe):
                    out.mux(packet)
                video_frames += 1
        for packet in audio.encode(None):
            out.mux(packet)
        if video is not None:
            for packet in video.encode(None):
                out.mux(packet)
    return path


# (extension, codec, rate, channels, with_video): every container/codec a user is likely to have
CODED_FORMATS = [
    ("mp3", "libmp3lame", 44100, 2, False),
    ("mp3", "libmp3lame", 22050, 1, False),
    ("ogg", "libopus", 48000, 2, False),
    ("opus", "libopus", 48000, 1, False),
    ("m4a", "aac", 44100, 2, False),
    ("m4a", "aac", 8000, 1, False),
    ("flac", "flac", 22050, 2, False),
    ("mp4", "aac", 48000, 2, True),
]


def format_id(fmt) -> str:
    ext, _, rate, channels, _ = fmt
    return f"{ext}-{rate}-{channels}ch"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audio_sources")


@pytest.fixture(scope="module")
def speech_22k(media_dir) -> tuple[Path, np.ndarray]:
    """espeak-ng speech at its own 22050 Hz, and our 16 kHz decode of it."""
    path = espeak_wav(SPEECH_TEXT, media_dir / "speech_22050.wav", rate=22050)
    return path, read_audio_file(path)


# -- pure conversions ----------------------------------------------------------------------------


def test_to_float32_scales_each_pcm_type_to_unit_range():
    np.testing.assert_allclose(to_float32(np.array([-32768, 0, 16384], np.int16)), [-1, 0, 0.5])
    np.testing.assert_allclose(to_float32(np.array([-(2**31), 2**30], np.int32)), [-1, 0.5])
    np.testing.assert_allclose(to_float32(np.array([0, 128, 192], np.uint8)), [-1, 0, 0.5])
    assert to_float32(np.array([0.25], np.float64)).dtype == np.float32
    with pytest.raises(TypeError, match="complex"):
        to_float32(np.zeros(3, np.complex64))


def test_downmix_is_the_channel_mean_and_checks_the_shape():
    stereo = np.array([[1.0, 0.0], [0.5, -0.5], [0.2, 0.4]], np.float32)
    np.testing.assert_allclose(downmix(stereo, 2), [0.5, 0.0, 0.3], atol=1e-7)
    np.testing.assert_array_equal(downmix(stereo[:, :1], 1), stereo[:, 0])
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        downmix(stereo[:, 0], 2)
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        downmix(stereo, 3)


@pytest.mark.parametrize("fmt", ["s16", "s16p", "flt", "fltp", "s32", "u8", "dbl"])
def test_audio_frame_to_array_reads_packed_and_planar_formats(fmt):
    left = np.linspace(-0.5, 0.5, 480)
    right = 0.25 * np.ones(480)
    frame = av.AudioFrame.from_ndarray(
        np.stack([left, right]).astype(np.float32), format="fltp", layout="stereo"
    )
    frame.sample_rate = 48000
    converted = av.AudioResampler(format=fmt, layout="stereo", rate=48000).resample(frame)[0]
    pcm = to_float32(audio_frame_to_array(converted))
    assert pcm.shape == (480, 2)
    tolerance = 1 / 100 if fmt == "u8" else 1e-4
    np.testing.assert_allclose(pcm[:, 0], left, atol=tolerance)
    np.testing.assert_allclose(pcm[:, 1], right, atol=tolerance)


# -- StreamResampler -----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("channels", [1, 2])
def test_stream_resampler_random_chunks_equal_one_shot(rate, channels, speech_22k):
    _, speech16 = speech_22k
    import soxr

    source = soxr.resample(speech16, SAMPLE_RATE, rate, "VHQ") if rate != SAMPLE_RATE else speech16
    if channels == 2:  # different channels, so the downmix matters
        source = np.stack([source, 0.5 * np.roll(source, 7)], axis=1)
    whole = StreamResampler(rate, channels)
    one_shot = np.concatenate([whole.process(source), whole.flush()])

    rng = np.random.default_rng(rate + channels)
    chunked = StreamResampler(rate, channels)
    parts, pos = [], 0
    while pos < len(source):
        n = int(rng.integers(1, 700))
        parts.append(chunked.process(source[pos : pos + n]))
        pos += n
    parts.append(chunked.flush())
    streamed = np.concatenate(parts)

    assert len(one_shot) == round(len(source) * SAMPLE_RATE / rate)
    assert len(streamed) == len(one_shot)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-6)
    assert chunked.samples_in == len(source) and chunked.samples_out == len(streamed)


def test_stream_resampler_int16_equals_scaled_float_and_16k_mono_passes_through():
    rng = np.random.default_rng(0)
    pcm16 = (rng.standard_normal((4800, 2)) * 3000).astype(np.int16)
    as_int = StreamResampler(48000, 2)
    as_float = StreamResampler(48000, 2)
    out_int = np.concatenate([as_int.process(pcm16), as_int.flush()])
    scaled = pcm16.astype(np.float32) / 32768
    out_float = np.concatenate([as_float.process(scaled), as_float.flush()])
    np.testing.assert_allclose(out_int, out_float, atol=1e-6)
    assert len(out_int) == 1600

    mono = rng.standard_normal(1000).astype(np.float32)
    passthrough = StreamResampler(SAMPLE_RATE, 1)
    assert passthrough.passthrough
    np.testing.assert_array_equal(passthrough.process(mono), mono)
    np.testing.assert_array_equal(passthrough.process(mono[:, None]), mono)
    assert len(passthrough.flush()) == 0
    with pytest.raises(RuntimeError, match="flushed"):
        passthrough.process(mono)
    with pytest.raises(ValueError):
        StreamResampler(0, 1)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        StreamResampler(48000, 2).process(mono)


def test_stream_resampler_matches_sox(speech_22k, media_dir):
    """sox's `rate` effect (an independent resampler and downmix) agrees sample for sample."""
    path, ours = speech_22k
    stereo = write_audio(
        media_dir / "speech_stereo_44k.wav", _resample(ours, 44100), 44100, 2, "pcm_s16le"
    )
    for source, out in [(path, ours), (stereo, read_audio_file(stereo))]:
        reference_path = media_dir / f"{source.stem}_sox16k.wav"
        subprocess.run(
            ["sox", str(source), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "32",
             "-e", "floating-point", str(reference_path), "rate", "-v"],
            check=True,
        )
        reference = read_audio_file(reference_path)
        assert abs(len(out) - len(reference)) <= 1
        lag, correlation = best_lag(reference, out)
        assert lag == 0 and correlation > 0.9999, (source.name, lag, correlation)


def _resample(x: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(x, SAMPLE_RATE, rate, "VHQ")


def test_stream_resampler_throughput_is_far_above_real_time():
    seconds = 20
    noise = np.random.default_rng(0).standard_normal((48000 * seconds, 2)) * 0.1
    source = noise.astype(np.float32)
    resampler = StreamResampler(48000, 2)
    block = 960  # 20 ms blocks, as from a device or WebRTC
    t0 = time.perf_counter()
    for start in range(0, len(source), block):
        resampler.process(source[start : start + block])
    resampler.flush()
    elapsed = time.perf_counter() - t0
    speed = seconds / elapsed
    print(f"StreamResampler 48 kHz stereo -> 16 kHz mono, 20 ms blocks: {speed:.0f}x real time")
    assert speed > 50


# -- files: wav at every rate, and every common codec ---------------------------------------------


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_tone_keeps_length_and_pitch(rate, channels, media_dir):
    path = write_audio(
        media_dir / f"tone_{rate}_{channels}.wav", tone(rate, LENGTH_CHECK_SECONDS), rate, channels,
        "pcm_s16le",
    )
    out = read_audio_file(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - LENGTH_CHECK_SECONDS * SAMPLE_RATE) <= LENGTH_TOLERANCE
    assert abs(peak_frequency(out) - TONE_HZ) < 1.0
    assert 0.45 < np.abs(out).max() < 0.55  # the downmix of identical channels keeps the level


@pytest.mark.parametrize("fmt", CODED_FORMATS, ids=format_id)
def test_coded_tone_keeps_length_and_pitch(fmt, media_dir):
    ext, codec, rate, channels, with_video = fmt
    path = write_audio(
        media_dir / f"tone_{rate}_{channels}.{ext}", tone(rate, LENGTH_CHECK_SECONDS), rate,
        channels, codec, with_video,
    )
    out = read_audio_file(path)
    assert abs(len(out) - LENGTH_CHECK_SECONDS * SAMPLE_RATE) <= LENGTH_TOLERANCE, len(out)
    assert abs(peak_frequency(out) - TONE_HZ) < 1.0


@pytest.mark.parametrize("fmt", CODED_FORMATS, ids=format_id)
def test_coded_speech_stays_aligned_with_the_wav(fmt, media_dir, speech_22k):
    """Codec delay (mp3 encoder delay, AAC priming, opus pre-skip) is removed: lag 0."""
    ext, codec, rate, channels, with_video = fmt
    _, reference = speech_22k
    path = write_audio(
        media_dir / f"speech_{rate}_{channels}.{ext}", _resample(reference, rate), rate, channels,
        codec, with_video,
    )
    out = read_audio_file(path)
    assert abs(len(out) - len(reference)) <= round(0.001 * SAMPLE_RATE)
    lag, correlation = best_lag(reference, out)
    assert abs(lag) <= 1 and correlation > 0.98, (lag, correlation)


def test_iter_audio_file_yields_contiguous_chunks_with_absolute_starts(speech_22k):
    path, whole = speech_22k
    chunks = list(iter_audio_file(path, chunk_seconds=0.5))
    assert all(isinstance(c, AudioChunk) for c in chunks)
    assert [c.start for c in chunks] == list(range(0, len(whole), SAMPLE_RATE // 2))
    assert all(len(c.samples) == SAMPLE_RATE // 2 for c in chunks[:-1])
    assert 0 < len(chunks[-1].samples) <= SAMPLE_RATE // 2
    assert chunks[-1].end == len(whole)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), whole)


def test_bad_files_raise_audio_source_error_naming_the_file(media_dir):
    missing = media_dir / "no_such_file.wav"
    with pytest.raises(AudioSourceError, match="no_such_file.wav"):
        read_audio_file(missing)

    garbage = media_dir / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AudioSourceError, match="garbage.mp3"):
        read_audio_file(garbage)

    silent_video = media_dir / "video_only.mp4"
    with av.open(str(silent_video), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(AudioSourceError, match=r"video_only.mp4.*no audio stream.*video"):
        read_audio_file(silent_video)

    empty = media_dir / "empty.wav"  # a valid header with no samples after it
    with wave.open(str(empty), "wb") as header_only:
        header_only.setnchannels(1)
        header_only.setsampwidth(2)
        header_only.setframerate(16000)
    with pytest.raises(AudioSourceError, match="empty.wav.*no samples"):
        read_audio_file(empty)

    with pytest.raises(ValueError):
        next(iter_audio_file(missing, chunk_seconds=0))


# -- PcmPushSource: what aiortc hands over --------------------------------------------------------


def aiortc_frames(signal_lr: np.ndarray, rate: int = 48000, samples: int = AIORTC_FRAME_SAMPLES):
    """Packed s16 stereo frames, the format aiortc's audio decoder produces."""
    pcm = (np.clip(signal_lr, -1, 1) * 32767).astype(np.int16)
    for start in range(0, len(pcm) - samples + 1, samples):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm[start : start + samples].reshape(1, -1)),
            format="s16",
            layout="stereo",
        )
        frame.sample_rate = rate
        frame.pts = start
        yield frame


def test_push_source_keeps_duration_and_pitch_of_aiortc_frames():
    seconds = 3
    left = tone(48000, seconds)
    ring = AudioRing(10 * SAMPLE_RATE)
    source = PcmPushSource(ring)
    for frame in aiortc_frames(np.stack([left, np.zeros_like(left)], axis=1)):
        source.push(frame)
    before_flush = ring.write_index
    source.close()
    assert ring.closed
    assert ring.write_index == seconds * SAMPLE_RATE
    # soxr HQ holds back its filter delay, 6-37 ms at 48 kHz with 20 ms frames, until flush
    assert ring.write_index - before_flush <= 0.040 * SAMPLE_RATE
    out = ring.read(0, ring.write_index)
    assert abs(peak_frequency(out) - TONE_HZ) < 1.0
    assert 0.23 < np.abs(out[SAMPLE_RATE:]).max() < 0.27  # left-only tone, averaged with silence
    assert source.stats() == {
        "frames_in": seconds * 48000 // AIORTC_FRAME_SAMPLES,
        "samples_out": seconds * SAMPLE_RATE,
        "reconfigurations": 0,
    }


def test_push_source_follows_a_rate_and_layout_change_mid_stream():
    ring = AudioRing(10 * SAMPLE_RATE)
    source = PcmPushSource(ring)
    first = tone(48000, 1.0)
    for frame in aiortc_frames(np.stack([first, first], axis=1)):
        source.push(frame)
    # the peer renegotiates: planar float mono at 44.1 kHz in 10 ms frames
    second = tone(44100, 1.0, hz=660.0)
    for start in range(0, len(second), 441):
        frame = av.AudioFrame.from_ndarray(
            second[None, start : start + 441], format="fltp", layout="mono"
        )
        frame.sample_rate = 44100
        source.push(frame)
    source.flush()
    assert source.stats()["reconfigurations"] == 1
    assert ring.write_index == 2 * SAMPLE_RATE
    out = ring.read(0, ring.write_index)
    margin = SAMPLE_RATE // 10  # skip the switch itself
    assert abs(peak_frequency(out[: SAMPLE_RATE - margin]) - TONE_HZ) < 1.0
    assert abs(peak_frequency(out[SAMPLE_RATE + margin :]) - 660.0) < 1.0


def test_push_pcm_interleaved_int16_equals_pushed_frames():
    stereo = np.stack([tone(48000, 0.5), tone(48000, 0.5, hz=330.0)], axis=1)
    by_frames, by_pcm = AudioRing(SAMPLE_RATE), AudioRing(SAMPLE_RATE)
    frames_source, pcm_source = PcmPushSource(by_frames), PcmPushSource(by_pcm)
    for frame in aiortc_frames(stereo):
        frames_source.push(frame)
        pcm_source.push_pcm(frame.to_ndarray()[0], rate=48000, channels=2)  # interleaved s16
    frames_source.flush()
    pcm_source.flush()
    assert by_frames.write_index == by_pcm.write_index == SAMPLE_RATE // 2
    half = SAMPLE_RATE // 2
    np.testing.assert_array_equal(by_frames.read(0, half), by_pcm.read(0, half))
    with pytest.raises(ValueError, match="3 channels"):
        pcm_source.push_pcm(np.zeros(10, np.int16), rate=48000, channels=3)


# -- microphone errors that need no sound card ----------------------------------------------------


def test_microphone_without_sounddevice_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # what a missing package looks like
    with pytest.raises(MicrophoneError, match=r"realtime-avatar\[mic\]"):
        MicrophoneSource(AudioRing(SAMPLE_RATE)).start()


def test_microphone_with_unknown_device_raises_and_lists_the_inputs():
    pytest.importorskip("sounddevice", reason="sounddevice (the 'mic' extra) is not installed")
    with pytest.raises(MicrophoneError, match="no-such-microphone"):
        MicrophoneSource(AudioRing(SAMPLE_RATE), device="no-such-microphone").start()
