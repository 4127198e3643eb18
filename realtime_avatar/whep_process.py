"""WHEP viewers' peer connections in a child process, fed the session's shared VP8/Opus packets.

With the viewers' peers in the serving process, every RTP packet to every viewer (SRTP, the
pacing, aiortc's per-peer tasks) runs on the event loop that also drives the sessions: measured
on the 2-core machine (README, broadcasting), 20 viewers kept that loop ~90% busy and most of a
talking session's mouth frames came too late, even with the viewers' own processes at nice 19.
Here the serving process encodes once (shared_encode.py) and writes each packet once, to one
Unix socket; a child process (`python -m realtime_avatar.whep_process`) holds the viewers'
peer connections and sends the packets to each of them. The session's event loop then pays
one socket write per packet, whatever the audience; the child runs at output priority (nice 5,
priority.py), below the render and the Whisper encoder.

    serving process                                         child process
    SharedVideoEncoder ─ EncodedTrack ─┐                    ┌─ _Channel ─ EncodedTrack ─ viewer 1
    SharedAudioEncoder ─ EncodedTrack ─┴─ Unix socket ─────>┤            ─ EncodedTrack ─ viewer 2 ...
    WhepEndpoint (HTTP) ── JSON: offer/close/end <────────> └─ JSON: answer/error/closed/keyframe

Messages: a 4-byte big-endian length, a type byte, the body. b"J": a JSON control message;
b"P": a packet (`pack_packet`). What each side keeps bounded: the serving side's feed tracks
queue 4 video packets (then skip to the next keyframe, shared_encode.EncodedTrack), the socket
write is awaited (drained) per packet, each viewer in the child has its own EncodedTrack queue.

If the child dies, its viewers are reported gone (their HTTP resources 404 from then on), the
sessions go on, and the next WHEP offer starts a new child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import logging
import os
import struct
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Callable

import av

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0  # the child imports aiortc and PyAV (~1-2 s idle, more on a busy machine)
REQUEST_TIMEOUT_S = 20.0  # an offer's answer (ICE gathering included)
MAX_MESSAGE = 8 * 1024 * 1024  # a VP8 keyframe of 512x512 is ~50 kB; anything this big is a bug
_HEADER = struct.Struct(">IB")  # length of what follows (type byte + body), type
_PACKET = struct.Struct(">HBBqII")  # channel index, kind, flags, pts, time_base num, den
KINDS = ("video", "audio")
KEYFRAME = 1


# ----------------------------------------------------------------------------------- the wire


def frame_message(kind: bytes, body: bytes) -> bytes:
    """One message on the socket: length (4 bytes, big-endian, counts type + body), type, body."""
    return _HEADER.pack(len(body) + 1, kind[0]) + body


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(type, body) of the next message; asyncio.IncompleteReadError at the end of the stream,
    ValueError for a length that cannot be right."""
    length, kind = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if not 1 <= length <= MAX_MESSAGE:
        raise ValueError(f"whep process: message of {length} bytes on the socket")
    return bytes([kind]), await reader.readexactly(length - 1)


def pack_packet(channel: int, kind: str, packet: av.Packet) -> bytes:
    """The body of a b"P" message: a header (channel index, kind, keyframe flag, pts and its
    time base) and the packet's payload. pts/time_base are what aiortc's packetizers read for
    the RTP timestamp."""
    tb = packet.time_base or fractions.Fraction(1, 1)
    flags = KEYFRAME if packet.is_keyframe else 0
    return _PACKET.pack(channel, KINDS.index(kind), flags, packet.pts or 0, tb.numerator, tb.denominator) + bytes(packet)


def unpack_packet(body: bytes) -> tuple[int, str, av.Packet]:
    """Inverse of pack_packet: (channel index, kind, av.Packet with pts, time_base, is_keyframe)."""
    channel, kind, flags, pts, num, den = _PACKET.unpack_from(body)
    packet = av.Packet(body[_PACKET.size :])
    packet.pts, packet.time_base = pts, fractions.Fraction(num, den)
    packet.is_keyframe = bool(flags & KEYFRAME)
    return channel, KINDS[kind], packet


