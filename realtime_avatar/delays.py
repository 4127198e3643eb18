"""The output delay of a live session, term by term, and the measurements that size it.

A frame's lips can go on screen once (DESIGN.md 4, "latency arithmetic"):

    its own audio has arrived                          (the scheduler's arrival time)
  + the model's right context                          AudioWindow.right_context_s (MuseTalk 80 ms)
  + the encoder lookahead                              StreamingConfig.lookahead_s
  + up to one hop until the encoder runs again         StreamingConfig.hop_s
  + one encoder run and one render batch               compute: measured p99, not a constant
  + input jitter                                       measured: p99 of how much later than the
                                                       earliest packet a packet arrives, relative
                                                       to its media time

The first three come from the model's audio contract; the last two are measured on the machine
(the runtime calibrates the compute term at start-up, the session keeps measuring both and
re-sizes the delay between talk spurts, where a change cannot cut a word).

That sum of worst cases over-estimates: a frame rarely waits a whole hop AND meets the p99
encoder run AND the p99 render AND the p99 jitter (bench_e2e_webrtc: onset frames were ready
~100 ms before their tick). So the session also measures what each speech frame really needed
(when it was ready, from the time its audio was due on the input's clock) and corrects the sum
by the p99 of the difference (`need - sum`): the sum still follows load changes (idle probes
update its terms), the correction takes off what the worst cases never add up to.

Pure functions and small bounded trackers; no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .timing import FPS, SAMPLE_RATE

DEFAULT_COMPUTE_S = 0.05  # first-session guess before anything was measured (render + encoder)
DEFAULT_JITTER_S = 0.02  # one 20 ms Opus packet of input jitter before anything was measured
DURATION_HISTORY = 200  # render batches / encoder runs kept for the p99 (8 s of 40 ms hops)
ARRIVAL_HISTORY_S = 10.0  # packets kept for the jitter estimate
JITTER_REFRESH_S = 0.5  # the jitter estimate is recomputed at most this often
JITTER_SPAN_S = 1.0  # a packet's lateness is compared with the earliest of this span before it
MIN_SAMPLES = 8  # fewer measurements than this: keep the default
MIN_NEED_SAMPLES = 25  # speech frames measured (one second) before the sum is corrected by them


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (q in [0, 1]) of a non-empty sequence: an observed value, never an
    interpolation, so a p99 of 100 samples is the second largest. Raises ValueError when empty."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q * len(ordered))))
    return ordered[rank - 1]


@dataclass(frozen=True)
class DelayBudget:
    """The output delay's terms in seconds; `total_s` is what the scheduler waits."""

    right_context_s: float
    lookahead_s: float
    hop_s: float
    compute_s: float  # p99 of one encoder run + one render batch
    jitter_s: float  # p99 input jitter

    @property
    def total_s(self) -> float:
        return self.right_context_s + self.lookahead_s + self.hop_s + self.compute_s + self.jitter_s

    def as_ms(self) -> dict[str, float]:
        terms = ("right_context", "lookahead", "hop", "compute", "jitter", "total")
        return {t: round(1000 * getattr(self, f"{t}_s"), 1) for t in terms}


def pipeline_delay(
    right_context_s: float, lookahead_s: float, hop_s: float, compute_s: float, jitter_s: float
) -> DelayBudget:
    """The delay budget from its terms (seconds, each >= 0; ValueError otherwise)."""
    terms = (right_context_s, lookahead_s, hop_s, compute_s, jitter_s)
    if any(t < 0 for t in terms):
        raise ValueError(f"delay terms must be >= 0, got {terms}")
    return DelayBudget(*terms)


class DurationTracker:
    """The last DURATION_HISTORY durations (seconds) of something; p99 of them, or `default`
    while fewer than MIN_SAMPLES were seen."""

    def __init__(self, default: float, history: int = DURATION_HISTORY, min_samples: int = MIN_SAMPLES):
        self.default = default
        self.min_samples = min_samples
        self._values: deque[float] = deque(maxlen=history)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def __len__(self) -> int:
        return len(self._values)

    def p99(self) -> float:
        return quantile(self._values, 0.99) if len(self._values) >= self.min_samples else self.default


def arrival_jitter(
    arrivals: Sequence[tuple[int, float]], sample_rate: int = SAMPLE_RATE, span_s: float = JITTER_SPAN_S
) -> float:
    """p99 input jitter (seconds) of packets given as (samples received so far, wall time).

    Each packet's lateness is its wall time minus its media time (samples / rate); its jitter is
    how much later than the earliest-arriving packet of the preceding `span_s` it is. A playout
    anchored on any packet and delayed by this much more plays 99% of the following packets on
    time. Measured against a sliding minimum, not the minimum of the whole history, so that a
    sender clock that drifts (or falls behind on a starved machine) is not taken for jitter: the
    scheduler handles drift by re-anchoring (max_backlog), a buffer cannot.
    """
    if len(arrivals) < 2:
        return 0.0
    window: deque[tuple[float, float]] = deque()  # (time, lateness), lateness increasing
    excess = []
    for n, t in arrivals:
        late = t - n / sample_rate
        while window and window[-1][1] >= late:
            window.pop()
        window.append((t, late))
        while window[0][0] < t - span_s:
            window.popleft()
        excess.append(late - window[0][1])
    return quantile(excess, 0.99)


