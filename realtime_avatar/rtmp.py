"""RTMP push: a session's output (or a rendered clip) as H.264 + AAC in FLV, through PyAV's FFmpeg.

    session tracks --MediaRelay--> feed() (event loop, never waits) --bounded queue-->
        writer thread: libx264 + aac encode, FLV mux, FFmpeg's RTMP protocol --> server

The event loop only copies frame references into a bounded queue; encoding and the socket writes
happen on the pusher's own thread, so a slow or dead server costs dropped (and counted) frames,
never a late tick in the session. When the connection fails the thread closes it, waits (backoff
doubling from BACKOFF_MIN_S to BACKOFF_MAX_S, frames queued meanwhile are dropped) and connects
again; every state change is one log line. Timestamps restart at 0 on every connection (a new
RTMP publish), taken from the frames' own presentation times so audio and video stay aligned
whatever is dropped: audio gaps are filled with silence, late video frames are skipped.

FFmpeg opens the RTMP connection lazily (at the first mux); `start_encoding()` is called
explicitly so that "connected" is logged when the server has accepted the publish.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import queue
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError

from .priority import lower_thread_priority
from .timing import FPS, SAMPLE_RATE

log = logging.getLogger(__name__)

RTMP_SCHEMES = ("rtmp", "rtmps")
QUEUE_SECONDS = 2.0  # backlog kept for a slow server before the oldest frames are dropped
BACKOFF_MIN_S = 0.25  # first reconnect delay; doubles per failed attempt
BACKOFF_MAX_S = 2.0  # a restarted server is back on air within ~2 s of accepting again
VIDEO_BITRATE = 1_500_000  # bits/s: a 512x512 face at 25 fps, veryfast, looks clean
AUDIO_BITRATE = 128_000
AUDIO_RATE = 48_000  # AAC out: what streaming platforms expect (input is resampled by PyAV)
KEYFRAME_INTERVAL = 2 * FPS  # frames: viewers joining mid-stream wait at most 2 s for a picture
CLOSE_TIMEOUT_S = 5.0  # a writer blocked in a dead socket is abandoned after this long


class RtmpError(ValueError):
    """A bad RTMP URL (the message says what is wrong and what a good one looks like)."""


def check_rtmp_url(url: str) -> str:
    """Return `url` if it is an rtmp:// or rtmps:// URL with a host and a path; else RtmpError."""
    parts = urlsplit(url)
    if parts.scheme not in RTMP_SCHEMES:
        raise RtmpError(f"{url!r} is not an RTMP URL: use rtmp://HOST[:PORT]/APP/STREAM_KEY")
    if not parts.hostname or parts.path.strip("/") == "":
        raise RtmpError(f"{url!r} needs a host and an application/stream path, e.g. rtmp://127.0.0.1/live/avatar")
    return url


