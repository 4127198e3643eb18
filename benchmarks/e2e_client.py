"""The WebRTC client of bench_e2e_webrtc.py, importable without the server side (no torch, no
mediapipe), so that it starts quickly as a process of its own:

    python benchmarks/e2e_client.py --client-spec SPEC.pkl --client-out OUT.pkl

It connects to the server at spec["url"], sends the WAV in real time, notes each received
frame's arrival, pts and mouth thumbnail and keeps its face region, and the returned audio;
then it writes those logs (pickled). time.monotonic() is CLOCK_MONOTONIC, one clock for every
process on the machine, so the server's and the client's times compare.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _scaled(box, image_shape, frame_shape):
    if image_shape[:2] == frame_shape[:2]:
        return box
    sy, sx = image_shape[0] / frame_shape[0], image_shape[1] / frame_shape[1]  # scaled by the sender
    return int(box[0] * sx), int(box[1] * sy), int(box[2] * sx), int(box[3] * sy)


class _MouthTrack:
    """Wraps the received video track: notes each frame's arrival and mouth thumbnail, and
    keeps the face region (measured with mediapipe after the run, off the media path)."""

    def __init__(self, track, box, face, frame_shape, log: list, faces: list):
        self._inner = track
        self._box, self._face, self._shape, self._log, self._faces = box, face, frame_shape, log, faces
        self.kind = track.kind

    async def recv(self):
        frame = await self._inner.recv()
        arrived = time.monotonic()
        image = frame.to_ndarray(format="bgr24")
        box = _scaled(self._box, image.shape, self._shape)
        x1, y1, x2, y2 = _scaled(self._face, image.shape, self._shape)
        self._log.append((arrived, frame.pts, common.mouth_signature(image, box)))
        self._faces.append(image[y1:y2, x1:x2].copy())
        return frame

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _client_class():
    from realtime_avatar.rtc_receive import release_all_receivers
    from tests.rtc_client import RtcClient

    class MouthClient(RtcClient):
        """The test client, with the received video track wrapped by _MouthTrack."""

        def __init__(self, *args, box, face, frame_shape, **kwargs):
            super().__init__(*args, **kwargs)
            self.frames: list[tuple[float, int, np.ndarray]] = []  # (arrival, pts, signature)
            self.faces: list[np.ndarray] = []  # the face region of each received frame
            self._box, self._face, self._shape = box, face, frame_shape

        def _on_track(self, track):
            # frames as soon as they are complete, as a browser takes them (rtc_receive.py)
            release_all_receivers(self.pc)
            if track.kind == "video":
                track = _MouthTrack(track, self._box, self._face, self._shape, self.frames, self.faces)
            super()._on_track(track)

    return MouthClient


async def _run_client(url: str, wav: Path, box, face, frame_shape, speech_s: float, tail_s: float) -> dict:
    """One client's whole call: connect, stream the WAV, keep what comes back until `tail_s`
    after the speech, close. Returns the client-side logs (picklable)."""
    import aiohttp

    from tests.rtc_client import WavMicrophoneTrack

    mic = WavMicrophoneTrack(wav)  # the signal carries its own lead and tail silence
    async with aiohttp.ClientSession() as http:
        client = _client_class()(url, mic, box=box, face=face, frame_shape=frame_shape)
        t_connect = time.monotonic()
        await client.connect(http)
        await asyncio.wait_for(client.connected.wait(), 15)
        connected_s = time.monotonic() - t_connect
        await asyncio.wait_for(client.first_video.wait(), 15)
        while mic.speech_started_at is None:
            await asyncio.sleep(0.01)
        end = mic.speech_started_at + speech_s + tail_s
        while time.monotonic() < end:
            await asyncio.sleep(0.1)
        # aiortc's receiver hands out pts relative to the first RTP timestamp it received
        receivers = [t.receiver for t in client.pc.getTransceivers() if t.kind == "video"]
        mapper = getattr(receivers[0], "_RTCRtpReceiver__timestamp_mapper", None) if receivers else None
        await client.close(http)
    return {"frames": client.frames, "faces": client.faces, "recording": client.recording,
            "rtp_first_timestamp": getattr(mapper, "_origin", None),
            "speech_started_at": mic.speech_started_at, "connected_s": connected_s}


def client_process_main(spec_path: str, out_path: str) -> None:
    """The client as a process of its own (`--client process`): reads its arguments from a
    pickle, writes its logs to another."""
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    logs = asyncio.run(_run_client(**spec))
    with open(out_path, "wb") as f:
        pickle.dump(logs, f)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="bench_e2e_webrtc.py's client in a process of its own (started by it)")
    parser.add_argument("--client-spec", required=True, help="pickle: url, wav, box, face, frame_shape, speech_s, tail_s")
    parser.add_argument("--client-out", required=True, help="where the client's logs are pickled")
    args = parser.parse_args()
    client_process_main(args.client_spec, args.client_out)
