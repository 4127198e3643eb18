"""The audio-push API (voice agents): real server, real AvatarSession, real WebSocket client.

What goes in must come out: tones pushed at 8/16/24/48 kHz in chunks of 10 ms to 1 s come back
on the session's own audio output for as long as they lasted, and `playback_finished` reports
that position; `clear_buffer` at random moments never hangs and always ends the segment.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from realtime_avatar.audio_push import AudioPushError, PcmDecoder, check_format
from realtime_avatar.broadcast import BROADCASTER_KEY, BroadcastOptions
from realtime_avatar.fanout import outputs_of
from realtime_avatar.server import create_app
from realtime_avatar.session import AvatarSession, SessionConfig
from realtime_avatar.timing import SAMPLE_RATE
from tests.rtc_client import block_rms, serving

TONE_HZ = 330.0


def tone(seconds: float, rate: int, amplitude: float = 0.4) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * 32767 * np.sin(2 * np.pi * TONE_HZ * t)).astype("<i2")


# --- pure parts ---------------------------------------------------------------------------------


def test_pcm_decoder_joins_samples_split_between_chunks_and_reports_a_truncated_tail():
    pcm = tone(0.5, 24_000).tobytes()
    whole = PcmDecoder(24_000)
    expected = np.concatenate([whole.decode(pcm), whole.end()[0]])
    split = PcmDecoder(24_000)
    cuts = [0, 1, 3, 1000, 1001, 7777, len(pcm)]  # odd cuts: samples straddle chunks
    parts = [split.decode(pcm[a:b]) for a, b in zip(cuts, cuts[1:])]
    tail, leftover = split.end()
    assert leftover == 0
    np.testing.assert_allclose(np.concatenate(parts + [tail]), expected, atol=1e-6)
    assert abs(len(expected) - 0.5 * SAMPLE_RATE) <= 1
    odd = PcmDecoder(16_000)
    odd.decode(pcm[:101])
    assert odd.end()[1] == 1


@pytest.mark.parametrize("rate", [0, 1_000_000, -16000, 16000.5, "16000", None, True])
def test_sample_rates_out_of_range_are_refused_with_the_range(rate):
    with pytest.raises(AudioPushError, match="sample_rate"):
        check_format(rate)
    assert check_format(8000) == (8000, 1) and check_format(48_000.0, 2) == (48_000, 2)


# --- through the server ------------------------------------------------------------------------


def _factory(runtime):
    async def factory():
        # a generous render budget: the 2 cores are shared with other work during test runs
        return AvatarSession(runtime.encoder, runtime.renderer,
                             SessionConfig(streaming=runtime.streaming, render_budget_s=1.0, batch_size=8))
    return factory


class OutputTap:
    """The session's own audio output (a relay proxy, as a viewer gets), at 16 kHz."""

    def __init__(self, session):
        self.track = outputs_of(session).audio()
        self.samples: list[np.ndarray] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self):
        while True:
            frame = await self.track.recv()
            self.samples.append(frame.to_ndarray()[0].astype(np.float32) / 32768.0)

    def loud_seconds(self, since: int) -> float:
        """Seconds of 10 ms blocks carrying the tone, from chunk index `since` on."""
        audio = np.concatenate(self.samples[since:])
        return float(np.sum(block_rms(audio, SAMPLE_RATE) > 0.1)) / 100

    async def close(self):
        self.task.cancel()
        self.track.stop()


async def _events_until(ws, kind: str, timeout: float) -> list[dict]:
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, f"socket ended: {msg}"
            event = json.loads(msg.data)
            seen.append(event)
            if event["type"] == kind:
                return seen


def test_pushed_audio_at_any_rate_and_chunking_plays_for_its_duration(runtime):
    """Each segment: 0.8 s of tone at the declared rate, chunked as given, then flush; the
    session's output carries 0.8 s of tone and playback_finished says 0.8 s, not interrupted."""
    cases = [(8_000, 0.01), (16_000, 1.0), (24_000, 0.05), (48_000, 0.3), (44_100, 0.013)]
    seconds = 0.8

    async def scenario():
        app = create_app(_factory(runtime), broadcast=BroadcastOptions())
        results = []
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"avatar": None, "outputs": ["whep"]}) as r:
                assert r.status == 201, await r.text()
                created = await r.json()
            session = app[BROADCASTER_KEY].sessions[created["id"]].session
            tap = OutputTap(session)
            async with http.ws_connect(f"{url}{created['audio']}") as ws:
                for rate, chunk_s in cases:
                    await ws.send_str(json.dumps({"type": "start", "sample_rate": rate, "channels": 1}))
                    mark = len(tap.samples)
                    pcm = tone(seconds, rate).tobytes()
                    step = 2 * max(1, int(chunk_s * rate))
                    for i in range(0, len(pcm), step):
                        await ws.send_bytes(pcm[i : i + step])
                    await ws.send_str(json.dumps({"type": "flush"}))
                    events = await _events_until(ws, "playback_finished", 10)
                    await asyncio.sleep(0.3)  # the tap is a few ticks behind the clock
                    results.append((rate, chunk_s, [e["type"] for e in events], events[-1], tap.loud_seconds(mark)))
            await tap.close()
        return results

    for rate, chunk_s, kinds, finished, loud in asyncio.run(scenario()):
        assert kinds == ["playback_started", "playback_finished"], (rate, kinds)
        assert finished["interrupted"] is False
        assert abs(finished["playback_position"] - seconds) <= 0.045, (rate, chunk_s, finished)
        assert abs(loud - seconds) <= 0.04, f"{rate} Hz in {chunk_s} s chunks: {loud} s of tone came out"


