"""AvatarSession: one live conversation, from pushed audio to paced video + audio tracks.

    push_audio ──> PcmPushSource ──> AudioRing (16 kHz, the input clock)
                                        │
    _features_loop: StreamingWhisper.stream() ──> StreamingFrameWindows ──> render queue
    _render_loop:   batches of windows ──> AvatarRenderer ──> FrameEngine (one batch per tick
                    for all sessions, on the device) ──> rendered frames
    _clock_loop:    every 40 ms, PlaybackScheduler picks the input frame for the tick and
                    emits its video frame and its 40 ms of audio together ──> tracks

Every queue has an owner and a bound: the render queue (owned by _features_loop/_render_loop)
holds at most `ring_seconds` of frames, rendered frames older than the playback position are
dropped, and the two output queues keep only the newest few ticks when nobody reads them.
`close()` cancels the three tasks and drains everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fractions
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from whisper.model import AudioEncoder

from .audio_ring import AudioRing, SamplesLost
from .audio_sources import PcmPushSource
from .delays import (
    DEFAULT_COMPUTE_S,
    DEFAULT_JITTER_S,
    DURATION_HISTORY,
    MIN_NEED_SAMPLES,
    ArrivalTracker,
    DurationTracker,
    corrected_delay,
    frames_to_render,
    quantile,
    retime_frames,
)
from .frame_windows import FrameAudio, StreamingFrameWindows
from .playback import PlaybackScheduler, tick_time
from .renderer import AvatarRenderer
from .streaming_whisper import StreamingConfig, StreamingWhisper
from .timing import (
    FEATURE_RATE,
    FEATURES_PER_FRAME,
    FPS,
    MUSETALK_WINDOW,
    SAMPLE_RATE,
    SAMPLES_PER_FEATURE,
    SAMPLES_PER_FRAME,
    WINDOW_FEATURES,
    WINDOW_PAD_LEFT,
    AudioWindow,
    num_features,
    window_first_feature,
)
from .video_encoding import pad_to_even

log = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90_000  # RTP video clock
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
OUTPUT_QUEUE_TICKS = 4  # output frames kept for a slow reader before the oldest is dropped
# A frame's window reaches 4 features (80 ms) past the frame's own audio (features 2i+4, 2i+5).
WINDOW_RIGHT_CONTEXT_S = (WINDOW_FEATURES - WINDOW_PAD_LEFT - FEATURES_PER_FRAME) / FEATURE_RATE
# The encoder runs at least every 40 ms (one frame): a longer hop is waiting added to every frame.
MAX_HOP_S = 0.04
# An encoder run slower than the hop (a loaded machine, many sessions) would leave the encoder
# behind for good at one hop per run; when behind, a run emits up to this many hops (at most
# half the encoder window: streaming_whisper.plan_window).
CATCH_UP_HOPS = 25
# A playing spurt is re-sized (delays.retime_frames) at most this often, and only after this much
# silence was played: a pause between words, not the gap between two syllables.
RETIME_INTERVAL_S = 1.0
RETIME_AFTER_SILENCE_S = 0.2


def pipeline_delay(
    streaming: StreamingConfig, render_budget_s: float, window: AudioWindow = MUSETALK_WINDOW
) -> float:
    """Seconds from the end of a frame's audio until its lips can be on screen: the model
    window's right context, the encoder lookahead, up to one hop of waiting, and the render
    budget (compute + jitter; see delays.py for the terms)."""
    return window.right_context_s + streaming.lookahead_s + streaming.hop_s + render_budget_s


def session_streaming(trained: StreamingConfig, max_hop_s: float = MAX_HOP_S) -> StreamingConfig:
    """The live encoder setting for a model trained with `trained`: its window and lookahead,
    with the hop cut to max_hop_s (the hop only decides how often the encoder runs; a feature's
    right context stays >= the lookahead). The window grows if it must to stay > hop + lookahead."""
    hop = min(trained.hop_s, max_hop_s)
    return dataclasses.replace(trained, hop_s=hop, window_s=max(trained.window_s, hop + trained.lookahead_s + 0.04))


def window_audio_range(frame: int, window: AudioWindow = MUSETALK_WINDOW) -> tuple[int, int]:
    """Samples [start, end) of the audio that frame's window hears (may start < 0)."""
    first = window_first_feature(frame, window)
    return first * SAMPLES_PER_FEATURE, (first + window.length) * SAMPLES_PER_FEATURE


