"""WebRTC front door: an aiohttp app that answers SDP offers and streams one avatar per peer.

Each peer gets its own AvatarSession (made by the injected `session_factory`): the peer's
microphone track is relayed frame by frame into `session.push_audio`, and the session's paced
video and delayed audio tracks are sent back. Signalling is either the page's JSON
`POST /offer` or WHIP (RFC 9725: `POST /whip` with application/sdp, `DELETE /whip/<id>`).

aiortc 1.16 has no trickle ICE, so every answer is sent once ICE gathering is complete.

Lifetime: a peer is torn down exactly once, by whichever comes first of ICE/DTLS failure or
close, its audio track ending, no audio for `media_timeout_s` (aioice's consent check would
take 30 s to notice a vanished client), DELETE, or server shutdown. Teardown cancels the
relay task, closes the peer connection, awaits `session.close()` and drops the registry entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fractions
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator, Protocol, Sequence

import aioice.ice
import av
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AUDIO_PTIME, MediaStreamError
from aiortc.sdp import SessionDescription

from .video_encoding import install_live_h264_settings
from .fanout import outputs_of

if TYPE_CHECKING:
    from .broadcast import BroadcastOptions
from .rtc_receive import release_all_receivers

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).parent / "web"
LOOPBACK_V4 = "127.0.0.1"
DEFAULT_MAX_SESSIONS = 4
DEFAULT_MEDIA_TIMEOUT_S = 3.0  # no audio from a connected peer this long: it is gone
DEFAULT_CONNECT_TIMEOUT_S = 15.0  # answered, but no first audio frame this long: never came
NEGOTIATION_TIMEOUT_S = 10.0  # offer -> answer, ICE gathering included (host candidates only)
CLOSE_STEP_TIMEOUT_S = 5.0  # each teardown step; a stuck one is logged and skipped, never waited on
MAX_SDP_BYTES = 64 * 1024  # a real offer is 2-8 kB; anything far larger is not an offer
SEND_DIRECTIONS = ("sendrecv", "sendonly")  # offer directions in which the peer sends audio


class AvatarSessionLike(Protocol):
    """What the server needs of realtime_avatar.session.AvatarSession (duck-typed)."""

    video_track: MediaStreamTrack
    audio_track: MediaStreamTrack

    async def start(self) -> None: ...

    def push_audio(self, frame: av.AudioFrame) -> None: ...

    def end_of_input(self) -> None: ...

    def interrupt(self) -> None: ...

    def stats(self) -> dict: ...

    async def close(self) -> None: ...


SessionFactory = Callable[[], Awaitable[AvatarSessionLike]]


class OfferError(Exception):
    """An offer the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --- ICE host candidates -------------------------------------------------------------------

_aioice_host_addresses = aioice.ice.get_host_addresses

# The local addresses ICE may gather on, for the negotiation running in this context; None: all.
# A context variable, not a global: asyncio tasks copy the context they are created in, and
# aiortc creates its gathering tasks inside setLocalDescription, so each server's (and each
# test's) negotiation sees its own binding while other peers in the process keep theirs.
_ICE_ADDRESSES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "ice_addresses", default=None
)
_loopback_candidates = False  # set by include_loopback_candidates()


def _host_addresses_with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    allowed = _ICE_ADDRESSES.get()
    if allowed is not None:
        # aioice binds one UDP socket per address it is given (local_addr=(address, 0)), so
        # this list decides where the media sockets listen, not only what the SDP says.
        return [a for a in allowed if (use_ipv6 if ":" in a else use_ipv4)]
    addresses = _aioice_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    if _loopback_candidates and use_ipv4 and LOOPBACK_V4 not in addresses:
        addresses.append(LOOPBACK_V4)
    return addresses


