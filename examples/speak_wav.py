"""Speak a WAV through the audio-push API and record what a WHEP viewer sees to an MP4.

This is what a voice agent does: it creates (or reuses) an avatar session on a running
`realtime-avatar serve`, pushes its TTS audio as 16-bit PCM over the session's WebSocket, and
listens for `playback_started` / `playback_finished`. A WHEP viewer (aiortc) watches the same
session and records it.

    realtime-avatar serve &                        # or: serve --broadcast broadcast --rtmp ... --janus ...
    python examples/speak_wav.py --wav hello.wav --out hello.mp4
    python examples/speak_wav.py --session broadcast --interrupt-after 1.5   # barge-in demo

Protocol (see realtime_avatar/audio_push.py): text {"type": "start", "sample_rate": HZ,
"channels": N}, binary PCM chunks of any size, text {"type": "flush"} at the end of an
utterance, {"type": "clear_buffer"} to interrupt; events come back as JSON text messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import wave
from pathlib import Path

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

CHUNK_S = 0.1  # TTS engines deliver audio in pieces; any size works


def read_wav(path: Path) -> tuple[bytes, int, int]:
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2:
            sys.exit(f"speak_wav: {path} is {8 * w.getsampwidth()}-bit; the API takes 16-bit PCM "
                     "(convert it: sox in.wav -b 16 out.wav)")
        return w.readframes(w.getnframes()), w.getframerate(), w.getnchannels()


class Recorder:
    """Keeps what a viewer receives, then writes it as an MP4 (H.264 + AAC) at stop()."""

    def __init__(self, path: Path):
        self.path = path
        self.video: list[np.ndarray] = []  # BGR frames in arrival order (25 fps from the server)
        self.audio: list[np.ndarray] = []  # 48 kHz stereo s16, interleaved, as aiortc decodes Opus
        self.tasks: list[asyncio.Task] = []

    def add(self, track) -> None:
        self.tasks.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    self.video.append(frame.to_ndarray(format="bgr24"))
                else:
                    self.audio.append(frame.to_ndarray().reshape(-1))
        except MediaStreamError:
            pass

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.to_thread(self._write)

    def _write(self) -> None:
        if not self.video:
            sys.exit("speak_wav: the viewer received no video")
        height, width = self.video[0].shape[:2]
        with av.open(str(self.path), "w", format="mp4") as container:
            vstream = container.add_stream("libx264", rate=25)
            vstream.width, vstream.height, vstream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
            astream = container.add_stream("aac", rate=48_000)
            astream.layout = "stereo"
            for n, image in enumerate(self.video):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[: vstream.height, : vstream.width]),
                                                   format="bgr24")
                frame.pts = n
                container.mux(vstream.encode(frame))
            container.mux(vstream.encode(None))
            if self.audio:
                pcm = np.concatenate(self.audio)[None, :]
                frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
                frame.sample_rate, frame.pts = 48_000, 0
                container.mux(astream.encode(frame))
                container.mux(astream.encode(None))


async def watch(http: aiohttp.ClientSession, server: str, channel: str, out: Path, headers: dict):
    """Join as a WHEP viewer and record to `out`; returns (pc, recorder, viewer URL)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    recorder = Recorder(out)
    pc.on("track", recorder.add)
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(f"{server}/whep/{channel}", data=pc.localDescription.sdp,
                         headers={**headers, "Content-Type": "application/sdp"}) as r:
        if r.status != 201:
            sys.exit(f"speak_wav: WHEP refused ({r.status}): {await r.text()}")
        location = r.headers["Location"]
        answer = await r.text()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return pc, recorder, f"{server}{location}"


async def main(args) -> int:
    pcm, rate, channels = read_wav(args.wav)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    server = args.server.rstrip("/")
    async with aiohttp.ClientSession(headers=headers) as http:
        session = args.session
        if session is None:
            async with http.post(f"{server}/sessions", json={"avatar": None, "outputs": ["whep"]}) as r:
                if r.status != 201:
                    sys.exit(f"speak_wav: could not create a session ({r.status}): {await r.text()}")
                session = (await r.json())["id"]
        pc, recorder, viewer = await watch(http, server, session, args.out, headers)
        await asyncio.sleep(1.0)  # the viewer connects and sees the idle face first
        ws_url = server.replace("http", "ws", 1) + f"/sessions/{session}/audio"
        async with http.ws_connect(ws_url) as ws:
            await ws.send_str(json.dumps({"type": "start", "sample_rate": rate, "channels": channels}))
            step = int(CHUNK_S * rate) * 2 * channels
            t0 = time.monotonic()
            for i in range(0, len(pcm), step):
                await ws.send_bytes(pcm[i : i + step])
            await ws.send_str(json.dumps({"type": "flush"}))
            if args.interrupt_after is not None:
                await asyncio.sleep(args.interrupt_after)
                await ws.send_str(json.dumps({"type": "clear_buffer"}))
            async for msg in ws:
                event = json.loads(msg.data)
                print(f"{time.monotonic() - t0:6.2f} s  {json.dumps(event)}", file=sys.stderr)
                if event["type"] == "playback_finished":
                    break
        await asyncio.sleep(0.8)  # the last frames reach the viewer
        await recorder.stop()
        async with http.delete(viewer):
            pass
        await pc.close()
        if args.session is None:
            async with http.delete(f"{server}/sessions/{session}"):
                pass
    print(f"recorded {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080", help="realtime-avatar serve address")
    parser.add_argument("--wav", type=Path,
                        default=Path(__file__).resolve().parents[1] / "realtime_avatar/assets/speech_sample.wav",
                        help="16-bit PCM WAV to speak (default: the built-in speech sample)")
    parser.add_argument("--out", type=Path, default=Path("out/speak_wav.mp4"), help="MP4 the WHEP viewer records")
    parser.add_argument("--session", default=None,
                        help="an existing session to speak through (e.g. 'broadcast'); default: create one")
    parser.add_argument("--interrupt-after", type=float, default=None, metavar="S",
                        help="send clear_buffer S seconds after the audio was pushed (barge-in demo)")
    parser.add_argument("--token", default=None, help="bearer token, if the server was started with --token")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(main(args)))
