"""A monotonic clock that does not count the time a process spent stopped.

Training (`export.train`) and per-avatar tuning (`prepare --tune`) spend a time budget; a run
stopped with Ctrl+Z (SIGTSTP) or SIGSTOP, or a laptop asleep, should not lose its budget to the
pause, and the learning-rate schedule follows the same clock.
"""

from __future__ import annotations

import threading
import time

PAUSE_BEAT_S = 0.5  # the heartbeat's period
PAUSE_GAP_S = 5.0  # a beat this late means the process was stopped, not merely busy


class PauseAwareClock:
    """Monotonic seconds that do not advance while the process is stopped (SIGSTOP, Ctrl+Z, a
    machine asleep): a daemon thread beats every PAUSE_BEAT_S; a beat more than PAUSE_GAP_S late
    and the process used next to no CPU meanwhile means it was stopped, and the gap is taken off
    (a long C call that holds the GIL also delays the beat, but burns CPU all along). A run
    paused so that a benchmark gets the machine keeps its whole --minutes of training (budgets
    and the learning-rate schedule follow this clock)."""

    def __init__(self):
        self._paused = 0.0
        self._last = time.monotonic()
        self._last_cpu = time.process_time()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        while True:
            time.sleep(PAUSE_BEAT_S)
            self._settle()

    def _settle(self) -> None:
        with self._lock:
            now, cpu = time.monotonic(), time.process_time()
            gap, used = now - self._last, cpu - self._last_cpu
            if gap > PAUSE_GAP_S and used < 0.5 * gap:
                self._paused += gap - PAUSE_BEAT_S
            self._last, self._last_cpu = now, cpu

    def __call__(self) -> float:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="train-clock", daemon=True)
            self._thread.start()
        self._settle()  # a stop that ended just now counts before the caller reads the time
        return time.monotonic() - self._paused


run_clock = PauseAwareClock()
"""The process-wide instance: seconds, float, only differences are meaningful."""