def ice_addresses_for_host(host: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The local addresses ICE candidates (and their UDP sockets) belong on when the HTTP server
    binds `host`, as aiohttp reads it: None, '' or '::' is every interface (None returned: no
    restriction); '0.0.0.0' every IPv4 address of the machine plus 127.0.0.1; an address
    itself; a name (e.g. 'localhost') what it resolves to. A sequence combines its entries.
    """
    if host is None:
        return None
    hosts = [host] if isinstance(host, str) else list(host)
    addresses: list[str] = []
    for h in hosts:
        if h in ("", "::"):
            return None
        if h == "0.0.0.0":
            addresses += _aioice_host_addresses(use_ipv4=True, use_ipv6=False) + [LOOPBACK_V4]
            continue
        try:
            addresses.append(str(ipaddress.ip_address(h)))
        except ValueError:
            infos = socket.getaddrinfo(h, None, type=socket.SOCK_DGRAM)
            addresses += [str(info[4][0]) for info in infos]
    return tuple(dict.fromkeys(addresses))  # unique, in order


@contextlib.contextmanager
def ice_gathering_on(addresses: Sequence[str] | None) -> Iterator[None]:
    """Within this block (and the tasks it starts), aioice gathers host candidates, and binds
    their sockets, only on `addresses` (None: the default, every interface). Needs the aioice
    hook that create_app installs (install_ice_address_hook)."""
    install_ice_address_hook()
    token = _ICE_ADDRESSES.set(tuple(addresses) if addresses is not None else None)
    try:
        yield
    finally:
        _ICE_ADDRESSES.reset(token)


def install_ice_address_hook() -> None:
    """Route aioice's host-address lookup through this module (idempotent, process-wide; with
    no binding in effect and loopback candidates off it returns what aioice would)."""
    aioice.ice.get_host_addresses = _host_addresses_with_loopback


def loopback_candidates_included() -> bool:
    """Whether include_loopback_candidates() was called in this process (a child process that
    negotiates peers for this server, whep_process.py, does as it does)."""
    return _loopback_candidates


def include_loopback_candidates() -> None:
    """Make aioice offer a 127.0.0.1 host candidate as well as the machine's other addresses.

    aioice drops 127.0.0.1 from its host addresses and has no option to keep it, so on a
    loopback-only host (a container, CI) an aiortc answer carries no candidate at all and no
    peer can connect. aioice looks `get_host_addresses` up in its module at gathering time;
    this swaps in a wrapper that appends 127.0.0.1. Idempotent, process-wide (it also serves
    aiortc clients in the same process). A remote browser ignores a loopback candidate (Chrome
    uses one only with --allow-loopback-in-peer-connection), so this costs one unused socket.
    """
    global _loopback_candidates
    _loopback_candidates = True
    install_ice_address_hook()


# --- audio framing ---------------------------------------------------------------------------


class PtimeAudioTrack(MediaStreamTrack):
    """Re-frames another audio track into 20 ms frames, the packetisation aiortc assumes.

    aiortc's sender gives every packet of one encode() call the same RTP timestamp, so a 40 ms
    frame (the session's tick) becomes two Opus packets with one timestamp and the receiver's
    jitter buffer keeps only one of them: half the audio is lost. Frames of 20 ms pass through.
    """

    kind = "audio"

    def __init__(self, source: MediaStreamTrack):
        super().__init__()
        self._source = source
        self._fifo = av.AudioFifo()
        self._chunk = 0  # samples per 20 ms at the source's rate; 0 until the first frame
        self._sent = 0  # samples sent: the pts of the next frame

    async def recv(self) -> av.AudioFrame:
        while not (self._chunk and self._fifo.samples >= self._chunk):
            frame = await self._source.recv()  # MediaStreamError when the source ends
            chunk = int(AUDIO_PTIME * frame.sample_rate)
            if frame.samples == chunk and self._fifo.samples == 0:
                return frame  # already 20 ms: nothing to do
            self._chunk = chunk
            # The fifo would insist on contiguous pts; ours are recomputed. The frame may be shared
            # (a MediaRelay hands one object to every consumer): its pts is put back at once.
            pts, frame.pts = frame.pts, None
            self._fifo.write(frame)
            frame.pts = pts
        out = self._fifo.read(self._chunk)
        out.pts = self._sent
        out.time_base = fractions.Fraction(1, out.sample_rate)
        self._sent += out.samples
        return out


# --- pure helpers (tested apart from the network) -------------------------------------------


def parse_offer_sdp(sdp: str) -> SessionDescription:
    """Parse an SDP offer; raise OfferError(400) saying what is wrong with it if it is not one."""
    if not sdp or not sdp.strip():
        raise OfferError(400, "empty SDP offer: send the offer from RTCPeerConnection.createOffer()")
    if len(sdp) > MAX_SDP_BYTES:
        raise OfferError(400, f"SDP offer is {len(sdp)} bytes; more than {MAX_SDP_BYTES} is not an offer")
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError(400, "malformed SDP offer: it must start with 'v=0'")
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises ValueError, IndexError, KeyError, ...
        raise OfferError(400, f"malformed SDP offer ({type(exc).__name__}: {exc})") from exc
    return description


def check_offer_sdp(sdp: str) -> SessionDescription:
    """Parse an SDP offer and check it can drive an avatar; raise OfferError(400) if not.

    The peer must send audio (an audio m-line that is sendrecv or sendonly): that is the
    avatar's only input. Video is optional in the offer (a peer that offers no video m-line
    just gets the audio back).
    """
    description = parse_offer_sdp(sdp)
    audio = [m for m in description.media if m.kind == "audio"]
    if not audio:
        raise OfferError(
            400,
            "the offer has no audio m-line: add the microphone track (or an audio transceiver "
            "with direction 'sendrecv') before createOffer()",
        )
    if not any(m.direction in SEND_DIRECTIONS for m in audio):
        raise OfferError(
            400,
            f"the offer's audio is {audio[0].direction!r}: the avatar needs the peer to send "
            "audio ('sendrecv' or 'sendonly')",
        )
    return description


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_matches(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


@dataclass
class AudioInStats:
    """What the server has heard from one peer's microphone track."""

    frames: int = 0
    samples: int = 0  # per channel
    sample_rate: int = 0  # of the last frame (48000 for Opus, 8000 for PCMU/PCMA, ...)
    peak: float = 0.0  # largest |sample| so far, as a fraction of full scale
    last_rms: float = 0.0  # of the last frame, fraction of full scale
    last_frame_at: float | None = None  # time.monotonic() of the last frame

    def update(self, frame: av.AudioFrame) -> None:
        self.frames += 1
        self.samples += frame.samples
        self.sample_rate = frame.sample_rate
        self.last_frame_at = time.monotonic()
        samples = frame.to_ndarray()
        if samples.size and samples.dtype == np.int16:
            scaled = samples.astype(np.float32) / 32768.0
        elif samples.size:
            scaled = samples.astype(np.float32)  # float formats are already in [-1, 1]
        else:
            return
        self.peak = max(self.peak, float(np.abs(scaled).max()))
        self.last_rms = float(np.sqrt(np.mean(scaled * scaled)))

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate if self.sample_rate else 0.0

    def as_dict(self) -> dict:
        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "sample_rate": self.sample_rate,
            "peak": round(self.peak, 5),
            "last_rms": round(self.last_rms, 5),
        }


