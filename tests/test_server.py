"""The WebRTC server with real peers on 127.0.0.1: aiortc clients speaking espeak-ng WAVs.

Plumbing tests use tests.loopback_session (a small real session: echo audio, level-driven
video). Every test runs its own event loop and server on a free port.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from realtime_avatar.server import (
    SERVER_KEY,
    AudioInStats,
    MetricsSnapshot,
    OfferError,
    bearer_token,
    check_offer_sdp,
    create_app,
    render_metrics,
)
from realtime_avatar.timing import FPS
from tests.loopback_session import LoopbackSession, loopback_factory
from tests.rtc_client import RtcClient, WavMicrophoneTrack, read_wav, serving, voiced_span
from tests.speech import espeak_wav

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "Hello there. This is a short test of the talking avatar."


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    return espeak_wav(SENTENCE, tmp_path_factory.mktemp("speech") / "speech16k.wav", rate=16_000)


async def offer_sdp(*, audio: str | None = "sendrecv", video: str | None = "recvonly") -> str:
    """A real aiortc offer with the given transceiver directions (None: no such m-line)."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        if audio:
            pc.addTransceiver("audio", direction=audio)
        if video:
            pc.addTransceiver("video", direction=video)
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


async def wait_for(predicate, timeout: float, step: float = 0.05) -> float:
    """Poll until predicate() is true; return the seconds it took. Fails the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- pure functions ---------------------------------------------------------------------------


def test_check_offer_sdp_accepts_a_real_offer_and_names_what_is_wrong():
    good = asyncio.run(offer_sdp())
    assert [m.kind for m in check_offer_sdp(good).media] == ["audio", "video"]
    check_offer_sdp(asyncio.run(offer_sdp(video=None)))  # video is optional

    for bad, words in [
        ("", "empty"),
        ("hello", "v=0"),
        (asyncio.run(offer_sdp(audio=None)), "no audio"),
        (asyncio.run(offer_sdp(audio="recvonly")), "recvonly"),
        ("v=0\r\n" + "a=x\r\n" * 20000, "not an offer"),
    ]:
        with pytest.raises(OfferError) as error:
            check_offer_sdp(bad)
        assert error.value.status == 400
        assert words in error.value.message


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_render_metrics_is_prometheus_text_and_counters_include_closed_sessions():
    text = render_metrics(
        MetricsSnapshot(
            sessions_active=2,
            sessions_total=7,
            sessions_rejected={"capacity": 3, "unauthorized": 1},
            frames_sent_closed=1000,
            late_frames_closed=4,
            per_session={
                "a": {"fps": 25.0, "frames_sent": 50, "late_frames": 1, "latency_ms": 180.5, "av_offset_ms": 3.0},
                "b": {"fps": np.float32(24.5), "frames_sent": np.int64(10), "late_frames": 0},
            },
        )
    )
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) realtime_avatar_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples["realtime_avatar_sessions_active"] == 2
    assert samples["realtime_avatar_sessions_total"] == 7
    assert samples['realtime_avatar_sessions_rejected_total{reason="capacity"}'] == 3
    assert samples["realtime_avatar_frames_sent_total"] == 1060
    assert samples["realtime_avatar_late_frames_total"] == 5
    assert samples['realtime_avatar_fps{session="b"}'] == pytest.approx(24.5)
    assert samples['realtime_avatar_latency_ms{session="a"}'] == pytest.approx(180.5)
    assert samples['realtime_avatar_latency_ms{session="b"}'] == 0  # missing stat reads 0
    assert "# TYPE realtime_avatar_frames_sent_total counter" in text


def test_audio_in_stats_reads_levels_of_packed_stereo_s16(speech_wav):
    samples, rate = read_wav(speech_wav)
    pcm = (samples * 32767).astype(np.int16)
    stereo = np.repeat(pcm[: rate // 50], 2)[None, :]  # 20 ms, packed L R L R
    frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
    frame.sample_rate = rate
    stats = AudioInStats()
    stats.update(frame)
    stats.update(frame)
    assert stats.frames == 2 and stats.samples == 2 * (rate // 50)
    assert stats.seconds == pytest.approx(0.04)
    assert stats.peak == pytest.approx(np.abs(pcm[: rate // 50]).max() / 32768, rel=1e-4)


# --- real peers -------------------------------------------------------------------------------


def test_speech_round_trip_video_rate_and_complete_audio(speech_wav):
    """A client speaks a sentence; video comes back at >= 24 fps for ~10 s and the echoed
    speech comes back whole (same voiced duration)."""
    run_s = 10.0

    async def scenario():
        app = create_app(loopback_factory)
        async with serving(app) as url, aiohttp.ClientSession() as http:
            mic = WavMicrophoneTrack(speech_wav, lead_s=1.0)
            client = RtcClient(url, mic)
            t0 = time.monotonic()
            await client.connect(http)
            answered = time.monotonic() - t0
            await asyncio.wait_for(client.first_video.wait(), 5)
            first_frame = time.monotonic() - t0
            await asyncio.sleep(run_s)
            async with http.get(f"{url}/sessions/{client.session_id}/stats") as response:
                stats = await response.json()
            async with http.get(f"{url}/metrics") as response:
                metrics = await response.text()
            await client.close(http)
            assert not app[SERVER_KEY].peers
            return client, mic, stats, metrics, answered, first_frame

    client, mic, stats, metrics, answered, first_frame = asyncio.run(scenario())
    rec = client.recording

    # the answer carries a loopback host candidate (a loopback-only host needs it)
    assert re.search(r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 \d+ typ host", client.answer_sdp)

    arrivals = rec.video_arrivals
    steady = (arrivals[0] + 1.0, arrivals[-1])  # skip the first second (encoder warm-up)
    fps = rec.fps(*steady)
    print(f"answer {answered * 1000:.0f} ms, first frame {first_frame * 1000:.0f} ms, "
          f"{len(arrivals)} frames, steady fps {fps:.2f}, server {stats['session']}")
    assert fps >= FPS - 1
    assert len(arrivals) >= (run_s - 0.5) * (FPS - 1)
    assert rec.video_size == (256, 256)
    pts_steps = np.diff(rec.video_pts)
    assert np.median(pts_steps) == 90_000 // FPS  # 40 ms in the 90 kHz clock

    assert stats["audio_in"]["sample_rate"] == 48_000  # Opus
    assert stats["audio_in"]["peak"] > 0.1  # the server heard the speech, not silence
    assert stats["connection_state"] == "connected"
    assert "realtime_avatar_frames_sent_total" in metrics

    sent, sent_rate = read_wav(speech_wav)
    sent_start, sent_end = voiced_span(sent, sent_rate)
    received = rec.audio
    assert rec.audio_rate == 48_000
    got_start, got_end = voiced_span(received, rec.audio_rate)
    print(f"voiced: sent {sent_end - sent_start:.3f} s, received {got_end - got_start:.3f} s; "
          f"received {len(received) / rec.audio_rate:.2f} s of audio in total")
    assert abs((got_end - got_start) - (sent_end - sent_start)) < 0.1
    # audio flowed continuously: the total received is about the time connected
    assert len(received) / rec.audio_rate > run_s * 0.9


def test_fifty_connect_disconnect_cycles_leave_nothing_behind(speech_wav):
    """Half the clients hang up with DELETE, half by just closing their peer connection."""
    cycles = 50

    async def scenario():
        app = create_app(loopback_factory)
        server = app[SERVER_KEY]
        sessions: list[LoopbackSession] = []

        async def factory():
            sessions.append(LoopbackSession(size=64))
            return sessions[-1]

        server.session_factory = factory
        async with serving(app) as url, aiohttp.ClientSession() as http:

            async def cycle(i: int) -> None:
                client = RtcClient(url, WavMicrophoneTrack(speech_wav))
                await client.connect(http)
                await asyncio.wait_for(client.first_video.wait(), 5)
                await client.close(http if i % 2 == 0 else None)
                await wait_for(lambda: not server.peers, timeout=5)

            for i in range(3):  # warm up: imports, codec tables, first allocations
                await cycle(i)
            gc.collect()
            tasks_before = len(asyncio.all_tasks())
            rss_before = rss_bytes()
            t0 = time.monotonic()
            for i in range(cycles):
                await cycle(i)
            elapsed = time.monotonic() - t0
            await asyncio.sleep(0.2)
            gc.collect()
            tasks_after = len(asyncio.all_tasks())
            rss_after = rss_bytes()
            return server, sessions, tasks_before, tasks_after, rss_before, rss_after, elapsed

    server, sessions, tasks_before, tasks_after, rss_before, rss_after, elapsed = asyncio.run(scenario())
    growth_mb = (rss_after - rss_before) / 2**20
    print(f"{cycles} cycles in {elapsed:.1f} s; tasks {tasks_before} -> {tasks_after}; "
          f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB (+{growth_mb:.1f})")
    assert server.peers == {}
    assert server.sessions_total == cycles + 3
    assert all(s.closed for s in sessions)
    assert tasks_after <= tasks_before
    assert growth_mb < 20


def test_malformed_and_audioless_offers_get_400_and_the_server_keeps_serving(speech_wav):
    async def scenario():
        app = create_app(loopback_factory)
        good = await offer_sdp()
        truncated = good[: good.index("a=ice-ufrag")]  # parses, but has no ICE credentials
        cases = [
            ("json", {"sdp": "this is not sdp", "type": "offer"}, "malformed"),
            ("json", {"sdp": truncated, "type": "offer"}, "ICE"),
            ("json", {"sdp": good, "type": "answer"}, "type"),
            ("json", {"sdp": await offer_sdp(audio=None), "type": "offer"}, "no audio"),
            ("raw", b"\xff\xfe{not json", "JSON"),
            ("whip", truncated, "ICE"),
            ("whip", await offer_sdp(audio=None), "no audio"),
        ]
        async with serving(app) as url, aiohttp.ClientSession() as http:
            for kind, body, words in cases:
                if kind == "json":
                    request = http.post(f"{url}/offer", json=body)
                elif kind == "raw":
                    request = http.post(f"{url}/offer", data=body, headers={"Content-Type": "application/json"})
                else:
                    request = http.post(f"{url}/whip", data=body, headers={"Content-Type": "application/sdp"})
                async with request as response:
                    assert response.status == 400, (kind, words, await response.text())
                    assert words in (await response.json())["error"]
            assert app[SERVER_KEY].peers == {}
            assert app[SERVER_KEY].rejected["bad_offer"] == len(cases)

            client = RtcClient(url, WavMicrophoneTrack(speech_wav))
            await client.connect(http)
            await asyncio.wait_for(client.first_video.wait(), 5)
            await client.close(http)

    asyncio.run(scenario())


def test_whip_create_delete_and_errors(speech_wav):
    async def scenario():
        app = create_app(loopback_factory)
        server = app[SERVER_KEY]
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/whip", data=await offer_sdp(),
                                 headers={"Content-Type": "text/plain"}) as response:
                assert response.status == 415
                assert "application/sdp" in (await response.json())["error"]

            client = RtcClient(url, WavMicrophoneTrack(speech_wav), whip=True)
            await client.connect(http)  # raises unless 201
            assert client.resource_url.startswith(f"{url}/whip/")
            assert client.answer_sdp.startswith("v=0")
            await asyncio.wait_for(client.first_video.wait(), 5)
            assert list(server.peers) == [client.session_id]

            async with http.delete(client.resource_url) as response:
                assert response.status == 200
            assert server.peers == {}
            async with http.delete(client.resource_url) as response:
                assert response.status == 404
            async with http.delete(f"{url}/whip/0123456789abcdef") as response:
                assert response.status == 404
                assert "no session" in (await response.json())["error"]
            async with http.patch(f"{url}/whip/{client.session_id}") as response:
                assert response.status == 405  # no trickle ICE (RFC 9725 allows refusing it)
            await client.close()

    asyncio.run(scenario())


def test_client_that_vanishes_is_torn_down_within_seconds(speech_wav):
    """A client process killed with SIGKILL sends no BYE and no DTLS close: the server notices
    that the audio stopped and tears the session down well before aioice's 30 s consent check."""
    media_timeout = 2.0
    sessions: list[LoopbackSession] = []

    async def factory():
        sessions.append(LoopbackSession(size=64))
        return sessions[-1]

    async def scenario():
        app = create_app(factory, media_timeout_s=media_timeout)
        server = app[SERVER_KEY]
        async with serving(app) as url:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.rtc_client", url, str(speech_wav),
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                session_id = line.decode().strip()
                assert session_id in server.peers, (line, await proc.stderr.read())
                await wait_for(lambda: server.peers[session_id].audio_in.frames > 25, timeout=5)
            finally:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            killed = time.monotonic()
            took = await wait_for(lambda: not server.peers, timeout=media_timeout + 4)
            return took, time.monotonic() - killed

    took, _ = asyncio.run(scenario())
    print(f"vanished client torn down {took:.2f} s after SIGKILL (media timeout {media_timeout} s)")
    assert took < media_timeout + 3
    assert sessions and sessions[0].closed


