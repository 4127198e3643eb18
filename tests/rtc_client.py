"""An aiortc peer for tests: speaks a WAV file as its microphone, records what comes back.

The microphone track sends the file in real time (20 ms frames at the file's own rate, s16
mono: aiortc's encoder resamples to the negotiated codec's rate), preceded and followed by
silence like a live microphone. Every received video frame is recorded with its arrival time
and pts; received audio is kept as mono float samples. Signalling is the server's JSON
`/offer` or WHIP.

Run as a script (`python -m tests.rtc_client URL WAV`) it connects, prints the session id and
streams until killed: tests kill it with SIGKILL to play a client that vanishes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import av
from aiohttp import web
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import AUDIO_PTIME, MediaStreamError

from tests.speech import read_wav


class WavMicrophoneTrack(MediaStreamTrack):
    """A paced audio track: `lead_s` of silence, the WAV, then silence until `total_s`.

    After `total_s` (if given) the track ends, as a microphone that is switched off.
    `speech_started_at` is the time.monotonic() at which the WAV's first frame was sent.
    """

    kind = "audio"

    def __init__(self, wav_path: str | Path, *, lead_s: float = 0.0, total_s: float | None = None):
        super().__init__()
        samples, self.rate = read_wav(wav_path)
        self.speech_samples = len(samples)
        self.frame_samples = int(AUDIO_PTIME * self.rate)  # 20 ms at the file's rate
        lead = np.zeros(int(lead_s * self.rate), dtype=np.int16)
        speech = np.clip(samples * 32767.0, -32768, 32767).astype(np.int16)
        self._pcm = np.concatenate([lead, speech])
        self._lead_samples = len(lead)
        self._total_samples = None if total_s is None else int(total_s * self.rate)
        self._sent = 0  # samples
        self._start: float | None = None
        self.speech_started_at: float | None = None

    @property
    def speech_seconds(self) -> float:
        return self.speech_samples / self.rate

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._total_samples is not None and self._sent >= self._total_samples:
            self.stop()
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._sent / self.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = self._pcm[self._sent : self._sent + self.frame_samples]
        if len(chunk) < self.frame_samples:
            chunk = np.pad(chunk, (0, self.frame_samples - len(chunk)))
        if self.speech_started_at is None and self._sent >= self._lead_samples:
            self.speech_started_at = time.monotonic()
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, self.rate)
        self._sent += self.frame_samples
        return frame


@dataclass
class Recording:
    """What the client received: per video frame arrival time and pts, and the audio."""

    video_arrivals: list[float] = field(default_factory=list)  # time.monotonic()
    video_pts: list[int] = field(default_factory=list)
    video_frames: list[np.ndarray] = field(default_factory=list)  # bgr24 (or a region), if kept
    video_size: tuple[int, int] | None = None  # (width, height)
    audio_chunks: list[np.ndarray] = field(default_factory=list)  # mono float32
    audio_arrivals: list[float] = field(default_factory=list)  # one per chunk
    audio_rate: int = 0

    @property
    def audio(self) -> np.ndarray:
        if not self.audio_chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self.audio_chunks)

    def fps(self, start: float, end: float) -> float:
        """Video frames that arrived in [start, end) (monotonic times), per second."""
        n = sum(1 for t in self.video_arrivals if start <= t < end)
        return n / (end - start)


def to_mono_float(frame: av.AudioFrame) -> np.ndarray:
    """A received audio frame (packed or planar s16, any channels) as mono float32."""
    data = frame.to_ndarray().astype(np.float32) / 32768.0
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        return data.mean(axis=0)
    return data.reshape(-1, channels).mean(axis=1)


HTTP_TIMEOUT_S = 30.0  # signalling requests in tests: a hung server fails the test, not the run
CLOSE_TIMEOUT_S = 10.0


def http_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))


class RtcClient:
    """One test peer: sends `mic`, receives the avatar; connect() then close()."""

    def __init__(
        self,
        base_url: str,
        mic: MediaStreamTrack | None,
        *,
        token: str | None = None,
        audio_codec: str | None = None,  # e.g. "audio/PCMU" to force an 8 kHz codec
        whip: bool = False,
        keep_video: bool = False,
        video_region: tuple[int, int, int, int] | None = None,  # (y0, y1, x0, x1) to keep
        receive_video: bool = True,
    ):
        self.base_url = base_url.rstrip("/")
        self.mic = mic
        self.token = token
        self.audio_codec = audio_codec
        self.whip = whip
        self.keep_video = keep_video
        self.video_region = video_region
        self.receive_video = receive_video
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.recording = Recording()
        self.session_id: str | None = None
        self.resource_url: str | None = None  # WHIP Location, or /sessions/<id>
        self.answer_sdp: str | None = None
        self.connected = asyncio.Event()
        self.first_video = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    def _headers(self, content_type: str) -> dict:
        headers = {"Content-Type": content_type}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        record = self._record_video if track.kind == "video" else self._record_audio
        task = asyncio.ensure_future(record(track))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_video(self, track: MediaStreamTrack) -> None:
        rec = self.recording
        try:
            while True:
                frame = await track.recv()
                rec.video_arrivals.append(time.monotonic())
                rec.video_pts.append(frame.pts)
                rec.video_size = (frame.width, frame.height)
                if self.keep_video:
                    image = frame.to_ndarray(format="bgr24")
                    if self.video_region is not None:
                        y0, y1, x0, x1 = self.video_region
                        image = image[y0:y1, x0:x1].copy()
                    rec.video_frames.append(image)
                self.first_video.set()
        except MediaStreamError:
            pass

    async def _record_audio(self, track: MediaStreamTrack) -> None:
        rec = self.recording
        try:
            while True:
                frame = await track.recv()
                rec.audio_rate = frame.sample_rate
                rec.audio_chunks.append(to_mono_float(frame))
                rec.audio_arrivals.append(time.monotonic())
        except MediaStreamError:
            pass

    async def make_offer(self) -> str:
        """Add the transceivers and gather; returns the complete offer SDP."""
        if self.mic is not None:
            audio = self.pc.addTransceiver(self.mic, direction="sendrecv")
            if self.audio_codec is not None:
                codecs = [
                    c for c in RTCRtpSender.getCapabilities("audio").codecs
                    if c.mimeType.lower() == self.audio_codec.lower()
                ]
                if not codecs:
                    raise ValueError(f"aiortc has no audio codec {self.audio_codec!r}")
                audio.setCodecPreferences(codecs)
        if self.receive_video:
            self.pc.addTransceiver("video", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, http: aiohttp.ClientSession) -> None:
        """Offer, post, apply the answer. Raises aiohttp.ClientResponseError on refusal."""
        offer = await self.make_offer()
        if self.whip:
            async with http.post(
                f"{self.base_url}/whip", data=offer, headers=self._headers("application/sdp")
            ) as response:
                response.raise_for_status()
                self.answer_sdp = await response.text()
                self.resource_url = self.base_url + response.headers["Location"]
                self.session_id = response.headers["Location"].rsplit("/", 1)[-1]
        else:
            async with http.post(
                f"{self.base_url}/offer",
                json={"sdp": offer, "type": "offer"},
                headers=self._headers("application/json"),
            ) as response:
                response.raise_for_status()
                body = await response.json()
                self.answer_sdp = body["sdp"]
                self.session_id = body.get("session_id")  # a watch-only preview has none
                if self.session_id is not None:
                    self.resource_url = f"{self.base_url}/sessions/{self.session_id}"
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=self.answer_sdp, type="answer"))

    async def close(self, http: aiohttp.ClientSession | None = None) -> None:
        """Hang up: DELETE the session (if `http` is given), then close the peer connection."""
        if http is not None and self.resource_url is not None:
            async with http.delete(self.resource_url, headers=self._headers("text/plain")):
                pass
        try:
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"aiortc RTCPeerConnection.close() took over {CLOSE_TIMEOUT_S} s") from None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stream_forever(url: str, wav: str) -> None:
    async with http_client() as http:
        client = RtcClient(url, WavMicrophoneTrack(wav))
        await client.connect(http)
        await asyncio.wait_for(client.connected.wait(), 10)
        print(client.session_id, flush=True)
        await asyncio.Event().wait()



@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Run an aiohttp app on 127.0.0.1 at a free port; yields its base URL; cleans up (which
    runs the app's on_shutdown) on exit."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def block_rms(samples: np.ndarray, rate: int) -> np.ndarray:
    """RMS of each whole 10 ms block of a clip."""
    block = max(1, rate // 100)
    n = len(samples) // block
    if n == 0:
        raise ValueError("clip shorter than 10 ms")
    return np.sqrt(np.mean(samples[: n * block].reshape(n, block) ** 2, axis=1))


def voiced_span(samples: np.ndarray, rate: int, relative_threshold: float = 0.1) -> tuple[float, float]:
    """(start, end) in seconds of the part of a clip louder than `relative_threshold` x its
    loudest 10 ms block: where speech begins and ends, whatever pauses lie inside."""
    rms, block = block_rms(samples, rate), max(1, rate // 100)
    loud = np.flatnonzero(rms > relative_threshold * rms.max())
    if rms.max() == 0 or len(loud) == 0:
        raise ValueError("voiced_span: the clip is silent")
    return loud[0] * block / rate, (loud[-1] + 1) * block / rate


def voiced_seconds(samples: np.ndarray, rate: int, relative_threshold: float = 0.1) -> float:
    """Total seconds of 10 ms blocks louder than `relative_threshold` x the loudest block.
    Unlike `voiced_span`, a silent gap that a stalled real-time link inserts adds nothing,
    while a stretched or truncated clip still changes it in proportion."""
    rms, block = block_rms(samples, rate), max(1, rate // 100)
    if rms.max() == 0:
        raise ValueError("voiced_seconds: the clip is silent")
    return float(np.count_nonzero(rms > relative_threshold * rms.max()) * block / rate)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="stream a WAV to the avatar server until killed")
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("wav", help="16-bit PCM WAV to send as the microphone")
    args = parser.parse_args()
    try:
        asyncio.run(_stream_forever(args.url, args.wav))
    except KeyboardInterrupt:
        sys.exit(0)