@dataclass
class MetricsSnapshot:
    """Numbers for one /metrics scrape; `per_session` maps session id -> session.stats()."""

    sessions_active: int
    sessions_total: int
    sessions_rejected: dict[str, int]
    frames_sent_closed: int  # frames sent by sessions already closed (counters never go down)
    late_frames_closed: int
    per_session: dict[str, dict] = field(default_factory=dict)


_METRIC_PREFIX = "realtime_avatar"
# Prometheus histogram buckets, seconds. Latency: audio arrival -> frame on the wire inside the
# session; ~180-400 ms is the design range (DESIGN.md 4), so the buckets are dense there.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)
# Render: one batched render call (model + blend); a frame lasts 40 ms, a batch of 4-8 frames
# must finish in 160-320 ms, and a GPU does it in a few ms.
RENDER_BUCKETS_S = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class _SnapshotCollector:
    """Counters and gauges read from the server's state at each scrape (prometheus_client's
    custom-collector protocol), so that a closed session's frames still count."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]):
        self._snapshot = snapshot

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self._snapshot()
        per = snap.per_session

        def stat(stats: dict, key: str, scale: float = 1.0) -> float:
            value = stats.get(key)
            return float(value) * scale if isinstance(value, (int, float, np.number)) else 0.0

        def name(short: str) -> str:
            return f"{_METRIC_PREFIX}_{short}"

        yield GaugeMetricFamily(name("sessions_active"), "Avatar sessions streaming now.",
                                value=snap.sessions_active)
        yield CounterMetricFamily(name("sessions"), "Avatar sessions started since the server started.",
                                  value=snap.sessions_total)
        rejected = CounterMetricFamily(name("sessions_rejected"), "Offers refused, by reason.", labels=["reason"])
        for reason, n in sorted(snap.sessions_rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily(
            name("frames_sent"), "Video frames sent, all sessions.",
            value=snap.frames_sent_closed + sum(stat(s, "frames_sent") for s in per.values()))
        yield CounterMetricFamily(
            name("late_frames"), "Video frames sent after their due time, all sessions.",
            value=snap.late_frames_closed + sum(stat(s, "late_frames") for s in per.values()))
        for short, help_text, key, scale in (
            ("fps", "Video frames per second sent, per session.", "fps", 1.0),
            ("session_latency_seconds", "Audio-in to frame-out latency, median over the last 10 s, per "
             "session (the histogram realtime_avatar_latency_seconds has every frame).", "latency_ms", 1e-3),
            ("av_offset_seconds", "Video minus audio presentation offset, per session.", "av_offset_ms", 1e-3),
        ):
            family = GaugeMetricFamily(name(short), help_text, labels=["session"])
            for sid, stats in sorted(per.items()):
                family.add_metric([sid], stat(stats, key, scale))
            yield family


class ServerMetrics:
    """The /metrics of one server, in a CollectorRegistry of its own (several servers in one
    process, as in tests, never share or clash). Sessions report into it through
    `observe_latency` and `observe_render` (the session's `metrics_sink`)."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]):
        from prometheus_client import CollectorRegistry, Histogram

        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(snapshot))
        self.latency = Histogram(
            f"{_METRIC_PREFIX}_latency_seconds", "Audio arrival to its video frame on the wire, inside "
            "the session (network not included), per frame.", buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.render = Histogram(
            f"{_METRIC_PREFIX}_render_seconds", "Wall time of one batched render call (model and blend).",
            buckets=RENDER_BUCKETS_S, registry=self.registry)

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def observe_render(self, frames: int, seconds: float) -> None:
        self.render.observe(seconds)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """(body, Content-Type) for a scrape with this Accept header: OpenMetrics when the
        scraper asks for it (Prometheus does), else the classic text format 0.0.4."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def render_metrics(snapshot: MetricsSnapshot) -> str:
    """Prometheus text exposition (version 0.0.4) of a MetricsSnapshot (counters and gauges)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(_SnapshotCollector(lambda: snapshot))
    return generate_latest(registry).decode()


def _json_default(value: object) -> object:
    # session.stats() may hold numpy scalars; JSON has only plain numbers
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(data: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=_json_default),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


# --- one peer -------------------------------------------------------------------------------


class PeerSession:
    """One RTCPeerConnection, its AvatarSession and the tasks that feed it; closes once."""

    def __init__(
        self,
        session_id: str,
        pc: RTCPeerConnection,
        session: AvatarSessionLike,
        *,
        media_timeout_s: float,
        connect_timeout_s: float,
        on_closed: Callable[["PeerSession"], None],
    ):
        self.id = session_id
        self.pc = pc
        self.session = session
        self.audio_in = AudioInStats()
        self.created_at = time.monotonic()
        self.close_reason: str | None = None
        self._media_timeout_s = media_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._on_closed = on_closed
        self._tasks: set[asyncio.Task] = set()  # relay and drain tasks, owned here
        self._relay_started = False
        self._close_task: asyncio.Task | None = None

        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_connection_state)

    @property
    def closing(self) -> bool:
        return self._close_task is not None

    def _on_track(self, track: MediaStreamTrack) -> None:
        release_all_receivers(self.pc)  # hear the microphone without aiortc's 80 ms prefetch
        if track.kind == "audio" and not self._relay_started:
            self._relay_started = True
            self._own(self._relay_audio(track), on_exit_close=True)
        else:
            # Frames nobody reads pile up in aiortc's unbounded track queue: drain them.
            self._own(self._drain(track), on_exit_close=False)

    def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.schedule_close(f"connection {self.pc.connectionState}")

    def _own(self, coro: Awaitable[str], *, on_exit_close: bool) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if on_exit_close and not t.cancelled():
                error = t.exception()
                reason = f"audio relay failed: {error!r}" if error else t.result()
                if error:
                    log.error("session %s: %s", self.id, reason)
                self.schedule_close(reason)

        task.add_done_callback(done)

    async def _relay_audio(self, track: MediaStreamTrack) -> str:
        """Feed the peer's audio into the session until the track ends or goes quiet."""
        timeout = self._connect_timeout_s  # until the first frame: ICE + DTLS still to do
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when a
            # cancel arrives just as recv() completes, losing the cancel; this loop then runs on
            # and a teardown waiting for it waits forever (seen under CPU load).
            try:
                async with asyncio.timeout(timeout):
                    frame = await track.recv()
            except TimeoutError:
                if self.audio_in.frames == 0:
                    return f"no audio within {timeout:g} s of the answer (ICE never connected?)"
                return f"no audio for {timeout:g} s (peer vanished)"
            except MediaStreamError:
                self.session.end_of_input()
                return "audio track ended"
            timeout = self._media_timeout_s
            self.audio_in.update(frame)
            self.session.push_audio(frame)

    @staticmethod
    async def _drain(track: MediaStreamTrack) -> str:
        try:
            while True:
                await track.recv()
        except MediaStreamError:
            return "drained"

    def schedule_close(self, reason: str) -> asyncio.Task:
        """Start teardown (once) from a callback; returns the task that does it."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close(reason))
        return self._close_task

    async def close(self, reason: str) -> None:
        await asyncio.shield(self.schedule_close(reason))

    async def _close(self, reason: str) -> None:
        self.close_reason = reason
        log.info("session %s closing: %s", self.id, reason)
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()

        async def relay_and_drain_tasks() -> None:
            await asyncio.gather(*tasks, return_exceptions=True)

        # Each step runs even if one before it failed or hung: a half-closed peer is a leak, and
        # a teardown that never returns keeps its registry slot forever. The peer connection
        # goes first: it ends the remote tracks, so the relay ends even if a cancel were lost.
        for what, step in (
            ("peer connection", self.pc.close),
            ("relay tasks", relay_and_drain_tasks),
            ("avatar session", self.session.close),
        ):
            try:
                await asyncio.wait_for(step(), CLOSE_STEP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.error("session %s: closing the %s took over %g s; moving on", self.id, what,
                          CLOSE_STEP_TIMEOUT_S)
            except Exception:
                log.exception("session %s: closing the %s failed", self.id, what)
        self._on_closed(self)

    def stats(self) -> dict:
        return {
            "id": self.id,
            "connection_state": self.pc.connectionState,
            "ice_connection_state": self.pc.iceConnectionState,
            "uptime_s": round(time.monotonic() - self.created_at, 3),
            "audio_in": self.audio_in.as_dict(),
            "session": self.session.stats(),
        }


# --- the server -----------------------------------------------------------------------------


class AvatarServer:
    """The registry of peers and the HTTP handlers; one per aiohttp app."""

    def __init__(
        self,
        session_factory: SessionFactory,
        *,
        max_sessions: int,
        token: str | None,
        media_timeout_s: float,
        connect_timeout_s: float,
        ice_addresses: Sequence[str] | None = None,
    ):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.session_factory = session_factory
        self.max_sessions = max_sessions
        self.token = token
        self.media_timeout_s = media_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.ice_addresses = tuple(ice_addresses) if ice_addresses is not None else None
        self.peers: dict[str, PeerSession] = {}
        self.sessions_total = 0
        self.rejected: dict[str, int] = {}
        self._negotiating = 0  # slots held by offers still being answered
        self._frames_sent_closed = 0
        self._late_frames_closed = 0
        self.prometheus = ServerMetrics(self.metrics)
        # broadcast.py: sessions without a peer (POST /sessions) served by the /sessions/<id>
        # routes too, and hooks called as hook("started" | "closed", peer)
        self.extra_sessions: dict = {}
        self.peer_hooks: list[Callable[[str, PeerSession], None]] = []

    # registry

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _run_hooks(self, event: str, peer: PeerSession) -> None:
        for hook in self.peer_hooks:
            try:
                hook(event, peer)
            except Exception:
                log.exception("session %s: %s hook failed", peer.id, event)

    def _on_peer_closed(self, peer: PeerSession) -> None:
        if self.peers.pop(peer.id, None) is None:
            return
        self._run_hooks("closed", peer)
        try:
            final = peer.session.stats()
            self._frames_sent_closed += int(final.get("frames_sent", 0))
            self._late_frames_closed += int(final.get("late_frames", 0))
        except Exception:
            log.exception("session %s: stats() failed after close", peer.id)

    async def negotiate(self, offer_sdp: str) -> tuple[PeerSession, str]:
        """Answer an SDP offer with a new peer; returns (peer, answer SDP). Raises OfferError."""
        check_offer_sdp(offer_sdp)
        if len(self.peers) + self._negotiating >= self.max_sessions:
            self._reject("capacity")
            raise OfferError(
                503,
                f"server is at capacity ({self.max_sessions} sessions): try again later or "
                "start it with a larger max_sessions",
            )
        self._negotiating += 1
        try:
            return await asyncio.wait_for(self._answer(offer_sdp), NEGOTIATION_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._reject("timeout")
            raise OfferError(504, f"no answer within {NEGOTIATION_TIMEOUT_S:g} s") from None
        finally:
            self._negotiating -= 1

    async def _answer(self, offer_sdp: str) -> tuple[PeerSession, str]:
        try:
            session = await self.session_factory()
        except Exception as exc:
            log.exception("session_factory failed")
            raise OfferError(500, f"could not create an avatar session: {exc!r}") from exc
        if hasattr(session, "metrics_sink"):  # latency and render-time histograms of /metrics
            session.metrics_sink = self.prometheus
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: host candidates only
        peer = PeerSession(
            uuid.uuid4().hex,
            pc,
            session,
            media_timeout_s=self.media_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            on_closed=self._on_peer_closed,
        )
        try:
            await session.start()
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:
                raise OfferError(400, f"offer rejected by the peer connection: {exc}") from exc
            # addTrack reuses the offer's transceivers: audio becomes sendrecv, video sendonly.
            # The tracks are relay proxies, so WHEP viewers and broadcasts can watch this session.
            outputs = outputs_of(session)
            pc.addTrack(PtimeAudioTrack(outputs.audio(own_peer=True)))
            pc.addTrack(outputs.video(own_peer=True))
            with ice_gathering_on(self.ice_addresses):  # media only where HTTP is bound
                await pc.setLocalDescription(await pc.createAnswer())  # gathers ICE to completion
        except BaseException:
            await peer.close("negotiation failed")
            raise
        self.peers[peer.id] = peer
        self.sessions_total += 1
        self._run_hooks("started", peer)
        log.info("session %s started (%d active)", peer.id, len(self.peers))
        return peer, pc.localDescription.sdp

    async def close_all(self, reason: str = "server shutdown") -> None:
        await asyncio.gather(*(peer.close(reason) for peer in list(self.peers.values())))

    def metrics(self) -> MetricsSnapshot:
        per_session = {}
        for sid, peer in self.peers.items():
            try:
                per_session[sid] = peer.session.stats()
            except Exception:
                log.exception("session %s: stats() failed", sid)
        return MetricsSnapshot(
            sessions_active=len(self.peers),
            sessions_total=self.sessions_total,
            sessions_rejected=dict(self.rejected),
            frames_sent_closed=self._frames_sent_closed,
            late_frames_closed=self._late_frames_closed,
            per_session=per_session,
        )

    # HTTP handlers

    def _authorized(self, request: web.Request) -> bool:
        ok = token_matches(self.token, bearer_token(request.headers.get("Authorization")))
        if not ok:
            self._reject("unauthorized")
        return ok

    def _unauthorized(self) -> web.Response:
        response = error_response(
            401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
            "(the page takes it from ?token= in its URL)"
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="realtime-avatar"'
        return response

    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_ROOT / "index.html")

    async def handle_offer(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._reject("bad_offer")
            return error_response(400, "body must be JSON: {\"sdp\": \"v=0...\", \"type\": \"offer\"}")
        if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
            self._reject("bad_offer")
            return error_response(400, "body must be JSON {\"sdp\": <string>, \"type\": \"offer\"}")
        try:
            peer, answer = await self.negotiate(body["sdp"])
        except OfferError as exc:
            if exc.status == 400:
                self._reject("bad_offer")
            return error_response(exc.status, exc.message)
        return json_response({"sdp": answer, "type": "answer", "session_id": peer.id})

    async def handle_whip(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        if request.content_type != "application/sdp":
            self._reject("bad_offer")
            return error_response(
                415, f"WHIP offers must be Content-Type application/sdp, got {request.content_type!r}"
            )
        try:
            offer = await request.text()
        except UnicodeDecodeError:
            self._reject("bad_offer")
            return error_response(400, "the SDP offer is not valid UTF-8")
        try:
            peer, answer = await self.negotiate(offer)
        except OfferError as exc:
            if exc.status == 400:
                self._reject("bad_offer")
            return error_response(exc.status, exc.message)
        return web.Response(
            status=201,
            text=answer,
            content_type="application/sdp",
            headers={"Location": f"/whip/{peer.id}"},
        )

    def _peer(self, request: web.Request) -> PeerSession | None:
        sid = request.match_info["session_id"]
        return self.peers.get(sid) or self.extra_sessions.get(sid)

    def _unknown_session(self, request: web.Request) -> web.Response:
        return error_response(404, f"no session {request.match_info['session_id']!r} (ended or never existed)")

    async def handle_delete(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        peer = self._peer(request)
        if peer is None:
            return self._unknown_session(request)
        await peer.close("deleted by the client")
        return web.Response(status=200)

    async def handle_stats(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        peer = self._peer(request)
        if peer is None:
            return self._unknown_session(request)
        return json_response(peer.stats())

    async def handle_interrupt(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        peer = self._peer(request)
        if peer is None:
            return self._unknown_session(request)
        peer.session.interrupt()
        return web.Response(status=204)

    async def handle_health(self, request: web.Request) -> web.Response:
        return json_response(
            {"ok": True, "sessions": len(self.peers), "max_sessions": self.max_sessions}
        )

    async def handle_metrics(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        body, content_type = self.prometheus.exposition(request.headers.get("Accept", ""))
        return web.Response(
            body=body, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff"}
        )


SERVER_KEY = web.AppKey("avatar_server", AvatarServer)


def create_app(
    session_factory: SessionFactory,
    *,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    token: str | None = None,
    media_timeout_s: float = DEFAULT_MEDIA_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    loopback_candidates: bool = True,
    host: str | Sequence[str] | None = None,
    broadcast: "BroadcastOptions | None" = None,
) -> web.Application:
    """The aiohttp app: page, signalling (/offer, /whip), /health, /metrics, per-session stats.

    token: when set, every route but the page, its static files and /health needs
    `Authorization: Bearer <token>`. loopback_candidates: see include_loopback_candidates.
    host: the address the HTTP server binds (as given to TCPSite); the answers' ICE candidates
    and the media sockets behind them are limited to it (see ice_addresses_for_host), so
    `--host 127.0.0.1` keeps media on this machine too. None: every interface.
    broadcast: RTMP/Janus/WHEP/audio-push options (broadcast.py); None: those routes are absent.
    """
    install_ice_address_hook()
    install_live_h264_settings()  # no keyframe pulse when a peer negotiates H.264
    if loopback_candidates:
        include_loopback_candidates()
    server = AvatarServer(
        session_factory,
        max_sessions=max_sessions,
        token=token,
        media_timeout_s=media_timeout_s,
        connect_timeout_s=connect_timeout_s,
        ice_addresses=ice_addresses_for_host(host),
    )
    app = web.Application(client_max_size=MAX_SDP_BYTES * 2)
    app[SERVER_KEY] = server
    app.router.add_get("/", server.handle_index)
    app.router.add_static("/web/", WEB_ROOT)
    app.router.add_post("/offer", server.handle_offer)
    app.router.add_post("/whip", server.handle_whip)
    app.router.add_delete("/whip/{session_id}", server.handle_delete)
    app.router.add_delete("/sessions/{session_id}", server.handle_delete)
    app.router.add_get("/sessions/{session_id}/stats", server.handle_stats)
    app.router.add_post("/sessions/{session_id}/interrupt", server.handle_interrupt)
    app.router.add_get("/health", server.handle_health)
    app.router.add_get("/metrics", server.handle_metrics)

    async def on_shutdown(app: web.Application) -> None:
        await server.close_all()

    app.on_shutdown.append(on_shutdown)
    if broadcast is not None:
        from .broadcast import install

        install(app, server, broadcast)
    return app


async def run_server(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    session_factory: SessionFactory,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    token: str | None = None,
    started: asyncio.Event | None = None,
    broadcast: "BroadcastOptions | None" = None,
) -> None:
    """Serve until cancelled; on cancellation every session is closed before returning."""
    app = create_app(session_factory, max_sessions=max_sessions, token=token, host=host, broadcast=broadcast)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("realtime-avatar serving on http://%s:%d/", host, port)
        if started is not None:
            started.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