@pytest.mark.parametrize(
    "wav_rate, codec, server_rate",
    [(8_000, None, 48_000), (44_100, None, 48_000), (16_000, "audio/PCMU", 8_000)],
    ids=["8kHz-wav-opus", "44.1kHz-wav-opus", "PCMU-8kHz-frames"],
)
def test_unusual_input_rates_arrive_whole(tmp_path, wav_rate, codec, server_rate):
    """WAVs at 8 and 44.1 kHz, and a client that forces PCMU so the server's frames are
    8 kHz mono instead of Opus' 48 kHz stereo: the speech still comes back whole."""
    wav = espeak_wav("Testing one two three.", tmp_path / f"speech{wav_rate}.wav", rate=wav_rate)

    async def scenario():
        app = create_app(loopback_factory)
        async with serving(app) as url, aiohttp.ClientSession() as http:
            mic = WavMicrophoneTrack(wav, lead_s=0.5)
            client = RtcClient(url, mic, audio_codec=codec)
            await client.connect(http)
            await asyncio.wait_for(client.first_video.wait(), 5)
            await asyncio.sleep(mic.speech_seconds + 1.5)
            stats = app[SERVER_KEY].peers[client.session_id].stats()
            await client.close(http)
            return client.recording, stats

    rec, stats = asyncio.run(scenario())
    assert stats["audio_in"]["sample_rate"] == server_rate
    assert stats["audio_in"]["peak"] > 0.1
    sent, rate = read_wav(wav)
    assert rate == wav_rate
    sent_start, sent_end = voiced_span(sent, rate)
    got_start, got_end = voiced_span(rec.audio, rec.audio_rate)
    print(f"{wav_rate} Hz via {codec or 'opus'}: voiced sent {sent_end - sent_start:.3f} s, "
          f"received {got_end - got_start:.3f} s")
    assert abs((got_end - got_start) - (sent_end - sent_start)) < 0.1


