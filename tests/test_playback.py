"""The output clock's bookkeeping: latency, idling, backlog bound, barge-in (pure, no I/O)."""

import pytest

from realtime_avatar.playback import PlaybackScheduler, tick_time

TICK = 0.04


def run(scheduler, arrivals, ticks, t0=0.0):
    """arrivals: {tick n: frames complete at that tick}. Returns the frame played at each tick."""
    played = []
    complete = 0
    for n in range(ticks):
        now = tick_time(t0, n)
        complete = arrivals.get(n, complete)
        scheduler.input_progress(complete, now)
        played.append(scheduler.tick(now))
    return played


def test_tick_times_do_not_drift_over_hours():
    ten_hours = 25 * 3600 * 10
    assert tick_time(100.0, ten_hours) == pytest.approx(100.0 + 36000.0, abs=1e-9)


def test_steady_input_plays_every_frame_after_the_delay():
    s = PlaybackScheduler(delay_s=0.2)
    arrivals = {n: n + 1 for n in range(100)}  # one frame per tick, real time
    played = run(s, arrivals, 100)
    assert played[:5] == [None] * 5  # 0.2 s = 5 ticks of latency
    assert played[5:] == list(range(95))
    assert s.stats.dropped == 0


def test_silence_idles_and_speech_after_a_gap_does_not_wait():
    s = PlaybackScheduler(delay_s=0.12)
    # 10 frames, then no input for 50 ticks, then 10 more frames arrive in real time
    arrivals = {n: n + 1 for n in range(10)} | {n: n - 49 for n in range(60, 70)}
    played = run(s, arrivals, 80)
    assert played[3:13] == list(range(10))
    assert all(p is None for p in played[13:63])
    assert played[63:73] == list(range(10, 20))  # same 3-tick latency after the pause


def test_burst_is_played_one_per_tick_and_backlog_is_bounded():
    s = PlaybackScheduler(delay_s=0.1, max_backlog_s=0.2)
    played = run(s, {0: 50}, 60)  # 2 s of audio arrives at once
    got = [p for p in played if p is not None]
    assert got == sorted(got) and len(set(got)) == len(got)
    assert got[-1] == 49
    assert s.stats.dropped > 0 and s.stats.dropped + len(got) == 50
    # after the catch-up no frame plays more than delay + backlog after its arrival
    first_play_tick = played.index(got[0])
    assert first_play_tick * TICK >= 0.1


def test_drop_pending_is_barge_in():
    s = PlaybackScheduler(delay_s=0.0)
    s.input_progress(20, 0.0)
    assert s.tick(0.0) == 0
    assert s.drop_pending() == 19
    assert s.tick(0.04) is None
    s.input_progress(25, 0.08)
    assert s.tick(0.08) == 20


def test_invalid_settings():
    with pytest.raises(ValueError):
        PlaybackScheduler(delay_s=-1)
