"""AvatarSession end to end inside one process: real Whisper, real renderer, real clock.

Speech is pushed in 20 ms packets at real-time pace, as a WebRTC peer would; every output tick
is recorded through the session's on_tick hook (the same frames the WebRTC tracks carry).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from realtime_avatar.session import AvatarSession, SessionConfig, pipeline_delay, window_audio_range
from realtime_avatar.streaming_whisper import StreamingConfig
from realtime_avatar.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from tests.speech import espeak_wav, read_wav

PACKET = SAMPLE_RATE // 50  # 20 ms


def test_pipeline_delay_adds_up():
    s = StreamingConfig(window_s=2.0, hop_s=0.1, lookahead_s=0.2)
    assert pipeline_delay(s, 0.1) == pytest.approx(0.08 + 0.2 + 0.1 + 0.1)
    assert window_audio_range(0) == (-4 * 320, 6 * 320)
    assert window_audio_range(10) == (16 * 320, 26 * 320)


@pytest.fixture(scope="module")
def speech_then_silence(tmp_path_factory):
    wav = espeak_wav("Hello there, how are you today?", tmp_path_factory.mktemp("s") / "s.wav", rate=48000)
    audio, rate = read_wav(wav)
    silence = np.zeros(int(1.5 * rate), np.float32)
    return np.concatenate([silence, audio, silence]), rate


async def run_session(runtime, audio, rate, config, after=None, extra_seconds=1.5):
    session = AvatarSession(runtime.encoder, runtime.renderer, config)
    ticks = []
    session.on_tick = lambda n, frame, image, pcm: ticks.append((n, frame, image, pcm.copy()))
    await session.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    packet = rate // 50
    for i in range(0, len(audio), packet):
        await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
        pcm = (audio[i : i + packet] * 32767).astype(np.int16)
        session.push_pcm(np.stack([pcm, pcm], axis=1), rate, 2)  # stereo s16, as WebRTC delivers
        if after is not None:
            after(session, i / rate)
    session.end_of_input()
    await asyncio.sleep(extra_seconds)
    stats = session.stats()
    await session.close()
    return session, ticks, stats


def test_live_session_paces_renders_and_returns_the_audio(runtime, speech_then_silence):
    audio, rate = speech_then_silence
    config = SessionConfig(streaming=StreamingConfig(window_s=2.0, hop_s=0.12, lookahead_s=0.12),
                           render_budget_s=0.6, batch_size=4)
    session, ticks, stats = asyncio.run(run_session(runtime, audio, rate, config))
    print(stats)
    duration = len(audio) / rate
    # paced at 25 fps: one tick per 40 ms, pts consecutive
    assert [t[0] for t in ticks] == list(range(len(ticks)))
    assert abs(len(ticks) - (duration + 1.5) * FPS) < 0.1 * len(ticks)
    assert 23.5 <= stats["fps"] <= 26.5
    # every input frame played exactly once, in order, nothing dropped
    played = [t[1] for t in ticks if t[1] is not None]
    n_input = int(len(audio) / rate * SAMPLE_RATE) // SAMPLES_PER_FRAME
    assert played == list(range(n_input)), (len(played), n_input)
    # the audio that goes out is the audio that came in (resampled to 16 kHz), frame by frame
    out = np.concatenate([t[3] for t in ticks if t[1] is not None])
    from realtime_avatar.audio_sources import StreamResampler

    ref = StreamResampler(rate, 1).process(audio)
    ref = np.concatenate([ref, StreamResampler(rate, 1).flush()]) if len(ref) < len(out) else ref
    n = min(len(out), len(ref))
    assert n >= 0.98 * len(ref)
    corr = np.corrcoef(out[:n], ref[:n])[0, 1]
    assert corr > 0.99, corr
    # latency: the first speech frame leaves about output_delay after its audio arrived
    assert stats["latency_ms"] is not None and stats["latency_ms"] < stats["output_delay_ms"] + 200
    # lips: speech frames are rendered from speech, silent ones show the idle mouth exactly
    crop = runtime.avatar.blender
    speech_frames = [t for t in ticks if t[1] is not None and not session._is_silent(t[1])]
    silent_frames = [t for t in ticks if t[1] is not None and session._is_silent(t[1])]
    assert len(speech_frames) > 25 and len(silent_frames) > 25
    diffs_speech = [np.abs(t[2].astype(int) - runtime.renderer.idle_frame(t[0]).astype(int)).mean() for t in speech_frames]
    diffs_silent = [np.abs(t[2].astype(int) - runtime.renderer.idle_frame(t[0]).astype(int)).mean() for t in silent_frames]
    assert max(diffs_silent) == 0.0
    # A speech frame the renderer did not finish in time shows the idle mouth; the session must
    # report every such frame (degrade visibly and say so, never stall the clock).
    fallbacks = sum(d == 0.0 for d in diffs_speech)
    assert fallbacks <= stats["late_frames"] + 2  # the first frames may legitimately look idle
    assert stats["rendered_frames"] > 0 and fallbacks < len(speech_frames)


def test_interrupt_drops_queued_frames_within_a_tick(runtime, speech_then_silence):
    audio, rate = speech_then_silence
    config = SessionConfig(streaming=StreamingConfig(window_s=2.0, hop_s=0.12, lookahead_s=0.12),
                           delay_s=1.0, batch_size=4)
    marks = {}

    def after(session, t):
        if t >= 2.5 and "interrupt" not in marks:
            marks["pending"] = session.scheduler.pending()
            session.interrupt()
            marks["interrupt"] = session.ticks

    session, ticks, stats = asyncio.run(run_session(runtime, audio[: int(3.5 * rate)], rate, config, after,
                                                    extra_seconds=0.5))
    assert marks["pending"] > 10  # a second of audio was queued behind the 1 s delay
    at = marks["interrupt"]
    # the tick right after the interrupt idles: nothing queued before it is shown or heard
    after_ticks = [t for t in ticks if t[0] >= at + 1]
    assert after_ticks[0][1] is None
    before = {t[1] for t in ticks if t[0] <= at and t[1] is not None}
    played_after = [t[1] for t in after_ticks if t[1] is not None]
    assert not set(played_after) & before
    assert all(k > max(before, default=-1) + marks["pending"] - 1 for k in played_after)
    assert stats["dropped_frames"] >= marks["pending"]


def test_close_releases_everything(runtime):
    async def go():
        session = AvatarSession(runtime.encoder, runtime.renderer, SessionConfig())
        await session.start()
        session.push_pcm(np.zeros(48000, np.int16), 48000, 1)
        await asyncio.sleep(0.3)
        before = len(asyncio.all_tasks())
        await session.close()
        await session.close()  # twice is fine
        after = len(asyncio.all_tasks())
        return session, before, after

    session, before, after = asyncio.run(go())
    assert after == before - 4  # features, render, clock, idle probe
    assert session._render_queue.empty() and not session._rendered
    assert session.ring.closed


class LoadedRenderer:
    """The real renderer on a machine that got busier after start-up: every render takes
    `extra_s` longer (what 20 viewers and two encoders did to it in bench_broadcast)."""

    def __init__(self, renderer, extra_s: float):
        self._renderer, self.extra_s = renderer, extra_s

    def __getattr__(self, name):
        return getattr(self._renderer, name)

    async def render_async(self, positions, windows, **kwargs):
        await asyncio.sleep(self.extra_s)
        return await self._renderer.render_async(positions, windows, **kwargs)


def test_idle_probes_size_the_next_spurt_for_the_load_that_came_after_start_up(runtime):
    async def go(probe_interval_s):
        config = SessionConfig(compute_s=0.03, probe_interval_s=probe_interval_s)
        session = AvatarSession(runtime.encoder, LoadedRenderer(runtime.renderer, 0.15), config)
        before = session.current_delay_s()
        await session.start()
        await asyncio.sleep(4.5)  # nobody speaks
        after = session.current_delay_s()
        probes = session.probes
        await session.close()
        return before, after, probes

    before, after, probes = asyncio.run(go(0.1))
    assert probes >= 8
    assert after >= before + 0.12, (before, after)  # the 150 ms of extra render time is in the delay
    before, after, probes = asyncio.run(go(0.0))  # probes off: the start-up figure stays
    assert probes == 0 and abs(after - before) < 0.02


def test_a_microphone_session_is_re_sized_in_the_pauses_without_cutting_a_word(runtime, speech_then_silence):
    # A microphone never stops sending: speech, 3 s of silence, the same speech again is ONE talk
    # spurt. The session starts with a delay far too long (a start-up guess of 1.2 s of compute);
    # once speech frames are measured, the pause between the words re-sizes it.
    audio, rate = speech_then_silence
    config = SessionConfig(streaming=StreamingConfig(window_s=1.0, hop_s=0.04, lookahead_s=0.04),
                           compute_s=1.2, probe_interval_s=0.0)
    session, ticks, stats = asyncio.run(run_session(runtime, np.concatenate([audio, audio]), rate, config))
    print(stats)
    assert len(stats["spurt_delays_ms"]) == 1  # one spurt from start to end: never re-anchored
    start_delay = stats["spurt_delays_ms"][0]
    assert start_delay >= 1200
    moved = stats["retimed_frames"]
    assert moved and sum(moved) >= 4, moved  # >= 160 ms taken off in the pauses
    assert stats["need_excess_p99_ms"] is not None
    # nothing but silence was skipped: every input frame with sound in its window played, in order
    played = [t[1] for t in ticks if t[1] is not None]
    assert played == sorted(set(played))
    n_input = int(2 * len(audio) / rate * SAMPLE_RATE) // SAMPLES_PER_FRAME
    skipped = set(range(n_input)) - set(played)
    assert len(skipped) == sum(m for m in moved if m > 0)
    assert skipped and all(session._is_silent(k) for k in skipped)
    # the second word plays sooner after its audio than the first (ticks - input frame), and no
    # word is stretched or cut: one offset per word
    speech = [t for t in ticks if t[1] is not None and not session._is_silent(t[1])]
    half = n_input // 2
    offsets_first = {t[0] - t[1] for t in speech if t[1] < half}
    offsets_second = {t[0] - t[1] for t in speech if t[1] >= half}
    assert len(offsets_first) == 1 and len(offsets_second) == 1
    assert offsets_first.pop() - offsets_second.pop() >= 4
