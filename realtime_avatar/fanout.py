"""One render, many consumers: a session's output tracks fanned out with aiortc's MediaRelay.

A session's `video_track` and `audio_track` have one reader each (their recv() pops a queue).
Everything that shows a session (its own WebRTC peer, WHEP viewers, an RTMP push, a Janus
publisher) reads a relay proxy instead, so the avatar is rendered once whatever the audience.

Every proxy holds a bounded queue (aiortc's buffered proxies have an unbounded one): a consumer
that falls behind loses its oldest frames, counted in `proxy.dropped` (and, for the session's own
peer, in the session track's `dropped`, as when that peer read the track directly), never a
backlog. A proxy that stops (its peer left) leaves the relay; the relay itself keeps reading the
session's tracks until they end, so a session nobody watches still drains.
"""

from __future__ import annotations

import asyncio

from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender
from aiortc.contrib.media import MediaRelay

from .shared_encode import DEFAULT_BITRATE, EncodedTrack, EncodedVideoTrack, SharedAudioEncoder, SharedVideoEncoder

PROXY_QUEUE_TICKS = 4  # frames a consumer may lag (160 ms at 25 fps) before its oldest is dropped
BROADCAST_QUEUE_TICKS = 50  # the RTMP reader hands frames on at once; 2 s covers event-loop stalls


class DroppingQueue(asyncio.Queue):
    """A bounded queue whose put_nowait drops (and counts) the oldest item when full."""

    def __init__(self, maxsize: int, counted_on=None):
        super().__init__(maxsize)
        self.dropped = 0
        self._counted_on = counted_on  # also add drops to this object's `dropped`

    def put_nowait(self, item) -> None:
        if self.full():
            self.get_nowait()
            self.dropped += 1
            if self._counted_on is not None:
                self._counted_on.dropped += 1
        super().put_nowait(item)


def _bounded(proxy: MediaStreamTrack, ticks: int, counted_on=None) -> MediaStreamTrack:
    # aiortc 1.16's buffered RelayStreamTrack reads `_queue` (an unbounded asyncio.Queue) and the
    # relay fills it with put_nowait: a bounded, dropping queue in its place bounds every consumer.
    proxy._queue = DroppingQueue(ticks, counted_on if hasattr(counted_on, "dropped") else None)
    return proxy


class Yuv420Track(MediaStreamTrack):
    """The session's video converted once to yuv420p, the format every encoder wants.

    A relay hands one frame object to all its consumers, and aiortc encodes each viewer on a
    thread pool: an encoder that converts a shared frame itself (VideoFrame.reformat keeps one
    converter per frame) crashes the process when two threads do it at once. Converted here,
    once, encoders only read the frame.
    """

    kind = "video"

    def __init__(self, source: MediaStreamTrack):
        super().__init__()
        self._source = source

    async def recv(self):
        frame = await self._source.recv()  # MediaStreamError when the session ends
        if frame.format.name == "yuv420p":
            return frame
        # On the event loop, on purpose: sws_scale of a 512x512 frame takes ~1 ms, less than
        # a hop to a thread costs in a process where 20 viewers' encoder and decoder threads
        # contend for the GIL (measured: the relay fell to 13 fps with a thread hop, at load 14).
        out = frame.reformat(format="yuv420p")
        out.pts, out.time_base = frame.pts, frame.time_base
        return out


class SessionOutputs:
    """The fan-out point of one session (anything with `video_track` and `audio_track`)."""

    def __init__(self, session):
        self.session = session
        self.relay = MediaRelay()
        self._video = Yuv420Track(session.video_track)
        self._shared_vp8: SharedVideoEncoder | None = None
        self._shared_opus: SharedAudioEncoder | None = None

    def video(self, *, every_frame: bool = False, own_peer: bool = False) -> MediaStreamTrack:
        """A new video proxy (yuv420p frames, shared: read them, never modify them).

        every_frame: a deeper queue, for encoders that must see each tick (RTMP).
        own_peer: the session's own WebRTC peer; its drops also count on session.video_track."""
        ticks = BROADCAST_QUEUE_TICKS if every_frame else PROXY_QUEUE_TICKS
        return _bounded(self.relay.subscribe(self._video, buffered=True), ticks,
                        self.session.video_track if own_peer else None)

    def encoded_video(self, bitrate: int = DEFAULT_BITRATE) -> EncodedVideoTrack:
        """A new viewer track of VP8 packets from the session's one shared encoder (created on
        first use, closed when its last viewer leaves; see shared_encode.py)."""
        if self._shared_vp8 is None or self._shared_vp8.closed:
            self._shared_vp8 = SharedVideoEncoder(self.video(), bitrate=bitrate)
        return self._shared_vp8.subscribe()

    def encoded_audio(self) -> EncodedTrack:
        """A new consumer track of Opus packets from the session's one shared audio encoder
        (created on first use, closed when its last consumer leaves)."""
        if self._shared_opus is None or self._shared_opus.closed:
            self._shared_opus = SharedAudioEncoder(self.audio())
        return self._shared_opus.subscribe()

    @property
    def shared_audio_encoder(self) -> SharedAudioEncoder | None:
        """The session's shared Opus encoder while it has consumers (None before the first)."""
        return self._shared_opus

    @property
    def shared_encoder(self) -> SharedVideoEncoder | None:
        """The session's shared VP8 encoder while it has viewers (None before the first)."""
        return self._shared_vp8

    def audio(self, *, every_frame: bool = False, own_peer: bool = False) -> MediaStreamTrack:
        """A new audio proxy (40 ms frames); arguments as for video()."""
        ticks = BROADCAST_QUEUE_TICKS if every_frame else PROXY_QUEUE_TICKS
        return _bounded(self.relay.subscribe(self.session.audio_track, buffered=True), ticks,
                        self.session.audio_track if own_peer else None)


SHARED_CODECS = {"video": ("video/vp8", "video/rtx"), "audio": ("audio/opus",)}


def add_shared_track(pc: RTCPeerConnection, outputs: SessionOutputs, kind: str) -> EncodedTrack:
    """Send the session's shared encode of `kind` ("video": VP8, "audio": Opus) on `pc`, and
    restrict that transceiver to the shared codec (call before createOffer/createAnswer; the
    remote side must support it: see whep.check_viewer_offer). The peer's keyframe requests
    (RTCP PLI/FIR) go to the shared encoder: aiortc's sender would force a keyframe of its own
    encoder, and it has none here. Returns the track (stop() it when the peer leaves)."""
    track = outputs.encoded_video() if kind == "video" else outputs.encoded_audio()
    sender = pc.addTrack(track)
    wanted = SHARED_CODECS[kind]
    for transceiver in pc.getTransceivers():
        if transceiver.sender is sender:
            transceiver.setCodecPreferences(
                [c for c in RTCRtpSender.getCapabilities(kind).codecs if c.mimeType.lower() in wanted])
    if kind == "video":
        sender._send_keyframe = track.request_keyframe
    return track


def outputs_of(session) -> SessionOutputs:
    """The session's SessionOutputs, created on first use and kept on the session object."""
    outputs = getattr(session, "_fanout", None)
    if outputs is None:
        outputs = SessionOutputs(session)
        session._fanout = outputs
    return outputs
