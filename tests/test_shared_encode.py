"""One VP8 encode for all WHEP viewers (realtime_avatar/shared_encode.py).

Real libvpx encodes, real VP8 decodes (PyAV) and, for the WHEP path, real aiortc viewers that
decode what they receive: a viewer only counts frames its decoder could make.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import aiohttp
import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCRtpSender
from aiortc.mediastreams import MediaStreamError

from realtime_avatar.broadcast import BROADCASTER_KEY, BroadcastOptions
from realtime_avatar.server import create_app
from realtime_avatar.shared_encode import SharedVideoEncoder, keyframe_due
from tests.loopback_session import LoopbackSession, card_image
from tests.rtc_client import serving
from tests.whep_viewers import Viewer

TIME_BASE = fractions.Fraction(1, 90_000)


def test_keyframe_requests_are_coalesced():
    assert not keyframe_due(False, None, 10.0)
    assert keyframe_due(True, None, 10.0)  # the first frame
    assert not keyframe_due(True, 9.8, 10.0, min_interval_s=0.5)  # a keyframe 200 ms ago serves
    assert keyframe_due(True, 9.5, 10.0, min_interval_s=0.5)


class CardTrack(MediaStreamTrack):
    """`count` yuv420p frames of a moving test card, as fast as they are read, then the end."""

    kind = "video"

    def __init__(self, count: int, size: int = 96):
        super().__init__()
        self.count, self.sent = count, 0
        self.card = card_image(size)

    def image(self, index: int) -> np.ndarray:
        return np.roll(self.card, 2 * index, axis=1)

    async def recv(self) -> av.VideoFrame:
        if self.sent >= self.count or self.readyState != "live":
            raise MediaStreamError
        frame = av.VideoFrame.from_ndarray(self.image(self.sent), format="rgb24").reformat(format="yuv420p")
        frame.pts, frame.time_base = self.sent * 3600, TIME_BASE
        self.sent += 1
        await asyncio.sleep(0.002)
        return frame


async def read_packets(track, limit: int | None = None, pause_s: float = 0.0) -> list[av.Packet]:
    packets = []
    try:
        while limit is None or len(packets) < limit:
            packets.append(await track.recv())
            await asyncio.sleep(pause_s)
    except MediaStreamError:
        pass
    return packets


def decode(packets: list[av.Packet]) -> list[np.ndarray]:
    decoder = av.CodecContext.create("libvpx", "r")
    images = []
    for packet in packets:
        for frame in decoder.decode(av.Packet(bytes(packet))):
            images.append(frame.to_ndarray(format="rgb24"))
    return images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-9))


def test_frames_are_encoded_once_for_all_viewers_and_every_viewer_decodes_them():
    async def scenario():
        source = CardTrack(40)
        shared = SharedVideoEncoder(source)
        tracks = [shared.subscribe() for _ in range(3)]
        packets = await asyncio.gather(*(read_packets(t) for t in tracks))
        return source, shared, packets

    source, shared, packets = asyncio.run(scenario())
    assert shared.frames_encoded == source.sent == 40  # once, not once per viewer
    assert shared.closed  # the source ended: encoder and viewers closed
    for got in packets:
        assert len(got) == 40 and got[0].is_keyframe
        assert [p.pts for p in got] == [i * 3600 for i in range(40)]
        images = decode(got)
        assert len(images) == 40
        assert min(psnr(im, source.image(i)) for i, im in enumerate(images)) > 25
    assert shared.keyframes == 1  # three viewers joining together: one keyframe


def test_a_late_viewer_starts_at_a_keyframe_and_a_lagging_one_resyncs_without_stalling_others():
    async def scenario():
        source = CardTrack(60)
        shared = SharedVideoEncoder(source, min_keyframe_interval_s=0.0)
        steady = shared.subscribe()
        lagging = shared.subscribe()
        lagging_read = asyncio.ensure_future(read_packets(lagging, pause_s=0.03))  # 10x too slow
        first = await read_packets(steady, 10)
        late = shared.subscribe()  # joins mid-stream: asks for a keyframe
        rest, late_got = await asyncio.gather(read_packets(steady), read_packets(late))
        return shared, first + rest, late_got, await lagging_read, lagging

    shared, steady, late, lagging, lagging_track = asyncio.run(scenario())
    assert len(steady) == 60 and len(decode(steady)) == 60  # never disturbed
    assert late[0].is_keyframe and late[0].pts > 0 and len(decode(late)) == len(late)
    # the lagging viewer kept its first queued packets, lost the rest, and picked up again at a
    # keyframe it asked for: every packet it got still decodes
    assert lagging_track.dropped > 0 and len(lagging) < 60
    assert len(decode(lagging)) == len(lagging)
    assert any(p.is_keyframe and p.pts > 0 for p in lagging)
    assert shared.keyframes >= 3


def test_the_last_viewer_leaving_stops_the_encoder_and_its_source():
    async def scenario():
        source = CardTrack(10_000)
        shared = SharedVideoEncoder(source)
        a, b = shared.subscribe(), shared.subscribe()
        await read_packets(a, 5)
        a.stop()
        still_open = not shared.closed
        b.stop()
        await asyncio.sleep(0.05)
        return shared, source, still_open

    shared, source, still_open = asyncio.run(scenario())
    assert still_open and shared.closed and source.readyState == "ended"
    assert source.sent < 10_000
    with pytest.raises(RuntimeError, match="closed"):
        shared.subscribe()


def _app(shared: bool = True):
    async def factory():
        return LoopbackSession(size=96)

    # inline peers: the test reads the server-side peer connections (the viewer process has its own test)
    return create_app(factory, broadcast=BroadcastOptions(max_viewers=10, whep_shared_encode=shared, whep_peers="inline"))


class H264Viewer(Viewer):
    """A viewer that offers H.264 only (no VP8): it must get its own encoder."""

    async def join(self, http, url):
        transceiver = self.pc.addTransceiver("video", direction="recvonly")
        transceiver.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() in ("video/h264", "video/rtx")])
        self.audio = False
        self.pc.addTransceiver = lambda *a, **k: None  # the parent adds video again: already done
        await super().join(http, url)


def test_whep_viewers_share_one_encode_and_an_h264_viewer_gets_its_own():
    async def scenario():
        app = _app()
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"name": "show", "outputs": ["whep"]}) as r:
                assert r.status == 201, await r.text()
            whep = f"{url}/whep/show"
            viewers = [Viewer(audio=i == 0) for i in range(3)]
            await asyncio.gather(*(v.join(http, whep) for v in viewers))
            h264 = H264Viewer()
            await h264.join(http, whep)
            await asyncio.sleep(1.5)
            outputs = app[BROADCASTER_KEY].sessions["show"].runner.outputs
            shared = outputs.shared_encoder
            session = app[BROADCASTER_KEY].sessions["show"].session
            encoded0, keyframes0, sent0 = shared.frames_encoded, shared.keyframes, session.stats()["frames_sent"]
            m0, a0 = time.monotonic(), viewers[0].audio_frames
            await asyncio.sleep(2.0)
            m1, a1 = time.monotonic(), viewers[0].audio_frames
            encoded, sent = shared.frames_encoded - encoded0, session.stats()["frames_sent"] - sent0
            # what each server-side peer negotiated: VP8 for the crowd, H.264 for the other
            negotiated = sorted(t._codecs[0].mimeType for v in app[BROADCASTER_KEY].whep.viewers.values()
                                for t in v.pc.getTransceivers() if t.kind == "video")
            # a PLI from a viewer reaches the shared encoder through its sender
            server_viewer = next(iter(app[BROADCASTER_KEY].whep.viewers.values()))
            senders = [s for s in server_viewer.pc.getSenders() if s.track is not None and s.track.kind == "video"]
            await asyncio.sleep(0.6)
            k_before = shared.keyframes
            senders[0]._send_keyframe()
            await asyncio.sleep(0.3)
            keyframe_on_pli = shared.keyframes - k_before
            fps = [v.fps(m0, m1) for v in viewers]
            h264_fps = h264.fps(m0, m1)
            opus = outputs.shared_audio_encoder  # the audio viewer's Opus comes from the shared encode
            audio = (opus is not None and opus.frames_encoded > 0, (a1 - a0) / (m1 - m0))
            for v in viewers + [h264]:
                await v.leave(http, url)
            await asyncio.sleep(0.3)
            session_fps = sent / (m1 - m0)
            return fps, h264_fps, encoded, sent, session_fps, keyframes0, keyframe_on_pli, shared.closed, negotiated, audio

    fps, h264_fps, encoded, sent, session_fps, keyframes, keyframe_on_pli, closed, negotiated, audio = asyncio.run(scenario())
    shared_audio, audio_rate = audio
    assert shared_audio and audio_rate >= 35, audio  # 20 ms Opus packets: ~50 a second
    assert negotiated == ["video/H264", "video/VP8", "video/VP8", "video/VP8"]
    # one encode per session frame for three VP8 viewers (not three)
    assert abs(encoded - sent) <= 5, (encoded, sent)  # counters read mid-flight: a queue apart
    # each VP8 viewer decodes what the session sends (25 fps on an idle machine; the session's
    # own rate is the reference, so a loaded test machine does not fail the fan-out)
    assert min(fps) >= 0.9 * session_fps and session_fps >= 20.0, (fps, session_fps)
    assert h264_fps >= 0.9 * session_fps
    assert keyframes <= 3  # viewers joining together share keyframes
    assert keyframe_on_pli == 1
    assert closed  # all viewers left: the shared encoder stopped


def test_serve_whep_encode_option_reaches_the_broadcast_options():
    from realtime_avatar.cli import _broadcast_options, build_parser

    assert _broadcast_options(build_parser().parse_args(["serve"])).whep_shared_encode is True
    per_viewer = build_parser().parse_args(["serve", "--whep-encode", "per-viewer"])
    assert _broadcast_options(per_viewer).whep_shared_encode is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--whep-encode", "h264"])


def test_per_viewer_encoding_is_still_there_when_asked_for():
    async def scenario():
        app = _app(shared=False)
        async with serving(app) as url, aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sessions", json={"name": "show", "outputs": ["whep"]}) as r:
                assert r.status == 201, await r.text()
            viewer = Viewer(audio=False)
            await viewer.join(http, f"{url}/whep/show")
            await asyncio.sleep(1.0)
            m0 = time.monotonic()
            await asyncio.sleep(1.5)
            fps = viewer.fps(m0, time.monotonic())
            shared = app[BROADCASTER_KEY].sessions["show"].runner.outputs.shared_encoder
            await viewer.leave(http, url)
            return fps, shared

    fps, shared = asyncio.run(scenario())
    assert fps >= 20.0 and shared is None  # aiortc's own encoder; no shared one made


class ToneTrack(MediaStreamTrack):
    """`count` 40 ms frames (s16 mono, 48 kHz) of a 440 Hz tone, as fast as they are read."""

    kind = "audio"

    def __init__(self, count: int):
        super().__init__()
        self.count, self.sent = count, 0

    async def recv(self) -> av.AudioFrame:
        if self.sent >= self.count or self.readyState != "live":
            raise MediaStreamError
        t = (np.arange(1920) + 1920 * self.sent) / 48_000
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48_000, 1920 * self.sent, fractions.Fraction(1, 48_000)
        self.sent += 1
        await asyncio.sleep(0.001)
        return frame


def test_audio_is_encoded_once_to_opus_for_all_consumers_and_decodes_to_the_tone():
    from realtime_avatar.shared_encode import OPUS_FRAME, SharedAudioEncoder

    async def scenario():
        source = ToneTrack(50)  # 2 s
        shared = SharedAudioEncoder(source)
        tracks = [shared.subscribe() for _ in range(3)]
        packets = await asyncio.gather(*(read_packets(t) for t in tracks))
        return source, shared, packets

    source, shared, packets = asyncio.run(scenario())
    assert shared.frames_encoded == source.sent == 50 and shared.closed
    for got in packets:
        # 20 ms packets (what aiortc's OpusEncoder.pack turns into RTP), pts in 1/48000
        assert len(got) >= 98 and [p.pts for p in got] == [OPUS_FRAME * i for i in range(len(got))]
        decoder = av.CodecContext.create("libopus", "r")
        pcm = np.concatenate([f.to_ndarray().reshape(-1, 2)[:, 0] for p in got
                              for f in decoder.decode(av.Packet(bytes(p)))]).astype(np.float64)
        assert abs(len(pcm) / 48_000 - 2.0) < 0.05
        spectrum = np.abs(np.fft.rfft(pcm[4800:]))
        assert abs(np.argmax(spectrum) * 48_000 / len(pcm[4800:]) - 440) < 5  # the tone, not noise


def test_output_encoder_threads_run_below_the_render_priority():
    import sys
    import threading

    from realtime_avatar.priority import OUTPUT_NICE, lower_thread_priority, thread_nice

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are a Linux feature")
    seen = {}

    def output_thread():
        seen["lowered"] = lower_thread_priority()
        seen["self"] = thread_nice()
        child = threading.Thread(target=lambda: seen.setdefault("child", thread_nice()))  # x264's, say
        child.start()
        child.join()

    before = thread_nice()
    thread = threading.Thread(target=output_thread)
    thread.start()
    thread.join()
    assert seen == {"lowered": True, "self": max(OUTPUT_NICE, before), "child": max(OUTPUT_NICE, before)}
    assert thread_nice() == before  # the calling (render) thread keeps its priority

    async def encoder_thread_nice():
        shared = SharedVideoEncoder(CardTrack(1000))
        track = shared.subscribe()
        await read_packets(track, 3)
        nice = shared._executor.submit(thread_nice).result()  # the thread that encoded them
        track.stop()
        return nice

    assert asyncio.run(encoder_thread_nice()) == max(OUTPUT_NICE, before)