@pytest.mark.slow
def test_clear_buffer_at_random_points_always_ends_in_playback_finished(runtime):
    """14 interruptions at random moments (before, during, after playback starts): each ends
    in playback_finished within a second, interrupted and with a position no longer than what
    was pushed; from the very next tick of the session's clock no input frame plays (queued
    audio, features and frames are gone within one frame), and the output stays silent."""
    rng = random.Random(12)

    async def scenario():
        app = create_app(_factory(runtime), broadcast=BroadcastOptions())
        outcomes = []
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"outputs": ["whep"]}) as r:
                created = await r.json()
            entry = app[BROADCASTER_KEY].sessions[created["id"]]
            session = entry.session
            playout = entry.playout
            ticks: list[tuple[int, int | None]] = []  # (tick, input frame played) from the clock
            hooked = session.on_tick

            def on_tick(n, frame, image, audio):
                ticks.append((n, frame))
                hooked(n, frame, image, audio)

            session.on_tick = on_tick
            cleared_at: list[int] = []  # the tick count when clear_buffer reached the session
            clear = playout.clear_buffer

            def clear_and_mark():
                cleared_at.append(session.ticks)
                clear()

            playout.clear_buffer = clear_and_mark
            tap = OutputTap(session)
            async with http.ws_connect(f"{url}{created['audio']}?sample_rate=24000") as ws:
                for _ in range(14):
                    await ws.send_bytes(tone(1.5, 24_000).tobytes())
                    await ws.send_str(json.dumps({"type": "flush"}))
                    await asyncio.sleep(rng.uniform(0.0, 1.2))
                    await ws.send_str(json.dumps({"type": "clear_buffer"}))
                    events = await _events_until(ws, "playback_finished", 1.0)
                    await asyncio.sleep(0.2)
                    mark = len(tap.samples)
                    await asyncio.sleep(0.4)
                    after = [frame for n, frame in ticks if n >= cleared_at[-1]]
                    outcomes.append((events[-1], tap.loud_seconds(mark), after))
            stats = session.stats()
            await tap.close()
        return outcomes, stats

    outcomes, stats = asyncio.run(scenario())
    assert len(outcomes) == 14
    for finished, loud_after, frames_after in outcomes:
        assert finished["interrupted"] is True
        assert 0.0 <= finished["playback_position"] <= 1.5
        assert len(frames_after) >= 10 and all(f is None for f in frames_after), \
            "an input frame queued before clear_buffer played after it"
        assert loud_after == 0.0, "audio queued before clear_buffer still played"
    assert stats["fps"] > 20


