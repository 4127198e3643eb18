"""One VP8 encode of a session's video for all of its WHEP viewers.

aiortc encodes per RTCRtpSender, so N viewers of one session cost N VP8 encodes of the same
frame: measured on the 2-core machine (README, broadcasting), 20 WHEP viewers of a 512x512
session fell to ~8 fps while the RTMP push beside them held 24.5. aiortc's senders also accept
pre-encoded `av.Packet`s and then only packetize them (`Vp8Encoder.pack`), so here a session's
video is encoded once and every viewer's sender reads the same packets: the cost of a viewer
becomes packetizing and sending, not encoding.

What per-viewer encoding gave for free, and how it is kept:
- A viewer starts decoding at a keyframe. A new viewer's track skips packets until the next
  keyframe and asks for one; a viewer's RTCP keyframe requests (PLI/FIR, routed here from its
  sender) do the same. Requests are coalesced into at most one keyframe per
  `min_keyframe_interval_s`, so 20 viewers joining at once cost one or two keyframes, not 20.
- A viewer that falls behind loses frames. In an inter-coded stream a lost frame breaks every
  frame after it, so such a viewer keeps what it has queued, then skips to the next keyframe
  (and asks for one) instead of decoding garbage. The others never notice.
- Bitrate: one fixed target for everyone (per-viewer congestion control would let one viewer's
  REMB lower the picture of all). WHEP viewers are a LAN/loopback or small-audience path; large
  audiences go through an SFU (janus.py), which forwards one publisher's stream the same way.

Only VP8 is shared (what browsers and aiortc pick first); a viewer that offers no VP8 gets its
own encoder, as before (whep.py decides).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger(__name__)

DEFAULT_BITRATE = 1_000_000  # bit/s; aiortc's per-viewer VP8 starts at 0.5 and may climb to 1.5 Mbit/s
MIN_KEYFRAME_INTERVAL_S = 0.5  # coalesce keyframe requests (joins, PLIs, lagging viewers)
VIEWER_QUEUE_PACKETS = 4  # packets a viewer may lag (160 ms at 25 fps) before it skips to a keyframe


def keyframe_due(requested: bool, last_keyframe_s: float | None, now_s: float,
                 min_interval_s: float = MIN_KEYFRAME_INTERVAL_S) -> bool:
    """Whether the next frame should be forced to a keyframe: one was requested and the last
    keyframe is at least `min_interval_s` old (monotonic seconds; None: there was none yet)."""
    return requested and (last_keyframe_s is None or now_s - last_keyframe_s >= min_interval_s)


def vp8_codec(width: int, height: int, time_base, bitrate: int) -> av.CodecContext:
    """A libvpx VP8 encoder set up as aiortc's Vp8Encoder (realtime deadline, no lag, CBR)."""
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = width, height
    codec.pix_fmt = "yuv420p"
    codec.time_base = time_base
    codec.bit_rate = bitrate
    codec.gop_size = 3000  # keyframes on request (new viewers, PLI), as aiortc does
    codec.qmin, codec.qmax = 2, 56
    codec.options = {
        "bufsize": str(bitrate), "minrate": str(bitrate), "maxrate": str(bitrate),  # CBR, 1 s buffer
        "cpu-used": "-6", "deadline": "realtime", "lag-in-frames": "0", "noise-sensitivity": "4",
        "overshoot-pct": "15", "undershoot-pct": "100", "partitions": "0", "static-thresh": "1",
    }
    codec.thread_count = 1  # one thread: the render and the other outputs need the other cores
    return codec


class EncodedVideoTrack(MediaStreamTrack):
    """One viewer's view of a SharedVideoEncoder: recv() gives `av.Packet`s (VP8), which an
    aiortc RTCRtpSender packetizes without encoding. Raises MediaStreamError when the session's
    video ends or the track is stopped."""

    kind = "video"

    def __init__(self, encoder: SharedVideoEncoder):
        super().__init__()
        self._encoder = encoder
        self._queue: asyncio.Queue[av.Packet | None] = asyncio.Queue(VIEWER_QUEUE_PACKETS)
        self._waiting_for_keyframe = True  # a decoder can only start at a keyframe
        self._ended = False
        self.dropped = 0  # packets this viewer lost by lagging behind (plus those skipped to resync)

    def request_keyframe(self) -> None:
        """Ask the shared encoder for a keyframe (an RTCP PLI/FIR from this viewer)."""
        self._encoder.request_keyframe()

    def offer(self, packet: av.Packet) -> None:
        """Called by the encoder, on the event loop, with each packet in order."""
        if self._waiting_for_keyframe:
            if not packet.is_keyframe:
                self.dropped += 1
                return
            self._waiting_for_keyframe = False
        if self._queue.full():
            # Behind: what is queued still decodes, what follows a gap would not.
            self.dropped += 1
            self._waiting_for_keyframe = True
            self._encoder.request_keyframe()
            return
        self._queue.put_nowait(packet)

    def end(self) -> None:
        """The source ended: recv() raises once what is queued has been read."""
        self._ended = True
        if not self._queue.full():
            self._queue.put_nowait(None)  # wakes a waiting recv(); a full queue is read first

    async def recv(self) -> av.Packet:
        if self.readyState != "live" or (self._ended and self._queue.empty()):
            self.stop()
            raise MediaStreamError
        packet = await self._queue.get()
        if packet is None:
            self.stop()
            raise MediaStreamError
        return packet

    def stop(self) -> None:
        super().stop()
        self._encoder.unsubscribe(self)


