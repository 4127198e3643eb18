"""A live session with an odd-sized avatar (512x425): its frames reach aiortc's encoders.

aiortc's H.264 encoder (libx264, 4:2:0) cannot open an odd size, so before the session padded
its frames a peer that negotiated H.264 got no video at all; VP8 took odd sizes."""

from __future__ import annotations

import asyncio
import fractions

import av
import cv2
import numpy as np
import skimage.data
from aiortc.codecs import get_encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from realtime_avatar.avatar import AvatarSettings, prepare_avatar
from realtime_avatar.renderer import AvatarRenderer, silence_window
from realtime_avatar.session import AvatarSession, SessionConfig

H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102,
                             parameters={"packetization-mode": "1", "profile-level-id": "42e01f"})
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)


def test_odd_sized_avatar_frames_encode_as_h264_and_vp8(runtime, tmp_path):
    odd = np.ascontiguousarray(cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)[:425])
    source = tmp_path / "odd.png"
    assert cv2.imwrite(str(source), odd)
    avatar = prepare_avatar(source, tmp_path / "a", runtime.model, AvatarSettings(idle_motion=False), progress=False)
    renderer = AvatarRenderer(runtime.model, avatar, silence_window(runtime.encoder), batch_size=4)

    async def frames(n: int) -> list[av.VideoFrame]:
        session = AvatarSession(runtime.encoder, renderer, SessionConfig(streaming=runtime.streaming))
        await session.start()
        try:
            return [await asyncio.wait_for(session.video_track.recv(), 5) for _ in range(n)]
        finally:
            await session.close()

    got = asyncio.run(frames(3))
    assert all((f.width, f.height) == (512, 426) for f in got)  # padded, as the MP4s are
    image = got[-1].to_ndarray(format="bgr24")
    assert np.array_equal(image[:425], renderer.idle_frame(0))  # the idle frame, every row kept
    assert np.array_equal(image[425], image[424])  # the repeated last row
    for codec in (H264, VP8):
        encoder = get_encoder(codec)
        frame = got[-1]
        frame.time_base = fractions.Fraction(1, 90000)
        payloads, _ = encoder.encode(frame)
        assert payloads and sum(map(len, payloads)) > 100, codec.mimeType
