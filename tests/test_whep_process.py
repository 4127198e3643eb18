"""WHEP viewers whose peer connections live in the viewer process (whep_process.py).

Real aiortc viewers of a real broadcast session (tests.loopback_session, small frames) through a
real child process; the wire format is tested apart from I/O.
"""

from __future__ import annotations

import asyncio
import fractions
import os
import signal
import time

import aiohttp
import av
import pytest

from realtime_avatar.broadcast import BROADCASTER_KEY, BroadcastOptions
from realtime_avatar.server import create_app
from realtime_avatar.whep_process import frame_message, pack_packet, read_message, unpack_packet
from tests.loopback_session import LoopbackSession
from tests.rtc_client import serving
from tests.whep_viewers import Viewer


def test_packets_and_messages_cross_the_wire_unchanged():
    packet = av.Packet(b"\x9d\x01\x2a" + bytes(range(200)))
    packet.pts, packet.time_base, packet.is_keyframe = 123456789012, fractions.Fraction(1, 90000), True
    channel, kind, back = unpack_packet(pack_packet(7, "video", packet))
    assert (channel, kind, bytes(back), back.pts, back.time_base, back.is_keyframe) == (
        7, "video", bytes(packet), 123456789012, fractions.Fraction(1, 90000), True)
    audio = av.Packet(b"opus")
    audio.pts, audio.time_base = 960, fractions.Fraction(1, 48000)
    assert unpack_packet(pack_packet(65535, "audio", audio))[:2] == (65535, "audio")
    assert not unpack_packet(pack_packet(0, "audio", audio))[2].is_keyframe

    async def read_all(data: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out = [await read_message(reader), await read_message(reader)]
        with pytest.raises(asyncio.IncompleteReadError):
            await read_message(reader)
        bad = asyncio.StreamReader()
        bad.feed_data(b"\x7f\xff\xff\xff\x4a")
        with pytest.raises(ValueError, match="bytes on the socket"):
            await read_message(bad)
        return out

    assert asyncio.run(read_all(frame_message(b"J", b'{"op": "x"}') + frame_message(b"P", b""))) == [
        (b"J", b'{"op": "x"}'), (b"P", b"")]


def _app():
    async def factory():
        return LoopbackSession(size=96)

    return create_app(factory, broadcast=BroadcastOptions(max_viewers=30, whep_peers="process"))


async def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.1)
    return condition()


def test_viewers_in_the_viewer_process_watch_leave_and_survive_its_crash():
    async def scenario():
        app = _app()
        whep_endpoint = app[BROADCASTER_KEY].whep
        out = {}
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"name": "show", "outputs": ["whep"]}) as r:
                assert r.status == 201, await r.text()
                whep = url + (await r.json())["whep"]
            viewers = [Viewer(audio=(i == 0)) for i in range(3)]
            for viewer in viewers[:2]:
                await viewer.join(http, whep)
            await asyncio.sleep(1.5)
            # a viewer joining mid-stream asks (through the child) the shared encoder for a keyframe
            shared = app[BROADCASTER_KEY].sessions["show"].runner.outputs.shared_encoder
            keyframes_before = shared.keyframes
            await viewers[2].join(http, whep)
            await asyncio.sleep(2.0)
            out["join_keyframes"] = shared.keyframes - keyframes_before
            t0 = time.monotonic()
            await asyncio.sleep(2.0)
            out["fps"] = [v.fps(t0, time.monotonic()) for v in viewers]
            out["audio_frames"] = viewers[0].audio_frames
            process = whep_endpoint.process
            out["server_peers"] = [v.pc for v in whep_endpoint.viewers.values()]
            out["packets_sent"] = process.packets_sent
            # one leaves; its resource is gone after
            await viewers[2].leave(http, url)
            async with http.delete(f"{url}{viewers[2].location}") as r:
                out["second_delete"] = r.status
            out["after_leave"] = await _wait_for(lambda: len(whep_endpoint.viewers) == 2, 5.0)
            # the viewer process dies: its viewers are gone, the server serves, a new viewer starts a new one
            os.kill(process._proc.pid, signal.SIGKILL)
            out["crash_noticed"] = await _wait_for(lambda: not whep_endpoint.viewers, 5.0)
            async with http.get(f"{url}/health") as r:
                out["health"] = r.status
            async with http.delete(f"{url}{viewers[0].location}") as r:
                out["delete_after_crash"] = r.status
            late = Viewer(audio=False)
            await late.join(http, whep)
            await asyncio.sleep(2.0)
            t0 = time.monotonic()
            await asyncio.sleep(2.0)
            out["late_fps"] = late.fps(t0, time.monotonic())
            out["starts"] = process.starts
            # the session ends: its viewers are cut off
            async with http.delete(f"{url}/sessions/show") as r:
                out["session_delete"] = r.status
            out["ended"] = await _wait_for(lambda: not whep_endpoint.viewers, 5.0)
            for viewer in (*viewers[:2], late):
                await viewer.pc.close()
            child = process._proc
        out["child_exit"] = await asyncio.wait_for(child.wait(), 15.0)
        return out

    out = asyncio.run(scenario())
    print(out)
    assert min(out["fps"]) >= 24.0, out["fps"]
    assert out["join_keyframes"] >= 1
    assert out["audio_frames"] > 50 and out["packets_sent"] > 100
    assert out["server_peers"] == [None, None, None]  # no peer connection in the serving process
    assert out["second_delete"] == 404 and out["after_leave"]
    assert out["crash_noticed"] and out["health"] == 200 and out["delete_after_crash"] == 404
    assert out["late_fps"] >= 24.0 and out["starts"] == 2
    assert out["session_delete"] == 200 and out["ended"]
    assert out["child_exit"] == 0  # the app's shutdown stopped the second child cleanly