class SharedVideoEncoder:
    """Encodes a video track (yuv420p frames, e.g. a relay proxy) to VP8 once, for any number of
    EncodedVideoTracks. Owns the source: stops it (and its task, and its encoder thread) when
    the last viewer leaves or the source ends; `closed` is then True and a new viewer needs a
    new SharedVideoEncoder (fanout.SessionOutputs.encoded_video does that)."""

    def __init__(self, source: MediaStreamTrack, *, bitrate: int = DEFAULT_BITRATE,
                 min_keyframe_interval_s: float = MIN_KEYFRAME_INTERVAL_S):
        if bitrate <= 0:
            raise ValueError(f"bitrate must be positive, got {bitrate}")
        self._source = source
        self.bitrate = bitrate
        self.min_keyframe_interval_s = min_keyframe_interval_s
        self._viewers: list[EncodedVideoTrack] = []
        self._codec: av.CodecContext | None = None
        self._keyframe_requested = True
        self._last_keyframe_s: float | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shared-vp8")
        self._task: asyncio.Task | None = None
        self.closed = False
        self.frames_encoded = 0
        self.keyframes = 0

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def subscribe(self) -> EncodedVideoTrack:
        """A new viewer track (starts at the next keyframe, which it requests)."""
        if self.closed:
            raise RuntimeError("this shared encoder is closed: make a new one for new viewers")
        track = EncodedVideoTrack(self)
        self._viewers.append(track)
        self.request_keyframe()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return track

    def unsubscribe(self, track: EncodedVideoTrack) -> None:
        if track in self._viewers:
            self._viewers.remove(track)
        if not self._viewers:
            self.close()

    def request_keyframe(self) -> None:
        self._keyframe_requested = True

    def close(self) -> None:
        """Stop encoding (idempotent): the task is cancelled, the source stopped, viewers ended."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
        self._source.stop()
        for track in self._viewers:
            track.end()
        self._viewers.clear()
        self._executor.shutdown(wait=False)

    def _encode(self, frame: av.VideoFrame, keyframe: bool) -> list[av.Packet]:
        # On the encoder thread. The frame is shared with the session's other consumers (own
        # peer, RTMP): it is read, never modified; a forced keyframe is set on a copy.
        if self._codec is None or (self._codec.width, self._codec.height) != (frame.width, frame.height):
            self._codec = vp8_codec(frame.width, frame.height, frame.time_base, self.bitrate)
        if keyframe:
            copy = av.VideoFrame.from_ndarray(frame.to_ndarray(format="yuv420p"), format="yuv420p")
            copy.pts, copy.time_base = frame.pts, frame.time_base
            copy.pict_type = av.video.frame.PictureType.I
            frame = copy
        packets = self._codec.encode(frame)
        for packet in packets:  # what RTCRtpSender's pack() reads for the RTP timestamp
            packet.pts, packet.time_base = frame.pts, frame.time_base
        return packets

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self._source.recv()
                if frame.format.name != "yuv420p":
                    frame = frame.reformat(format="yuv420p")
                keyframe = keyframe_due(self._keyframe_requested, self._last_keyframe_s, time.monotonic(),
                                        self.min_keyframe_interval_s)
                if keyframe:
                    self._keyframe_requested = False
                packets = await loop.run_in_executor(self._executor, self._encode, frame, keyframe)
                self.frames_encoded += 1
                for packet in packets:
                    if packet.is_keyframe:
                        self.keyframes += 1
                        self._last_keyframe_s = time.monotonic()
                    for track in list(self._viewers):
                        track.offer(packet)
        except MediaStreamError:
            pass  # the session's video ended
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("shared VP8 encoder failed: its viewers are ended")
        finally:
            if not self.closed:
                self._task = None  # ended by itself, not cancelled
                self.close()
