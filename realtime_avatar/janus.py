"""Janus VideoRoom publisher: the engine renders once, the SFU fans out to the audience.

Talks to a Janus gateway over its documented HTTP (REST) API with aiohttp
(https://janus.conf.meetecho.com/docs/rest.html): create a session, attach the
`janus.plugin.videoroom` handle, make sure the room exists, join it as a publisher and publish
an aiortc offer carrying the session's shared Opus and VP8 encodes (shared_encode.py; the room's
codecs), so publishing adds no encode to those its WHEP viewers already share.
Janus' asynchronous answers arrive on a long poll (GET /janus/<session>), which also keeps the
Janus session alive.

`JanusPublisher.run()` supervises: a Janus that refuses (down, no such room and creation
forbidden, a plugin error) is logged with its reason and retried with backoff; the avatar
session is never touched by any of it.

Why not a client library: `janus-client` 0.9.0 on PyPI (MIT, 2025-11; aiohttp + aiortc +
websockets) was read for this. Its VideoRoom plugin creates and owns the RTCPeerConnection and
calls setLocalDescription inside publish(), where the server's bound-address ICE hook
(server.ice_gathering_on) and the shared-encode/Opus track wrappers have to wrap exactly that
call, and it imports a websockets transport we do not use (a new dependency). What we need of
the REST API is create / attach / join / publish / long poll: about 150 lines here, tested
against a real Janus (tests/test_janus.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from .fanout import SessionOutputs, add_shared_track

log = logging.getLogger(__name__)

VIDEOROOM = "janus.plugin.videoroom"
REQUEST_TIMEOUT_S = 10.0
POLL_MAXEV = 10
RETRY_MIN_S, RETRY_MAX_S = 1.0, 15.0


class JanusError(Exception):
    """Janus refused or could not be reached; the message has its reason."""


def _tx() -> str:
    return uuid.uuid4().hex[:12]


class JanusSession:
    """One Janus session over HTTP: requests, and events routed to their transaction."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str):
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.id: int | None = None
        self._waiters: dict[str, asyncio.Future] = {}
        self._poller: asyncio.Task | None = None
        self.events: asyncio.Queue = asyncio.Queue(maxsize=256)  # events nobody waited for (hangup, ...)

    async def _post(self, url: str, payload: dict) -> dict:
        payload = {**payload, "transaction": payload.get("transaction") or _tx()}
        try:
            async with self.http.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as r:
                reply = await r.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise JanusError(f"no usable answer from {url}: {type(exc).__name__}: {exc}") from exc
        if reply.get("janus") == "error":
            error = reply.get("error", {})
            raise JanusError(f"Janus error {error.get('code')}: {error.get('reason')}")
        return reply

    async def create(self) -> None:
        reply = await self._post(self.base_url, {"janus": "create"})
        self.id = reply["data"]["id"]
        self._poller = asyncio.ensure_future(self._poll())

    async def attach(self, plugin: str = VIDEOROOM) -> int:
        reply = await self._post(f"{self.base_url}/{self.id}", {"janus": "attach", "plugin": plugin})
        return reply["data"]["id"]

    async def request(self, handle: int, body: dict) -> dict:
        """A synchronous plugin request (create, exists, list...): its plugin data."""
        reply = await self._post(f"{self.base_url}/{self.id}/{handle}", {"janus": "message", "body": body})
        return self._plugin_data(reply)

    async def message(self, handle: int, body: dict, jsep: dict | None = None,
                      timeout: float = REQUEST_TIMEOUT_S) -> tuple[dict, dict | None]:
        """An asynchronous plugin request (join, publish, start...): (plugin data, jsep) of its event."""
        tx = _tx()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[tx] = waiter
        payload = {"janus": "message", "body": body, "transaction": tx}
        if jsep is not None:
            payload["jsep"] = jsep
        try:
            reply = await self._post(f"{self.base_url}/{self.id}/{handle}", payload)
            if reply.get("janus") == "success":  # answered synchronously after all
                return self._plugin_data(reply), reply.get("jsep")
            event = await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise JanusError(f"no answer to {body.get('request')!r} within {timeout:g} s") from None
        finally:
            self._waiters.pop(tx, None)
        return self._plugin_data(event), event.get("jsep")

    @staticmethod
    def _plugin_data(reply: dict) -> dict:
        data = reply.get("plugindata", {}).get("data", {})
        if "error_code" in data or "error" in data:
            raise JanusError(f"VideoRoom error {data.get('error_code')}: {data.get('error')}")
        return data

    async def _poll(self) -> None:
        url = f"{self.base_url}/{self.id}"
        while True:
            try:
                async with self.http.get(url, params={"maxev": POLL_MAXEV, "rid": _tx()},
                                         timeout=aiohttp.ClientTimeout(total=60)) as r:
                    reply = await r.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                log.info("janus session %s: long poll failed (%s)", self.id, exc)
                for waiter in self._waiters.values():
                    if not waiter.done():
                        waiter.set_exception(JanusError(f"Janus went away: {exc}"))
                await asyncio.sleep(1.0)
                continue
            for event in reply if isinstance(reply, list) else [reply]:
                waiter = self._waiters.get(event.get("transaction", ""))
                if waiter is not None and not waiter.done() and event.get("janus") == "event":
                    waiter.set_result(event)
                elif event.get("janus") not in ("keepalive", "ack"):
                    if self.events.full():
                        self.events.get_nowait()
                    self.events.put_nowait(event)

    async def destroy(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.id is not None:
            try:
                await self._post(f"{self.base_url}/{self.id}", {"janus": "destroy"})
            except JanusError:
                pass
            self.id = None


class JanusPublisher:
    """Publishes one session into VideoRoom `room` (created if missing) as `display`."""

    def __init__(self, base_url: str, room: int, display: str = "avatar", *, create_room: bool = True):
        if not base_url.startswith(("http://", "https://")):
            raise JanusError(f"{base_url!r} is not a Janus HTTP API URL: use http://HOST:8088/janus")
        self.base_url = base_url
        self.room = room
        self.display = display
        self.create_room = create_room
        self.state = "idle"
        self.last_error: str | None = None
        self.publisher_id: int | None = None
        self.publishes = 0
        self._pc: RTCPeerConnection | None = None
        self._proxies: list = []
        self._janus: JanusSession | None = None

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            log.info("janus room %s: %s -> %s%s", self.room, self.state, state, f" ({detail})" if detail else "")
            self.state = state

    async def publish_once(self, http: aiohttp.ClientSession, outputs: SessionOutputs) -> None:
        """Join and publish; returns once Janus has answered. Raises JanusError."""
        self._janus = janus = JanusSession(http, self.base_url)
        await janus.create()
        handle = await janus.attach(VIDEOROOM)
        if not (await janus.request(handle, {"request": "exists", "room": self.room})).get("exists"):
            if not self.create_room:
                raise JanusError(f"room {self.room} does not exist on {self.base_url}")
            await janus.request(handle, {"request": "create", "room": self.room, "publishers": 16,
                                         "audiocodec": "opus", "videocodec": "vp8"})
        joined, _ = await janus.message(handle, {"request": "join", "ptype": "publisher", "room": self.room,
                                                  "display": self.display})
        self.publisher_id = joined.get("id")
        self._pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        # The session's shared Opus and VP8 encodes (the room's codecs), the same packets its
        # WHEP viewers get: publishing costs no encode of its own.
        self._proxies = [add_shared_track(pc, outputs, "audio"), add_shared_track(pc, outputs, "video")]
        await pc.setLocalDescription(await pc.createOffer())
        _, jsep = await janus.message(handle, {"request": "publish", "audio": True, "video": True},
                                      jsep={"type": "offer", "sdp": pc.localDescription.sdp})
        if not jsep or jsep.get("type") != "answer":
            raise JanusError("Janus accepted the publish but sent no SDP answer")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=jsep["sdp"], type="answer"))
        self.publishes += 1

    async def _teardown(self) -> None:
        for proxy in self._proxies:
            proxy.stop()  # leaves the relay (a buffered proxy nobody reads would grow forever)
        self._proxies = []
        if self._pc is not None:
            await self._pc.close()
            self._pc = None
        if self._janus is not None:
            await self._janus.destroy()
            self._janus = None

    async def run(self, outputs: SessionOutputs) -> None:
        """Publish until cancelled; republish (with backoff) whenever Janus refuses or drops us."""
        delay = RETRY_MIN_S
        async with aiohttp.ClientSession() as http:
            try:
                while True:
                    self._set_state("connecting", self.base_url)
                    try:
                        await self.publish_once(http, outputs)
                        self._set_state("published", f"publisher id {self.publisher_id}")
                        delay = RETRY_MIN_S
                        while self._pc is not None and self._pc.connectionState not in ("failed", "closed"):
                            await asyncio.sleep(0.5)
                        self.last_error = f"peer connection {self._pc.connectionState if self._pc else 'gone'}"
                    except JanusError as exc:
                        self.last_error = str(exc)
                    await self._teardown()
                    self._set_state("waiting", f"{self.last_error}; retrying in {delay:g} s")
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, RETRY_MAX_S)
            finally:
                await self._teardown()
                self._set_state("closed")

    def stats(self) -> dict:
        return {"state": self.state, "room": self.room, "publisher_id": self.publisher_id,
                "publishes": self.publishes, "last_error": self.last_error}
