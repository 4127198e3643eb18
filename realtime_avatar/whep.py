"""WHEP viewers: any number of watch-only WebRTC peers per session, one render fanned out.

WHEP is the egress twin of WHIP: the viewer POSTs an SDP offer (application/sdp, receive-only)
to /whep/<session-or-channel>, gets 201 + Location + the answer, and DELETEs the Location to
leave. Each viewer's peer connection sends relay proxies of the session's tracks (see fanout.py):
the avatar is rendered once, and its video and audio are encoded once for all viewers that take
VP8 and Opus (shared_encode.py; a viewer without them gets its own encoder).
For audiences beyond a few dozen viewers per machine, publish into an SFU instead (janus.py).

Where the viewers' peer connections live: `peers="process"` (serve's default) puts them in a
child process fed the shared packets (whep_process.py), so that 20 viewers' RTP and SRTP work
is not done on the event loop that drives the sessions; `peers="inline"` keeps them in this
process (also what a viewer that does not take VP8 and Opus always gets: its own encoders).

A viewer is cut off alone when its connection fails or closes, when it is not connected within
`connect_timeout_s` of its answer (it never started reading), or when its session ends.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from .fanout import SHARED_CODECS, SessionOutputs, add_shared_track
from .server import (
    OfferError,
    PtimeAudioTrack,
    error_response,
    ice_gathering_on,
    loopback_candidates_included,
    parse_offer_sdp,
)
from .whep_process import ViewerProcessError, WhepPeerProcess

log = logging.getLogger(__name__)

DEFAULT_MAX_VIEWERS = 50  # per server; beyond that, an SFU (--janus)
CONNECT_TIMEOUT_S = 10.0
RECEIVE_DIRECTIONS = ("recvonly", "sendrecv")
PEERS = ("process", "inline")


def check_viewer_offer(sdp: str) -> dict[str, bool]:
    """A WHEP offer must want to receive audio or video; raise OfferError(400) if not.
    Returns, for each kind the offer receives, whether it takes the shared codec (video VP8,
    audio Opus): then the viewer gets the session's shared encode of that kind."""
    description = parse_offer_sdp(sdp)
    received = {m.kind for m in description.media if m.kind in SHARED_CODECS and m.direction in RECEIVE_DIRECTIONS}
    if not received:
        raise OfferError(400, "a WHEP offer must receive media: add recvonly audio/video transceivers "
                              "(pc.addTransceiver('video', {direction: 'recvonly'})) before createOffer()")
    return {kind: any(c.mimeType.lower() == SHARED_CODECS[kind][0] for m in description.media if m.kind == kind
                      for c in m.rtp.codecs)
            for kind in received}


class WhepViewer:
    def __init__(self, viewer_id: str, channel: str, pc: RTCPeerConnection | None):
        self.id = viewer_id
        self.channel = channel
        self.pc = pc  # None: the viewer's peer is in the viewer process
        self.close_reason: str | None = None
        self.proxies: list = []  # relay proxies this viewer reads; stopped when it leaves
        self._closing: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None


