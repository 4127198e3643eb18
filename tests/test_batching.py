"""TickBatcher (realtime_avatar/batching.py): when a batch starts, and who is in it."""

from __future__ import annotations

import asyncio
import time

from realtime_avatar.batching import TickBatcher, everyone_is_in


def test_a_batch_starts_early_only_when_every_active_submitter_is_in():
    assert everyone_is_in({"a"}, {"a"})
    assert everyone_is_in({"a", "b"}, {"a", "b"})
    assert not everyone_is_in({"a"}, {"a", "b"})  # b may still send something this tick
    assert everyone_is_in(set(), set())


def _echo(requests):
    time.sleep(0.002)  # the worker thread's "render"
    return list(requests)


def test_a_lone_submitter_never_waits_for_the_tick_boundary():
    async def scenario():
        batcher = TickBatcher(_echo, tick_s=0.2)  # a tick long enough to see any wait
        await batcher.start()
        waits = []
        for i in range(5):
            await asyncio.sleep(0.013 * i)  # anywhere inside the tick
            t0 = time.monotonic()
            assert await batcher.submit(i) == i
            waits.append(time.monotonic() - t0)
        await batcher.close()
        return waits

    waits = asyncio.run(scenario())
    assert max(waits) < 0.1, waits  # not held until the next 200 ms boundary


def test_sessions_that_submit_in_the_same_tick_share_one_batch_and_go_when_all_are_in():
    async def session(batcher, name, offset_s, rounds, period_s=0.08):
        got = []
        start = time.monotonic()
        for k in range(rounds):
            await asyncio.sleep(max(0.0, start + offset_s + k * period_s - time.monotonic()))
            t0 = time.monotonic()
            got.append((await batcher.submit(name), time.monotonic() - t0))
        return got

    async def scenario():
        batcher = TickBatcher(_echo, tick_s=0.3)
        await batcher.start()
        # two paced sessions, b 20 ms after a: once both are active, a waits for b (~20 ms),
        # not for the 300 ms boundary, and both go in one batch
        results = await asyncio.gather(session(batcher, "a", 0.0, 6), session(batcher, "b", 0.02, 6))
        stats = batcher.stats
        await batcher.close()
        return results, stats

    (a, b), stats = asyncio.run(scenario())
    assert [r for r, _ in a] == ["a"] * 6 and [r for r, _ in b] == ["b"] * 6  # each gets its own
    later = [t for _, t in a[2:] + b[2:]]
    assert max(later) < 0.1, (a, b)
    assert stats.batches <= 8 and stats.requests == 12  # from the third round on, both in one batch


def test_a_quiet_session_stops_holding_the_others_back():
    async def scenario():
        batcher = TickBatcher(_echo, tick_s=0.25)
        batcher.active_s = 0.1
        await batcher.start()
        await asyncio.gather(batcher.submit("a"), asyncio.ensure_future(batcher.submit("b")))
        await asyncio.sleep(0.3)  # b goes quiet (listening): no longer active
        t0 = time.monotonic()
        await batcher.submit("a")
        wait = time.monotonic() - t0
        await batcher.close()
        return wait

    assert asyncio.run(scenario()) < 0.1


def test_a_probe_does_not_make_the_session_wait_for_it_afterwards():
    async def scenario():
        batcher = TickBatcher(_echo, tick_s=0.3)
        await batcher.start()
        await asyncio.ensure_future(batcher.submit("probe", regular=False))  # another task, once
        t0 = time.monotonic()
        await batcher.submit("frames")
        wait = time.monotonic() - t0
        await batcher.close()
        return wait

    assert asyncio.run(scenario()) < 0.1  # not held for the probe's task until the boundary
