"""RTMP push against a real nginx + libnginx-mod-rtmp that the test starts (tests/servers/).

The stream is pulled back with PyAV from nginx's recording of the publish: 25 fps, the whole
audio, and audio/video aligned like the MP4 render of the same speech. nginx is restarted in
the middle of a live session's push: the push comes back by itself, the session never slows.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import av
import numpy as np
import pytest
import soxr

from realtime_avatar.broadcast import BROADCASTER_KEY, BroadcastOptions
from realtime_avatar.offline_render import render_clip
from realtime_avatar.rtmp import RtmpError, RtmpPusher, check_rtmp_url, push_clip_realtime, read_clip
from realtime_avatar.server import create_app
from realtime_avatar.timing import FPS, SAMPLE_RATE
from tests.broadcast_servers import NginxRtmp, free_port
from tests.jack import jackd  # noqa: F401 - a fixture (the live --mic --rtmp test)
from tests.loopback_session import LoopbackSession
from tests.rtc_client import serving
from tests.speech import espeak_wav


def read_flv(path) -> tuple[list[float], list[np.ndarray], np.ndarray, float]:
    """(video frame times, grey frames, audio at 16 kHz mono, first audio time) of a recording."""
    with av.open(str(path)) as c:
        frames = [(f.time, f.to_ndarray(format="gray")) for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        chunks, t_audio = [], None
        for f in c.decode(audio=0):
            t_audio = f.time if t_audio is None else t_audio
            chunks.append(f.to_ndarray().mean(axis=0))
        rate = f.sample_rate
    audio = soxr.resample(np.concatenate(chunks).astype(np.float32), rate, SAMPLE_RATE)
    return [t for t, _ in frames], [g for _, g in frames], audio, t_audio


def test_rtmp_urls_are_checked_with_a_clear_message():
    assert check_rtmp_url("rtmp://127.0.0.1:1935/live/avatar")
    for bad, why in [("http://x/live/a", "not an RTMP URL"), ("rtmp://host", "needs a host"),
                     ("live/avatar", "not an RTMP URL")]:
        with pytest.raises(RtmpError, match=why):
            check_rtmp_url(bad)


@pytest.mark.slow
def test_render_rtmp_is_25_fps_whole_audio_and_in_sync_with_the_mp4(runtime, tmp_path):
    """`render --rtmp`: the MP4 render of a sentence pushed in real time; the recording nginx
    made of it has every frame at 25 fps, the whole audio, and an A/V offset within 40 ms of
    the MP4's (measured by matching frames and cross-correlating the audio)."""
    wav = espeak_wav("One two three, the avatar is live.", tmp_path / "speech.wav")
    mp4 = render_clip(runtime.renderer, runtime.clip_features, wav, tmp_path / "clip.mp4", progress=False).path
    frames, audio = read_clip(mp4)
    nginx = NginxRtmp(tmp_path / "nginx").start()
    try:
        pusher = RtmpPusher(nginx.url("clip"), frames[0].shape[1], frames[0].shape[0], name="clip")
        pusher.start()
        t0 = time.monotonic()
        asyncio.run(push_clip_realtime(pusher, frames, audio))
        took = time.monotonic() - t0
        pusher.close()
        time.sleep(0.5)  # nginx finishes the recording when the publisher leaves
    finally:
        nginx.stop()
    assert pusher.stats.video_dropped == 0 and pusher.stats.connects == 1
    assert took >= (len(frames) - 1) / FPS - 0.05, "not paced in real time"
    times, grey, flv_audio, _ = read_flv(nginx.records("clip")[-1])

    assert len(times) == len(frames)
    steps = np.diff(times)
    assert abs(np.median(steps) - 1 / FPS) < 0.002 and steps.max() < 0.06
    assert abs(len(flv_audio) / SAMPLE_RATE - len(audio) / SAMPLE_RATE) < 0.1

    # video offset: where the MP4's middle frames appear in the FLV (their pts)
    with av.open(str(mp4)) as c:
        mp4_grey = [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(video=0)]
    stack = np.stack([g.astype(np.float32) for g in grey])
    offsets = []
    for i in range(len(mp4_grey) // 3, 2 * len(mp4_grey) // 3):
        j = int(np.argmin(np.mean((stack - mp4_grey[i]) ** 2, axis=(1, 2))))
        offsets.append(times[j] - i / FPS)
    video_offset = float(np.median(offsets))
    # audio offset: cross-correlation of the recorded audio with the MP4's (both 16 kHz)
    ref = audio[: len(flv_audio)]
    corr = np.correlate(flv_audio[: len(ref)], ref[SAMPLE_RATE // 2 : -SAMPLE_RATE // 2], mode="valid")
    audio_offset = (int(np.argmax(corr)) - SAMPLE_RATE // 2) / SAMPLE_RATE
    print(f"{len(times)} frames, median step {1000 * np.median(steps):.1f} ms, audio {len(flv_audio) / SAMPLE_RATE:.3f} s "
          f"(clip {len(audio) / SAMPLE_RATE:.3f} s); video offset {1000 * video_offset:.1f} ms, audio offset "
          f"{1000 * audio_offset:.1f} ms: A/V {1000 * (video_offset - audio_offset):+.1f} ms vs the MP4")
    assert abs(video_offset - audio_offset) <= 0.040, (video_offset, audio_offset)


def test_push_survives_an_nginx_restart_and_never_slows_the_session(tmp_path, caplog):
    """A broadcast session pushes to nginx; nginx is stopped for 1.5 s and started again: the
    push reconnects within 5 s of nginx being back (a new recording with frames), one log line
    per state change, and the session keeps its 25 fps throughout."""
    caplog.set_level(logging.INFO, logger="realtime_avatar.rtmp")
    nginx = NginxRtmp(tmp_path / "nginx")

    async def factory():
        return LoopbackSession(size=128)

    async def scenario():
        nginx.start()
        app = create_app(factory, broadcast=BroadcastOptions(rtmp_url=nginx.url("{session}")))
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"name": "show", "outputs": ["rtmp"]}) as r:
                assert r.status == 201, await r.text()
            entry = app[BROADCASTER_KEY].sessions["show"]
            await asyncio.sleep(2.5)
            pusher = entry.runner.rtmp
            assert pusher.stats.state == "connected"
            await asyncio.to_thread(nginx.stop)
            await asyncio.sleep(1.5)
            fps_during_outage = entry.session.stats()["fps"]
            await asyncio.to_thread(nginx.start)
            back = time.monotonic()
            while not (pusher.stats.connects >= 2 and pusher.stats.state == "connected"):
                assert time.monotonic() - back < 5.0, f"push not back within 5 s: {pusher.stats.as_dict()}"
                await asyncio.sleep(0.05)
            resumed_after = time.monotonic() - back
            await asyncio.sleep(2.0)
            stats = pusher.stats.as_dict()
        return fps_during_outage, resumed_after, stats

    try:
        fps_during_outage, resumed_after, stats = asyncio.run(scenario())
    finally:
        nginx.stop()
    print(f"push back {resumed_after:.2f} s after nginx listens again; session fps during the outage "
          f"{fps_during_outage:.1f}; pusher {stats}")
    assert resumed_after < 5.0
    assert fps_during_outage >= 24.0
    records = nginx.records("show")
    assert len(records) >= 2
    with av.open(str(records[-1])) as c:
        assert sum(1 for _ in c.decode(video=0)) >= FPS  # the second publish carries video
    states = [r.getMessage() for r in caplog.records if r.name == "realtime_avatar.rtmp"]
    assert any("connected -> waiting" in s for s in states) and any("-> connected" in s for s in states)
    assert len(states) == len(set(states)) or all("->" in s for s in states)  # state changes only


def test_unreachable_rtmp_server_is_retried_without_stalling_the_session(tmp_path, caplog):
    """Nothing listens on the URL: the pusher logs the failure and retries with backoff, drops
    (and counts) frames, and the session and the server go on serving."""
    caplog.set_level(logging.INFO, logger="realtime_avatar.rtmp")
    port = free_port()

    async def factory():
        return LoopbackSession(size=64)

    async def scenario():
        app = create_app(factory, broadcast=BroadcastOptions(rtmp_url=f"rtmp://127.0.0.1:{port}/live/{{session}}"))
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"name": "x", "outputs": ["rtmp"]}) as r:
                assert r.status == 201
            await asyncio.sleep(3.0)
            entry = app[BROADCASTER_KEY].sessions["x"]
            async with http.get(f"{url}/health") as r:
                assert r.status == 200
            return entry.session.stats()["fps"], entry.runner.rtmp.stats.as_dict()

    fps, stats = asyncio.run(scenario())
    assert fps >= 24.0
    assert stats["connects"] == 0 and stats["failures"] >= 3
    assert stats["video_dropped"] > 0
    assert "Connection refused" in stats["last_error"] or "refused" in stats["last_error"].lower()
    assert any("reconnecting in" in r.getMessage() for r in caplog.records)


