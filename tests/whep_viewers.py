"""A crowd of watch-only WHEP viewers in a process of their own (aiortc peers on 127.0.0.1).

    python -m tests.whep_viewers BASE_URL CHANNEL --viewers 20 --warmup 2 --measure 4

Joins all viewers, waits `warmup` seconds, counts the frames each receives for `measure`
seconds, leaves (DELETE), and prints one JSON line: {"fps": [...], "audio_frames": [...],
"connected": n}. The first `--audio` viewers also receive audio (Opus doubles the packets).
Tests run the crowd here so that the server under test has its process to itself.

--count-only: the crowd's video is depacketized but not decoded (one 2x2 frame per complete
received VP8/H.264 frame). For benchmarks where the viewers share the server's CPU: a real
viewer decodes on its own machine, and 20 decoders on the server's 2 cores measure the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import time

import av

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError


class Viewer:
    """A watch-only aiortc peer: recvonly audio + video, counts what arrives."""

    def __init__(self, audio: bool = True):
        self.audio = audio
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.video_times: list[float] = []
        self.audio_frames = 0
        self.location: str | None = None
        self._tasks: list[asyncio.Task] = []
        self.pc.on("track", lambda track: self._tasks.append(asyncio.ensure_future(self._consume(track))))

    async def _consume(self, track):
        try:
            while True:
                await track.recv()
                if track.kind == "video":
                    self.video_times.append(time.monotonic())
                else:
                    self.audio_frames += 1
        except MediaStreamError:
            pass

    async def join(self, http: aiohttp.ClientSession, url: str) -> None:
        self.pc.addTransceiver("video", direction="recvonly")
        if self.audio:
            self.pc.addTransceiver("audio", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(url, data=self.pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}) as r:
            assert r.status == 201, await r.text()
            self.location = r.headers["Location"]
            answer = await r.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    def fps(self, t0: float, t1: float) -> float:
        n = sum(1 for t in self.video_times if t0 <= t < t1)
        return n / (t1 - t0)

    async def leave(self, http: aiohttp.ClientSession, base: str) -> None:
        async with http.delete(f"{base}{self.location}") as r:
            assert r.status == 200
        await self.pc.close()
        for task in self._tasks:
            task.cancel()


async def first_publisher(janus, handle: int, room: int, timeout_s: float = 10.0) -> int:
    """The id of the first publisher of Janus VideoRoom `room`, once there is one (the room
    may not exist yet either); AssertionError after `timeout_s`."""
    from realtime_avatar.janus import JanusError

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            listing = await janus.request(handle, {"request": "listparticipants", "room": room})
            publishers = [p for p in listing.get("participants", []) if p.get("publisher")]
            if publishers:
                return publishers[0]["id"]
        except JanusError:  # no such room yet
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"nobody publishes in Janus room {room} within {timeout_s:g} s")


async def join_janus_room(http: aiohttp.ClientSession, url: str, room: int, pc: RTCPeerConnection):
    """Subscribe `pc` to the first publisher of Janus VideoRoom `room` (waits up to 10 s for
    one); returns the JanusSession (destroy() it to leave)."""
    from realtime_avatar.janus import VIDEOROOM, JanusSession

    janus = JanusSession(http, url)
    await janus.create()
    handle = await janus.attach(VIDEOROOM)
    publisher = await first_publisher(janus, handle, room)
    _, offer = await janus.message(handle, {"request": "join", "ptype": "subscriber", "room": room,
                                            "streams": [{"feed": publisher}]})
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type=offer["type"]))
    await pc.setLocalDescription(await pc.createAnswer())
    await janus.message(handle, {"request": "start", "room": room},
                        jsep={"type": "answer", "sdp": pc.localDescription.sdp})
    return janus


class JanusViewer(Viewer):
    """A subscriber of the first publisher of a Janus VideoRoom (the SFU path of the audience):
    same counting as Viewer; `join(http, janus_url, room)`."""

    async def join(self, http: aiohttp.ClientSession, url: str, room: int = 0) -> None:
        self.janus = await join_janus_room(http, url, room, self.pc)

    async def leave(self, http: aiohttp.ClientSession, base: str = "") -> None:
        await self.pc.close()
        await self.janus.destroy()
        for task in self._tasks:
            task.cancel()


class CountingDecoder:
    """Stands in for aiortc's video decoder: a 2x2 frame per complete encoded frame."""

    def decode(self, encoded_frame) -> list[av.VideoFrame]:
        frame = av.VideoFrame(2, 2, "yuv420p")
        frame.pts, frame.time_base = encoded_frame.timestamp, fractions.Fraction(1, 90_000)
        return [frame]


def count_only_video() -> None:
    """Make this process's aiortc receivers count video frames instead of decoding them."""
    import aiortc.rtcrtpreceiver as receiver

    decoder_for = receiver.get_decoder
    receiver.get_decoder = lambda codec: (CountingDecoder() if codec.mimeType.lower().startswith("video/")
                                          else decoder_for(codec))


async def crowd(args) -> dict:
    async with aiohttp.ClientSession() as http:
        if args.via == "janus":  # base: the Janus HTTP API URL, channel: the room
            viewers = [JanusViewer(audio=i < args.audio) for i in range(args.viewers)]
            await asyncio.gather(*(v.join(http, args.base, int(args.channel)) for v in viewers))
        else:
            viewers = [Viewer(audio=i < args.audio) for i in range(args.viewers)]
            await asyncio.gather(*(v.join(http, f"{args.base}/whep/{args.channel}") for v in viewers))
        print(json.dumps({"joined": len(viewers)}), flush=True)
        await asyncio.sleep(args.warmup)
        t0 = time.monotonic()
        await asyncio.sleep(args.measure)
        t1 = time.monotonic()
        result = {"fps": [v.fps(t0, t1) for v in viewers], "audio_frames": [v.audio_frames for v in viewers],
                  "connected": sum(v.pc.connectionState == "connected" for v in viewers)}
        await asyncio.gather(*(v.leave(http, args.base) for v in viewers), return_exceptions=True)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base")
    parser.add_argument("channel")
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--audio", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--measure", type=float, default=4.0)
    parser.add_argument("--via", choices=("whep", "janus"), default="whep",
                        help="watch over WHEP (base: the server, channel: the session) or as subscribers of a "
                             "Janus room (base: the Janus HTTP API URL, channel: the room number)")
    parser.add_argument("--count-only", action="store_true", help="count video frames, do not decode them")
    arguments = parser.parse_args()
    if arguments.count_only:
        count_only_video()
    print(json.dumps(asyncio.run(crowd(arguments))), flush=True)