@dataclass
class RtmpStats:
    state: str = "idle"  # idle, connecting, connected, waiting, closed
    connects: int = 0  # successful connections (1 + reconnects)
    failures: int = 0  # failed connects or broken connections
    video_sent: int = 0
    audio_seconds_sent: float = 0.0
    video_dropped: int = 0  # queue full, disconnected, or late
    audio_dropped: int = 0
    last_error: str | None = None
    connected_at: float | None = None  # time.monotonic() of the last successful connect

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class RtmpPusher:
    """Pushes timed video frames and audio to one RTMP URL from its own thread.

    put_video / put_audio never block: they take frames stamped with their presentation time in
    seconds (any origin, shared by audio and video) and drop the oldest queued item when the queue
    is full. Audio is mono PCM (int16 or float32) at `audio_rate`.
    """

    def __init__(self, url: str, width: int, height: int, *, name: str = "rtmp", fps: int = FPS,
                 audio_rate: int = SAMPLE_RATE, queue_seconds: float = QUEUE_SECONDS):
        self.url = check_rtmp_url(url)
        self.name = name
        self.width, self.height = width - width % 2, height - height % 2  # yuv420p needs even sizes
        self.fps = fps
        self.audio_rate = audio_rate
        self.stats = RtmpStats()
        # two items per tick (a video frame and its audio)
        self._queue: queue.Queue = queue.Queue(maxsize=max(4, int(2 * queue_seconds * fps)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rtmp-{name}", daemon=True)
        self._started = False

    # -- producer side (event loop) -------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def put_video(self, image, t: float) -> None:
        """image: HxWx3 uint8 BGR, or an av.VideoFrame (not modified); t: seconds."""
        self._put(("v", t, image))

    def put_audio(self, pcm: np.ndarray, t: float) -> None:
        """pcm: [n] mono int16 or float32 at audio_rate, starting at t seconds."""
        self._put(("a", t, pcm))

    def _put(self, item) -> None:
        if self._stop.is_set():
            return
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._count_drop(self._queue.get_nowait())
                except queue.Empty:
                    pass

    def _count_drop(self, item) -> None:
        if item is None:
            return
        if item[0] == "v":
            self.stats.video_dropped += 1
        else:
            self.stats.audio_dropped += 1

    async def feed(self, video_track, audio_track) -> None:
        """Copy two tracks (e.g. SessionOutputs proxies) into the pusher until either ends.

        Audio of any rate and layout is brought to mono at `audio_rate` (soxr, streaming);
        the frames themselves are never modified (relay consumers share them)."""
        from .audio_sources import StreamResampler, audio_frame_to_array

        resampler: StreamResampler | None = None

        async def pump(track, kind: str) -> None:
            nonlocal resampler
            try:
                while True:
                    frame = await track.recv()
                    if frame.pts is None or frame.time_base is None:
                        continue  # untimed frames cannot be placed on the stream's clock
                    t = float(frame.pts * frame.time_base)
                    if kind == "v":
                        self.put_video(frame, t)
                        continue
                    pcm = audio_frame_to_array(frame)
                    channels = frame.layout.nb_channels
                    if frame.sample_rate == self.audio_rate and channels == 1:
                        self.put_audio(pcm[:, 0], t)
                        continue
                    if self.audio_rate != SAMPLE_RATE:
                        raise ValueError(f"RTMP feed resamples to {SAMPLE_RATE} Hz only, not {self.audio_rate}")
                    if resampler is None or (resampler.in_rate, resampler.channels) != (frame.sample_rate, channels):
                        resampler = StreamResampler(frame.sample_rate, channels)
                    out = resampler.process(pcm)
                    if len(out):  # soxr holds back a few ms: place what comes out after it
                        self.put_audio(out, t + frame.samples / frame.sample_rate - len(out) / SAMPLE_RATE)
            except MediaStreamError:
                return
            finally:
                track.stop()

        tasks = [asyncio.ensure_future(pump(video_track, "v")), asyncio.ensure_future(pump(audio_track, "a"))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    log.error("rtmp %s: feed failed: %r", self.name, task.exception())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Send what is queued (up to `timeout`), end the stream, stop the thread. Blocking:
        call it with asyncio.to_thread from a loop."""
        if not self._started:
            self.stats.state = "closed"
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("rtmp %s: writer still blocked in a write after %g s; abandoned", self.name, timeout)

    # -- writer thread ---------------------------------------------------------------------------

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.stats.state:
            log.info("rtmp %s: %s -> %s%s", self.name, self.stats.state, state, f" ({detail})" if detail else "")
            self.stats.state = state

    def _run(self) -> None:
        lower_thread_priority()  # x264's threads inherit it: the render comes first (priority.py)
        backoff = BACKOFF_MIN_S
        while True:
            self._set_state("connecting", self.url)
            try:
                finished = self._stream_one_connection()
            except Exception as exc:  # FFmpeg I/O errors: refused, reset, broken pipe, timeouts
                self.stats.failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                if self._stop.is_set():
                    break
                self._set_state("waiting", f"{self.stats.last_error}; reconnecting in {backoff:g} s")
                self._discard_for(backoff)
                if self.stats.connected_at is not None and time.monotonic() - self.stats.connected_at > 10:
                    backoff = BACKOFF_MIN_S  # a connection that lasted: start the backoff afresh
                else:
                    backoff = min(2 * backoff, BACKOFF_MAX_S)
                continue
            if finished:
                break
        self._set_state("closed")
        while True:  # count what was never sent
            try:
                self._count_drop(self._queue.get_nowait())
            except queue.Empty:
                break

    def _discard_for(self, seconds: float) -> None:
        """Wait out a backoff, dropping (and counting) what arrives meanwhile: it would be stale."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                self._stop.set()
                return
            self._count_drop(item)

    def _stream_one_connection(self) -> bool:
        """One RTMP publish until the stream ends (True) or the connection breaks (raises)."""
        container = av.open(self.url, mode="w", format="flv",
                            container_options={"flvflags": "no_duration_filesize"})
        try:
            video = container.add_stream("libx264", rate=self.fps)
            video.width, video.height, video.pix_fmt = self.width, self.height, "yuv420p"
            video.bit_rate = VIDEO_BITRATE
            video.options = {"preset": "veryfast", "tune": "zerolatency", "g": str(KEYFRAME_INTERVAL), "bf": "0"}
            sound = container.add_stream("aac", rate=AUDIO_RATE)
            sound.layout = "stereo"
            sound.bit_rate = AUDIO_BITRATE
            container.start_encoding()  # opens the RTMP connection and sends the FLV header
            self.stats.connects += 1
            self.stats.connected_at = time.monotonic()
            self._set_state("connected", f"publish #{self.stats.connects}")
            writer = _StreamWriter(container, video, sound, self.fps, self.audio_rate, self.stats)
            while True:
                try:
                    item = self._queue.get(timeout=0.5)
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    continue
                if item is None:
                    self._stop.set()
                    break
                writer.write(item)
            writer.flush()
            return True
        finally:
            try:
                container.close()
            except Exception:  # the socket may already be gone; the connection is over anyway
                pass


class _StreamWriter:
    """Places timed items on one connection's clock (first item = 0) and muxes them."""

    def __init__(self, container, video, sound, fps: int, audio_rate: int, stats: RtmpStats):
        self.container, self.video, self.sound = container, video, sound
        self.fps, self.audio_rate, self.stats = fps, audio_rate, stats
        self.t0: float | None = None
        self.last_video_pts = -1
        self.audio_next = 0  # samples at audio_rate written so far
        self.video_tb = fractions.Fraction(1, fps)
        self.audio_tb = fractions.Fraction(1, audio_rate)

    def write(self, item) -> None:
        kind, t, data = item
        if self.t0 is None:
            self.t0 = t
        if kind == "v":
            self._video(t - self.t0, data)
        else:
            self._audio(t - self.t0, data)

    def _video(self, t: float, data) -> None:
        pts = round(t * self.fps)
        if pts <= self.last_video_pts:
            self.stats.video_dropped += 1  # from before this connection, or a repeated tick
            return
        if isinstance(data, av.VideoFrame):
            # A shared frame (relay): read it only. Copy (to set our pts), converting if needed.
            if data.format.name == "yuv420p" and (data.width, data.height) == (self.video.width, self.video.height):
                frame = av.VideoFrame.from_ndarray(data.to_ndarray(), format="yuv420p")
            else:
                frame = av.VideoFrame.from_ndarray(data.to_ndarray(format="bgr24")[: self.video.height, : self.video.width],
                                                   format="bgr24")
        else:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(data[: self.video.height, : self.video.width]),
                                               format="bgr24")
        frame.pts, frame.time_base = pts, self.video_tb
        self.container.mux(self.video.encode(frame))
        self.last_video_pts = pts
        self.stats.video_sent += 1

    def _audio(self, t: float, pcm: np.ndarray) -> None:
        start = round(t * self.audio_rate)
        if start + len(pcm) <= self.audio_next:
            self.stats.audio_dropped += 1
            return
        if start > self.audio_next:  # dropped audio: keep the clock with silence
            self._encode_audio(np.zeros(start - self.audio_next, np.int16))
        elif start < self.audio_next:
            pcm = pcm[self.audio_next - start :]
        self._encode_audio(pcm)

    def _encode_audio(self, pcm: np.ndarray) -> None:
        if pcm.dtype != np.int16:
            pcm = np.clip(np.asarray(pcm, np.float32) * 32768.0, -32768, 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm)[None, :], format="s16", layout="mono")
        frame.sample_rate = self.audio_rate
        frame.pts, frame.time_base = self.audio_next, self.audio_tb
        self.container.mux(self.sound.encode(frame))
        self.audio_next += len(pcm)
        self.stats.audio_seconds_sent = self.audio_next / self.audio_rate

    def flush(self) -> None:
        self.container.mux(self.video.encode(None))
        self.container.mux(self.sound.encode(None))


# -- a rendered clip, paced in real time ------------------------------------------------------------


def read_clip(path) -> tuple[list[np.ndarray], np.ndarray]:
    """An MP4's video frames (BGR) and its audio as 16 kHz mono float32."""
    from .audio_sources import read_audio_file

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    return frames, read_audio_file(path)


async def push_clip_realtime(pusher: RtmpPusher, frames: list[np.ndarray], audio16k: np.ndarray,
                             fps: int = FPS) -> None:
    """Feed frame n and its 40 ms of audio at t0 + n/fps (a live source's pace), then return."""
    loop = asyncio.get_running_loop()
    per_frame = SAMPLE_RATE // fps
    t0 = loop.time()
    for n, image in enumerate(frames):
        wait = t0 + n / fps - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        pusher.put_video(image, n / fps)
        chunk = audio16k[n * per_frame : (n + 1) * per_frame]
        if len(chunk):
            pusher.put_audio(chunk, n / fps)
