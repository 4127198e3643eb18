"""A fixed-capacity ring of 16 kHz mono samples addressed by an absolute sample clock.

One real-time producer (a PortAudio callback, a WebRTC track reader, a file reader) writes;
asyncio consumers (the streaming Whisper encoder, the A/V delay line) read by absolute sample
index. Sample k of the stream is always sample k, whatever wrapped around in between, so every
later stage can turn sample indices into feature and frame indices with realtime_avatar.timing.

Rules the producer can rely on:
- `write` never waits for a consumer. It takes a lock only for the duration of a memcpy.
- When a write would overwrite samples nobody has read yet, the oldest ones are dropped and
  counted (`overrun_samples`, `overrun_events`): in a live stream, old audio is the audio to lose.
- Waking an asyncio consumer goes through `loop.call_soon_threadsafe`; a closed or dead loop is
  ignored, never raised into the producer.

Rules for consumers:
- `read(start, end)` copies samples [start, end). Asking for samples that were already
  overwritten raises `SamplesLost` (with the oldest index still held, so the consumer can
  resume there and know how much it lost); asking for samples not yet written raises ValueError.
- `await wait_until(index)` returns once `write_index >= index`; after `close()` it raises
  `RingClosed` if that index will never be written (end of stream), so the consumer can read
  the tail it still has and stop.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import numpy as np


class AudioRingError(Exception):
    """Base class of the ring's errors."""


class RingClosed(AudioRingError):
    """The ring was closed (end of stream) before the awaited sample index was written."""

    def __init__(self, index: int, write_index: int):
        super().__init__(
            f"audio ring closed at sample {write_index}; sample {index} will never arrive"
        )
        self.index = index
        self.write_index = write_index


class SamplesLost(AudioRingError):
    """The requested samples were overwritten before they were read (the consumer fell behind)."""

    def __init__(self, start: int, oldest_index: int):
        super().__init__(
            f"samples [{start}, {oldest_index}) were overwritten before being read; the oldest "
            f"sample still held is {oldest_index}: resume from there or enlarge the ring"
        )
        self.start = start
        self.oldest_index = oldest_index

    @property
    def lost(self) -> int:
        return self.oldest_index - self.start


@dataclass(eq=False)  # identity: two waiters on the same index are still different
class _Waiter:
    index: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _wake(future: asyncio.Future) -> None:
    # Runs inside the consumer's loop; the future may have been cancelled by a timeout.
    if not future.done():
        future.set_result(None)


