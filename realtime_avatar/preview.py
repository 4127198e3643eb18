"""Preview of a session running on this machine (`realtime-avatar live --mic`).

Two kinds, both fed by the session's own clock, so they show exactly what is played:

- `WindowPreview`: a Tk window on this machine's display (tkinter ships with Python; OpenCV's
  headless wheel, which mediapipe needs, has no GUI). Frames come from the session's `on_tick`
  hook in the event loop's thread, and the window is pumped from the same thread: Tk is not
  thread-safe, and this needs no second loop.
- `PagePreview`: when there is no display (a server, a container), a watch-only page served on
  127.0.0.1: a browser pulls the session's video and audio over WebRTC (recvonly). The audio
  starts muted on the page: played next to the microphone it would feed back into it.
"""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription

from .video_encoding import install_live_h264_settings
from .fanout import outputs_of
from .server import (
    WEB_ROOT,
    OfferError,
    PtimeAudioTrack,
    error_response,
    ice_addresses_for_host,
    ice_gathering_on,
    include_loopback_candidates,
    json_response,
    parse_offer_sdp,
)

log = logging.getLogger(__name__)

PUMP_INTERVAL_S = 0.02  # the window redraws at most every 20 ms: above the 25 fps it shows


def display_available() -> str | None:
    """None if a window can be opened here; else why not (for the message that says what we do)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY is not set)"
    try:
        import tkinter  # noqa: F401
    except ImportError as exc:  # Python built without Tk (e.g. a distro's python3 without python3-tk)
        return f"tkinter is not available ({exc})"
    return None


def ppm_bytes(image_bgr: np.ndarray) -> bytes:
    """A binary PPM (P6) of a BGR uint8 image: the format Tk's PhotoImage reads without PIL."""
    if image_bgr.dtype != np.uint8 or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 BGR image, got {image_bgr.dtype} {image_bgr.shape}")
    height, width = image_bgr.shape[:2]
    return b"P6 %d %d 255\n" % (width, height) + np.ascontiguousarray(image_bgr[:, :, ::-1]).tobytes()


class WindowPreview:
    """A Tk window showing the latest played frame. Call `show` per tick, `await run()` to pump."""

    def __init__(self, title: str = "realtime-avatar"):
        import tkinter

        self._tk = tkinter
        self.root = tkinter.Tk()  # TclError with a clear message if the display cannot be opened
        self.root.title(title)
        self.root.protocol("WM_DELETE_WINDOW", self.close)
        self._label = tkinter.Label(self.root, borderwidth=0)
        self._label.pack()
        self.photo: tkinter.PhotoImage | None = None
        self._latest: np.ndarray | None = None
        self.frames_shown = 0
        self.closed = False

    def show(self, image_bgr: np.ndarray) -> None:
        """Hand over a frame (kept by reference: the session makes a new image per tick)."""
        self._latest = image_bgr

    def pump(self) -> None:
        """Draw the newest frame if there is one and process window events."""
        if self.closed:
            return
        image, self._latest = self._latest, None
        if image is not None:
            data = ppm_bytes(image)
            if self.photo is None:
                self.photo = self._tk.PhotoImage(master=self.root, data=data, format="PPM")
                self._label.configure(image=self.photo)
            else:
                self.photo.configure(data=data, format="PPM")
            self.frames_shown += 1
        self.root.update()

    async def run(self) -> None:
        """Pump until the window is closed (by the user, or by `close`)."""
        while not self.closed:
            self.pump()
            await asyncio.sleep(PUMP_INTERVAL_S)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.root.destroy()


def check_watch_offer(sdp: str) -> SessionDescription:
    """A watch-only offer must ask to receive video (the page offers recvonly video and audio)."""
    description = parse_offer_sdp(sdp)
    if not any(m.kind == "video" and m.direction in ("recvonly", "sendrecv") for m in description.media):
        raise OfferError(400, "the offer does not ask for video: add a 'recvonly' video transceiver")
    return description


class PagePreview:
    """Serves `GET /` (a watch-only page) and `POST /offer` for one session on this machine.

    Every viewer gets the session's tracks through aiortc's MediaRelay, so several tabs (or a
    reload) can watch at once; the session's own tracks are read by the relay only while
    someone watches (unread ticks are dropped and counted by the session's tracks).
    """

    def __init__(self, session, host: str = "127.0.0.1", port: int = 8080):
        self.session, self.host, self.port = session, host, port
        self.peers: set[RTCPeerConnection] = set()
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/", self.handle_index)
        app.router.add_static("/web/", WEB_ROOT)
        app.router.add_post("/offer", self.handle_offer)
        self.app = app

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> str:
        include_loopback_candidates()
        install_live_h264_settings()
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]  # the one we got, if port 0 asked for any
        return self.url

    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_ROOT / "watch.html")

    async def handle_offer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            sdp = body["sdp"]
        except Exception:
            return error_response(400, 'send JSON {"sdp": ..., "type": "offer"}')
        try:
            check_watch_offer(sdp)
            answer = await self._answer(sdp)
        except OfferError as exc:
            return error_response(exc.status, exc.message)
        return json_response({"sdp": answer, "type": "answer"})

    async def _answer(self, offer_sdp: str) -> str:
        if self.session.closed:
            raise OfferError(410, "the live session has ended")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.peers.add(pc)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._drop(pc)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            kinds = {t.kind for t in pc.getTransceivers()}
            if "audio" in kinds:
                pc.addTrack(PtimeAudioTrack(outputs_of(self.session).audio()))
            # the session's one fan-out point: an RTMP push of the same session reads it too
            pc.addTrack(outputs_of(self.session).video())
            with ice_gathering_on(ice_addresses_for_host(self.host)):  # media where the page is bound
                await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await self._drop(pc)
            raise OfferError(400, f"offer rejected by the peer connection: {exc}") from exc
        log.info("preview viewer connected (%d watching)", len(self.peers))
        return pc.localDescription.sdp

    async def _drop(self, pc: RTCPeerConnection) -> None:
        if pc in self.peers:
            self.peers.discard(pc)
            await pc.close()

    async def close(self) -> None:
        for pc in list(self.peers):
            await self._drop(pc)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