def test_503_at_capacity_and_the_slot_comes_back(speech_wav):
    async def scenario():
        app = create_app(loopback_factory, max_sessions=1)
        async with serving(app) as url, aiohttp.ClientSession() as http:
            first = RtcClient(url, WavMicrophoneTrack(speech_wav))
            await first.connect(http)
            async with http.post(f"{url}/offer", json={"sdp": await offer_sdp(), "type": "offer"}) as response:
                assert response.status == 503
                assert "capacity" in (await response.json())["error"]
            async with http.get(f"{url}/health") as response:
                assert await response.json() == {"ok": True, "sessions": 1, "max_sessions": 1}
            await first.close(http)
            second = RtcClient(url, WavMicrophoneTrack(speech_wav))
            await second.connect(http)
            await asyncio.wait_for(second.first_video.wait(), 5)
            await second.close(http)
            assert app[SERVER_KEY].rejected == {"capacity": 1}

    asyncio.run(scenario())


def test_bearer_token_guards_signalling_stats_and_metrics(speech_wav):
    async def scenario():
        app = create_app(loopback_factory, token="s3cret")
        async with serving(app) as url, aiohttp.ClientSession() as http:
            offer = {"sdp": await offer_sdp(), "type": "offer"}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                async with http.post(f"{url}/offer", json=offer, headers=headers) as response:
                    assert response.status == 401
                    assert "token" in (await response.json())["error"]
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.get(f"{url}/metrics") as response:
                assert response.status == 401
            async with http.get(f"{url}/health") as response:
                assert response.status == 200  # health checks need no token
            async with http.get(f"{url}/") as response:
                assert response.status == 200  # nor does the page (it reads ?token=)

            client = RtcClient(url, WavMicrophoneTrack(speech_wav), token="s3cret", whip=True)
            await client.connect(http)
            async with http.get(f"{url}/sessions/{client.session_id}/stats") as response:
                assert response.status == 401
            async with http.get(f"{url}/sessions/{client.session_id}/stats",
                                headers={"Authorization": "Bearer s3cret"}) as response:
                assert response.status == 200
            async with http.delete(client.resource_url) as response:
                assert response.status == 401  # a stranger cannot hang up someone else's call
            await client.close(http)  # with the token
            assert app[SERVER_KEY].peers == {}

    asyncio.run(scenario())


