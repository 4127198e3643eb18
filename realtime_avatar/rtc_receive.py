"""Receive-side latency of aiortc: release each RTP frame as soon as it is complete.

aiortc's receiver (1.x) re-assembles frames in a JitterBuffer that only knows a frame is
complete when the first packet of the NEXT frame arrives, and for audio it also waits for 4
more frames (prefetch=4):

    audio  JitterBuffer(capacity=16, prefetch=4)   +80 ms: 4 Opus packets of 20 ms
    video  JitterBuffer(capacity=512)              +1 frame: 40 ms at 25 fps

Both are pure waiting on a loopback or a LAN. A browser's receiver does not wait like this: an
audio packet is a whole frame, and a video frame ends at the packet with the RTP marker bit
(RFC 3550 5.1; VP8 RFC 7741 4.1, H.264 RFC 6184 5.1). FrameEndJitterBuffer releases frames on
exactly those rules (and still on the next frame's first packet, if a marker was lost), so our
server hears the microphone 80 ms sooner and an aiortc viewer sees the avatar a frame
sooner. Packet loss and reordering are handled as before: a gap stops the release until the
missing packet comes or the buffer overflows (then aiortc's own recovery and PLI run).
"""

from __future__ import annotations

import logging

from aiortc.jitterbuffer import JitterBuffer, JitterFrame

log = logging.getLogger(__name__)

_BUFFER_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"  # aiortc 1.x keeps it name-mangled
# False: leave aiortc's receivers as they are (benchmarks measure what the swap saves)
ENABLED = True


class FrameEndJitterBuffer(JitterBuffer):
    """aiortc's JitterBuffer, releasing the oldest frame once it is complete: an audio packet
    at once, a video frame at its marker packet (or at the next frame's first packet)."""

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets = []
        timestamp = None
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None  # a gap (or nothing yet): wait
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                break  # the next frame started: the first one is complete
            packets.append(packet)
            if not self._is_video or packet.marker:
                break  # audio: one packet is one frame; video: the marker ends the frame
        else:
            return None
        self.remove(len(packets))
        return JitterFrame(data=b"".join(p._data for p in packets), timestamp=timestamp)


def release_frames_when_complete(receiver) -> bool:
    """Swap an aiortc RTCRtpReceiver's jitter buffer for a FrameEndJitterBuffer of the same
    capacity. Call before RTP flows (in the "track" handler, or after setRemoteDescription).
    Returns False (and changes nothing) on an aiortc whose receiver is laid out differently."""
    if not ENABLED:
        return False
    current = getattr(receiver, _BUFFER_ATTRIBUTE, None)
    if type(current) is not JitterBuffer:
        if not isinstance(current, FrameEndJitterBuffer):
            log.debug("aiortc receiver has no JitterBuffer at %s: left as it is", _BUFFER_ATTRIBUTE)
        return isinstance(current, FrameEndJitterBuffer)
    setattr(receiver, _BUFFER_ATTRIBUTE, FrameEndJitterBuffer(current.capacity, is_video=current._is_video))
    return True


def release_all_receivers(pc) -> int:
    """release_frames_when_complete() on every receiver of an RTCPeerConnection; how many."""
    return sum(release_frames_when_complete(t.receiver) for t in pc.getTransceivers())
