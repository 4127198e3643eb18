"""Broadcast sessions and their outputs: the server side of RTMP, WHEP, Janus and audio push.

    POST /sessions {"avatar": null, "outputs": ["rtmp", "janus"], "name": "broadcast"}
        -> 201 {"id": ..., "audio": "/sessions/<id>/audio", "whep": "/whep/<id>", "watch": "/watch/<id>"}
    GET  /sessions/<id>/audio        WebSocket: the audio-push API (audio_push.py)
    POST /whep/<id>, DELETE /whep/<id>/<viewer>, GET /watch/<id>   viewers (whep.py)
    DELETE /sessions/<id>, GET /sessions/<id>/stats, POST /sessions/<id>/interrupt   as for peers

A broadcast session has no WebRTC peer: it is fed only by the audio-push API and watched through
WHEP, RTMP and Janus. Peer sessions (the page, WHIP) can be watched over WHEP too, fed over a data
channel labelled "audio", and pushed to RTMP with `rtmp_sessions="all"`.

Every output runs in its own task with its own error handling; none of them can stall the
session (RTMP encodes on its own thread, Janus retries in the background, viewers are cut off
alone).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from dataclasses import dataclass

from aiohttp import WSMsgType, web

from .audio_push import AudioPlayout, AudioPushConnection, AudioPushError
from .fanout import SessionOutputs, outputs_of
from .janus import JanusPublisher
from .rtmp import RtmpPusher, check_rtmp_url
from .server import WEB_ROOT, AvatarServer, error_response, json_response
from .whep import DEFAULT_MAX_VIEWERS, WhepEndpoint

log = logging.getLogger(__name__)

OUTPUTS = ("whep", "rtmp", "janus")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EVENT_QUEUE = 64  # events waiting for a slow WebSocket client before it is cut off
MAX_WS_MESSAGE = 4 * 1024 * 1024  # 4 MiB: more than 20 s of 48 kHz stereo PCM in one message


@dataclass(frozen=True)
class BroadcastOptions:
    rtmp_url: str | None = None  # may hold {session}, replaced by the session id
    rtmp_sessions: str = "broadcast"  # "broadcast": sessions that ask for rtmp; "all": every session
    janus_url: str | None = None
    janus_room: int = 1234
    max_viewers: int = DEFAULT_MAX_VIEWERS
    broadcast_session: str | None = None  # create this API session at start (e.g. "broadcast")
    whep_shared_encode: bool = True  # one VP8 encode for all WHEP viewers (False: one per viewer)
    whep_peers: str = "process"  # viewers' peer connections in a child process (whep_process.py); "inline": here

    def __post_init__(self):
        if self.rtmp_url is not None:
            check_rtmp_url(self.rtmp_url.replace("{session}", "x"))
            if self.rtmp_sessions == "all" and "{session}" not in self.rtmp_url:
                raise ValueError("--rtmp-sessions all needs {session} in the RTMP URL (one stream key per session)")
        if self.rtmp_sessions not in ("broadcast", "all"):
            raise ValueError(f"rtmp_sessions must be 'broadcast' or 'all', not {self.rtmp_sessions!r}")


class SessionOutputsRunner:
    """The outputs of one session (RTMP push, Janus publish) as tasks owned here."""

    def __init__(self, session_id: str, outputs: SessionOutputs):
        self.session_id = session_id
        self.outputs = outputs
        self.rtmp: RtmpPusher | None = None
        self.janus: JanusPublisher | None = None
        self._rtmp_proxies: tuple = ()
        self._tasks: list[asyncio.Task] = []

    def start_rtmp(self, url: str) -> None:
        self._tasks.append(asyncio.ensure_future(self._rtmp(url.replace("{session}", self.session_id))))

    async def _rtmp(self, url: str) -> None:
        video, audio = self.outputs.video(every_frame=True), self.outputs.audio(every_frame=True)
        self._rtmp_proxies = (video, audio)
        first = await video.recv()  # the stream's size is the session's frame size
        self.rtmp = RtmpPusher(url, first.width, first.height, name=self.session_id)
        self.rtmp.start()
        self.rtmp.put_video(first, float(first.pts * first.time_base))
        try:
            await self.rtmp.feed(video, audio)
        finally:
            await asyncio.to_thread(self.rtmp.close)

    def start_janus(self, url: str, room: int) -> None:
        self.janus = JanusPublisher(url, room, display=self.session_id)
        self._tasks.append(asyncio.ensure_future(self.janus.run(self.outputs)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def stats(self) -> dict:
        rtmp = None
        if self.rtmp is not None:
            rtmp = self.rtmp.stats.as_dict()
            # frames the RTMP reader did not take from the relay in time (event loop stalled)
            rtmp["relay_dropped"] = sum(getattr(getattr(p, "_queue", None), "dropped", 0) for p in self._rtmp_proxies)
        return {"rtmp": rtmp, "janus": self.janus.stats() if self.janus else None}


class BroadcastSession:
    """A session made by POST /sessions: fed by the audio-push API only. Looks like a
    server.PeerSession to the shared /sessions/<id> handlers (close, stats, .session)."""

    def __init__(self, session_id: str, session, outputs: list[str]):
        self.id = session_id
        self.session = session
        self.requested = outputs
        self.runner = SessionOutputsRunner(session_id, outputs_of(session))
        self._playout: AudioPlayout | None = None
        self.connections = 0
        self._closed = False
        self.on_closed = None  # callback(self) once closed (the registry forgets it)

    @property
    def playout(self) -> AudioPlayout:
        if self._playout is None:
            self._playout = AudioPlayout(self.session)
            self._playout.start()
        return self._playout

    async def close(self, reason: str = "closed") -> None:
        if self._closed:
            return
        self._closed = True
        log.info("broadcast session %s closing: %s", self.id, reason)
        await self.runner.close()
        if self._playout is not None:
            await self._playout.close()
        await self.session.close()
        if self.on_closed is not None:
            self.on_closed(self)

    def stats(self) -> dict:
        playout = self._playout
        return {"id": self.id, "outputs": self.requested, "session": self.session.stats(), **self.runner.stats(),
                "audio_push": None if playout is None else {
                    "buffered_s": round(playout.buffered_seconds, 3), "interruptions": playout.interruptions,
                    "segments_finished": playout.segments_finished, "connections": self.connections}}


class Broadcaster:
    """Broadcast sessions, WHEP viewers and the outputs of one AvatarServer."""

    def __init__(self, server: AvatarServer, options: BroadcastOptions):
        self.server = server
        self.options = options
        self.sessions: dict[str, BroadcastSession] = {}
        self.peer_outputs: dict[str, SessionOutputsRunner] = {}
        self.whep = WhepEndpoint(self.resolve, max_viewers=options.max_viewers, authorized=server._authorized,
                                 shared_encode=options.whep_shared_encode, peers=options.whep_peers)
        self.whep.ice_addresses = server.ice_addresses  # like the server's own peers (--host)
        server.extra_sessions = self.sessions  # the shared /sessions/<id> routes find them there
        server.peer_hooks.append(self._on_peer)

    def resolve(self, channel: str) -> SessionOutputs | None:
        if channel in self.sessions:
            return outputs_of(self.sessions[channel].session)
        peer = self.server.peers.get(channel)
        return outputs_of(peer.session) if peer is not None else None

    # -- sessions ------------------------------------------------------------------------------

    async def create(self, name: str | None = None, outputs: list[str] = ("whep",)) -> BroadcastSession:
        unknown = [o for o in outputs if o not in OUTPUTS]
        if unknown:
            raise AudioPushError(f"unknown outputs {unknown}: choose from {list(OUTPUTS)}")
        if "rtmp" in outputs and self.options.rtmp_url is None:
            raise AudioPushError("output 'rtmp' needs the server started with --rtmp URL")
        if "janus" in outputs and self.options.janus_url is None:
            raise AudioPushError("output 'janus' needs the server started with --janus URL --room N")
        session_id = name or uuid.uuid4().hex
        if not NAME_RE.match(session_id):
            raise AudioPushError(f"session name {session_id!r}: use 1-64 letters, digits, '-' or '_'")
        if session_id in self.sessions or session_id in self.server.peers:
            raise AudioPushError(f"a session named {session_id!r} exists already")
        if len(self.sessions) + len(self.server.peers) >= self.server.max_sessions:
            raise AudioPushError(f"server is at capacity ({self.server.max_sessions} sessions)")
        session = await self.server.session_factory()
        await session.start()
        entry = BroadcastSession(session_id, session, list(outputs))
        self.sessions[session_id] = entry

        def closed(e: BroadcastSession) -> None:
            if self.sessions.get(e.id) is e:
                del self.sessions[e.id]
            asyncio.ensure_future(self.whep.close_channel(e.id))

        entry.on_closed = closed
        if "rtmp" in outputs:
            entry.runner.start_rtmp(self.options.rtmp_url)
        if "janus" in outputs:
            entry.runner.start_janus(self.options.janus_url, self.options.janus_room)
        log.info("broadcast session %s started (outputs %s)", session_id, ", ".join(outputs))
        return entry

    async def close_session(self, session_id: str, reason: str) -> None:
        entry = self.sessions.get(session_id)
        if entry is not None:
            await entry.close(reason)
        await self.whep.close_channel(session_id)

    def _on_peer(self, event: str, peer) -> None:
        """server.peer_hooks: outputs and data-channel audio push for WebRTC peer sessions."""
        if event == "started":
            if self.options.rtmp_url and self.options.rtmp_sessions == "all":
                runner = self.peer_outputs[peer.id] = SessionOutputsRunner(peer.id, outputs_of(peer.session))
                runner.start_rtmp(self.options.rtmp_url)

            @peer.pc.on("datachannel")
            def on_datachannel(channel) -> None:
                if channel.label == "audio" and hasattr(peer.session, "ring"):
                    self._datachannel_push(peer, channel)
        elif event == "closed":
            asyncio.ensure_future(self.whep.close_channel(peer.id))
            runner = self.peer_outputs.pop(peer.id, None)
            if runner is not None:
                asyncio.ensure_future(runner.close())

    def _datachannel_push(self, peer, channel) -> None:
        """A peer that opens a data channel labelled "audio" drives its avatar with pushed audio
        (the audio-push protocol); its microphone frames are then ignored (one input clock), but
        its audio track must keep coming (even silence): it is how the server knows it is there."""
        playout = getattr(peer.session, "_audio_playout", None)
        if playout is None:
            playout = peer.session._audio_playout = AudioPlayout(peer.session)
            playout.start()
            peer.session.push_audio = lambda frame: None  # the mic no longer feeds this session
            log.info("session %s: driven by pushed audio on its data channel", peer.id)

        def send(event: dict) -> None:
            if channel.readyState == "open":
                channel.send(json.dumps(event))

        connection = AudioPushConnection(playout, send)

        @channel.on("message")
        def on_message(message) -> None:
            if isinstance(message, str):
                connection.on_text(message)
            else:
                connection.on_binary(bytes(message))

        @channel.on("close")
        def on_close() -> None:
            connection.close()

    async def close_all(self) -> None:
        await self.whep.close_all()
        await asyncio.gather(*(self.close_session(sid, "server shutdown") for sid in list(self.sessions)))
        await asyncio.gather(*(r.close() for r in self.peer_outputs.values()))

    # -- HTTP ----------------------------------------------------------------------------------

    async def handle_create(self, request: web.Request) -> web.Response:
        if not self.server._authorized(request):
            return self.server._unauthorized()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, 'body must be JSON: {"avatar": null, "outputs": ["whep", "rtmp"]}')
        if not isinstance(body, dict):
            return error_response(400, 'body must be a JSON object: {"avatar": null, "outputs": ["whep"]}')
        avatar = body.get("avatar")
        if avatar not in (None, "default", self._avatar_name()):
            return error_response(400, f"this server serves avatar {self._avatar_name()!r}, not {avatar!r}: "
                                       "start a server with --avatar for another face")
        outputs = body.get("outputs", ["whep"])
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            return error_response(400, f"outputs must be a list of names from {list(OUTPUTS)}")
        try:
            entry = await self.create(body.get("name"), outputs)
        except AudioPushError as exc:
            return error_response(409 if "exists" in str(exc) else 400, str(exc))
        return json_response({"id": entry.id, "outputs": entry.requested, "audio": f"/sessions/{entry.id}/audio",
                              "whep": f"/whep/{entry.id}", "watch": f"/watch/{entry.id}"},
                             status=201, headers={"Location": f"/sessions/{entry.id}"})

    def _avatar_name(self) -> str | None:
        """The avatar this server's sessions show, if the embedder set server.avatar_name."""
        return getattr(self.server, "avatar_name", None)

    async def handle_audio(self, request: web.Request) -> web.StreamResponse:
        """The audio-push WebSocket of a broadcast session (or a peer session)."""
        if not self.server._authorized(request):
            return self.server._unauthorized()
        sid = request.match_info["session_id"]
        entry = self.sessions.get(sid)
        if entry is None:
            return error_response(404, f"no broadcast session {sid!r}: create one with POST /sessions")
        rate = request.query.get("sample_rate")
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, heartbeat=20)
        await ws.prepare(request)
        events: asyncio.Queue = asyncio.Queue(maxsize=EVENT_QUEUE)

        def send(event: dict) -> None:
            try:
                events.put_nowait(event)
            except asyncio.QueueFull:  # the client does not read its events: cut it off alone
                log.info("audio push %s: client reads no events; disconnecting it", sid)
                asyncio.ensure_future(ws.close(code=1008, message=b"events not read"))

        async def writer() -> None:
            while True:
                event = await events.get()
                await ws.send_str(json.dumps(event))

        try:
            connection = AudioPushConnection(entry.playout, send, sample_rate=int(rate) if rate else None,
                                             channels=int(request.query.get("channels", 1)))
        except (AudioPushError, ValueError) as exc:
            await ws.send_str(json.dumps({"type": "error", "message": str(exc)}))
            await ws.close(code=1003, message=b"bad audio format")
            return ws
        entry.connections += 1
        writing = asyncio.ensure_future(writer())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    connection.on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    connection.on_binary(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            connection.close()
            entry.connections -= 1
            # events already queued (e.g. a final playback_finished) go out if the socket is open
            await asyncio.sleep(0)
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)
        return ws

    async def handle_watch(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_ROOT / "whep.html")


BROADCASTER_KEY = web.AppKey("broadcaster", Broadcaster)


def install(app: web.Application, server: AvatarServer, options: BroadcastOptions) -> Broadcaster:
    """Add the broadcast routes to a server app; sessions and viewers close on app shutdown."""
    broadcaster = Broadcaster(server, options)
    app[BROADCASTER_KEY] = broadcaster
    app.router.add_post("/sessions", broadcaster.handle_create)
    app.router.add_get("/sessions/{session_id}/audio", broadcaster.handle_audio)
    app.router.add_post("/whep/{channel}", broadcaster.whep.handle_post)
    app.router.add_delete("/whep/{channel}/{viewer_id}", broadcaster.whep.handle_delete)
    app.router.add_get("/watch/{channel}", broadcaster.handle_watch)

    async def on_startup(app: web.Application) -> None:
        if options.broadcast_session:
            outputs = ["whep"] + (["rtmp"] if options.rtmp_url else []) + (["janus"] if options.janus_url else [])
            await broadcaster.create(options.broadcast_session, outputs)

    async def on_shutdown(app: web.Application) -> None:
        await broadcaster.close_all()

    app.on_startup.append(on_startup)
    app.on_shutdown.insert(0, on_shutdown)
    return broadcaster
