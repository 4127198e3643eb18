"""The output clock of a live session: which input frame plays at each 25 fps tick.

Input audio arrives on its own clock (a sound card, a browser), in bursts, sometimes not at all.
The output runs on one clock: tick n is due at t0 + n/25 and carries video frame n together with
the 40 ms of input audio that frame shows. Audio and lips therefore leave the session in the
same tick, so they cannot drift apart; what can vary is the latency, and that is kept bounded:

- a talk spurt is anchored when its first frame arrives: that frame plays `delay` seconds later
  (time for the encoder's lookahead and the renderer), and every following input frame k plays
  exactly (k - first)/25 s after it. Frames that arrive with network jitter smaller than `delay`
  therefore play without a gap, on the input's own sample clock;
- a frame that has not arrived when it is due (the input stopped, or a late packet beyond the
  margin) makes the tick idle (mouth closed) and ends the spurt; the next frame to arrive starts
  a new one. Idling never builds a backlog and speech never waits behind silence;
- when the input runs ahead (a burst, a clock faster than ours) so that a frame would play more
  than `delay + max_backlog` after it arrived, frames are dropped and the spurt re-anchored, so
  latency returns to `delay`.

Pure bookkeeping, no I/O: the session feeds it the input progress and asks it at each tick.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .timing import FPS

EPSILON_S = 1e-6  # float slack when comparing wall times (t0 + n/25 + delay is not exact)


def tick_time(t0: float, n: int) -> float:
    """Wall time at which output tick n is due (exact, no accumulated float error)."""
    return t0 + n / FPS


@dataclass
class PlaybackStats:
    played: int = 0  # ticks that carried an input frame
    idle: int = 0  # ticks with no input frame due
    dropped: int = 0  # input frames skipped to bound latency (or dropped by interrupt)
    underruns: int = 0  # spurts ended because the next frame had not arrived when due
    spurt_delays: list = field(default_factory=list)  # delay_s each talk spurt started with (last 20)
    retimed: list = field(default_factory=list)  # frames each in-spurt re-size moved (last 20; + skipped, - idle)

    def anchored_at(self, delay_s: float) -> None:
        self.spurt_delays = (self.spurt_delays + [delay_s])[-20:]


class PlaybackScheduler:
    def __init__(self, delay_s: float, max_backlog_s: float = 0.5):
        if delay_s < 0 or max_backlog_s <= 0:
            raise ValueError(f"delay_s must be >= 0 and max_backlog_s > 0 (got {delay_s}, {max_backlog_s})")
        self.delay_s = delay_s
        self.max_backlog_s = max_backlog_s
        self._arrivals: deque[tuple[int, float]] = deque()  # (input frame, time its audio was complete)
        self._complete = 0  # input frames [0, _complete) have all their audio
        self._anchor: tuple[int, float] | None = None  # (input frame, wall time it plays)
        self.next_frame = 0  # the next input frame to play
        self.last_arrival: float | None = None  # when the audio of the last played frame arrived
        self.stats = PlaybackStats()

    def input_progress(self, frames_complete: int, now: float) -> None:
        """Input frames [0, frames_complete) have arrived (observed at `now`)."""
        for k in range(max(self._complete, self.next_frame), frames_complete):
            self._arrivals.append((k, now))
        self._complete = max(self._complete, frames_complete)

    def _due(self, frame: int) -> float:
        anchor_frame, anchor_time = self._anchor
        return anchor_time + (frame - anchor_frame) / FPS

    def tick(self, now: float) -> int | None:
        """The input frame to play at this tick, or None to idle."""
        if self._anchor is not None and self._arrivals:
            # Bound latency: while the oldest waiting frame would play too long after it arrived,
            # drop it; the spurt restarts from the first frame that is still fresh.
            while self._arrivals and self._due(self._arrivals[0][0]) - self._arrivals[0][1] > self.delay_s + self.max_backlog_s:
                self._arrivals.popleft()
                self.stats.dropped += 1
                self._anchor = None
                if self._arrivals:
                    self.next_frame = self._arrivals[0][0]
                    self._anchor = (self.next_frame, max(now, self._arrivals[0][1] + self.delay_s))
                    self.stats.anchored_at(self.delay_s)
        if not self._arrivals:
            if self._anchor is not None and now + EPSILON_S >= self._due(self.next_frame):
                self._anchor = None  # the next frame is due but absent: the spurt has ended
                self.stats.underruns += 1
            self.stats.idle += 1
            return None
        frame, arrival = self._arrivals[0]
        if self._anchor is None:
            self._anchor = (frame, arrival + self.delay_s)
            self.stats.anchored_at(self.delay_s)
        if now + EPSILON_S >= self._due(frame):
            self._arrivals.popleft()
            self.next_frame = frame + 1
            self.last_arrival = arrival
            self.stats.played += 1
            return frame
        self.stats.idle += 1
        return None

    @property
    def anchored(self) -> bool:
        """A talk spurt is playing: its frames' times are fixed (change `delay_s` only when not)."""
        return self._anchor is not None

    @property
    def anchor_frame(self) -> int | None:
        """The input frame the playing spurt's times count from (None: no spurt)."""
        return None if self._anchor is None else self._anchor[0]

    def due(self, frame: int) -> float | None:
        """Wall time input `frame` plays at in the current spurt; None when no spurt is anchored."""
        return None if self._anchor is None else self._due(frame)

    def retime(self, frames: int) -> int:
        """Move the playing spurt by whole frames (delays.retime_frames): frames > 0 skips that
        many pending input frames (they are never played, the delay shrinks by frames/25 s),
        frames < 0 plays -frames idle ticks before the next frame (the delay grows). Only for
        silence: the session checks that what is skipped is quiet. Skips at most what is pending.
        Returns the frames actually moved (same sign); 0 when no spurt is playing."""
        if self._anchor is None or frames == 0:
            return 0
        anchor_frame, anchor_time = self._anchor
        if frames > 0:
            frames = min(frames, len(self._arrivals))
            for _ in range(frames):
                self._arrivals.popleft()
            self.next_frame += frames
            self.stats.dropped += frames
            self._anchor = (anchor_frame + frames, anchor_time)  # frame f+k plays when f would have
        else:
            self._anchor = (anchor_frame, anchor_time - frames / FPS)
        self.delay_s = max(0.0, self.delay_s - frames / FPS)
        self.stats.retimed.append(frames)
        self.stats.retimed[:] = self.stats.retimed[-20:]
        return frames

    def pending(self) -> int:
        """Input frames that arrived and wait to be played."""
        return len(self._arrivals)

    def drop_pending(self) -> int:
        """Barge-in: forget every frame not played yet; returns how many were dropped."""
        n = len(self._arrivals)
        if n:
            self.next_frame = self._arrivals[-1][0] + 1
        self._arrivals.clear()
        self._anchor = None
        self.stats.dropped += n
        return n