def test_serve_rtmp_sessions_all_pushes_each_webrtc_session_to_its_own_stream_key(tmp_path):
    """`serve --rtmp rtmp://.../live/{session} --rtmp-sessions all`: a WebRTC peer's session is
    pushed too, under its session id, and the push ends when the peer leaves."""
    from tests.rtc_client import RtcClient, WavMicrophoneTrack, http_client

    nginx = NginxRtmp(tmp_path / "nginx").start()
    wav = tmp_path / "silence.wav"
    import wave

    with wave.open(str(wav), "w") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
        w.writeframes(b"\x00\x00" * 16_000)

    async def factory():
        return LoopbackSession(size=64)

    async def scenario():
        app = create_app(factory, broadcast=BroadcastOptions(rtmp_url=nginx.url("{session}"), rtmp_sessions="all"))
        async with serving(app) as url, http_client() as http:
            client = RtcClient(url, WavMicrophoneTrack(wav, lead_s=5.0))
            await client.connect(http)
            await asyncio.sleep(3.0)
            runner = app[BROADCASTER_KEY].peer_outputs[client.session_id]
            stats = runner.stats()["rtmp"]
            await client.close(http)
            await asyncio.sleep(1.0)
            return client.session_id, stats, dict(app[BROADCASTER_KEY].peer_outputs)

    try:
        session_id, stats, left = asyncio.run(scenario())
    finally:
        nginx.stop()
    assert stats["connects"] == 1 and stats["video_sent"] >= 2 * FPS
    assert session_id not in left
    with av.open(str(nginx.records(session_id)[-1])) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 2 * FPS