class WhepEndpoint:
    """Viewer registry and HTTP handlers. `resolve(channel)` gives the SessionOutputs to watch
    (None: no such session)."""

    def __init__(self, resolve: Callable[[str], SessionOutputs | None], *,
                 max_viewers: int = DEFAULT_MAX_VIEWERS, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 authorized: Callable[[web.Request], bool] = lambda request: True, shared_encode: bool = True,
                 peers: str = "process"):
        if peers not in PEERS:
            raise ValueError(f"peers must be one of {PEERS}, not {peers!r}")
        self.resolve = resolve
        self.peers = peers
        self.process: WhepPeerProcess | None = None  # started with the first viewer it takes
        self.shared_encode = shared_encode  # False: one VP8 encoder per viewer (aiortc's own)
        self.max_viewers = max_viewers
        self.connect_timeout_s = connect_timeout_s
        self.authorized = authorized
        self.viewers: dict[str, WhepViewer] = {}
        self.ice_addresses: tuple[str, ...] | None = None  # set by the server: its bind address(es)
        self.viewers_total = 0
        self._negotiating = 0

    def count(self, channel: str | None = None) -> int:
        return sum(1 for v in self.viewers.values() if channel is None or v.channel == channel)

    async def answer(self, channel: str, offer_sdp: str) -> tuple[WhepViewer, str]:
        takes = check_viewer_offer(offer_sdp)
        outputs = self.resolve(channel)
        if outputs is None:
            raise OfferError(404, f"no session or channel {channel!r} to watch (ended or never existed)")
        if len(self.viewers) + self._negotiating >= self.max_viewers:
            raise OfferError(503, f"{self.max_viewers} viewers already: publish to an SFU (--janus) for more")
        self._negotiating += 1
        if self.peers == "process" and self.shared_encode and all(takes.values()):
            self._negotiating -= 1  # from here the viewer is counted in self.viewers
            return await self._answer_in_process(channel, outputs, offer_sdp, set(takes))
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        viewer = WhepViewer(uuid.uuid4().hex, channel, pc)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            kinds = {t.kind for t in pc.getTransceivers()}
            if "video" in kinds and self.shared_encode and takes.get("video"):
                viewer.proxies.append(add_shared_track(pc, outputs, "video"))
            elif "video" in kinds:
                viewer.proxies.append(outputs.video())
                pc.addTrack(viewer.proxies[-1])
            if "audio" in kinds and self.shared_encode and takes.get("audio"):
                viewer.proxies.append(add_shared_track(pc, outputs, "audio"))
            elif "audio" in kinds:
                viewer.proxies.append(outputs.audio())
                pc.addTrack(PtimeAudioTrack(viewer.proxies[-1]))
            with ice_gathering_on(self.ice_addresses):  # viewers' media only where HTTP is bound
                await asyncio.wait_for(pc.setLocalDescription(await pc.createAnswer()), CONNECT_TIMEOUT_S)
        except Exception as exc:
            await self._shutdown(viewer)
            if isinstance(exc, OfferError):
                raise
            raise OfferError(400, f"offer rejected: {exc}") from exc
        finally:
            self._negotiating -= 1
        self.viewers[viewer.id] = viewer
        self.viewers_total += 1

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self.schedule_close(viewer, f"connection {pc.connectionState}")

        viewer._watchdog = asyncio.ensure_future(self._watch(viewer))
        log.info("whep viewer %s watching %s (%d viewers)", viewer.id, channel, len(self.viewers))
        return viewer, pc.localDescription.sdp

    async def _answer_in_process(self, channel: str, outputs: SessionOutputs, offer_sdp: str,
                                 kinds: set[str]) -> tuple[WhepViewer, str]:
        if self.process is None:
            self.process = WhepPeerProcess(ice_addresses=self.ice_addresses,
                                           loopback_candidates=loopback_candidates_included(),
                                           on_viewer_closed=self._closed_in_process)
        viewer = WhepViewer(uuid.uuid4().hex, channel, None)
        self.viewers[viewer.id] = viewer  # before the answer: the process may report it closed at once
        try:
            answer = await self.process.add_viewer(channel, outputs, viewer.id, offer_sdp, kinds, self.connect_timeout_s)
        except ViewerProcessError as exc:
            self.viewers.pop(viewer.id, None)
            raise OfferError(exc.status, exc.message) from None
        self.viewers_total += 1
        log.info("whep viewer %s watching %s (%d viewers, viewer process)", viewer.id, channel, len(self.viewers))
        return viewer, answer

    def _closed_in_process(self, viewer_id: str, reason: str) -> None:
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is not None:
            viewer.close_reason = viewer.close_reason or reason
            log.info("whep viewer %s of %s leaves: %s", viewer.id, viewer.channel, reason)

    async def _watch(self, viewer: WhepViewer) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if viewer.pc.connectionState != "connected":
            self.schedule_close(viewer, f"not connected within {self.connect_timeout_s:g} s")

    def schedule_close(self, viewer: WhepViewer, reason: str) -> asyncio.Task:
        if viewer._closing is None:
            viewer.close_reason = reason
            viewer._closing = asyncio.ensure_future(self._close(viewer, reason))
        return viewer._closing

    async def _close(self, viewer: WhepViewer, reason: str) -> None:
        log.info("whep viewer %s of %s leaves: %s", viewer.id, viewer.channel, reason)
        self.viewers.pop(viewer.id, None)
        if viewer._watchdog is not None and viewer._watchdog is not asyncio.current_task():
            viewer._watchdog.cancel()
        await self._shutdown(viewer)

    async def _shutdown(self, viewer: WhepViewer) -> None:
        if viewer.pc is None:
            if self.process is not None:
                await self.process.remove_viewer(viewer.id)
            return
        for proxy in viewer.proxies:
            proxy.stop()  # leaves the relay (a buffered proxy nobody reads would grow forever)
        try:
            await asyncio.wait_for(viewer.pc.close(), 5.0)
        except Exception:
            log.exception("whep viewer %s: closing the peer connection failed", viewer.id)

    async def close_channel(self, channel: str, reason: str = "session ended") -> None:
        if self.process is not None:
            await self.process.end_channel(channel)
        await asyncio.gather(*(asyncio.shield(self.schedule_close(v, reason))
                               for v in list(self.viewers.values()) if v.channel == channel))

    async def close_all(self) -> None:
        await asyncio.gather(*(asyncio.shield(self.schedule_close(v, "server shutdown"))
                               for v in list(self.viewers.values())))
        if self.process is not None:
            await self.process.close()

    # -- HTTP ----------------------------------------------------------------------------------

    async def handle_post(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        if request.content_type != "application/sdp":
            return error_response(415, f"WHEP offers must be Content-Type application/sdp, got {request.content_type!r}")
        try:
            offer = await request.text()
            viewer, answer = await self.answer(request.match_info["channel"], offer)
        except UnicodeDecodeError:
            return error_response(400, "the SDP offer is not valid UTF-8")
        except OfferError as exc:
            return error_response(exc.status, exc.message)
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": f"/whep/{viewer.channel}/{viewer.id}"})

    async def handle_delete(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        viewer = self.viewers.get(request.match_info["viewer_id"])
        if viewer is None or viewer.channel != request.match_info["channel"]:
            return error_response(404, f"no viewer {request.match_info['viewer_id']!r} (left or never existed)")
        await asyncio.shield(self.schedule_close(viewer, "deleted by the viewer"))
        return web.Response(status=200)
