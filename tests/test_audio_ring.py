"""AudioRing: absolute indices, wrap-around, overrun accounting, thread-safe asyncio waits."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from realtime_avatar.audio_ring import AudioRing, RingClosed, SamplesLost
from realtime_avatar.timing import SAMPLE_RATE, SAMPLES_PER_FRAME


def ramp(start: int, end: int) -> np.ndarray:
    """Sample k of the test stream has value k (exact in float32 below 2**24)."""
    return np.arange(start, end, dtype=np.float32)


def test_indices_and_wraparound_return_exact_samples():
    ring = AudioRing(10)
    written = 0
    for n in [7, 7, 3, 10, 1, 25, 9]:
        ring.write(ramp(written, written + n))
        written += n
        assert ring.write_index == written
        assert ring.oldest_index == max(0, written - 10)
        # every sub-range of what is held comes back exactly, across the wrap point
        for a in range(ring.oldest_index, written + 1):
            for b in range(a, written + 1):
                np.testing.assert_array_equal(ring.read(a, b), ramp(a, b))


def test_overrun_counts_only_unread_samples_that_were_dropped():
    ring = AudioRing(10)
    ring.write(ramp(0, 7))
    ring.write(ramp(7, 14))  # drops 0..3, never read
    assert (ring.overrun_samples, ring.overrun_events) == (4, 1)
    np.testing.assert_array_equal(ring.read(4, 14), ramp(4, 14))
    ring.write(ramp(14, 19))  # drops 4..8, all read: no overrun
    assert (ring.overrun_samples, ring.overrun_events) == (4, 1)
    ring.write(ramp(19, 39))  # bigger than the ring: drops unread 14..28 (5 old + 10 of this chunk)
    assert (ring.overrun_samples, ring.overrun_events) == (19, 2)
    np.testing.assert_array_equal(ring.read(29, 39), ramp(29, 39))
    stats = ring.stats()
    assert stats["overrun_samples"] == 19 and stats["overrun_events"] == 2
    assert (stats["write_index"], stats["oldest_index"], stats["unread_samples"]) == (39, 29, 0)


def test_overrun_matches_a_per_sample_model_on_random_traffic():
    rng = np.random.default_rng(7)
    capacity = 64
    ring = AudioRing(capacity)
    read_mark = 0  # model: the consumer has given up on everything before the furthest read end
    lost = events = 0
    written = 0
    for _ in range(2000):
        if rng.random() < 0.6:
            n = int(rng.integers(1, 3 * capacity // 2))
            old_oldest = max(0, written - capacity)
            written += n
            new_oldest = max(0, written - capacity)
            dropped_unread = sum(1 for k in range(old_oldest, new_oldest) if k >= read_mark)
            lost += dropped_unread
            events += dropped_unread > 0
            ring.write(ramp(written - n, written))
        else:
            a = int(rng.integers(max(0, written - capacity), written + 1))
            b = int(rng.integers(a, written + 1))
            np.testing.assert_array_equal(ring.read(a, b), ramp(a, b))
            read_mark = max(read_mark, b)
        assert ring.overrun_samples == lost
        assert ring.overrun_events == events
        assert ring.read_index == read_mark


def test_read_errors_name_the_problem():
    ring = AudioRing(8)
    ring.write(ramp(0, 20))
    with pytest.raises(SamplesLost) as lost:
        ring.read(5, 15)
    assert lost.value.oldest_index == 12 and lost.value.lost == 7
    assert "12" in str(lost.value)
    with pytest.raises(ValueError, match="wait_until"):
        ring.read(15, 21)
    with pytest.raises(ValueError):
        ring.read(15, 14)
    with pytest.raises(ValueError, match="1-D"):
        ring.write(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError):
        AudioRing(0)


def test_write_converts_dtype_and_ignores_empty_chunks():
    ring = AudioRing(SAMPLES_PER_FRAME)
    ring.write(np.array([], dtype=np.float32))
    ring.write(np.array([0.5, -0.25], dtype=np.float64))
    assert ring.write_index == 2
    out = ring.read(0, 2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0.5, -0.25])


def test_wait_until_wakes_each_waiter_at_its_index():
    ring = AudioRing(1000)

    async def main():
        first = asyncio.ensure_future(ring.wait_until(100))
        second = asyncio.ensure_future(ring.wait_until(200))
        await asyncio.sleep(0.01)
        assert ring.stats()["waiters"] == 2
        threading.Thread(target=ring.write, args=(ramp(0, 150),)).start()
        assert await asyncio.wait_for(first, 2) == 150
        await asyncio.sleep(0.02)
        assert not second.done()
        threading.Thread(target=ring.write, args=(ramp(150, 200),)).start()
        assert await asyncio.wait_for(second, 2) == 200
        assert await ring.wait_until(50) == 200  # already there: returns at once
        assert ring.stats()["waiters"] == 0

    asyncio.run(main())


def test_wait_until_timeout_raises_and_forgets_the_waiter():
    ring = AudioRing(100)

    async def main():
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            await ring.wait_until(10, timeout=0.05)
        assert time.perf_counter() - t0 >= 0.045
        assert ring.stats()["waiters"] == 0

    asyncio.run(main())


def test_close_ends_waits_and_keeps_the_tail_readable():
    ring = AudioRing(1000)

    async def main():
        waiter = asyncio.ensure_future(ring.wait_until(1000))
        await asyncio.sleep(0.01)
        ring.write(ramp(0, 500))
        ring.close()
        with pytest.raises(RingClosed) as closed:
            await asyncio.wait_for(waiter, 2)
        assert closed.value.write_index == 500
        assert await ring.wait_until(300) == 500  # written before close: still available
        with pytest.raises(RingClosed):
            await ring.wait_until(501)

    asyncio.run(main())
    np.testing.assert_array_equal(ring.read(0, 500), ramp(0, 500))
    ring.write(ramp(500, 600))  # a late device callback: ignored, counted, not raised
    assert ring.write_index == 500
    assert ring.stats()["samples_after_close"] == 100


def test_concurrent_producer_and_asyncio_consumer_read_every_sample_once_in_order():
    total = 10 * SAMPLE_RATE
    capacity = 3 * SAMPLE_RATE
    source = np.random.default_rng(1).standard_normal(total).astype(np.float32)
    ring = AudioRing(capacity)
    write_seconds: list[float] = []

    def producer():
        rng = np.random.default_rng(2)
        pos = 0
        while pos < total:
            n = min(int(rng.integers(1, 2048)), total - pos)
            t0 = time.perf_counter()
            ring.write(source[pos : pos + n])
            write_seconds.append(time.perf_counter() - t0)
            pos += n
            time.sleep(0.0005)  # far faster than real time; the ring wraps three times
        ring.close()

    async def consumer() -> np.ndarray:
        rng = np.random.default_rng(3)
        parts, pos = [], 0
        while True:
            want = pos + int(rng.integers(1, 3000))
            try:
                await ring.wait_until(want, timeout=10)
            except RingClosed:
                parts.append(ring.read(pos, ring.write_index))
                return np.concatenate(parts)
            parts.append(ring.read(pos, want))
            pos = want

    async def main() -> np.ndarray:
        thread = threading.Thread(target=producer)
        thread.start()
        try:
            return await consumer()
        finally:
            thread.join()

    received = asyncio.run(main())
    assert ring.overrun_samples == 0, ring.stats()
    assert len(received) == total
    np.testing.assert_array_equal(received, source)  # exact: every sample once, in order
    assert float(received.astype(np.float64).sum()) == float(source.astype(np.float64).sum())
    assert ring.write_index > 3 * capacity  # it really wrapped
    assert max(write_seconds) < 0.05


def test_producer_is_not_blocked_by_a_stalled_consumer_loop():
    ring = AudioRing(SAMPLE_RATE)
    durations: list[float] = []
    started = threading.Event()

    def producer():
        started.wait()
        for k in range(200):
            t0 = time.perf_counter()
            ring.write(np.full(SAMPLES_PER_FRAME, k, np.float32))
            durations.append(time.perf_counter() - t0)

    async def main():
        waiter = asyncio.ensure_future(ring.wait_until(10 * SAMPLE_RATE))
        await asyncio.sleep(0.01)
        thread = threading.Thread(target=producer)
        thread.start()
        started.set()
        time.sleep(0.3)  # the consumer's loop is stuck; the producer must not care
        thread.join()
        waiter.cancel()

    asyncio.run(main())
    assert len(durations) == 200
    assert sum(durations) < 0.1, f"writes took {sum(durations):.3f} s in total"
    # 200 frames of 640 into a 16000-sample ring, nothing read: all but the last 16000 dropped
    assert ring.overrun_samples == 200 * SAMPLES_PER_FRAME - SAMPLE_RATE
    np.testing.assert_array_equal(ring.read(ring.write_index - 1, ring.write_index), [199.0])


def test_producer_survives_a_closed_consumer_loop():
    ring = AudioRing(1000)
    loop = asyncio.new_event_loop()
    task = loop.create_task(ring.wait_until(100))
    loop.run_until_complete(asyncio.sleep(0.01))
    assert ring.stats()["waiters"] == 1
    task._log_destroy_pending = False  # the loop goes away with this wait pending, on purpose
    loop.close()
    errors: list[BaseException] = []

    def producer():
        try:
            ring.write(ramp(0, 200))
            ring.close()
        except BaseException as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    thread = threading.Thread(target=producer)
    thread.start()
    thread.join()
    assert errors == []
    assert ring.write_index == 200 and ring.stats()["waiters"] == 0
