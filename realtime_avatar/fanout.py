"""One render, many consumers: a session's output tracks fanned out with aiortc's MediaRelay.

A session's `video_track` and `audio_track` have one reader each (their recv() pops a queue).
Everything that shows a session (its own WebRTC peer, WHEP viewers, an RTMP push, a Janus
publisher) reads a relay proxy instead, so the avatar is rendered once whatever the audience.

Video proxies for viewers are unbuffered (a viewer that falls behind gets the newest frame, never
a backlog); audio proxies and the broadcast video proxy are buffered, because every 40 ms of
audio must be sent, and their readers (aiortc senders, the RTMP reader task) never stall: they
hand frames on at once. A proxy that stops (its peer left) leaves the relay; the relay itself
keeps reading the session's tracks until they end, so a session nobody watches still drains.
"""

from __future__ import annotations

from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaRelay


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
        out = frame.reformat(format="yuv420p")
        out.pts, out.time_base = frame.pts, frame.time_base
        return out


class SessionOutputs:
    """The fan-out point of one session (anything with `video_track` and `audio_track`)."""

    def __init__(self, session):
        self.session = session
        self.relay = MediaRelay()
        self._video = Yuv420Track(session.video_track)

    def video(self, *, every_frame: bool = False) -> MediaStreamTrack:
        """A new video proxy (yuv420p frames, shared: read them, never modify them);
        `every_frame=True` for encoders that must see each tick (RTMP)."""
        return self.relay.subscribe(self._video, buffered=every_frame)

    def audio(self) -> MediaStreamTrack:
        """A new audio proxy (buffered: no 40 ms of audio is skipped)."""
        return self.relay.subscribe(self.session.audio_track, buffered=True)


def outputs_of(session) -> SessionOutputs:
    """The session's SessionOutputs, created on first use and kept on the session object."""
    outputs = getattr(session, "_fanout", None)
    if outputs is None:
        outputs = SessionOutputs(session)
        session._fanout = outputs
    return outputs