@dataclass(frozen=True)
class SessionConfig:
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    # Time allowed for encoder + batch render + input jitter before a frame is late. None: sized
    # from measurements (compute_s at first, then the session's own p99s, between talk spurts).
    render_budget_s: float | None = None
    delay_s: float | None = None  # output delay behind the input; None: pipeline_delay(...)
    window: AudioWindow = MUSETALK_WINDOW  # the model's audio window (Runtime.window)
    compute_s: float = DEFAULT_COMPUTE_S  # measured p99 encoder run + render batch (Runtime.measure_compute_s)
    max_backlog_s: float = 0.5  # extra latency tolerated before old frames are dropped
    batch_size: int = 4  # frames rendered per model call (more = faster, but adds latency)
    ring_seconds: float = 30.0  # input audio kept; also bounds the render queue
    silence_rms: float = 0.002  # windows quieter than this (~ -54 dBFS) show the idle mouth unrendered
    probe_interval_s: float = 1.0  # idle-time timing of encoder + render (adaptive delay only; 0: off)

    @property
    def adaptive(self) -> bool:
        """The delay follows the session's measured compute and jitter (no fixed value given)."""
        return self.delay_s is None and self.render_budget_s is None

    @property
    def output_delay_s(self) -> float:
        """The delay a session starts with."""
        if self.delay_s is not None:
            return self.delay_s
        budget = self.render_budget_s if self.render_budget_s is not None else self.compute_s + DEFAULT_JITTER_S
        return pipeline_delay(self.streaming, budget, self.window)