class _Wire:
    """One end of the socket: serialized writes (one writer at a time, each drained)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self._lock = asyncio.Lock()

    async def send(self, kind: bytes, body: bytes) -> None:
        async with self._lock:
            self.writer.write(frame_message(kind, body))
            await self.writer.drain()

    async def send_json(self, message: dict) -> None:
        await self.send(b"J", json.dumps(message).encode())

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------- serving-process side


class ViewerProcessError(Exception):
    """The child refused an offer (status, message: as OfferError) or is not there."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class _Feed:
    """A channel's packets on their way to the child: one consumer track per kind of the
    session's shared encoders, pumped into the socket."""

    index: int
    tracks: list
    tasks: list


class WhepPeerProcess:
    """The serving side: starts the child, forwards offers/leaves, feeds it packets.

    `on_viewer_closed(viewer_id, reason)` is called (on the event loop) when the child drops a
    viewer (its connection failed or closed, it never connected, its channel ended, the child
    exited)."""

    def __init__(self, *, ice_addresses: tuple[str, ...] | None, loopback_candidates: bool,
                 on_viewer_closed: Callable[[str, str], None]):
        self.ice_addresses = ice_addresses
        self.loopback_candidates = loopback_candidates
        self.on_viewer_closed = on_viewer_closed
        self._proc: asyncio.subprocess.Process | None = None
        self._wire: _Wire | None = None
        self._reader_task: asyncio.Task | None = None
        self._starting: asyncio.Task | None = None
        self._requests: dict[str, asyncio.Future] = {}
        self._feeds: dict[str, _Feed] = {}
        self._viewer_channels: dict[str, str] = {}
        self._next_index = 0
        self.packets_sent = 0
        self.starts = 0
        self._closing = False

    @property
    def running(self) -> bool:
        return self._wire is not None and self._proc is not None and self._proc.returncode is None

    async def _ensure_started(self) -> _Wire:
        if self.running:
            return self._wire
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)
        return self._wire

    async def _start(self) -> None:
        connected: asyncio.Future = asyncio.get_running_loop().create_future()

        async def on_connect(reader, writer):
            if not connected.done():
                connected.set_result(_Wire(reader, writer))
            else:
                writer.close()

        folder = tempfile.mkdtemp(prefix="whep-")
        path = os.path.join(folder, "socket")
        server = await asyncio.start_unix_server(on_connect, path)
        config = {"ice_addresses": self.ice_addresses, "loopback_candidates": self.loopback_candidates,
                  "log_level": logging.getLogger().getEffectiveLevel()}  # the child logs as serve does
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "realtime_avatar.whep_process", "--socket", path, "--config", json.dumps(config),
                stdin=asyncio.subprocess.DEVNULL)
            waiter = asyncio.ensure_future(self._proc.wait())
            done, _ = await asyncio.wait({connected, waiter}, timeout=START_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if connected not in done:
                waiter.cancel()
                if self._proc.returncode is None:
                    self._proc.kill()
                raise ViewerProcessError(503, "the WHEP viewer process did not start "
                                              f"(exit code {self._proc.returncode}); see the server log")
            waiter.cancel()
        finally:
            server.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
                os.rmdir(folder)
        self._wire = connected.result()
        self.starts += 1
        self._reader_task = asyncio.ensure_future(self._read(self._wire))
        log.info("whep viewer process %d started", self._proc.pid)

    async def _read(self, wire: _Wire) -> None:
        try:
            while True:
                kind, body = await read_message(wire.reader)
                if kind == b"J":
                    self._on_message(json.loads(body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("whep viewer process: bad message from the child")
        finally:
            self._lost(wire)

    def _on_message(self, message: dict) -> None:
        op = message.get("op")
        if op in ("answer", "error"):
            future = self._requests.pop(message.get("req"), None)
            if future is not None and not future.done():
                future.set_result(message)
        elif op == "closed":
            viewer_id = message["viewer"]
            channel = self._viewer_channels.pop(viewer_id, None)
            self.on_viewer_closed(viewer_id, message.get("reason", "closed"))
            if channel is not None and channel not in self._viewer_channels.values():
                self._stop_feed(channel)
        elif op == "keyframe":
            feed = self._feeds.get(message.get("channel"))
            if feed is not None:
                feed.tracks[0].request_keyframe()

    def _lost(self, wire: _Wire) -> None:
        """The child's socket closed: everything that depended on it ends."""
        if self._wire is not wire:
            return
        self._wire = None
        wire.close()
        if self._closing:
            return  # close() waits for the child to exit by itself
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited, not reaped yet
                self._proc.kill()
        for future in self._requests.values():
            if not future.done():
                future.set_result({"op": "error", "status": 503, "message": "the WHEP viewer process exited"})
        self._requests.clear()
        for channel in list(self._feeds):
            self._stop_feed(channel)
        viewers, self._viewer_channels = self._viewer_channels, {}
        if viewers:
            log.error("whep viewer process exited: its %d viewers are gone", len(viewers))
        for viewer_id in viewers:
            self.on_viewer_closed(viewer_id, "the viewer process exited")

    async def _request(self, message: dict, timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
        wire = await self._ensure_started()
        req = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._requests[req] = future
        try:
            await wire.send_json(message | {"req": req})
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise ViewerProcessError(503, f"the WHEP viewer process did not answer within {timeout_s:g} s") from None
        except ConnectionError as exc:
            raise ViewerProcessError(503, f"the WHEP viewer process is gone: {exc}") from None
        finally:
            self._requests.pop(req, None)

    async def add_viewer(self, channel: str, outputs, viewer_id: str, offer_sdp: str, kinds: set[str],
                         connect_timeout_s: float) -> str:
        """Negotiate viewer `viewer_id` of `channel` (whose SessionOutputs is `outputs`) in the
        child; `kinds`: the media it receives ("video"/"audio", each in the shared codec).
        Returns the SDP answer; raises ViewerProcessError (status, message)."""
        await self._ensure_started()
        self._feed(channel, outputs)
        self._viewer_channels[viewer_id] = channel
        reply = await self._request({"op": "offer", "channel": channel, "index": self._feeds[channel].index,
                                     "viewer": viewer_id, "sdp": offer_sdp, "kinds": sorted(kinds),
                                     "connect_timeout_s": connect_timeout_s})
        if reply["op"] == "error":
            self._viewer_channels.pop(viewer_id, None)
            if channel not in self._viewer_channels.values():
                self._stop_feed(channel)
            raise ViewerProcessError(int(reply.get("status", 400)), reply.get("message", "offer rejected"))
        return reply["sdp"]

    async def remove_viewer(self, viewer_id: str) -> None:
        """Close a viewer's peer in the child (its "closed" report follows)."""
        if self.running and viewer_id in self._viewer_channels:
            with contextlib.suppress(ConnectionError):
                await self._wire.send_json({"op": "close", "viewer": viewer_id})

    async def end_channel(self, channel: str) -> None:
        """The session ended: the child closes its viewers (each reported closed)."""
        self._stop_feed(channel)
        if self.running:
            with contextlib.suppress(ConnectionError):
                await self._wire.send_json({"op": "end", "channel": channel})

    def _feed(self, channel: str, outputs) -> None:
        if channel in self._feeds:
            return
        index, self._next_index = self._next_index, (self._next_index + 1) % 65536
        tracks = [outputs.encoded_video(), outputs.encoded_audio()]
        tasks = [asyncio.ensure_future(self._pump(channel, index, track)) for track in tracks]
        self._feeds[channel] = _Feed(index, tracks, tasks)

    async def _pump(self, channel: str, index: int, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                packet = await track.recv()
                wire = self._wire
                if wire is None:
                    return
                await wire.send(b"P", pack_packet(index, track.kind, packet))
                self.packets_sent += 1
        except (MediaStreamError, ConnectionError):
            pass  # the session's media ended, or the child left (_lost ends the rest)

    def _stop_feed(self, channel: str) -> None:
        feed = self._feeds.pop(channel, None)
        if feed is None:
            return
        for task in feed.tasks:
            task.cancel()
        for track in feed.tracks:
            track.stop()  # unsubscribes: the shared encoder closes when its last consumer leaves

    async def close(self) -> None:
        """Stop the child (it closes its peers) and every feed; idempotent."""
        self._closing = True
        for channel in list(self._feeds):
            self._stop_feed(channel)
        wire, proc = self._wire, self._proc
        if wire is not None:
            with contextlib.suppress(ConnectionError):
                await wire.send_json({"op": "shutdown"})
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)


# --------------------------------------------------------------------------------- child side


class _Hub:
    """One kind of one channel in the child: the packets from the socket, offered to each
    viewer's EncodedTrack (the interface shared_encode.EncodedTrack expects of its encoder)."""

    def __init__(self, kind: str, on_keyframe_request: Callable[[], None]):
        from .shared_encode import OPUS_QUEUE_PACKETS, VIEWER_QUEUE_PACKETS

        self.kind = kind
        self.queue_packets = VIEWER_QUEUE_PACKETS if kind == "video" else OPUS_QUEUE_PACKETS
        self.viewers: list = []
        self._on_keyframe_request = on_keyframe_request

    def subscribe(self):
        from .shared_encode import EncodedTrack

        track = EncodedTrack(self)
        self.viewers.append(track)
        self.request_keyframe()
        return track

    def unsubscribe(self, track) -> None:
        if track in self.viewers:
            self.viewers.remove(track)

    def request_keyframe(self) -> None:
        if self.kind == "video":
            self._on_keyframe_request()

    def offer(self, packet: av.Packet) -> None:
        for track in list(self.viewers):
            track.offer(packet)

    def end(self) -> None:
        for track in list(self.viewers):
            track.end()


class _Channel:
    """What fanout.add_shared_track asks of a session's outputs: encoded_video/encoded_audio."""

    def __init__(self, name: str, send_json: Callable[[dict], None]):
        self.name = name
        self.hubs = {kind: _Hub(kind, lambda: send_json({"op": "keyframe", "channel": name})) for kind in KINDS}

    def encoded_video(self):
        return self.hubs["video"].subscribe()

    def encoded_audio(self):
        return self.hubs["audio"].subscribe()


class _ChildViewer:
    def __init__(self, viewer_id: str, channel: str, pc):
        self.id, self.channel, self.pc = viewer_id, channel, pc
        self.tracks: list = []
        self.closing: asyncio.Task | None = None
        self.watchdog: asyncio.Task | None = None


class ViewerHost:
    """The child's side: peer connections of the viewers, fed from the socket."""

    def __init__(self, wire: _Wire, ice_addresses: tuple[str, ...] | None):
        self.wire = wire
        self.ice_addresses = ice_addresses
        self.channels: dict[int, _Channel] = {}
        self.viewers: dict[str, _ChildViewer] = {}
        self._background: set[asyncio.Task] = set()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def send_json(self, message: dict) -> None:
        self._spawn(self.wire.send_json(message))

    async def run(self) -> None:
        try:
            while True:
                kind, body = await read_message(self.wire.reader)
                if kind == b"P":
                    index, kind, packet = unpack_packet(body)
                    channel = self.channels.get(index)
                    if channel is not None:
                        channel.hubs[kind].offer(packet)
                elif kind == b"J":
                    message = json.loads(body)
                    if message.get("op") == "shutdown":
                        break
                    self._spawn(self._handle(message))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the serving process is gone: so are its viewers
        finally:
            await asyncio.gather(*(self.close_viewer(v, "server shutdown") for v in list(self.viewers.values())),
                                 return_exceptions=True)

    async def _handle(self, message: dict) -> None:
        op = message.get("op")
        if op == "offer":
            try:
                sdp = await self.answer(message)
                await self.wire.send_json({"op": "answer", "req": message["req"], "sdp": sdp})
            except Exception as exc:
                await self.wire.send_json({"op": "error", "req": message["req"], "status": 400,
                                           "message": f"offer rejected: {exc}"})
        elif op == "close":
            viewer = self.viewers.get(message.get("viewer"))
            if viewer is not None:
                await self.close_viewer(viewer, "deleted by the viewer")
        elif op == "end":
            for viewer in [v for v in self.viewers.values() if v.channel == message.get("channel")]:
                await self.close_viewer(viewer, "session ended")
            for index, channel in list(self.channels.items()):
                if channel.name == message.get("channel"):
                    channel.hubs["video"].end()
                    channel.hubs["audio"].end()
                    del self.channels[index]

    async def answer(self, message: dict) -> str:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        from .fanout import add_shared_track
        from .server import ice_gathering_on

        index, name = int(message["index"]), message["channel"]
        channel = self.channels.get(index)
        if channel is None or channel.name != name:
            channel = self.channels[index] = _Channel(name, self.send_json)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        viewer = _ChildViewer(message["viewer"], name, pc)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=message["sdp"], type="offer"))
            present = {t.kind for t in pc.getTransceivers()}
            for kind in message["kinds"]:
                if kind in present:
                    viewer.tracks.append(add_shared_track(pc, channel, kind))
            with ice_gathering_on(self.ice_addresses):
                await pc.setLocalDescription(await pc.createAnswer())
        except Exception:
            for track in viewer.tracks:
                track.stop()
            await pc.close()
            raise
        self.viewers[viewer.id] = viewer

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._spawn(self.close_viewer(viewer, f"connection {pc.connectionState}"))

        viewer.watchdog = self._spawn(self._watch(viewer, float(message["connect_timeout_s"])))
        return pc.localDescription.sdp

    async def _watch(self, viewer: _ChildViewer, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        if viewer.pc.connectionState != "connected":
            await self.close_viewer(viewer, f"not connected within {timeout_s:g} s")

    async def close_viewer(self, viewer: _ChildViewer, reason: str) -> None:
        if viewer.closing is None:
            viewer.closing = asyncio.ensure_future(self._close(viewer, reason))
        await asyncio.shield(viewer.closing)

    async def _close(self, viewer: _ChildViewer, reason: str) -> None:
        self.viewers.pop(viewer.id, None)
        if viewer.watchdog is not None and viewer.watchdog is not asyncio.current_task():
            viewer.watchdog.cancel()
        for track in viewer.tracks:
            track.stop()
        if not any(v.channel == viewer.channel for v in self.viewers.values()):
            # its last viewer: the serving side stops feeding it (packets for it are ignored)
            for index in [i for i, c in self.channels.items() if c.name == viewer.channel]:
                del self.channels[index]
        try:
            await asyncio.wait_for(viewer.pc.close(), 5.0)
        except Exception:
            log.exception("whep viewer %s: closing the peer connection failed", viewer.id)
        with contextlib.suppress(ConnectionError):
            await self.wire.send_json({"op": "closed", "viewer": viewer.id, "reason": reason})


async def child_main(socket_path: str, config: dict) -> None:
    from .priority import lower_thread_priority
    from .server import include_loopback_candidates, install_ice_address_hook

    lower_thread_priority()  # before any thread starts: aiortc's and PyAV's threads inherit it
    install_ice_address_hook()
    if config.get("loopback_candidates"):
        include_loopback_candidates()
    reader, writer = await asyncio.open_unix_connection(socket_path)
    addresses = config.get("ice_addresses")
    host = ViewerHost(_Wire(reader, writer), tuple(addresses) if addresses is not None else None)
    await host.run()
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="WHEP viewers' peer connections (started by `serve`, not by hand)")
    parser.add_argument("--socket", required=True, help="the serving process's Unix socket")
    parser.add_argument("--config", default="{}", help="JSON: ice_addresses, loopback_candidates, log_level")
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    logging.basicConfig(level=int(config.get("log_level", logging.INFO)),
                        format=f"%(levelname)s whep-process[{os.getpid()}] %(name)s: %(message)s")
    asyncio.run(child_main(args.socket, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
