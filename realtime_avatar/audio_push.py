"""Audio-push API for voice agents: PCM in, `clear_buffer` to interrupt, playback events out.

The semantics mirror LiveKit's avatar workers (what voice-agent developers already know: audio
as a byte stream, RPC `lk.clear_buffer`, RPC `lk.playback_finished` with the playback position
and an `interrupted` flag), carried as messages on a WebSocket (`/sessions/<id>/audio`) or on
a WebRTC data channel labelled "audio":

    client -> avatar
      text   {"type": "start", "sample_rate": 24000, "channels": 1}   declare the PCM format
      binary 16-bit little-endian PCM, interleaved, chunks of any size (a sample may straddle two)
      text   {"type": "flush"}          end of a segment (an utterance): play out what is queued
      text   {"type": "clear_buffer"}   interrupt: drop everything not yet shown or heard
    avatar -> client
      {"type": "playback_started"}                                   first sample of a segment plays
      {"type": "playback_finished", "playback_position": 1.24, "interrupted": false}
      {"type": "error", "message": "..."}                            bad input; the stream goes on

Agents generate speech faster than real time; the session's input is a live clock that drops
audio arriving far ahead of playback (bounded latency). So pushed audio waits in this module's
buffer (bounded: MAX_BUFFER_S) and a pacer feeds the session 20 ms at a time, at most LEAD_S
ahead of the wall clock. `clear_buffer` empties that buffer and calls `session.interrupt()`
(which drops queued features and frames), so the next tick shows the idle face; conversely, once
audio is pushed to a session, any interrupt of it (POST /sessions/<id>/interrupt) is a
clear_buffer.

Playback position is measured on the session's output clock (its `on_tick` hook reports which
input frame each 40 ms tick plays), in samples of the session's 16 kHz input: a segment covers
input samples [start, end) and has played (last played frame end - start) / 16000 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import soxr

from .timing import SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger(__name__)

MIN_RATE, MAX_RATE = 8_000, 192_000  # Hz: telephone to studio; anything else is a client bug
MAX_CHANNELS = 8
CHUNK_S = 0.02  # the pacer's step: 20 ms, a WebRTC packet
# How far ahead of the wall clock the session is fed. Every frame after a segment's first LEAD_S
# arrives that much before its tick would need it, so the session renders it ahead: a loaded
# machine (a broadcast with RTMP, Janus and viewers) then shows the mouth instead of idle frames
# for all but the first frames of an utterance (measured in bench_broadcast: 0.1 s left 60% of
# the first utterance's frames late, see the README). Kept below the scheduler's max_backlog_s
# (0.5 s, SessionConfig), beyond which frames that arrived early are dropped to bound latency.
LEAD_S = 0.3
MAX_BUFFER_S = 120.0  # pushed audio waiting to play; beyond this a push is refused with an error
MAX_TEXT_BYTES = 4096  # a control message is tiny; a larger text message is garbage


class AudioPushError(ValueError):
    """A client message that cannot be used; the message says what was wrong and what to send."""


def check_format(sample_rate, channels=1) -> tuple[int, int]:
    """(rate, channels) as ints, or AudioPushError naming the bad value and the allowed range."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or sample_rate != int(sample_rate):
        raise AudioPushError(f"sample_rate must be an integer number of Hz, got {sample_rate!r}")
    if not MIN_RATE <= int(sample_rate) <= MAX_RATE:
        raise AudioPushError(f"sample_rate {int(sample_rate)} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise AudioPushError(f"channels must be an integer 1..{MAX_CHANNELS}, got {channels!r}")
    return int(sample_rate), channels


class PcmDecoder:
    """s16le interleaved bytes (chunks of any size) -> 16 kHz mono float32, streaming.

    A sample (or a multi-channel frame) cut between two chunks is completed by the next one;
    `end()` returns the resampler's tail and reports bytes left over (a truncated stream).
    """

    def __init__(self, sample_rate: int, channels: int = 1):
        self.rate, self.channels = check_format(sample_rate, channels)
        self._carry = b""
        self._resampler = None if self.rate == SAMPLE_RATE else soxr.ResampleStream(
            self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def decode(self, data: bytes) -> np.ndarray:
        data = self._carry + data
        frame_bytes = 2 * self.channels
        usable = len(data) - len(data) % frame_bytes
        self._carry = data[usable:]
        pcm = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0
        mono = pcm.reshape(-1, self.channels).mean(axis=1) if self.channels > 1 else pcm
        if self._resampler is None:
            return mono
        return self._resampler.resample_chunk(mono)

    def end(self) -> tuple[np.ndarray, int]:
        """(the last samples, number of bytes that did not make a whole sample frame)."""
        leftover = len(self._carry)
        self._carry = b""
        tail = np.zeros(0, np.float32)
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self._resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return tail, leftover


@dataclass
class Segment:
    """One utterance in session input samples: [start, end); end is None until it is flushed
    and fed completely."""

    start: int | None = None  # input sample of its first pushed sample (None: nothing fed yet)
    end: int | None = None
    started: bool = False
    flushed: bool = False


class AudioPlayout:
    """Per-session owner of pushed audio: buffer, pacer task, segment bookkeeping, listeners.

    `session` needs push_pcm(samples, rate, channels), interrupt(), an `on_tick` hook attribute
    and `ring.write_index` (samples written to its input so far).
    """

    def __init__(self, session, *, lead_s: float = LEAD_S, max_buffer_s: float = MAX_BUFFER_S):
        self.session = session
        self.lead_s = lead_s
        self.max_buffer = int(max_buffer_s * SAMPLE_RATE)
        # queued 16 kHz mono float32 chunks with the segment each belongs to, oldest first
        self._buffer: deque[tuple[Segment, np.ndarray]] = deque()
        self._buffered = 0
        self._segments: deque[Segment] = deque()  # not finished yet, oldest first
        self._fed: Segment | None = None  # the segment the pacer feeds (or fed last)
        self._played_end = 0  # input sample just after the last frame the output clock played
        self._listeners: set[Callable[[dict], None]] = set()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.interruptions = 0
        self.segments_finished = 0
        # Any interrupt of the session (POST /sessions/<id>/interrupt, a barge-in) is a
        # clear_buffer: pushed audio must not keep flowing in after it.
        self._interrupt_session = session.interrupt
        session.interrupt = self.clear_buffer
        previous = getattr(session, "on_tick", None)

        def on_tick(n, frame, image, audio) -> None:
            if previous is not None:
                previous(n, frame, image, audio)
            self._on_tick(frame)

        session.on_tick = on_tick

    # -- listeners -----------------------------------------------------------------------------

    def listen(self, callback: Callable[[dict], None]) -> Callable[[], None]:
        """Events go to callback(event dict) (it must not block); returns an unsubscribe."""
        self._listeners.add(callback)
        return lambda: self._listeners.discard(callback)

    def _emit(self, event: dict) -> None:
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:
                log.exception("audio-push listener failed; removed")
                self._listeners.discard(callback)

    # -- input ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._pace())

    def push(self, samples16k: np.ndarray) -> None:
        """Queue 16 kHz mono float32 audio of the current segment (a new one starts if none)."""
        if len(samples16k) == 0:
            return
        if self._buffered + len(samples16k) > self.max_buffer:
            raise AudioPushError(f"more than {self.max_buffer / SAMPLE_RATE:g} s of audio queued: push no faster "
                                 "than it can play out (or send clear_buffer)")
        if not self._segments or self._segments[-1].flushed:
            self._segments.append(Segment())
        self._buffer.append((self._segments[-1], np.asarray(samples16k, np.float32)))
        self._buffered += len(samples16k)
        self._wake.set()

    def flush(self) -> None:
        """End of the current segment: playback_finished follows when its last sample plays."""
        if self._segments and not self._segments[-1].flushed:
            self._segments[-1].flushed = True
            self._wake.set()

    def clear_buffer(self) -> None:
        """Interrupt: drop queued audio here and in the session; every open segment ends now."""
        self._buffer.clear()
        self._buffered = 0
        self._fed = None
        self._interrupt_session()
        segments, self._segments = list(self._segments), deque()
        if segments:
            self.interruptions += 1
        for segment in segments:
            self._finish(segment, interrupted=True)

    @property
    def buffered_seconds(self) -> float:
        return self._buffered / SAMPLE_RATE

    @property
    def busy(self) -> bool:
        """Audio queued or playing (a segment not finished yet)."""
        return bool(self._segments)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._buffer.clear()
        self._buffered = 0
        self._segments.clear()
        self._listeners.clear()

    # -- pacing and bookkeeping ------------------------------------------------------------------

    def _end_fed_segment(self) -> None:
        """Once a flushed segment's audio is all fed, complete its last frame with silence (the
        output clock plays whole 40 ms frames only) and record where it ends."""
        segment = self._fed
        if segment is None or not segment.flushed or segment.end is not None or segment.start is None:
            return
        if self._buffer and self._buffer[0][0] is segment:
            return
        pad = (-self.session.ring.write_index) % SAMPLES_PER_FRAME
        if pad:
            self.session.push_pcm(np.zeros(pad, np.float32), SAMPLE_RATE, 1)
        segment.end = self.session.ring.write_index

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        step = int(CHUNK_S * SAMPLE_RATE)
        fed_until: float | None = None  # wall time up to which the session has been fed
        while True:
            self._end_fed_segment()
            if not self._buffer:
                fed_until = None
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            if fed_until is None or fed_until < now:
                fed_until = now
            while self._buffer and fed_until < now + self.lead_s:
                segment, chunk = self._take(step)
                if segment is not self._fed:
                    self._end_fed_segment()
                    self._fed = segment
                if segment.start is None:
                    segment.start = self.session.ring.write_index
                self.session.push_pcm(chunk, SAMPLE_RATE, 1)
                fed_until += len(chunk) / SAMPLE_RATE
            await asyncio.sleep(CHUNK_S)

    def _take(self, n: int) -> tuple[Segment, np.ndarray]:
        """Up to n queued samples, all of one segment."""
        segment = self._buffer[0][0]
        parts, got = [], 0
        while self._buffer and got < n and self._buffer[0][0] is segment:
            head = self._buffer[0][1]
            if len(head) <= n - got:
                parts.append(self._buffer.popleft()[1])
            else:
                parts.append(head[: n - got])
                self._buffer[0] = (segment, head[n - got :])
            got += len(parts[-1])
        self._buffered -= got
        return segment, (np.concatenate(parts) if len(parts) > 1 else parts[0])

    def _on_tick(self, frame: int | None) -> None:
        if frame is not None:
            self._played_end = max(self._played_end, (frame + 1) * SAMPLES_PER_FRAME)
        # The scheduler may skip frames (latency bound, interrupt): what it passed is over too.
        scheduler = getattr(self.session, "scheduler", None)
        passed = scheduler.next_frame * SAMPLES_PER_FRAME if scheduler is not None else 0
        while self._segments:
            segment = self._segments[0]
            if segment.start is None:
                return
            if not segment.started and self._played_end > segment.start:
                segment.started = True
                self._emit({"type": "playback_started"})
            if segment.end is None or max(self._played_end, passed) < segment.end:
                return
            self._segments.popleft()
            self._finish(segment, interrupted=False)

    def _finish(self, segment: Segment, *, interrupted: bool) -> None:
        played = 0
        if segment.start is not None:
            played = max(0, self._played_end - segment.start)
            if segment.end is not None:
                played = min(played, segment.end - segment.start)
        self.segments_finished += 1
        self._emit({"type": "playback_finished", "playback_position": round(played / SAMPLE_RATE, 3),
                    "interrupted": interrupted})


class AudioPushConnection:
    """One client's message stream (a WebSocket or a data channel) into an AudioPlayout.

    `send(event)` delivers an event to this client (non-blocking). Every bad message gets an
    error event and is otherwise ignored: the connection and the session carry on.
    """

    def __init__(self, playout: AudioPlayout, send: Callable[[dict], None], *,
                 sample_rate: int | None = None, channels: int = 1):
        self.playout = playout
        self.send = send
        self.decoder: PcmDecoder | None = None
        self.errors = 0
        self.bytes_in = 0
        if sample_rate is not None:
            self.decoder = PcmDecoder(sample_rate, channels)
        self._unlisten = playout.listen(send)

    def error(self, message: str) -> None:
        self.errors += 1
        log.info("audio push: %s", message)
        self.send({"type": "error", "message": message})

    def on_text(self, text: str) -> None:
        try:
            self._control(text)
        except AudioPushError as exc:
            self.error(str(exc))

    def _control(self, text: str) -> None:
        if len(text) > MAX_TEXT_BYTES:
            raise AudioPushError(f"control message of {len(text)} characters: send JSON like "
                                 '{"type": "clear_buffer"} (audio goes in binary messages)')
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            raise AudioPushError('control messages are JSON, e.g. {"type": "flush"}; got '
                                 f"{text[:40]!r}") from None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "start":
            self._end_decoder()
            self.decoder = PcmDecoder(*check_format(message.get("sample_rate"), message.get("channels", 1)))
        elif kind == "flush":
            self._end_decoder()
            self.playout.flush()
        elif kind == "clear_buffer":
            if self.decoder is not None:
                self.decoder.end()  # forget the resampler's tail and any half sample
            self.playout.clear_buffer()
        else:
            raise AudioPushError(f"unknown control message type {kind!r}: use start, flush or clear_buffer")

    def _end_decoder(self) -> None:
        if self.decoder is None:
            return
        tail, leftover = self.decoder.end()
        if len(tail):
            self.playout.push(tail)
        if leftover:
            self.error(f"truncated PCM: {leftover} byte(s) left over at the end of the segment "
                       f"(16-bit samples x {self.decoder.channels} channel(s) need multiples of "
                       f"{2 * self.decoder.channels} bytes); dropped")

    def on_binary(self, data: bytes) -> None:
        if self.decoder is None:
            self.error('binary PCM before its format: send {"type": "start", "sample_rate": HZ, "channels": 1} '
                       "first (or ?sample_rate=HZ in the URL)")
            return
        self.bytes_in += len(data)
        try:
            self.playout.push(self.decoder.decode(data))
        except AudioPushError as exc:
            self.error(str(exc))

    def close(self) -> None:
        """The client went away: what it pushed still plays out (as if it had sent flush)."""
        self._unlisten()
        try:
            self._end_decoder()
        except AudioPushError:
            pass
        self.playout.flush()
