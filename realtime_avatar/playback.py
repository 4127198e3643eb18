"""The output clock of a live session: which input frame plays at each 25 fps tick.

Input audio arrives on its own clock (a sound card, a browser), in bursts, sometimes not at all.
The output runs on one clock: tick n is due at t0 + n/25 and carries video frame n together with
the 40 ms of input audio that frame shows. Audio and lips therefore leave the session in the
same tick, so they cannot drift apart; what can vary is the latency, and that is kept bounded:

- input frame k becomes playable `delay` seconds after its audio arrived (time for the encoder's
  lookahead and the renderer); it plays at the first tick after that;
- with nothing playable (silence, no input) the tick idles (mouth closed), and the next input frame
  plays as soon as it is due: idling never builds a backlog, speech never waits behind silence;
- when frames pile up (an input burst, a clock faster than ours) and the oldest is more than
  `max_backlog` seconds past due, the oldest are dropped so latency returns to `delay`.

Pure bookkeeping, no I/O: the session feeds it the input progress and asks it at each tick.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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


class PlaybackScheduler:
    def __init__(self, delay_s: float, max_backlog_s: float = 0.5):
        if delay_s < 0 or max_backlog_s <= 0:
            raise ValueError(f"delay_s must be >= 0 and max_backlog_s > 0 (got {delay_s}, {max_backlog_s})")
        self.delay_s = delay_s
        self.max_backlog_s = max_backlog_s
        self._arrivals: deque[tuple[int, float]] = deque()  # (input frame, time its audio was complete)
        self._complete = 0  # input frames [0, _complete) have all their audio
        self.next_frame = 0  # the next input frame to play
        self.last_arrival: float | None = None  # when the audio of the last played frame arrived
        self.stats = PlaybackStats()

    def input_progress(self, frames_complete: int, now: float) -> None:
        """Input frames [0, frames_complete) have arrived (observed at `now`)."""
        for k in range(max(self._complete, self.next_frame), frames_complete):
            self._arrivals.append((k, now))
        self._complete = max(self._complete, frames_complete)

    def tick(self, now: float) -> int | None:
        """The input frame to play at this tick, or None to idle."""
        # Bound latency: drop the oldest frames while the one after them is already overdue.
        while len(self._arrivals) > 1 and now - self._arrivals[1][1] - self.delay_s > self.max_backlog_s:
            self._arrivals.popleft()
            self.stats.dropped += 1
            self.next_frame = self._arrivals[0][0]
        if self._arrivals and now + EPSILON_S >= self._arrivals[0][1] + self.delay_s:
            frame, self.last_arrival = self._arrivals.popleft()
            self.next_frame = frame + 1
            self.stats.played += 1
            return frame
        self.stats.idle += 1
        return None

    def pending(self) -> int:
        """Input frames that arrived and wait to be played."""
        return len(self._arrivals)

    def drop_pending(self) -> int:
        """Barge-in: forget every frame not played yet; returns how many were dropped."""
        n = len(self._arrivals)
        if n:
            self.next_frame = self._arrivals[-1][0] + 1
        self._arrivals.clear()
        self.stats.dropped += n
        return n
