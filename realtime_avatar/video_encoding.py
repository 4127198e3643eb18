"""H.264 settings and frame sizing for every MP4 the project writes (offline render, recorder).

Keyframes without a pulse: libx264 puts an IDR keyframe every 250 frames (10 s at 25 fps). With
its defaults an I-frame gets a lower quantizer than the P-frames around it (ipratio 1.4) and a
bit budget of its own, so the static background, which the P-frames only copy, is coded anew
and visibly brighter/sharper for a moment every 10 s. Constant quality (CRF) with the I-, P- and
B-frame quantizers tied together (ipratio = pbratio = 1) codes an unchanged background to the
same pixels in every keyframe: measured on the astronaut with a changing mouth, the background's
mean absolute change at the keyframe fell from 1.4 grey levels (CRF 20, defaults) to 0.05, at
about the same file size (689 vs 704 kB for 12 s of 512x512).

Odd sizes: H.264 with 4:2:0 chroma (what players and browsers decode) codes whole 2x2 chroma
blocks, and its cropping window also moves in steps of 2, so an odd width or height cannot be
stored. The frame is padded by repeating its last column/row to the next even size (nothing is
dropped), and that is logged once per file.
"""

from __future__ import annotations

import fractions
import logging

import av
import numpy as np

from .timing import FPS

log = logging.getLogger(__name__)

H264_CRF = 20  # constant quality: visually lossless enough for a face, small files
H264_PRESET = "veryfast"
# ipratio/pbratio 1: keyframes at the same quantizer as the frames between them (no pulse).
H264_X264_PARAMS = "ipratio=1.0:pbratio=1.0"
PIX_FMT = "yuv420p"  # the format every player decodes; needs even width and height


def even_size(width: int, height: int) -> tuple[int, int]:
    """The smallest even (width, height) at least as large: what a 4:2:0 encoder can store."""
    return width + width % 2, height + height % 2


def pad_to_even(image: np.ndarray) -> np.ndarray:
    """[H, W, C] -> [H', W', C] with H', W' even, the last row/column repeated; the same array
    when already even."""
    h, w = image.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return image
    return np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def add_h264_stream(container: av.container.OutputContainer, width: int, height: int,
                    *, crf: int = H264_CRF, what: str = "video") -> av.video.stream.VideoStream:
    """An H.264 stream at 25 fps for frames of width x height (padded to even, see pad_to_even),
    constant quality `crf` (0-51, lower is better) with keyframes that do not pulse."""
    even_w, even_h = even_size(width, height)
    if (even_w, even_h) != (width, height):
        log.info("%s: the avatar is %dx%d; H.264 (4:2:0) needs even sizes, so the video is %dx%d "
                 "with the last %s repeated (no pixel dropped)", what, width, height, even_w, even_h,
                 "row and column" if (even_w != width and even_h != height) else
                 "column" if even_w != width else "row")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = even_w, even_h, PIX_FMT
    stream.options = {"crf": str(crf), "preset": H264_PRESET, "x264-params": H264_X264_PARAMS}
    return stream


def video_frame(image_bgr: np.ndarray, index: int) -> av.VideoFrame:
    """Frame `index` of a 25 fps video from a BGR image (padded to even sizes)."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pad_to_even(image_bgr)), format="bgr24")
    frame.pts, frame.time_base = index, fractions.Fraction(1, FPS)
    return frame


# -- the live WebRTC path -------------------------------------------------------------------------
#
# aiortc encodes live video itself: VP8 (what browsers usually get; a keyframe only every 3000
# frames or on request, no pulse measured) or H.264 through libx264 at a target bitrate with
# x264's default keyframe interval of 250 frames, where the background jumped 1.34 grey levels
# every 10 s. Tying quantizers does not help under bitrate control (measured 1.2-2.0), so the
# live H.264 encoder uses periodic intra refresh instead of periodic keyframes: a column of
# intra blocks sweeps the picture, and a receiver that asks for a keyframe (PLI) still gets
# one. Measured: 0.06 grey levels at frame 250, same bitrate.
LIVE_H264_X264_PARAMS = "intra-refresh=1"


def _steady_h264_encoder_class():
    import fractions as _fractions

    from aiortc.codecs import h264

    class SteadyH264Encoder(h264.H264Encoder):
        """aiortc's H.264 encoder, with intra refresh instead of a keyframe every 250 frames.

        aiortc creates its libx264 context inside _encode_frame when it has none (first frame,
        a new size, or a bitrate change over 10%); this creates it first, with the same
        settings as aiortc 1.16 plus LIVE_H264_X264_PARAMS, and lets aiortc do the rest."""

        def _encode_frame(self, frame, force_keyframe):
            codec = self.codec
            if codec is not None and (
                frame.width != codec.width or frame.height != codec.height
                or abs(self.target_bitrate - codec.bit_rate) / codec.bit_rate > 0.1
            ):
                self.buffer_data, self.buffer_pts, self.codec = b"", None, None
            if self.codec is None:
                codec = av.CodecContext.create("libx264", "w")
                codec.width, codec.height = frame.width, frame.height
                codec.bit_rate = self.target_bitrate
                codec.pix_fmt = PIX_FMT
                codec.framerate = _fractions.Fraction(h264.MAX_FRAME_RATE, 1)
                codec.time_base = _fractions.Fraction(1, h264.MAX_FRAME_RATE)
                codec.options = {"level": "31", "tune": "zerolatency", "x264-params": LIVE_H264_X264_PARAMS}
                codec.profile = "Baseline"
                self.codec = codec
            yield from super()._encode_frame(frame, force_keyframe)

    return SteadyH264Encoder


def install_live_h264_settings() -> None:
    """Make aiortc's RTP senders use SteadyH264Encoder for H.264 (idempotent, process-wide;
    other codecs untouched). aiortc looks `get_encoder` up in its rtcrtpsender module when a
    sender starts, so wrapping it there is the one hook it offers."""
    import aiortc.rtcrtpsender as sender

    if getattr(sender.get_encoder, "_steady_h264", False):
        return
    original = sender.get_encoder
    steady = _steady_h264_encoder_class()

    def get_encoder(codec):
        if codec.mimeType.lower() == "video/h264":
            return steady()
        return original(codec)

    get_encoder._steady_h264 = True  # type: ignore[attr-defined]
    sender.get_encoder = get_encoder