class SessionTrack(MediaStreamTrack):
    """An output track fed by the session's clock; recv() waits for the next tick's frame."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=OUTPUT_QUEUE_TICKS)
        self.dropped = 0

    def put(self, frame) -> None:
        if self._queue.full():  # nobody reads (not negotiated yet, or a slow peer): keep the newest
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(frame)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:  # the session closed
            raise MediaStreamError
        return frame

    def finish(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        self.stop()


class AvatarSession:
    """A live session. Create it inside a running event loop, `await start()`, push audio."""

    def __init__(self, encoder: AudioEncoder, renderer: AvatarRenderer, config: SessionConfig = SessionConfig()):
        self.config = config
        self.renderer = renderer
        self.ring = AudioRing(int(config.ring_seconds * SAMPLE_RATE))
        self.input = PcmPushSource(self.ring)
        # the runtime's EncoderBatcher (when it has one) encodes all sessions' windows per tick
        self.whisper = StreamingWhisper(encoder, self.ring, config.streaming, catch_up_hops=CATCH_UP_HOPS,
                                        batcher=getattr(renderer, "encoder_batcher", None))
        self.windows = StreamingFrameWindows(window=config.window)
        self.scheduler = PlaybackScheduler(config.output_delay_s, config.max_backlog_s)
        self.video_track = SessionTrack("video")
        self.audio_track = SessionTrack("audio")
        self._render_queue: asyncio.Queue[FrameAudio | None] = asyncio.Queue(
            maxsize=int(config.ring_seconds * FPS)
        )
        self._rendered: dict[int, np.ndarray] = {}
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        # tick n plays input frame n - offset; used to pick the avatar pose a frame will be shown on
        self._tick_offset = int(np.ceil(config.output_delay_s * FPS))
        self.started_at: float | None = None
        self.ticks = 0
        self.late_frames = 0
        self.rendered_frames = 0
        self.silent_frames = 0
        self.stale_frames = 0
        self.probes = 0  # idle-time timing runs (_probe_loop)
        self._latencies: deque[float] = deque(maxlen=FPS * 10)
        self._tick_times: deque[float] = deque(maxlen=FPS * 2)
        self.on_tick = None  # optional callback(tick, input_frame | None, image, audio), e.g. a recorder
        # optional: observe_latency(seconds) per frame, observe_render(frames, seconds) per render
        # call; the server's /metrics histograms (server.ServerMetrics)
        self.metrics_sink = None
        # measured terms of the output delay (delays.py): p99 compute and input jitter
        self._encoder_times = DurationTracker(config.compute_s / 2)
        self._render_times = DurationTracker(config.compute_s / 2)  # per batch
        self._frame_times = DurationTracker(config.compute_s / (2 * max(1, config.batch_size)))  # per frame
        self._arrivals = ArrivalTracker()
        # what speech frames needed beyond the summed terms (delays.corrected_delay)
        self._need_excess = DurationTracker(0.0, min_samples=MIN_NEED_SAMPLES)
        self._needs: deque[float] = deque(maxlen=DURATION_HISTORY)  # the needs themselves (stats)
        self._tick_lateness: deque[float] = deque(maxlen=FPS * 10)
        self._silent_ticks = 0  # consecutive ticks that played a silent input frame
        self._last_retime = -math.inf

    # -- input ----------------------------------------------------------------------------------

    def push_audio(self, frame: av.AudioFrame) -> None:
        if not self._closed and not self.ring.closed:
            self.input.push(frame)
            self._arrived()

    def push_pcm(self, samples: np.ndarray, rate: int, channels: int = 1) -> None:
        if not self._closed and not self.ring.closed:
            self.input.push_pcm(samples, rate, channels)
            self._arrived()

    def _arrived(self) -> None:
        # Stamp arrivals when the packet comes, not at the next 40 ms tick: the spurt's anchor
        # (arrival + delay) would otherwise be up to a tick late. Same clock as loop.time().
        now = time.monotonic()
        self._arrivals.add(self.ring.write_index, now)
        self.scheduler.input_progress(self.ring.write_index // SAMPLES_PER_FRAME, now)

    def _summed_delay_s(self) -> float:
        """The model's right context + lookahead + hop + p99 compute + p99 input jitter."""
        compute = self._encoder_times.p99() + self._render_times.p99()
        return pipeline_delay(self.config.streaming, compute + self._arrivals.jitter(), self.config.window)

    def current_delay_s(self) -> float:
        """The output delay the next talk spurt gets (or a playing one is re-sized to, in silence):
        fixed when configured, else the summed terms corrected by what speech frames needed
        (delays.corrected_delay)."""
        if not self.config.adaptive:
            return self.config.output_delay_s
        floor = self.config.window.right_context_s + self.config.streaming.lookahead_s
        # too few frames measured: the tracker's default 0.0, i.e. the sum alone
        return corrected_delay(self._summed_delay_s(), self._need_excess.p99(), floor)

    def _frames_ready(self, frames: list[int], now: float) -> None:
        """Speech frames are rendered (or found too late to be): note what delay each needed,
        from the time its audio was due on the input's clock (its play time - the spurt's delay)."""
        summed = self._summed_delay_s()  # once per batch: two p99 sorts, not two per frame
        for frame in frames:
            due = self.scheduler.due(frame)
            if due is not None and frame >= self.scheduler.anchor_frame:  # not a frame of an earlier spurt
                needed = now - (due - self.scheduler.delay_s)
                self._needs.append(needed)
                self._need_excess.add(needed - summed)

    def end_of_input(self) -> None:
        """The speaker's stream ended: the last frames are released, then the avatar idles."""
        if not self.ring.closed:
            self.input.close()

    def interrupt(self) -> None:
        """Barge-in: nothing already queued is shown or heard; the next tick idles."""
        dropped = self.scheduler.drop_pending()
        while not self._render_queue.empty():
            self._render_queue.get_nowait()
        self._rendered.clear()
        log.info("interrupt: dropped %d queued frames", dropped)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("session already started")
        self._tasks = [
            asyncio.create_task(self._features_loop(), name="avatar-features"),
            asyncio.create_task(self._render_loop(), name="avatar-render"),
            asyncio.create_task(self._clock_loop(), name="avatar-clock"),
        ]
        if self.config.adaptive and self.config.probe_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._probe_loop(), name="avatar-probe"))
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("session task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Stop every task and release every buffer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.ring.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        while not self._render_queue.empty():
            self._render_queue.get_nowait()
        self._rendered.clear()
        self.video_track.finish()
        self.audio_track.finish()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- pipeline -------------------------------------------------------------------------------

    async def _features_loop(self) -> None:
        spent = self.whisper.encode_seconds
        async for block in self.whisper.stream():
            self._encoder_times.add(self.whisper.encode_seconds - spent)
            spent = self.whisper.encode_seconds
            for fa in self.windows.push(block.first_index, block.states):
                await self._render_queue.put(fa)
        for fa in self.windows.finish(num_features(self.ring.write_index)):
            await self._render_queue.put(fa)

    def _is_silent(self, frame: int) -> bool:
        start, end = window_audio_range(frame, self.config.window)
        try:
            audio = self.ring.read(max(0, start), min(end, self.ring.write_index))
        except SamplesLost:
            return True
        return audio.size == 0 or float(np.sqrt(np.mean(audio * audio))) < self.config.silence_rms

    async def _render_loop(self) -> None:
        cycle = self.renderer.cycle_length
        pending: deque[FrameAudio] = deque()  # taken off the queue, not rendered yet (<= batch_size)
        while True:
            if not pending:
                pending.append(await self._render_queue.get())
            while len(pending) < self.config.batch_size and not self._render_queue.empty():
                pending.append(self._render_queue.get_nowait())
            batch = [pending.popleft() for _ in range(self._due_count(list(pending)))]
            # Frames the clock has already passed are not worth rendering (we are behind).
            fresh = [fa for fa in batch if fa.index >= self.scheduler.next_frame]
            self.stale_frames += len(batch) - len(fresh)
            # a stale speech frame needed at least this much
            self._frames_ready([fa.index for fa in batch if fa.index < self.scheduler.next_frame
                                and not self._is_silent(fa.index)], time.monotonic())
            speech = []
            for fa in fresh:
                if self._is_silent(fa.index):
                    self.silent_frames += 1
                    self._rendered[fa.index] = None  # show the idle frame of whatever tick plays it
                else:
                    speech.append(fa)
            if not speech:
                continue
            poses = [(fa.index + self._tick_offset) % cycle for fa in speech]
            windows = np.stack([fa.window for fa in speech])
            t0 = time.monotonic()
            # the process's FrameEngine batches these with every other session's (one call per tick)
            images = await self.renderer.render_async(poses, windows)
            done = time.monotonic()
            spent = done - t0
            self._render_times.add(spent)
            self._frame_times.add(spent / len(speech))
            self._frames_ready([fa.index for fa in speech], done)
            if self.metrics_sink is not None:
                self.metrics_sink.observe_render(len(poses), spent)
            for fa, image in zip(speech, images):
                if fa.index >= self.scheduler.next_frame:
                    self._rendered[fa.index] = image
            self.rendered_frames += len(speech)

    def _due_count(self, pending: list[FrameAudio]) -> int:
        """Render what is due: as many queued frames as can be batched without the first one
        missing its tick (delays.frames_to_render); never waits for more frames to arrive."""
        now = time.monotonic()
        s = self.config.streaming
        # a frame not in an anchored spurt yet: as if its window just became final
        fallback = now + self.scheduler.delay_s - self.config.window.right_context_s - s.lookahead_s - s.hop_s
        deadlines = [d if (d := self.scheduler.due(fa.index)) is not None else fallback for fa in pending]
        per_frame = self._frame_times.p99()
        return frames_to_render(deadlines, now, lambda n: n * per_frame, self.config.batch_size)

    async def _probe_loop(self) -> None:
        """While nobody speaks, time one encoder run and one one-frame render every
        `probe_interval_s` under the machine's current load (viewers, RTMP and Janus encoders
        that joined since start-up), into the same p99 trackers as live runs: the next talk
        spurt's delay (current_delay_s) then fits the load it will meet. Without them the first
        spurt after a load change is sized from quieter times and its frames come late
        (measured in bench_broadcast: the TTS spurt after 20 viewers joined). Costs one encoder
        run and one frame render per interval (~30 ms of CPU on 2 cores for the default model)."""
        window = self.renderer.idle_window[None]
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            if self.scheduler.anchored or not self._render_queue.empty() or self.ring.closed:
                continue  # speech is measured by itself
            self._encoder_times.add(await self.whisper.probe())
            t0 = time.monotonic()
            await self.renderer.render_async([0], window, probe=True)
            spent = time.monotonic() - t0
            self._render_times.add(spent)
            self._frame_times.add(spent)
            self.probes += 1

    async def _clock_loop(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = self.started_at = loop.time()
        n = 0
        silence = np.zeros(SAMPLES_PER_FRAME, np.float32)
        while True:
            wait = tick_time(t0, n) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time()
            self._tick_lateness.append(now - tick_time(t0, n))
            if not self.scheduler.anchored:  # between talk spurts: re-size the delay to what was measured
                self.scheduler.delay_s = self.current_delay_s()
            self.scheduler.input_progress(self.ring.write_index // SAMPLES_PER_FRAME, now)
            self._retime_in_silence(now)
            arrival = None
            frame = self.scheduler.tick(now)
            pose = n % self.renderer.cycle_length
            image, audio = None, silence
            if frame is not None:
                self._silent_ticks = self._silent_ticks + 1 if self._is_silent(frame) else 0
                self._tick_offset = n - frame
                arrival = self.scheduler.last_arrival
                if frame in self._rendered:
                    image = self._rendered.pop(frame)
                else:
                    self.late_frames += 1
                try:
                    audio = self.ring.read(frame * SAMPLES_PER_FRAME, (frame + 1) * SAMPLES_PER_FRAME)
                except SamplesLost:
                    audio = silence
            if image is None:
                image = self.renderer.idle_frame(pose)
            for k in [k for k in self._rendered if k < self.scheduler.next_frame]:
                del self._rendered[k]  # dropped by the scheduler: never shown
            self._emit(n, image, audio)
            if arrival is not None:
                self._latencies.append(now - arrival)
                if self.metrics_sink is not None:
                    self.metrics_sink.observe_latency(now - arrival)
            if self.on_tick is not None:
                self.on_tick(n, frame, image, audio)
            self._tick_times.append(now)
            self.ticks = n = n + 1

    def _retime_in_silence(self, now: float) -> None:
        """Re-size a playing spurt to current_delay_s() in a pause: skip silent input frames or
        play idle ticks (delays.retime_frames). A microphone session is one spurt from connect
        to hang-up (silence is audio too), so without this it keeps its start-up delay."""
        if (not self.config.adaptive or not self.scheduler.anchored or now - self._last_retime < RETIME_INTERVAL_S
                or self._silent_ticks < RETIME_AFTER_SILENCE_S * FPS):
            return
        frames = retime_frames(self.scheduler.delay_s, self.current_delay_s())
        first = self.scheduler.next_frame
        if frames > 0:  # only frames that have arrived and are silent, words are never cut
            frames = min(frames, self.scheduler.pending())
            quiet = 0
            while quiet < frames and self._is_silent(first + quiet):
                quiet += 1
            frames = quiet
        elif frames < 0 and self.scheduler.pending() and not self._is_silent(first):
            frames = 0  # a word is about to play: wait for the next pause
        if frames:
            before = self.scheduler.delay_s
            self.scheduler.retime(frames)
            self._last_retime = now
            log.info("re-sized the playing spurt in a pause: %+d frames, output delay %.0f -> %.0f ms "
                     "(speech frames' need p99 %.0f ms over %d)", -frames, 1000 * before,
                     1000 * self.scheduler.delay_s, 1000 * quantile(self._needs, 0.99) if self._needs else 0,
                     len(self._needs))

    def _emit(self, n: int, image: np.ndarray, audio: np.ndarray) -> None:
        # The engine's format: yuv420p (serve: what every encoder takes, nothing converted on
        # the loop) or bgr24, odd sizes padded to even (aiortc's libx264 refuses odd ones).
        if self.renderer.frame_format == "yuv420p":
            video = av.VideoFrame.from_ndarray(image, format="yuv420p")
        else:
            video = av.VideoFrame.from_ndarray(pad_to_even(image), format="bgr24")
        video.pts = n * (VIDEO_CLOCK_RATE // FPS)
        video.time_base = VIDEO_TIME_BASE
        pcm = np.clip(audio * 32768.0, -32768, 32767).astype(np.int16)
        sound = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        sound.sample_rate = SAMPLE_RATE
        sound.pts = n * SAMPLES_PER_FRAME
        sound.time_base = AUDIO_TIME_BASE
        self.video_track.put(video)
        self.audio_track.put(sound)

    # -- reporting ------------------------------------------------------------------------------

    def stats(self) -> dict:
        fps = 0.0
        if len(self._tick_times) > 1:
            span = self._tick_times[-1] - self._tick_times[0]
            fps = (len(self._tick_times) - 1) / span if span > 0 else 0.0
        latencies = sorted(self._latencies)
        return {
            "fps": round(fps, 2),
            "frames_sent": self.ticks,
            "frames_played": self.scheduler.stats.played,
            "idle_frames": self.scheduler.stats.idle,
            "dropped_frames": self.scheduler.stats.dropped,
            "late_frames": self.late_frames,
            "rendered_frames": self.rendered_frames,
            "silent_frames": self.silent_frames,
            "stale_frames": self.stale_frames,
            # audio arrival -> frame on the wire, inside the session (network not included)
            "latency_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
            "output_delay_ms": round(1000 * self.scheduler.delay_s, 1),
            # the delay each of the last talk spurts started with (sized between spurts)
            "spurt_delays_ms": [round(1000 * d, 1) for d in self.scheduler.stats.spurt_delays],
            # re-sizes of a playing spurt in pauses (frames: + skipped, - idle ticks added)
            "retimed_frames": list(self.scheduler.stats.retimed),
            # the delay recent speech frames needed (ready - their audio's time on the input clock)
            "need_ms": {f"p{q}": round(1000 * quantile(self._needs, q / 100), 1) for q in (50, 90, 99)}
            if self._needs else None,
            # p99 of what they needed beyond the summed terms (None: too few measured)
            "need_excess_p99_ms": (round(1000 * self._need_excess.p99(), 1)
                                   if len(self._need_excess) >= MIN_NEED_SAMPLES else None),
            "probes": self.probes,
            # the measured terms the delay is sized from (p99s over the recent past)
            "encoder_p99_ms": round(1000 * self._encoder_times.p99(), 1),
            "render_p99_ms": round(1000 * self._render_times.p99(), 1),
            "input_jitter_ms": round(1000 * self._arrivals.jitter(), 1),
            "tick_lateness_p99_ms": round(1000 * quantile(self._tick_lateness, 0.99), 1) if self._tick_lateness else None,
            # video and audio of a tick leave together: the offset is zero by construction
            "av_offset_ms": 0.0,
            "input_seconds": round(self.ring.write_index / SAMPLE_RATE, 3),
            "ring_overruns": self.ring.overrun_samples,
            "encoder_runs": self.whisper.runs,
            "encoder_ms_per_run": round(1000 * self.whisper.encode_seconds / max(1, self.whisper.runs), 2),
        }
