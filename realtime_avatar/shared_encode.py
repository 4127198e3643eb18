"""One VP8 encode of a session's video (and one Opus encode of its audio) for all of its WHEP
viewers and its Janus publisher.

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

Only VP8 and Opus are shared (what browsers and aiortc pick first); a viewer that offers neither
gets its own encoder, as before (whep.py decides). Audio: aiortc encodes Opus per sender in its
thread pool, one job per 20 ms per peer (~1,000 jobs a second at 20 viewers);
SharedAudioEncoder encodes it once, on the event loop (~0.1 ms per packet).

The VP8 thread runs below the render's priority (priority.py): when the cores are short, the
mouth frames come first and the outputs lose smoothness, not the other way round.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .priority import lower_thread_priority

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


class EncodedTrack(MediaStreamTrack):
    """One consumer's view of a SharedEncoder: recv() gives `av.Packet`s (VP8 or Opus), which
    an aiortc RTCRtpSender packetizes without encoding. Raises MediaStreamError when the
    session's media ends or the track is stopped."""

    def __init__(self, encoder: SharedEncoder):
        super().__init__()
        self.kind = encoder.kind
        self._encoder = encoder
        self._queue: asyncio.Queue[av.Packet | None] = asyncio.Queue(encoder.queue_packets)
        # a video decoder can only start at a keyframe; every Opus packet decodes alone
        self._waiting_for_keyframe = encoder.kind == "video"
        self._ended = False
        self.dropped = 0  # packets this consumer lost by lagging behind (plus those skipped to resync)

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
            self.dropped += 1
            if self.kind == "video":
                # Behind: what is queued still decodes, what follows a gap would not.
                self._waiting_for_keyframe = True
                self._encoder.request_keyframe()
                return
            self._queue.get_nowait()  # audio: the oldest packet goes, the newest plays
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


EncodedVideoTrack = EncodedTrack  # the name the WHEP code and tests know


class SharedEncoder:
    """Encodes a track once for any number of EncodedTracks. Owns the source: stops it (and its
    task, and its encoder thread) when the last consumer leaves or the source ends; `closed` is
    then True and a new consumer needs a new encoder (fanout.SessionOutputs does that).
    Subclasses give `kind`, `queue_packets` and `_encode(frame, keyframe) -> packets`."""

    kind = "video"
    queue_packets = VIEWER_QUEUE_PACKETS

    def __init__(self, source: MediaStreamTrack, *, min_keyframe_interval_s: float = MIN_KEYFRAME_INTERVAL_S):
        self._source = source
        self.min_keyframe_interval_s = min_keyframe_interval_s
        self._viewers: list[EncodedTrack] = []
        self._keyframe_requested = True
        self._last_keyframe_s: float | None = None
        self._executor: ThreadPoolExecutor | None = None  # None: encode on the event loop (cheap codecs)
        self._task: asyncio.Task | None = None
        self.closed = False
        self.frames_encoded = 0
        self.keyframes = 0

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def subscribe(self) -> EncodedTrack:
        """A new consumer track (video: starts at the next keyframe, which it requests)."""
        if self.closed:
            raise RuntimeError("this shared encoder is closed: make a new one for new viewers")
        track = EncodedTrack(self)
        self._viewers.append(track)
        self.request_keyframe()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return track

    def unsubscribe(self, track: EncodedTrack) -> None:
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
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _prepare(self, frame):
        """The frame as the codec takes it (on the event loop)."""
        return frame

    def _encode(self, frame, keyframe: bool) -> list[av.Packet]:
        raise NotImplementedError

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = self._prepare(await self._source.recv())
                keyframe = keyframe_due(self._keyframe_requested, self._last_keyframe_s, time.monotonic(),
                                        self.min_keyframe_interval_s)
                if keyframe:
                    self._keyframe_requested = False
                if self._executor is None:
                    packets = self._encode(frame, keyframe)
                else:
                    packets = await loop.run_in_executor(self._executor, self._encode, frame, keyframe)
                self.frames_encoded += 1
                for packet in packets:
                    if packet.is_keyframe and self.kind == "video":
                        self.keyframes += 1
                        self._last_keyframe_s = time.monotonic()
                    for track in list(self._viewers):
                        track.offer(packet)
        except MediaStreamError:
            pass  # the session's media ended
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("shared %s encoder failed: its consumers are ended", self.kind)
        finally:
            if not self.closed:
                self._task = None  # ended by itself, not cancelled
                self.close()


class SharedVideoEncoder(SharedEncoder):
    """VP8 of a video track (yuv420p frames, e.g. a relay proxy), on its own thread at output
    priority (priority.py: the render and the Whisper encoder come first)."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack, *, bitrate: int = DEFAULT_BITRATE,
                 min_keyframe_interval_s: float = MIN_KEYFRAME_INTERVAL_S):
        if bitrate <= 0:
            raise ValueError(f"bitrate must be positive, got {bitrate}")
        super().__init__(source, min_keyframe_interval_s=min_keyframe_interval_s)
        self.bitrate = bitrate
        self._codec: av.CodecContext | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shared-vp8", initializer=lower_thread_priority)

    def _prepare(self, frame: av.VideoFrame) -> av.VideoFrame:
        return frame if frame.format.name == "yuv420p" else frame.reformat(format="yuv420p")

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


OPUS_RATE = 48_000  # RTP clock and sample rate of Opus in WebRTC (RFC 7587)
OPUS_FRAME = 960  # 20 ms at 48 kHz: the packetisation aiortc and browsers use
OPUS_QUEUE_PACKETS = 25  # 500 ms of audio a consumer may lag before its oldest packets go


class SharedAudioEncoder(SharedEncoder):
    """Opus of an audio track, encoded once for every consumer (WHEP viewers, the Janus
    publisher), as aiortc's OpusEncoder does per peer (48 kHz stereo, 20 ms packets, 96 kbit/s,
    `voip`): 20 peers cost one encode instead of 20 thread-pool jobs per 20 ms (measured in
    bench_broadcast: ~1,000 encoder jobs a second at 20 viewers kept the session's own work
    waiting). A 20 ms Opus encode takes ~0.1 ms, so it runs on the event loop."""

    kind = "audio"
    queue_packets = OPUS_QUEUE_PACKETS

    def __init__(self, source: MediaStreamTrack):
        super().__init__(source)
        self._resampler = av.AudioResampler(format="s16", layout="stereo", rate=OPUS_RATE, frame_size=OPUS_FRAME)
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.bit_rate = 96_000
        self._codec.format, self._codec.layout, self._codec.sample_rate = "s16", "stereo", OPUS_RATE
        self._codec.time_base = fractions.Fraction(1, OPUS_RATE)
        self._codec.options = {"application": "voip"}
        self._samples = 0  # 48 kHz samples encoded: the next packet's pts

    def _prepare(self, frame: av.AudioFrame) -> av.AudioFrame:
        # The relay hands one frame object to every consumer: the resampler gets a copy of its
        # samples (it would rewrite the shared frame's pts).
        copy = av.AudioFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name, layout=frame.layout.name)
        copy.sample_rate = frame.sample_rate
        return copy

    def _encode(self, frame: av.AudioFrame, keyframe: bool) -> list[av.Packet]:
        packets = []
        for chunk in self._resampler.resample(frame):
            packets += self._codec.encode(chunk)
        for packet in packets:  # what OpusEncoder.pack() reads: pts in 1/48000
            packet.pts, packet.time_base = self._samples, fractions.Fraction(1, OPUS_RATE)
            self._samples += OPUS_FRAME
        return packets