def test_cli_refuses_bad_broadcast_urls_with_one_line_and_exit_code_2(capsys):
    from realtime_avatar.cli import build_parser, main

    for argv, expected in [
        (["serve", "--rtmp", "http://example.com/live/a"], "is not an RTMP URL"),
        (["serve", "--rtmp", "rtmp://h/live/a", "--rtmp-sessions", "all"], "needs {session}"),
        (["serve", "--janus", "ws://127.0.0.1:8188"], "Janus HTTP API URL"),
        (["render", "--rtmp", "live/a"], "is not an RTMP URL"),
        (["live", "--rtmp", "rtmp://"], "needs a host"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    serve_help = build_parser().parse_args(["serve"])
    assert serve_help.rtmp is None and serve_help.room == 1234 and serve_help.rtmp_sessions == "broadcast"


@pytest.mark.jack
def test_live_mic_rtmp_pushes_the_microphone_avatar(jackd, runtime, tmp_path):  # noqa: F811 - jackd is a fixture
    """`live --mic --rtmp URL`: speech into a real PortAudio device (a JACK dummy card) comes out
    of nginx's recording of the push, with the avatar's video at 25 fps."""
    from realtime_avatar.cli import run_live
    from realtime_avatar.session import SessionConfig
    from tests.jack import SpeechIntoMicrophone, jack_device_index, reinitialize_portaudio
    from tests.speech import read_wav

    reinitialize_portaudio()
    device = jack_device_index()
    speech, rate = read_wav(espeak_wav("Hello, the microphone is on the air.", tmp_path / "s.wav", rate=jackd.rate))
    nginx = NginxRtmp(tmp_path / "nginx").start()
    config = SessionConfig(streaming=runtime.streaming, batch_size=4)

    async def scenario(player):
        live = asyncio.create_task(run_live(runtime, config, device, seconds=player.seconds + 1.5,
                                            report_every=0.2, rtmp=nginx.url("mic")))
        await asyncio.sleep(0.5)
        player.route()
        return await live

    try:
        with SpeechIntoMicrophone(jackd, device, speech) as player:
            stats = asyncio.run(scenario(player))
        time.sleep(0.5)
    finally:
        nginx.stop()
    assert stats["rtmp"]["connects"] == 1 and stats["rtmp"]["video_sent"] >= 0.8 * stats["frames_sent"]
    times, _, audio, _ = read_flv(nginx.records("mic")[-1])
    assert abs(np.median(np.diff(times)) - 1 / FPS) < 0.002
    assert np.abs(audio).max() > 0.1  # the speech is on the stream