class AudioRing:
    """Holds the newest `capacity_samples` float32 samples of an endless stream."""

    def __init__(self, capacity_samples: int):
        if capacity_samples <= 0:
            raise ValueError(f"capacity_samples must be positive, got {capacity_samples}")
        self.capacity = int(capacity_samples)
        self._buffer = np.zeros(self.capacity, dtype=np.float32)
        self._lock = threading.Lock()
        self._write_index = 0  # samples ever written
        self._read_index = 0  # end of the furthest read: samples from here on are unread
        self._overrun_samples = 0
        self._overrun_events = 0
        self._samples_after_close = 0
        self._closed = False
        self._waiters: list[_Waiter] = []

    # -- producer side ------------------------------------------------------------------------

    def write(self, samples: np.ndarray) -> None:
        """Append 1-D samples (converted to float32). Never blocks on, or raises into, consumers.

        Writing after close() is ignored (and counted in stats): a device callback may still
        fire once while its stream is being stopped.
        """
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"AudioRing.write expects 1-D mono samples, got shape {x.shape}")
        n = len(x)
        if n == 0:
            return
        with self._lock:
            if self._closed:
                self._samples_after_close += n
                return
            capacity = self.capacity
            old_oldest = self.oldest_index
            end = self._write_index + n
            if n > capacity:  # only the newest `capacity` samples of this chunk can be kept
                x = x[n - capacity :]
            pos = (end - len(x)) % capacity
            first = min(len(x), capacity - pos)
            self._buffer[pos : pos + first] = x[:first]
            self._buffer[: len(x) - first] = x[first:]
            self._write_index = end
            # Samples that fell out of the ring without ever being read are an overrun.
            lost = self.oldest_index - max(self._read_index, old_oldest)
            if lost > 0:
                self._overrun_samples += lost
                self._overrun_events += 1
            ready = self._take_waiters(lambda w: w.index <= end) if self._waiters else []
        self._notify(ready)

    def close(self) -> None:
        """End of stream: wake every waiter. Already written samples stay readable."""
        with self._lock:
            self._closed = True
            ready = self._take_waiters(lambda w: True)
        self._notify(ready)

    def _take_waiters(self, is_ready) -> list[_Waiter]:
        ready = [w for w in self._waiters if is_ready(w)]
        if ready:
            self._waiters = [w for w in self._waiters if not is_ready(w)]
        return ready

    @staticmethod
    def _notify(waiters: list[_Waiter]) -> None:
        for waiter in waiters:
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # the consumer's loop is closed: nobody is left to wake
                pass

    # -- consumer side ------------------------------------------------------------------------

    def read(self, start: int, end: int) -> np.ndarray:
        """Copy samples [start, end) out of the ring.

        Raises SamplesLost if `start` was already overwritten, ValueError if `end` is beyond
        `write_index` (await `wait_until(end)` first) or the range is malformed.
        """
        if start < 0 or end < start:
            raise ValueError(f"invalid sample range [{start}, {end})")
        with self._lock:
            if end > self._write_index:
                raise ValueError(
                    f"samples up to {end} requested but only {self._write_index} written; "
                    f"await wait_until({end}) first"
                )
            oldest = self.oldest_index
            if start < oldest:
                raise SamplesLost(start, oldest)
            n = end - start
            out = np.empty(n, dtype=np.float32)
            pos = start % self.capacity
            first = min(n, self.capacity - pos)
            out[:first] = self._buffer[pos : pos + first]
            out[first:] = self._buffer[: n - first]
            self._read_index = max(self._read_index, end)
        return out

    async def wait_until(self, index: int, timeout: float | None = None) -> int:
        """Wait until `write_index >= index`; return write_index at that moment.

        Raises RingClosed if the ring is closed before `index` is reached and TimeoutError
        (asyncio's, the builtin one) when `timeout` seconds pass first.
        """
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._write_index >= index:
                    return self._write_index
                if self._closed:
                    raise RingClosed(index, self._write_index)
                waiter = _Waiter(index, loop, loop.create_future())
                self._waiters.append(waiter)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives together with the result, and a consumer being
                # torn down would then keep waiting.
                async with asyncio.timeout(timeout):
                    await waiter.future
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    # -- state --------------------------------------------------------------------------------

    @property
    def write_index(self) -> int:
        """Absolute index one past the newest sample (= samples ever written)."""
        return self._write_index

    @property
    def oldest_index(self) -> int:
        """Absolute index of the oldest sample still held."""
        return max(0, self._write_index - self.capacity)

    @property
    def read_index(self) -> int:
        """End of the furthest read so far; overwriting samples at or after it is an overrun."""
        return self._read_index

    @property
    def overrun_samples(self) -> int:
        """Samples dropped unread because the ring was full."""
        return self._overrun_samples

    @property
    def overrun_events(self) -> int:
        """Writes that dropped unread samples."""
        return self._overrun_events

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict:
        with self._lock:
            return {
                "capacity": self.capacity,
                "write_index": self._write_index,
                "oldest_index": self.oldest_index,
                "read_index": self._read_index,
                "unread_samples": self._write_index - max(self._read_index, self.oldest_index),
                "overrun_samples": self._overrun_samples,
                "overrun_events": self._overrun_events,
                "samples_after_close": self._samples_after_close,
                "waiters": len(self._waiters),
                "closed": self._closed,
            }
