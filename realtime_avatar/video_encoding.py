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
