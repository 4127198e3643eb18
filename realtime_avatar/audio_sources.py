"""Audio sources: a file, WebRTC frames or a microphone, all turned into 16 kHz mono float32.

Every source ends in the same place: samples at timing.SAMPLE_RATE, one channel, float32 in
[-1, 1], counted from sample 0 of the stream (the absolute sample clock the rest of the
pipeline runs on). Files are iterated as `AudioChunk`s; live sources write into an `AudioRing`.

Decoding is PyAV's; the rate conversion is always soxr's streaming resampler, so a stream cut
into chunks of any size resamples to exactly the same samples as the whole signal at once, and
its length is exact (60 s at 44.1 kHz gives 960000 samples, not one more or less). Channels
are averaged into mono before resampling (cheaper, and equal to averaging after: both are
linear).

Sample counting, not timestamps: a source that skips (lost packets, a device overflow) simply
produces fewer samples; gaps in timestamps are not filled with silence here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soxr

from realtime_avatar.audio_ring import AudioRing
from realtime_avatar.timing import SAMPLE_RATE

# soxr 'HQ' (20-bit) is transparent for speech, runs ~1000x real time in 20 ms blocks on one
# core here and holds back 6-40 ms of filter delay; 'VHQ' holds back up to 85 ms: too much live.
RESAMPLE_QUALITY = "HQ"
FILE_CHUNK_SECONDS = 1.0  # default chunk length of iter_audio_file
MIC_BLOCK_SECONDS = 0.020  # 20 ms device blocks: the same packet time as WebRTC audio


class AudioSourceError(Exception):
    """An audio source cannot be opened or decoded; the message names the file or device."""


class MicrophoneError(AudioSourceError):
    """No usable microphone: sounddevice/PortAudio missing, or no such input device."""


@dataclass(frozen=True)
class AudioChunk:
    """16 kHz mono float32 samples [start, start + len(samples)) of a stream."""

    start: int  # absolute index of samples[0] at SAMPLE_RATE
    samples: np.ndarray

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


# -- pure conversions --------------------------------------------------------------------------


def to_float32(samples: np.ndarray) -> np.ndarray:
    """PCM of any common sample type to float32 in [-1, 1] (integers scaled by their full range)."""
    x = np.asarray(samples)
    if x.dtype == np.float32:
        return x
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    if x.dtype == np.uint8:  # 8-bit PCM is unsigned with its zero at 128
        return (x.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(x.dtype, np.signedinteger):
        return (x.astype(np.float64) / float(2 ** (8 * x.dtype.itemsize - 1))).astype(np.float32)
    raise TypeError(f"unsupported PCM sample type {x.dtype}: use float32, int16, int32 or uint8")


def downmix(samples: np.ndarray, channels: int) -> np.ndarray:
    """[n] or [n, channels] PCM to 1-D float32 mono, the mean of the channels."""
    x = to_float32(samples)
    if x.ndim == 1 and channels == 1:
        return x
    if x.ndim != 2 or x.shape[1] != channels:
        raise ValueError(
            f"expected audio shaped [n, {channels}]"
            + (" or [n]" if channels == 1 else "")
            + f", got {x.shape}"
        )
    if channels == 1:
        return x[:, 0]
    # a matrix-vector product is ~7x faster than x.mean(axis=1) on [960, 2] device blocks
    return x @ np.full(channels, 1.0 / channels, dtype=np.float32)


def audio_frame_to_array(frame: av.AudioFrame) -> np.ndarray:
    """A decoded PyAV frame (any sample format, packed or planar) as [samples, channels] PCM.

    The sample type is kept (int16 stays int16): to_float32/downmix scale it afterwards.
    """
    channels = frame.layout.nb_channels
    data = frame.to_ndarray()
    if frame.format.is_planar:  # [channels, samples]
        return data.T
    return data.reshape(-1, channels)  # packed: [1, samples * channels], interleaved


# -- resampling --------------------------------------------------------------------------------


class StreamResampler:
    """Streaming conversion of one PCM stream (fixed rate and channel count) to 16 kHz mono.

    `process` accepts float32/float64/int16/int32 chunks shaped [n] (mono) or [n, channels] and
    returns whatever 16 kHz output is ready (soxr holds back a few ms for its filter); `flush`
    returns the rest at the end of the stream. At 16 kHz input nothing is resampled and
    `process` may return the input array itself (no copy).
    """

    def __init__(self, in_rate: int, channels: int, quality: str = RESAMPLE_QUALITY):
        if in_rate <= 0:
            raise ValueError(f"in_rate must be a positive sample rate in Hz, got {in_rate}")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        self.in_rate = int(in_rate)
        self.channels = int(channels)
        self.passthrough = self.in_rate == SAMPLE_RATE
        self._stream = (
            None
            if self.passthrough
            else soxr.ResampleStream(self.in_rate, SAMPLE_RATE, 1, dtype="float32", quality=quality)
        )
        self._flushed = False
        self.samples_in = 0  # frames (per channel) at in_rate
        self.samples_out = 0  # samples at SAMPLE_RATE

    def process(self, chunk: np.ndarray) -> np.ndarray:
        if self._flushed:
            raise RuntimeError("StreamResampler already flushed: create a new one for a new stream")
        mono = downmix(chunk, self.channels)
        self.samples_in += len(mono)
        if self._stream is None:
            out = mono
        else:
            out = self._stream.resample_chunk(np.ascontiguousarray(mono))
        self.samples_out += len(out)
        return out

    def flush(self) -> np.ndarray:
        """End of stream: the samples soxr still holds. The resampler cannot be used after this."""
        if self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self.samples_out += len(out)
        return out


class _FollowingResampler:
    """A StreamResampler that is re-created (after flushing the old one) when the rate or the
    channel count of the incoming audio changes: WebRTC peers and chained files may do that."""

    def __init__(self, quality: str = RESAMPLE_QUALITY):
        self.quality = quality
        self.resampler: StreamResampler | None = None
        self.reconfigurations = 0

    def process(self, pcm: np.ndarray, rate: int, channels: int) -> np.ndarray:
        tail = None
        current = self.resampler
        if current is not None and (current.in_rate, current.channels) != (rate, channels):
            tail = current.flush()
            self.reconfigurations += 1
            current = None
        if current is None:
            current = self.resampler = StreamResampler(rate, channels, self.quality)
        out = current.process(pcm)
        return out if tail is None or len(tail) == 0 else np.concatenate([tail, out])

    def flush(self) -> np.ndarray:
        if self.resampler is None:
            return np.zeros(0, dtype=np.float32)
        out = self.resampler.flush()
        self.resampler = None
        return out


# -- files -------------------------------------------------------------------------------------


def _open_media(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise AudioSourceError(f"{path}: no such audio file")
    try:
        return av.open(str(path))
    except av.FFmpegError as exc:
        raise AudioSourceError(f"{path}: not a media file PyAV can open ({exc})") from exc


def declared_stream_samples(
    container: av.container.InputContainer, stream: av.audio.AudioStream
) -> int | None:
    """The audio stream's exact length in samples at its own rate, where the container states it.

    MP4/MOV edit lists record the exact duration, but ffmpeg decodes AAC's padded last frame in
    full: up to 1023 extra samples (64 ms at 16 kHz) of codec padding. Other containers'
    durations can be estimates (an mp3 without a Xing header), so they are not trusted.
    """
    formats = set(container.format.name.split(","))
    if stream.duration is None or not formats & {"mov", "mp4"} or not stream.rate:
        return None
    return round(stream.duration * stream.time_base * stream.rate)


def iter_audio_file(
    path: str | os.PathLike, chunk_seconds: float = FILE_CHUNK_SECONDS
) -> Iterator[AudioChunk]:
    """Decode the first audio stream of any file PyAV reads (wav, mp3, m4a, ogg, flac, a video's
    soundtrack), yielding 16 kHz mono chunks of `chunk_seconds` (the last one shorter).

    Raises AudioSourceError naming the file when it is missing, has no audio stream, cannot be
    decoded or decodes to no samples at all.
    """
    path = Path(path)
    chunk_samples = round(chunk_seconds * SAMPLE_RATE)
    if chunk_samples <= 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
    with _open_media(path) as container:
        if not container.streams.audio:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
            raise AudioSourceError(f"{path}: has no audio stream (streams found: {kinds})")
        stream = container.streams.audio[0]
        resampler = _FollowingResampler()
        declared = declared_stream_samples(container, stream)
        decoded = 0  # at the stream's own rate
        pending: list[np.ndarray] = []
        pending_samples = 0
        emitted = 0
        try:
            for frame in container.decode(stream):
                pcm = audio_frame_to_array(frame)
                if declared is not None:  # drop the codec padding past the declared end
                    pcm = pcm[: max(0, declared - decoded)]
                decoded += frame.samples
                out = resampler.process(pcm, frame.sample_rate, frame.layout.nb_channels)
                pending.append(out)
                pending_samples += len(out)
                if pending_samples >= chunk_samples:
                    joined = np.concatenate(pending)
                    n_full = len(joined) // chunk_samples * chunk_samples
                    for offset in range(0, n_full, chunk_samples):
                        yield AudioChunk(emitted, joined[offset : offset + chunk_samples])
                        emitted += chunk_samples
                    pending = [joined[n_full:]]
                    pending_samples = len(joined) - n_full
            pending.append(resampler.flush())
        except av.FFmpegError as exc:
            raise AudioSourceError(
                f"{path}: audio decoding failed after {emitted / SAMPLE_RATE:.2f} s ({exc})"
            ) from exc
        tail = np.concatenate(pending).astype(np.float32, copy=False)
        if emitted == 0 and len(tail) == 0:
            raise AudioSourceError(f"{path}: the audio stream decoded to no samples")
        for offset in range(0, len(tail), chunk_samples):
            part = tail[offset : offset + chunk_samples]
            yield AudioChunk(emitted, part)
            emitted += len(part)


def read_audio_file(path: str | os.PathLike) -> np.ndarray:
    """The whole audio track of a file as 16 kHz mono float32 (see iter_audio_file)."""
    return np.concatenate([chunk.samples for chunk in iter_audio_file(path)])


# -- pushed PCM (WebRTC) -----------------------------------------------------------------------


class PcmPushSource:
    """Feeds the audio frames a WebRTC track (or any other pusher) hands over into a ring.

    aiortc delivers packed stereo s16 at 48 kHz in 20 ms frames; any format, rate or layout is
    accepted, and a change mid-stream flushes the old resampler and starts a new one.
    """

    def __init__(self, ring: AudioRing, quality: str = RESAMPLE_QUALITY):
        self.ring = ring
        self._resampler = _FollowingResampler(quality)
        self.frames_in = 0
        self.samples_out = 0

    def push(self, frame: av.AudioFrame) -> int:
        """Resample one decoded frame into the ring; returns the 16 kHz samples written."""
        return self._push(audio_frame_to_array(frame), frame.sample_rate, frame.layout.nb_channels)

    def push_pcm(self, samples: np.ndarray, rate: int, channels: int) -> int:
        """Push raw PCM shaped [n, channels], or interleaved [n * channels] (or [n] when mono)."""
        x = np.asarray(samples)
        if x.ndim == 1 and channels > 1:
            if len(x) % channels:
                raise ValueError(
                    f"interleaved PCM of {len(x)} values does not divide into {channels} channels"
                )
            x = x.reshape(-1, channels)
        return self._push(x, rate, channels)

    def _push(self, pcm: np.ndarray, rate: int, channels: int) -> int:
        out = self._resampler.process(pcm, rate, channels)
        self.frames_in += 1
        return self._write(out)

    def flush(self) -> int:
        """End of a stream: write what the resampler still holds. Later pushes start afresh."""
        return self._write(self._resampler.flush())

    def close(self) -> None:
        """Flush, then close the ring: consumers see the end of the stream."""
        self.flush()
        self.ring.close()

    def _write(self, out: np.ndarray) -> int:
        self.ring.write(out)
        self.samples_out += len(out)
        return len(out)

    def stats(self) -> dict:
        return {
            "frames_in": self.frames_in,
            "samples_out": self.samples_out,
            "reconfigurations": self._resampler.reconfigurations,
        }


# -- microphone --------------------------------------------------------------------------------


def _import_sounddevice():
    """sounddevice is the optional `mic` extra; PortAudio is a system library (libportaudio2)."""
    try:
        import sounddevice
    except ImportError as exc:
        raise MicrophoneError(
            "microphone input needs the optional 'mic' extra: pip install 'realtime-avatar[mic]'"
        ) from exc
    except OSError as exc:  # sounddevice imports, but the PortAudio library is missing
        raise MicrophoneError(
            f"PortAudio is not installed ({exc}): apt-get install libportaudio2"
        ) from exc
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    hostapi: str
    max_input_channels: int
    default_samplerate: float
    is_default: bool


def list_input_devices() -> list[InputDevice]:
    """Every device PortAudio can record from (PortAudio enumerates them when it initialises)."""
    sd = _import_sounddevice()
    hostapis = sd.query_hostapis()
    try:
        default_input = sd.query_devices(kind="input")["index"]
    except sd.PortAudioError:  # no default input device
        default_input = None
    devices = []
    for info in sd.query_devices():
        if info["max_input_channels"] < 1:
            continue
        devices.append(
            InputDevice(
                index=info["index"],
                name=info["name"],
                hostapi=hostapis[info["hostapi"]]["name"],
                max_input_channels=info["max_input_channels"],
                default_samplerate=info["default_samplerate"],
                is_default=info["index"] == default_input,
            )
        )
    return devices


class MicrophoneSource:
    """Records a sound card at its native rate and writes 16 kHz mono into a ring.

    PortAudio runs `_callback` on its own real-time thread for every block; the callback only
    resamples (soxr, microseconds per block) and copies into the ring, never waits and never
    raises: an error is counted and kept in `stats()` instead. `channels` input channels are
    averaged (1: the first channel only).
    """

    def __init__(
        self,
        ring: AudioRing,
        device: int | str | None = None,
        blocksize: int | None = None,
        channels: int = 1,
        quality: str = RESAMPLE_QUALITY,
    ):
        self.ring = ring
        self.device = device
        self.channels = channels
        self.quality = quality
        self._requested_blocksize = blocksize
        self._stream = None
        self._resampler: StreamResampler | None = None
        self.samplerate: int | None = None  # the device's native rate, known after start()
        self.device_name: str | None = None
        self._callbacks = 0
        self._frames_in = 0
        self._samples_out = 0
        self._input_overflows = 0
        self._status_flags = 0
        self._callback_errors = 0
        self._last_error: str | None = None

    def start(self) -> None:
        if self._stream is not None:
            return
        sd = _import_sounddevice()
        try:
            info = sd.query_devices(self.device, kind="input")
        except (ValueError, sd.PortAudioError) as exc:
            names = [f"{d.index}: {d.name}" for d in list_input_devices()] or ["none"]
            raise MicrophoneError(
                f"no audio input device {self.device!r} ({exc}); input devices: {', '.join(names)}"
            ) from exc
        if info["max_input_channels"] < self.channels:
            raise MicrophoneError(
                f"input device {info['name']!r} has {info['max_input_channels']} input channels, "
                f"{self.channels} requested"
            )
        self.samplerate = int(round(info["default_samplerate"]))
        self.device_name = info["name"]
        self._resampler = StreamResampler(self.samplerate, self.channels, self.quality)
        blocksize = self._requested_blocksize
        if blocksize is None:
            blocksize = round(self.samplerate * MIC_BLOCK_SECONDS)
        try:
            stream = sd.InputStream(
                samplerate=self.samplerate,
                blocksize=blocksize,
                device=info["index"],
                channels=self.channels,
                dtype="float32",
                latency="low",
                callback=self._callback,
            )
            stream.start()
        except sd.PortAudioError as exc:
            raise MicrophoneError(
                f"cannot open input device {info['name']!r} at {self.samplerate} Hz: {exc}"
            ) from exc
        self._stream = stream

    def _callback(self, indata: np.ndarray, frames: int, time_info, status) -> None:
        try:
            self._callbacks += 1
            if status:
                self._status_flags += 1
                if status.input_overflow:
                    self._input_overflows += 1
            out = self._resampler.process(indata)
            self.ring.write(out)  # copies: indata is PortAudio's buffer, reused after we return
            self._frames_in += frames
            self._samples_out += len(out)
        except Exception as exc:  # noqa: BLE001 - raising here would kill the audio thread
            self._callback_errors += 1
            self._last_error = repr(exc)

    def stop(self) -> None:
        """Stop recording and write the resampler's tail; the ring stays open (its owner closes
        it)."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.stop()  # waits for the last callback to return
        stream.close()
        tail = self._resampler.flush()
        self.ring.write(tail)
        self._samples_out += len(tail)

    @property
    def active(self) -> bool:
        return self._stream is not None and self._stream.active

    def __enter__(self) -> MicrophoneSource:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stats(self) -> dict:
        return {
            "device": self.device_name,
            "samplerate": self.samplerate,
            "callbacks": self._callbacks,
            "frames_in": self._frames_in,
            "samples_out": self._samples_out,
            "input_overflows": self._input_overflows,
            "status_flags": self._status_flags,
            "callback_errors": self._callback_errors,
            "last_error": self._last_error,
        }
