"""The audio-push API (voice agents): real server, real AvatarSession, real WebSocket client.

What goes in must come out: tones pushed at 8/16/24/48 kHz in chunks of 10 ms to 1 s come back
on the session's own audio output for as long as they lasted, and `playback_finished` reports
that position; `clear_buffer` at random moments never hangs and always ends the segment.
"""

from __future__ import annotations

import asyncio
import json
import random

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
    """20 interruptions at random moments (before, during, after playback starts): each ends
    in playback_finished within a second, interrupted and with a position no longer than what
    was pushed; after each, the output is silent within two ticks (nothing queued plays)."""
    rng = random.Random(12)

    async def scenario():
        app = create_app(_factory(runtime), broadcast=BroadcastOptions())
        outcomes = []
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"outputs": ["whep"]}) as r:
                created = await r.json()
            session = app[BROADCASTER_KEY].sessions[created["id"]].session
            tap = OutputTap(session)
            async with http.ws_connect(f"{url}{created['audio']}?sample_rate=24000") as ws:
                for _ in range(20):
                    await ws.send_bytes(tone(1.5, 24_000).tobytes())
                    await ws.send_str(json.dumps({"type": "flush"}))
                    await asyncio.sleep(rng.uniform(0.0, 1.2))
                    await ws.send_str(json.dumps({"type": "clear_buffer"}))
                    events = await _events_until(ws, "playback_finished", 1.0)
                    await asyncio.sleep(0.2)
                    mark = len(tap.samples)
                    await asyncio.sleep(0.4)
                    outcomes.append((events[-1], tap.loud_seconds(mark)))
            stats = session.stats()
            await tap.close()
        return outcomes, stats

    outcomes, stats = asyncio.run(scenario())
    assert len(outcomes) == 20
    for finished, loud_after in outcomes:
        assert finished["interrupted"] is True
        assert 0.0 <= finished["playback_position"] <= 1.5
        assert loud_after == 0.0, "audio queued before clear_buffer still played"
    assert stats["fps"] > 20
