"""A small, real implementation of the AvatarSession interface, for server plumbing tests.

It renders no face: its video is a fixed test image whose brightness follows the level of the
audio it last received, and its audio track echoes the received audio back (resampled to
48 kHz stereo by PyAV). Both tracks are paced in real time like the real session's, so the
WebRTC server, the test client and the browser page can be developed and tested without the
avatar models. Tests that need lips use realtime_avatar.session.AvatarSession instead.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import AUDIO_PTIME, VIDEO_CLOCK_RATE, VIDEO_TIME_BASE, MediaStreamError

from realtime_avatar.timing import FPS

ECHO_RATE = 48_000  # Hz, what the echo track sends (Opus' clock, no resampling in aiortc)
ECHO_SAMPLES = int(AUDIO_PTIME * ECHO_RATE)  # 960 samples = 20 ms per audio frame
ECHO_MAX_SECONDS = 2.0  # bound on queued echo audio: older audio is dropped, never piled up
ECHO_PREBUFFER = 5 * ECHO_SAMPLES  # 100 ms held before echoing: absorbs input arriving late
VIDEO_TICKS_PER_FRAME = VIDEO_CLOCK_RATE // FPS  # 3600 ticks of 1/90000 s = 40 ms
FULL_SCALE_RMS = 0.1  # RMS (of full scale) that maps to full brightness: loud speech


def card_image(size: int = 256) -> np.ndarray:
    """An RGB test card with structure (rings and a gradient), so a blank frame is obvious."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rings = 0.5 + 0.5 * np.cos(40.0 * np.hypot(x - 0.5, y - 0.5))
    image = np.stack([x, y, rings], axis=-1)
    return (image * 255).astype(np.uint8)


def frame_rms(frame: av.AudioFrame) -> float:
    """RMS level of a packed or planar s16 audio frame, as a fraction of full scale."""
    samples = frame.to_ndarray().astype(np.float32) / 32768.0
    return float(np.sqrt(np.mean(samples * samples))) if samples.size else 0.0


class _Pacer:
    """Sleeps until item n of a stream at `rate` items/s is due; counts items that were late."""

    def __init__(self, rate: float):
        self.rate = rate
        self.start: float | None = None
        self.late = 0

    async def wait(self, index: int) -> None:
        if self.start is None:
            self.start = time.monotonic()
        delay = self.start + index / self.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay > 1.0 / self.rate:  # more than one period behind schedule
            self.late += 1


class LevelVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, session: "LoopbackSession", size: int):
        super().__init__()
        self._session = session
        self._image = card_image(size).astype(np.float32)
        self._pacer = _Pacer(FPS)
        self.frames_sent = 0
        self.sent_times: deque[float] = deque(maxlen=FPS * 2)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pacer.wait(self.frames_sent)
        gain = 0.5 + 0.5 * min(1.0, self._session.level / FULL_SCALE_RMS)
        frame = av.VideoFrame.from_ndarray((self._image * gain).astype(np.uint8), format="rgb24")
        frame.pts = self.frames_sent * VIDEO_TICKS_PER_FRAME
        frame.time_base = VIDEO_TIME_BASE
        self.frames_sent += 1
        self.sent_times.append(time.monotonic())
        return frame


class EchoAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self):
        super().__init__()
        self._fifo = av.AudioFifo()
        self._pacer = _Pacer(1.0 / AUDIO_PTIME)
        self._sent = 0
        self._playing = False  # False while (re)filling the prebuffer

    def write(self, frame: av.AudioFrame) -> None:
        frame.pts = None  # the fifo checks pts continuity; received pts have gaps after loss
        self._fifo.write(frame)
        excess = self._fifo.samples - int(ECHO_MAX_SECONDS * ECHO_RATE)
        if excess > 0:
            self._fifo.read(excess)

    def clear(self) -> None:
        if self._fifo.samples:
            self._fifo.read(self._fifo.samples)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pacer.wait(self._sent)
        if self._fifo.samples >= ECHO_PREBUFFER:
            self._playing = True
        elif self._fifo.samples < ECHO_SAMPLES:
            self._playing = False
        frame = self._fifo.read(ECHO_SAMPLES) if self._playing else None
        if frame is None:  # nothing received yet (or ran dry): send silence, as a mic would
            frame = av.AudioFrame(format="s16", layout="stereo", samples=ECHO_SAMPLES)
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
        frame.sample_rate = ECHO_RATE
        frame.pts = self._sent * ECHO_SAMPLES
        frame.time_base = fractions.Fraction(1, ECHO_RATE)
        self._sent += 1
        return frame


class LoopbackSession:
    """Duck-types realtime_avatar.session.AvatarSession for plumbing tests."""

    def __init__(self, size: int = 256):
        self.level = 0.0  # RMS of the last received audio frame, fraction of full scale
        self.frames_received = 0
        self.ended = False
        self.closed = False
        self.started = False
        self.interrupts = 0
        self.video_track = LevelVideoTrack(self, size)
        self.audio_track = EchoAudioTrack()
        # Any input rate and layout (Opus 48 kHz stereo, PCMU 8 kHz mono) becomes 48 kHz stereo.
        self._resampler = av.AudioResampler(format="s16", layout="stereo", rate=ECHO_RATE)

    async def start(self) -> None:
        self.started = True

    def push_audio(self, frame: av.AudioFrame) -> None:
        if self.closed:
            raise RuntimeError("push_audio on a closed LoopbackSession")
        self.frames_received += 1
        self.level = frame_rms(frame)
        for out in self._resampler.resample(frame):
            self.audio_track.write(out)

    def end_of_input(self) -> None:
        self.ended = True

    def interrupt(self) -> None:
        self.interrupts += 1
        self.audio_track.clear()

    def stats(self) -> dict:
        times = self.video_track.sent_times
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        return {
            "fps": fps,
            "frames_sent": self.video_track.frames_sent,
            "late_frames": self.video_track._pacer.late,
            "latency_ms": 0.0,
            "av_offset_ms": 0.0,
            "audio_frames_received": self.frames_received,
        }

    async def close(self) -> None:
        self.closed = True
        self.video_track.stop()
        self.audio_track.stop()
        self.audio_track.clear()


async def loopback_factory() -> LoopbackSession:
    return LoopbackSession()