def test_bad_input_gets_a_clear_error_and_the_session_keeps_serving(runtime):
    """Sample rates 0 and 1,000,000, garbage text, PCM before its format, an unknown control
    message and truncated PCM (an odd byte count) each get one error naming the problem; a
    good utterance on the same socket afterwards still plays to the end."""

    async def scenario():
        app = create_app(_factory(runtime), broadcast=BroadcastOptions())
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"outputs": ["whep"]}) as r:
                created = await r.json()
            async with http.post(f"{url}/sessions", data=b"{not json") as r:
                bad_create = (r.status, (await r.json())["error"])
            async with http.post(f"{url}/sessions", json={"outputs": ["rtmp"]}) as r:
                no_rtmp = (r.status, (await r.json())["error"])
            refused = []
            for rate in (0, 1_000_000):
                async with http.ws_connect(f"{url}{created['audio']}?sample_rate={rate}") as ws:
                    msg = await ws.receive()
                    refused.append(json.loads(msg.data)["message"])
                    assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            errors = []
            async with http.ws_connect(f"{url}{created['audio']}") as ws:
                await ws.send_bytes(b"\x00\x01" * 100)  # PCM before its format
                await ws.send_str("hello")  # not JSON
                await ws.send_str(json.dumps({"type": "dance"}))
                await ws.send_str(json.dumps({"type": "start", "sample_rate": 0}))
                await ws.send_str(json.dumps({"type": "start", "sample_rate": 1_000_000}))
                await ws.send_str("x" * 10_000)
                for _ in range(6):
                    errors.append(json.loads((await ws.receive()).data))
                await ws.send_str(json.dumps({"type": "start", "sample_rate": 16_000}))
                await ws.send_bytes(tone(0.4, 16_000).tobytes() + b"\x07")  # one byte too many
                await ws.send_str(json.dumps({"type": "flush"}))
                truncated = await _events_until(ws, "playback_finished", 10)
                await ws.send_bytes(tone(0.6, 16_000).tobytes())
                await ws.send_str(json.dumps({"type": "flush"}))
                good = await _events_until(ws, "playback_finished", 10)
                # the HTTP interrupt route is a clear_buffer too
                await ws.send_bytes(tone(1.5, 16_000).tobytes())
                await ws.send_str(json.dumps({"type": "flush"}))
                await asyncio.sleep(0.5)
                async with http.post(f"{url}/sessions/{created['id']}/interrupt") as r:
                    assert r.status == 204
                interrupted = (await _events_until(ws, "playback_finished", 2))[-1]
            async with http.get(f"{url}/health") as r:
                healthy = r.status
            async with http.get(f"{url}/sessions/nobody/audio") as r:
                unknown = r.status
        return bad_create, no_rtmp, refused, errors, truncated, good, interrupted, healthy, unknown

    bad_create, no_rtmp, refused, errors, truncated, good, interrupted, healthy, unknown = asyncio.run(scenario())
    assert interrupted["interrupted"] is True and interrupted["playback_position"] < 1.5
    assert bad_create[0] == 400 and "JSON" in bad_create[1]
    assert no_rtmp[0] == 400 and "--rtmp" in no_rtmp[1]
    assert "0 Hz is outside" in refused[0] and "1000000 Hz is outside" in refused[1]
    assert [e["type"] for e in errors] == ["error"] * 6
    text = " | ".join(e["message"] for e in errors)
    for expected in ("before its format", "control messages are JSON", "unknown control message type 'dance'",
                     "0 Hz is outside", "1000000 Hz is outside", "10000 characters"):
        assert expected in text, (expected, text)
    kinds = [e["type"] for e in truncated]
    assert kinds[0] == "error" and "truncated PCM: 1 byte" in truncated[0]["message"]
    assert kinds[-2:] == ["playback_started", "playback_finished"]
    assert abs(truncated[-1]["playback_position"] - 0.4) <= 0.045
    assert [e["type"] for e in good] == ["playback_started", "playback_finished"]
    assert abs(good[-1]["playback_position"] - 0.6) <= 0.045
    assert healthy == 200 and unknown == 404


def test_audio_push_over_the_peers_data_channel(runtime):
    """A WebRTC peer opens a data channel labelled "audio": the same protocol drives its own
    session (its microphone, silence here, is ignored meanwhile) and the events come back on it."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from tests.rtc_client import WavMicrophoneTrack

    async def scenario(tmp_wav):
        app = create_app(_factory(runtime), broadcast=BroadcastOptions())
        async with serving(app) as url, aiohttp.ClientSession() as http:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTrack(WavMicrophoneTrack(tmp_wav, lead_s=30.0))  # a microphone hearing silence
            pc.addTransceiver("video", direction="recvonly")
            channel = pc.createDataChannel("audio")
            events: asyncio.Queue = asyncio.Queue()
            opened = asyncio.Event()
            channel.on("open", opened.set)
            channel.on("message", lambda m: events.put_nowait(json.loads(m)))
            pc.on("track", lambda t: asyncio.ensure_future(_drain(t)))
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                answer = await r.json()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            await asyncio.wait_for(opened.wait(), 10)
            channel.send(json.dumps({"type": "start", "sample_rate": 48_000}))
            pcm = tone(0.8, 48_000).tobytes()
            for i in range(0, len(pcm), 9600):
                channel.send(pcm[i : i + 9600])
            channel.send(json.dumps({"type": "flush"}))
            seen = []
            async with asyncio.timeout(15):
                while not seen or seen[-1]["type"] != "playback_finished":
                    seen.append(await events.get())
            await pc.close()
        return seen

    async def _drain(track):
        try:
            while True:
                await track.recv()
        except Exception:
            pass

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "silence.wav"
        with wave.open(str(wav), "w") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
            w.writeframes(b"\x00\x00" * 1600)
        seen = asyncio.run(scenario(wav))
    assert [e["type"] for e in seen] == ["playback_started", "playback_finished"]
    assert abs(seen[-1]["playback_position"] - 0.8) <= 0.045 and seen[-1]["interrupted"] is False


def test_pushed_audio_is_fed_ahead_by_less_than_the_session_drops():
    # Frames fed LEAD_S early play LEAD_S + delay after they arrive; the scheduler drops frames
    # that would play more than delay + max_backlog_s after arrival, so the lead (plus one pacer
    # step of jitter) must stay below it or pushed speech would be cut.
    from realtime_avatar.audio_push import CHUNK_S, LEAD_S
    from realtime_avatar.session import SessionConfig

    assert 0 < LEAD_S + CHUNK_S < SessionConfig.max_backlog_s