class ArrivalTracker:
    """Input packets of the last ARRIVAL_HISTORY_S seconds; `jitter()` as arrival_jitter(), or
    `default` while fewer than MIN_SAMPLES packets were seen. A gap longer than the history (the
    speaker paused, the sender stopped) starts the estimate afresh: senders stop sending in
    silence (DTX) and restart on another timeline."""

    def __init__(self, default: float = DEFAULT_JITTER_S, history_s: float = ARRIVAL_HISTORY_S):
        self.default = default
        self.history_s = history_s
        self._arrivals: deque[tuple[int, float]] = deque()
        self._cached: tuple[float, float] | None = None  # (newest arrival then, jitter)

    def add(self, samples_received: int, now: float) -> None:
        if self._arrivals and now - self._arrivals[-1][1] > self.history_s:
            self._arrivals.clear()
        self._arrivals.append((samples_received, now))
        while self._arrivals and now - self._arrivals[0][1] > self.history_s:
            self._arrivals.popleft()

    def jitter(self) -> float:
        """Recomputed at most every JITTER_REFRESH_S of arrivals (~1 ms for 500 packets: the
        session's clock asks every tick between spurts, and the event loop is shared)."""
        if len(self._arrivals) < MIN_SAMPLES:
            return self.default
        newest = self._arrivals[-1][1]
        if self._cached is None or not 0 <= newest - self._cached[0] < JITTER_REFRESH_S:
            self._cached = (newest, arrival_jitter(list(self._arrivals)))
        return self._cached[1]


def corrected_delay(summed_s: float, excess_p99_s: float | None, floor_s: float) -> float:
    """The delay a talk spurt gets: the sum of the terms' p99s (`summed_s`) corrected by the p99
    of what measured speech frames needed beyond (or, usually, short of) that sum; None: not
    enough frames measured yet, the sum alone. Never below `floor_s` (the model's right context
    + lookahead: audio that has not been spoken cannot be heard sooner)."""
    delay = summed_s if excess_p99_s is None else summed_s + excess_p99_s
    return max(delay, floor_s)


def retime_frames(current_s: float, target_s: float) -> int:
    """How to move a playing talk spurt from delay `current_s` to `target_s` (seconds) in whole
    frames, during silence: > 0 skip that many input frames (the delay shrinks, never below the
    target), < 0 play that many idle ticks first (the delay grows to at least the target), 0
    within a frame of it already. A microphone never stops sending (silence is audio), so its
    session is one spurt from connect to hang-up and can only be re-sized this way."""
    frame_s = 1.0 / FPS
    if target_s > current_s + 1e-9:
        return -math.ceil((target_s - current_s) / frame_s - 1e-9)
    return math.floor((current_s - target_s) / frame_s + 1e-9)


def frames_to_render(
    deadlines: Sequence[float], now: float, batch_cost: Callable[[int], float], max_batch: int
) -> int:
    """How many of the queued frames (deadlines in queue order, earliest first) to render now.

    Batching is cheaper per frame, but a batch ends when its slowest frame is done: take the
    largest n <= max_batch whose batch still finishes before the first frame's deadline, and at
    least 1. When even one frame alone cannot make it, the whole queue (up to max_batch) goes:
    the pipeline is behind, and single-frame batches (the costliest per frame) would keep it
    behind (bench_concurrency, one session, 2-core AMD EPYC without avx512: 31-45% of speech
    frames late that way, 14-22% with this rule).
    `batch_cost(n)`: seconds for a batch of n. Frames are never held back to fill a batch: only
    what is queued is counted.
    """
    available = min(len(deadlines), max_batch)
    if available <= 1:
        return available
    first_deadline = min(deadlines[:available])
    if now + batch_cost(1) > first_deadline:
        return available  # behind: catch up at the cheapest cost per frame
    n = available
    while n > 1 and now + batch_cost(n) > first_deadline:
        n -= 1
    return n


def frame_deadline(frame: int, anchor: tuple[int, float] | None, fallback: float) -> float:
    """Wall time input `frame` plays at, given the playout anchor (frame, time); `fallback`
    when no spurt is anchored (the frame's time is not decided yet)."""
    if anchor is None:
        return fallback
    anchor_frame, anchor_time = anchor
    return anchor_time + (frame - anchor_frame) / FPS
