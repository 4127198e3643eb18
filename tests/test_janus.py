"""Janus VideoRoom publishing against Debian's janus, started by the test with its own config.

A broadcast session publishes into a room; an aiortc subscriber joins the room through Janus
(its HTTP API, as any Janus client would) and must receive the avatar at >= 24 fps with audio.
A Janus that refuses (not running) is retried in the background; the session keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from realtime_avatar.broadcast import BROADCASTER_KEY, BroadcastOptions
from realtime_avatar.fanout import outputs_of
from realtime_avatar.janus import JanusError, JanusPublisher
from realtime_avatar.server import create_app
from tests.broadcast_servers import JanusGateway, free_port
from tests.loopback_session import LoopbackSession
from tests.rtc_client import serving
from tests.whep_viewers import join_janus_room

ROOM = 4242


class Received:
    def __init__(self):
        self.video_times: list[float] = []
        self.audio_frames = 0
        self.audio_peak = 0.0

    def fps(self, since: float) -> float:
        t = [x for x in self.video_times if x >= since]
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0


async def subscribe(http: aiohttp.ClientSession, url: str, room: int, received: Received):
    """Join `room` as a subscriber of its first publisher; returns (janus, pc)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    async def consume(track):
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    received.video_times.append(time.monotonic())
                else:
                    received.audio_frames += 1
                    samples = frame.to_ndarray()
                    received.audio_peak = max(received.audio_peak, float(np.abs(samples).max()) / 32768)
        except MediaStreamError:
            pass

    pc.on("track", lambda track: asyncio.ensure_future(consume(track)))
    janus = await join_janus_room(http, url, room, pc)
    return janus, pc


class SpeakingSession(LoopbackSession):
    """A loopback session that says something: its echo track is fed a tone at start."""

    async def start(self) -> None:
        await super().start()
        import av

        t = np.arange(48_000 * 20) / 48_000
        tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]).T.reshape(1, -1).copy(), format="s16", layout="stereo")
        frame.sample_rate = 48_000
        self.audio_track.write(frame)


def test_a_broadcast_session_publishes_into_a_janus_room_that_subscribers_watch(tmp_path):
    janus_server = JanusGateway(tmp_path / "janus").start()

    async def factory():
        return SpeakingSession(size=160)

    async def scenario():
        app = create_app(factory, broadcast=BroadcastOptions(janus_url=janus_server.url, janus_room=ROOM))
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"name": "host", "outputs": ["janus"]}) as r:
                assert r.status == 201, await r.text()
            entry = app[BROADCASTER_KEY].sessions["host"]
            t0 = time.monotonic()
            while entry.runner.janus.state != "published":
                assert time.monotonic() - t0 < 15, entry.runner.janus.stats()
                await asyncio.sleep(0.1)
            received = Received()
            janus, pc = await subscribe(http, janus_server.url, ROOM, received)
            t0 = time.monotonic()
            while not received.video_times:
                assert time.monotonic() - t0 < 15, f"no video through Janus (pc {pc.connectionState})"
                await asyncio.sleep(0.1)
            start = time.monotonic() + 1.0
            await asyncio.sleep(5.0)
            session_fps = entry.session.stats()["fps"]
            await pc.close()
            await janus.destroy()
            return received.fps(start), received, session_fps, entry.runner.janus.stats()

    try:
        fps, received, session_fps, stats = asyncio.run(scenario())
    finally:
        janus_server.stop()
    assert stats["publishes"] == 1
    assert fps >= 24.0, f"{fps:.1f} fps through Janus"
    assert received.audio_frames >= 150 and received.audio_peak > 0.1, "no audio through Janus"
    assert session_fps >= 24.0


def test_a_janus_that_refuses_is_retried_and_the_session_keeps_serving(caplog):
    caplog.set_level(logging.INFO, logger="realtime_avatar.janus")
    with pytest.raises(JanusError, match="Janus HTTP API URL"):
        JanusPublisher("ws://127.0.0.1/janus", 1)
    dead = f"http://127.0.0.1:{free_port()}/janus"

    async def factory():
        return LoopbackSession(size=64)

    async def scenario():
        app = create_app(factory, broadcast=BroadcastOptions(janus_url=dead, janus_room=1))
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"name": "h", "outputs": ["janus"]}) as r:
                assert r.status == 201
            await asyncio.sleep(2.5)
            entry = app[BROADCASTER_KEY].sessions["h"]
            async with http.get(f"{url}/sessions/h/stats") as r:
                stats = await r.json()
            # the session still serves its viewers: a viewer's proxy gets 25 frames a second
            proxy = outputs_of(entry.session).video()
            await proxy.recv()
            t0, n = time.monotonic(), 0
            while time.monotonic() - t0 < 1.0:
                await proxy.recv()
                n += 1
            proxy.stop()
            return n / (time.monotonic() - t0), stats

    fps, stats = asyncio.run(scenario())
    assert fps >= 24.0
    assert stats["janus"]["state"] in ("waiting", "connecting")
    assert "no usable answer" in stats["janus"]["last_error"]
    assert any("retrying in" in r.getMessage() for r in caplog.records)