def test_shutdown_closes_every_session(speech_wav):
    sessions: list[LoopbackSession] = []

    async def factory():
        sessions.append(LoopbackSession(size=64))
        return sessions[-1]

    async def scenario():
        app = create_app(factory)
        clients = []
        async with serving(app) as url, aiohttp.ClientSession() as http:
            for _ in range(2):
                clients.append(RtcClient(url, WavMicrophoneTrack(speech_wav)))
                await clients[-1].connect(http)
            await asyncio.gather(*(asyncio.wait_for(c.first_video.wait(), 5) for c in clients))
            assert len(app[SERVER_KEY].peers) == 2
        # leaving `serving` ran the app's shutdown
        assert app[SERVER_KEY].peers == {}
        assert len(sessions) == 2 and all(s.closed for s in sessions)
        for client in clients:
            await client.close()

    asyncio.run(scenario())


def test_factory_failure_is_a_500_that_says_why():
    async def broken_factory():
        raise RuntimeError("avatar cache /nowhere/avatar not found")

    async def scenario():
        app = create_app(broken_factory)
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/offer", json={"sdp": await offer_sdp(), "type": "offer"}) as response:
                assert response.status == 500
                assert "/nowhere/avatar" in (await response.json())["error"]
            assert app[SERVER_KEY].peers == {} and app[SERVER_KEY]._negotiating == 0

    asyncio.run(scenario())


def test_page_and_static_files_are_served():
    async def scenario():
        app = create_app(loopback_factory)
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.get(f"{url}/") as response:
                assert response.status == 200
                page = await response.text()
            assert "<video" in page and "web/app.js" in page
            async with http.get(f"{url}/web/app.js") as response:
                assert response.status == 200
                script = await response.text()
            assert "getUserMedia" in script and "echoCancellation: false" in script
            async with http.get(f"{url}/web/../server.py") as response:
                assert response.status in (403, 404)  # no escaping the web folder

    asyncio.run(scenario())
