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


def test_after_a_stall_the_burst_is_trimmed_so_latency_stays_bounded():
    s = PlaybackScheduler(delay_s=0.1, max_backlog_s=0.2)
    # real time for 20 ticks, a 1 s stall, then the stalled second arrives at once, then real time
    arrivals = {n: n + 1 for n in range(20)} | {n: n - 4 for n in range(45, 80)}
    played, lag = [], []
    complete = 0
    for n in range(90):
        now = tick_time(0.0, n)
        complete = arrivals.get(n, complete)
        s.input_progress(complete, now)
        frame = s.tick(now)
        played.append(frame)
        if frame is not None:
            lag.append(now - s.last_arrival)
    got = [p for p in played if p is not None]
    assert got == sorted(got) and len(set(got)) == len(got)
    assert s.stats.dropped > 0 and got[-1] == 74  # the newest audio (frames 0..74) is still played
    assert max(lag) <= 0.1 + 0.2 + TICK + 1e-9  # never more than delay + backlog (+ one tick)


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


def test_network_jitter_within_the_delay_plays_without_gaps():
    s = PlaybackScheduler(delay_s=0.2)
    # frames arrive in pairs every other tick (80 ms packets), sometimes a tick late
    arrivals, k = {}, 0
    for n in range(0, 100, 2):
        late = 1 if n % 10 == 4 else 0
        k += 2
        arrivals[n + late] = k
    played = run(s, arrivals, 110)
    first = next(i for i, p in enumerate(played) if p is not None)
    got = played[first : first + 95]
    assert got == list(range(95)), got  # one frame per tick, no idle tick inside the speech
    assert s.stats.underruns == 1  # only when the input ends


def test_a_frame_missing_when_due_ends_the_spurt_and_the_next_one_reanchors():
    s = PlaybackScheduler(delay_s=0.08)
    arrivals = {n: n + 1 for n in range(10)} | {30: 15}  # 5 frames arrive 20 ticks late
    played = run(s, arrivals, 40)
    assert played[2:12] == list(range(10))
    assert all(p is None for p in played[12:32])
    assert played[32:37] == list(range(10, 15))  # the late frames play delay after their arrival
    assert s.stats.underruns == 2  # the late gap, then the end of the input
