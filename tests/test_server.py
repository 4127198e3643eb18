"""The WebRTC server with real peers on 127.0.0.1: aiortc clients speaking espeak-ng WAVs.

Plumbing tests use tests.loopback_session (a small real session: echo audio, level-driven
video). Every test runs its own event loop and server on a free port.
"""

from __future__ import annotations

import asyncio
import fractions
import gc
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import av
from aiohttp import web
import numpy as np
import pytest
import soxr
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from realtime_avatar.server import (
    SERVER_KEY,
    AudioInStats,
    MetricsSnapshot,
    OfferError,
    PeerSession,
    PtimeAudioTrack,
    bearer_token,
    check_offer_sdp,
    create_app,
    render_metrics,
)
from realtime_avatar.face import LIPS_OUTER
from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS
from realtime_avatar.session import AvatarSession, SessionConfig
from realtime_avatar.timing import FPS, SAMPLE_RATE
from tests.loopback_session import LoopbackSession, loopback_factory
from tests.rtc_client import RtcClient, WavMicrophoneTrack, http_client, read_wav, serving, voiced_seconds, voiced_span
from tests.speech import espeak_wav

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "Hello there. This is a short test of the talking avatar."


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    return espeak_wav(SENTENCE, tmp_path_factory.mktemp("speech") / "speech16k.wav", rate=16_000)


async def offer_sdp(*, audio: str | None = "sendrecv", video: str | None = "recvonly") -> str:
    """A real aiortc offer with the given transceiver directions (None: no such m-line)."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        if audio:
            pc.addTransceiver("audio", direction=audio)
        if video:
            pc.addTransceiver("video", direction=video)
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


async def wait_for(predicate, timeout: float, step: float = 0.05) -> float:
    """Poll until predicate() is true; return the seconds it took. Fails the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


async def within(seconds: float, coro, what: str):
    """Await coro; past `seconds`, fail naming the step and where every task was waiting."""
    try:
        return await asyncio.wait_for(coro, seconds)
    except asyncio.TimeoutError:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(limit=6, file=stacks)
        raise AssertionError(f"{what} took over {seconds} s; tasks:\n{stacks.getvalue()}") from None


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- pure functions ---------------------------------------------------------------------------


def test_check_offer_sdp_accepts_a_real_offer_and_names_what_is_wrong():
    good = asyncio.run(offer_sdp())
    assert [m.kind for m in check_offer_sdp(good).media] == ["audio", "video"]
    check_offer_sdp(asyncio.run(offer_sdp(video=None)))  # video is optional

    for bad, words in [
        ("", "empty"),
        ("hello", "v=0"),
        (asyncio.run(offer_sdp(audio=None)), "no audio"),
        (asyncio.run(offer_sdp(audio="recvonly")), "recvonly"),
        ("v=0\r\n" + "a=x\r\n" * 20000, "not an offer"),
    ]:
        with pytest.raises(OfferError) as error:
            check_offer_sdp(bad)
        assert error.value.status == 400
        assert words in error.value.message


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_render_metrics_is_prometheus_text_and_counters_include_closed_sessions():
    text = render_metrics(
        MetricsSnapshot(
            sessions_active=2,
            sessions_total=7,
            sessions_rejected={"capacity": 3, "unauthorized": 1},
            frames_sent_closed=1000,
            late_frames_closed=4,
            per_session={
                "a": {"fps": 25.0, "frames_sent": 50, "late_frames": 1, "latency_ms": 180.5, "av_offset_ms": 3.0},
                "b": {"fps": np.float32(24.5), "frames_sent": np.int64(10), "late_frames": 0},
            },
        )
    )
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}  # the official parser
    assert families["realtime_avatar_frames_sent"].type == "counter"
    assert families["realtime_avatar_sessions_active"].type == "gauge"
    samples = {}
    for family in families.values():
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    assert samples["realtime_avatar_sessions_active"] == 2
    assert samples["realtime_avatar_sessions_total"] == 7
    assert samples['realtime_avatar_sessions_rejected_total{reason="capacity"}'] == 3
    assert samples["realtime_avatar_frames_sent_total"] == 1060
    assert samples["realtime_avatar_late_frames_total"] == 5
    assert samples['realtime_avatar_fps{session="b"}'] == pytest.approx(24.5)
    assert samples['realtime_avatar_session_latency_seconds{session="a"}'] == pytest.approx(0.1805)
    assert samples['realtime_avatar_session_latency_seconds{session="b"}'] == 0  # missing stat reads 0
    assert samples['realtime_avatar_av_offset_seconds{session="a"}'] == pytest.approx(0.003)
    assert "# TYPE realtime_avatar_frames_sent_total counter" in text


def first_get(http, url: str, accept: str):
    return http.get(f"{url}/metrics", headers={"Accept": accept})


def test_metrics_registries_are_per_app_and_histograms_use_seconds():
    # Two servers in one process: each has its own registry (a global one would refuse the
    # second app's metric names, or mix their counts).
    async def scenario():
        first, second = create_app(loopback_factory), create_app(loopback_factory)
        first[SERVER_KEY].prometheus.observe_latency(0.22)
        first[SERVER_KEY].prometheus.observe_render(4, 0.03)
        async with serving(first) as url_a, serving(second) as url_b, http_client() as http:
            texts = []
            for url in (url_a, url_b):
                async with http.get(f"{url}/metrics") as response:
                    assert response.status == 200
                    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    texts.append(await response.text())
            async with first_get(http, url_a, "application/openmetrics-text; version=1.0.0") as response:
                assert response.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await response.text()).rstrip().endswith("# EOF")
            return texts

    from prometheus_client.parser import text_string_to_metric_families

    a, b = asyncio.run(scenario())
    hist = {s.name + str(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(a) if f.type == "histogram" for s in f.samples}
    assert hist["realtime_avatar_latency_seconds_count[]"] == 1
    assert hist["realtime_avatar_latency_seconds_bucket[('le', '0.25')]"] == 1
    assert hist["realtime_avatar_latency_seconds_bucket[('le', '0.2')]"] == 0
    assert hist["realtime_avatar_render_seconds_bucket[('le', '0.04')]"] == 1
    assert "realtime_avatar_latency_seconds_count 0.0" in b  # the other server saw nothing


def test_audio_in_stats_reads_levels_of_packed_stereo_s16(speech_wav):
    samples, rate = read_wav(speech_wav)
    pcm = (samples * 32767).astype(np.int16)
    stereo = np.repeat(pcm[: rate // 50], 2)[None, :]  # 20 ms, packed L R L R
    frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
    frame.sample_rate = rate
    stats = AudioInStats()
    stats.update(frame)
    stats.update(frame)
    assert stats.frames == 2 and stats.samples == 2 * (rate // 50)
    assert stats.seconds == pytest.approx(0.04)
    assert stats.peak == pytest.approx(np.abs(pcm[: rate // 50]).max() / 32768, rel=1e-4)


class ListTrack(MediaStreamTrack):
    """Plays a list of frames, then ends."""

    kind = "audio"

    def __init__(self, frames):
        super().__init__()
        self._frames = list(frames)

    async def recv(self):
        if not self._frames:
            raise MediaStreamError
        return self._frames.pop(0)


def pcm_frames(samples: np.ndarray, rate: int, per_frame: int) -> list[av.AudioFrame]:
    frames = []
    for i in range(0, len(samples), per_frame):
        frame = av.AudioFrame.from_ndarray(samples[None, i : i + per_frame], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, i, fractions.Fraction(1, rate)
        frames.append(frame)
    return frames


@pytest.mark.parametrize("rate, frame_ms", [(16_000, 40), (48_000, 20), (8_000, 60)])
def test_ptime_audio_track_reframes_to_20_ms_losslessly(speech_wav, rate, frame_ms):
    speech, speech_rate = read_wav(speech_wav)
    pcm = (soxr.resample(speech, speech_rate, rate) * 32767).astype(np.int16)[: rate]  # 1 s
    source = ListTrack(pcm_frames(pcm, rate, rate * frame_ms // 1000))

    async def drain():
        track, out = PtimeAudioTrack(source), []
        with pytest.raises(MediaStreamError):
            while True:
                out.append(await track.recv())
        return out

    out = asyncio.run(drain())
    assert {f.samples for f in out} == {rate // 50}  # 20 ms each
    assert [f.pts for f in out] == [k * rate // 50 for k in range(len(out))]
    assert np.array_equal(np.concatenate([f.to_ndarray()[0] for f in out]), pcm[: len(out) * rate // 50])


class BusyAudioTrack(MediaStreamTrack):
    """A remote audio track that always has a frame ready: recv() completes on every loop turn,
    so a teardown's cancel usually lands just as a recv() finishes."""

    kind = "audio"

    def __init__(self, frame: av.AudioFrame):
        super().__init__()
        self._frame = frame

    async def recv(self):
        await asyncio.sleep(0)
        return self._frame


def test_teardown_is_not_hung_by_a_busy_relay(speech_wav):
    """Python 3.11's asyncio.wait_for returns a result instead of raising when a cancel and the
    result arrive together; a relay loop built on it ignored teardown's cancel (72 of 100 in a
    probe) and teardown waited for it forever. The relay must stop within a moment."""
    samples, rate = read_wav(speech_wav)
    frame = pcm_frames((samples[: rate // 50] * 32767).astype(np.int16), rate, rate // 50)[0]

    async def scenario():
        from aiortc import RTCConfiguration, RTCPeerConnection

        durations = []
        for _ in range(20):
            session = LoopbackSession(size=64)
            closed = []
            peer = PeerSession("test", RTCPeerConnection(RTCConfiguration(iceServers=[])), session,
                               media_timeout_s=5, connect_timeout_s=5, on_closed=closed.append)
            peer.pc.emit("track", BusyAudioTrack(frame))  # as aiortc does on setRemoteDescription
            await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await within(3, peer.close("test"), "teardown with a busy relay")
            durations.append(time.monotonic() - t0)
            assert closed == [peer] and session.closed and session.frames_received > 0
        return durations

    durations = asyncio.run(scenario())
    assert max(durations) < 1.0, durations


# --- real peers -------------------------------------------------------------------------------


def mouth_region(runtime, pad: int = 12) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) around the outer lips over the whole idle cycle, padded."""
    lips = runtime.avatar.landmarks[:, list(LIPS_OUTER)]  # [N, points, (x, y)]
    (x0, y0), (x1, y1) = lips.min(axis=(0, 1)), lips.max(axis=(0, 1))
    h, w = runtime.avatar.frame_shape[:2]
    return max(0, int(y0) - pad), min(h, int(y1) + pad), max(0, int(x0) - pad), min(w, int(x1) + pad)


@dataclass
class SentTick:
    """What the real session put on the wire at one 40 ms tick (recorded by its on_tick hook)."""

    at: float  # time.monotonic()
    frame: int | None  # the input frame played, None for an idle tick
    rendered: bool  # a frame rendered from audio, not the idle frame
    loud: bool  # the tick's 40 ms of input audio is speech
    pcm: np.ndarray  # those 40 ms of audio (16 kHz float), as sent
    mouth: np.ndarray  # bgr crop of the frame sent
    idle_mouth: np.ndarray  # the same crop of the idle frame for that tick


def align_ticks(recording, sent: list[SentTick], search: int = 8) -> tuple[list[int], float]:
    """Tick number of every received frame, and the mean mouth mismatch of that alignment.

    RTP timestamps start at a random origin, so received pts give tick numbers only up to an
    offset. The arrival times bound it (same process, same clock); the mouth crops settle it.
    """
    pts0 = recording.video_pts[0]
    steps = [(p - pts0) // (90_000 // FPS) for p in recording.video_pts]
    times = np.array([t.at for t in sent])
    guess = int(np.searchsorted(times, recording.video_arrivals[0])) - 1
    best = None
    for n0 in range(max(0, guess - search), guess + 2):
        pairs = [(frame, n0 + k) for frame, k in zip(recording.video_frames, steps) if n0 + k < len(sent)]
        mismatch = float(np.mean([np.abs(f.astype(np.int16) - sent[n].mouth).mean() for f, n in pairs]))
        if best is None or mismatch < best[1]:
            best = ([n0 + k for k in steps], mismatch)
    return best


def test_real_session_round_trip_rate_audio_and_lips(runtime, speech_wav):
    """A client speaks a sentence to the real AvatarSession (Whisper + renderer): video comes
    back at >= 24 fps for ~10 s, the speech comes back whole, the mouth that the session
    rendered during speech reaches the client intact, and in silence it rests (idle frame)."""
    run_s = 10.0
    region = mouth_region(runtime)
    y0, y1, x0, x1 = region
    renderer = runtime.renderer
    sent: list[SentTick] = []
    sessions: list[AvatarSession] = []

    def record_tick(n, frame, image, pcm):
        idle = renderer.idle_frame(n % renderer.cycle_length)
        loud = bool(np.sqrt(np.mean(pcm * pcm)) > 0.02)
        sent.append(SentTick(time.monotonic(), frame, image is not idle, loud, pcm.copy(),
                             image[y0:y1, x0:x1].astype(np.int16), idle[y0:y1, x0:x1].astype(np.int16)))

    async def factory():
        # a generous render budget: the 2 cores are shared with other work during test runs
        config = SessionConfig(streaming=runtime.streaming, render_budget_s=1.0, batch_size=8)
        session = AvatarSession(runtime.encoder, renderer, config)
        session.on_tick = record_tick
        sessions.append(session)
        return session

    async def scenario():
        app = create_app(factory)
        async with serving(app) as url, http_client() as http:
            mic = WavMicrophoneTrack(speech_wav, lead_s=1.0)
            client = RtcClient(url, mic, keep_video=True, video_region=region)
            t0 = time.monotonic()
            await client.connect(http)
            answered = time.monotonic() - t0
            await asyncio.wait_for(client.first_video.wait(), 5)
            first_frame = time.monotonic() - t0
            await asyncio.sleep(run_s)
            async with http.get(f"{url}/sessions/{client.session_id}/stats") as response:
                stats = await response.json()
            async with http.get(f"{url}/metrics") as response:
                metrics = await response.text()
            await client.close(http)
            assert not app[SERVER_KEY].peers
            return client, stats, metrics, answered, first_frame

    client, stats, metrics, answered, first_frame = asyncio.run(scenario())
    rec = client.recording
    assert sessions[0].closed

    # the answer carries a loopback host candidate (a loopback-only host needs it)
    assert re.search(r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 \d+ typ host", client.answer_sdp)

    arrivals = rec.video_arrivals
    steady = (arrivals[0] + 1.0, arrivals[-1])  # skip the first second (encoder warm-up)
    fps = rec.fps(*steady)
    print(f"answer {answered * 1000:.0f} ms, first frame {first_frame * 1000:.0f} ms, "
          f"{len(arrivals)} frames, steady fps {fps:.2f}\nserver {stats}")
    # The session's clock kept 25 fps and all it handed to aiortc arrived; when the CPU is
    # starved (other work on the 2 cores) its output queue drops the few frames aiortc did not
    # read in time (measured: 0 on a quiet machine, up to ~10 in 10 s at load average 9).
    dropped = sessions[0].video_track.dropped
    window = steady[1] - steady[0]
    print(f"video frames dropped by the session (unread in time): {dropped}")
    assert fps + dropped / window >= FPS - 1
    assert dropped <= 0.05 * run_s * FPS, f"{dropped} frames dropped: the server could not keep up"
    assert len(arrivals) + dropped >= (run_s - 0.5) * (FPS - 1)
    assert rec.video_size == tuple(runtime.avatar.frame_shape[1::-1])
    assert np.median(np.diff(rec.video_pts)) == 90_000 // FPS  # 40 ms in the 90 kHz clock
    assert stats["audio_in"]["sample_rate"] == 48_000  # Opus
    assert stats["audio_in"]["peak"] > 0.1  # the server heard the speech, not silence
    assert stats["connection_state"] == "connected"
    assert "realtime_avatar_frames_sent_total" in metrics
    counts = dict(re.findall(r"^(realtime_avatar_(?:latency|render)_seconds_count) (\S+)$", metrics, re.M))
    assert float(counts["realtime_avatar_latency_seconds_count"]) > 0  # the real session reports
    assert float(counts["realtime_avatar_render_seconds_count"]) > 0

    # audio: what the session put on the wire comes back whole. Under CPU pressure the
    # session may idle a tick inside speech (input late: +40 ms of silence), skip input frames
    # (latency bound: -40 ms) or drop ticks nobody read in time (-40 ms); all are counted.
    session = sessions[0]
    wire = np.concatenate([t.pcm for t in sent])
    wire_start, wire_end = voiced_span(wire, SAMPLE_RATE)
    got_start, got_end = voiced_span(rec.audio, rec.audio_rate)
    sent_audio, sent_rate = read_wav(speech_wav)
    sent_start, sent_end = voiced_span(sent_audio, sent_rate)
    loud_ticks = [n for n, t in enumerate(sent) if t.loud]
    inside = sent[loud_ticks[0] : loud_ticks[-1] + 1]
    played = [t.frame for t in inside if t.frame is not None]
    gaps = sum(t.frame is None for t in inside)
    skipped = played[-1] - played[0] + 1 - len(played)
    queue_drops = session.audio_track.dropped
    print(f"voiced: input {sent_end - sent_start:.3f} s, session sent {wire_end - wire_start:.3f} s "
          f"({gaps} idle ticks, {skipped} skipped frames inside; {queue_drops} unread ticks dropped), "
          f"received {got_end - got_start:.3f} s; {len(rec.audio) / rec.audio_rate:.2f} s of audio received")
    assert abs((got_end - got_start) - (wire_end - wire_start)) < 0.06 + queue_drops / FPS
    assert abs((got_end - got_start) - (sent_end - sent_start)) < 0.06 + (gaps + skipped + queue_drops) / FPS
    assert len(rec.audio) / rec.audio_rate > run_s * 0.9

    # lips, at the server: speech ticks were rendered from the audio, quiet ticks idle
    loud = [t for t in sent if t.loud]
    quiet = [t for i, t in enumerate(sent) if not any(u.loud for u in sent[max(0, i - 8) : i + 9])]
    rendered_share = np.mean([t.rendered for t in loud])
    print(f"server: {len(loud)} speech ticks, {rendered_share:.0%} rendered; "
          f"{len(quiet)} quiet ticks, {np.mean([t.rendered for t in quiet]):.0%} rendered")
    assert len(loud) > 2 * FPS and len(quiet) > FPS
    # (how many depends on free CPU: the session shows the idle frame for any it cannot render
    # in time; test_session checks its speed, this test that the lips reach the peer)
    assert sum(t.rendered for t in loud) >= FPS // 2, "the session rendered (almost) no speech"
    assert not any(t.rendered for t in quiet), "the mouth moved in silence"

    # lips, at the client: every frame arrives as sent (mouth crops, through VP8)
    ticks, mismatch = align_ticks(rec, sent)
    print(f"received mouth vs sent mouth: mean abs difference {mismatch:.2f} levels")
    assert mismatch < 6
    received = dict(zip(ticks, rec.video_frames))
    moved = [np.abs(received[n].astype(np.int16) - t.idle_mouth).mean()
             for n, t in enumerate(sent) if n in received and t.loud and t.rendered]
    rested = [np.abs(received[n].astype(np.int16) - t.idle_mouth).mean()
              for n, t in enumerate(sent) if n in received and t in quiet]
    server_moved = [np.abs(t.mouth - t.idle_mouth).mean() for t in sent if t.loud and t.rendered]
    print(f"mouth vs idle: speech {np.median(moved):.2f} levels at the client "
          f"({np.median(server_moved):.2f} at the server), silence {np.median(rested):.2f}")
    assert len(rested) > FPS and np.median(rested) < 6  # at rest: the idle mouth, codec noise only
    if DEFAULT_COMPACT_WEIGHTS.is_file():  # trained lips move visibly; random ones barely do
        assert np.median(moved) > np.median(rested) + 2


LOOPBACK_ONLY_PROBE = """
import asyncio, json, sys
from realtime_avatar.server import create_app
from tests.loopback_session import loopback_factory
from tests.rtc_client import RtcClient, WavMicrophoneTrack, http_client, serving

async def main(wav, loopback):
    app = create_app(loopback_factory, loopback_candidates=loopback)
    async with serving(app) as url, http_client() as http:
        client = RtcClient(url, WavMicrophoneTrack(wav))
        await client.connect(http)
        try:
            await asyncio.wait_for(client.first_video.wait(), 5 if loopback else 1)
        except asyncio.TimeoutError:
            pass
        candidates = [l for l in client.answer_sdp.splitlines() if l.startswith("a=candidate:")]
        print(json.dumps({"candidates": candidates, "frames": len(client.recording.video_arrivals)}))
        await client.close(http)

asyncio.run(main(sys.argv[1], sys.argv[2] == "1"))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare(1) to make a loopback-only network namespace")
def test_loopback_only_host_answer_has_a_127_0_0_1_candidate_and_connects(speech_wav):
    """In a network namespace whose only interface is lo (a container, CI): aioice alone
    offers no candidate at all; with the server's loopback candidates the peers connect."""
    results = {}
    for loopback in (False, True):
        probe = subprocess.run(
            ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1" "$2" "$3"',
             sys.executable, LOOPBACK_ONLY_PROBE, str(speech_wav), "1" if loopback else "0"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        if probe.returncode != 0 and "unshare" in probe.stderr and "Operation not permitted" in probe.stderr:
            pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
        assert probe.returncode == 0, probe.stderr
        results[loopback] = json.loads(probe.stdout.strip().splitlines()[-1])
    print(results)
    assert results[False]["candidates"] == []  # what DESIGN.md warns about
    assert results[True]["candidates"] and all(" 127.0.0.1 " in c for c in results[True]["candidates"])
    assert results[True]["frames"] > 0


def _process_udp_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (local address, port) of every UDP socket this process holds (IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    found = {}
    for table, v6 in (("/proc/net/udp", False), ("/proc/net/udp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            inode = int(fields[9])
            if inode not in inodes:
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            if v6:
                addr = str(ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))))
            else:
                addr = str(ipaddress.IPv4Address(raw[::-1]))
            found[inode] = (addr, int(hex_port, 16))
    return found


def _candidate_addresses(sdp: str) -> list[tuple[str, int]]:
    # a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type>
    return [(f[4], int(f[5])) for f in (l.split() for l in sdp.splitlines() if l.startswith("a=candidate:"))]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_media_is_bound_only_where_the_server_is(speech_wav, host):
    """`serve --host 127.0.0.1` means this machine only: the answer's ICE candidates, and the
    UDP sockets behind them, are on 127.0.0.1 alone (before: on every interface). 0.0.0.0 gets
    the machine's IPv4 addresses and 127.0.0.1."""
    import aioice.ice

    machine = set(aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)) - {"127.0.0.1"}
    expected = {"127.0.0.1"} if host == "127.0.0.1" else machine | {"127.0.0.1"}

    async def scenario():
        app = create_app(loopback_factory, host=host)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, 0)
            await site.start()
            port = runner.addresses[0][1]
            async with http_client() as http:
                client = RtcClient(f"http://127.0.0.1:{port}", WavMicrophoneTrack(speech_wav))
                before = _process_udp_sockets()
                await client.connect(http)
                after = _process_udp_sockets()
                await asyncio.wait_for(client.first_video.wait(), 10)  # and media flows
                offer_ports = {p for _, p in _candidate_addresses(client.pc.localDescription.sdp)}
                await client.close(http)
            return client.answer_sdp, before, after, offer_ports
        finally:
            await runner.cleanup()

    answer, before, after, client_ports = asyncio.run(scenario())
    candidates = _candidate_addresses(answer)
    assert candidates and {a for a, _ in candidates} == expected, candidates
    server_sockets = [v for k, v in after.items() if k not in before and v[1] not in client_ports]
    assert sorted(server_sockets) == sorted(set(candidates))  # no socket beyond the candidates (bundled)
    if host == "127.0.0.1":
        assert all(addr == "127.0.0.1" for addr, _ in server_sockets)


def test_ice_addresses_for_host():
    from realtime_avatar.server import ice_addresses_for_host

    assert ice_addresses_for_host("127.0.0.1") == ("127.0.0.1",)
    assert ice_addresses_for_host(None) is None and ice_addresses_for_host("::") is None
    assert "127.0.0.1" in ice_addresses_for_host("0.0.0.0")
    assert "127.0.0.1" in ice_addresses_for_host("localhost")
    assert ice_addresses_for_host(["127.0.0.1", "::1"]) == ("127.0.0.1", "::1")


def test_fifty_connect_disconnect_cycles_leave_nothing_behind(speech_wav):
    """Half the clients hang up with DELETE, half by just closing their peer connection."""
    cycles = 50

    async def scenario():
        app = create_app(loopback_factory)
        server = app[SERVER_KEY]
        sessions: list[LoopbackSession] = []

        async def factory():
            sessions.append(LoopbackSession(size=64))
            return sessions[-1]

        server.session_factory = factory
        async with serving(app) as url, http_client() as http:

            async def cycle(i: int) -> None:
                client = RtcClient(url, WavMicrophoneTrack(speech_wav))
                await within(15, client.connect(http), f"cycle {i}: connect")
                await within(10, client.first_video.wait(), f"cycle {i}: first video frame")
                await within(10, client.close(http if i % 2 == 0 else None), f"cycle {i}: hang up")
                await wait_for(lambda: not server.peers, timeout=10)

            for i in range(3):  # warm up: imports, codec tables, first allocations
                await cycle(i)
            gc.collect()
            tasks_before = len(asyncio.all_tasks())
            rss_before = rss_bytes()
            t0 = time.monotonic()
            for i in range(cycles):
                await cycle(i)
            elapsed = time.monotonic() - t0
            await asyncio.sleep(0.2)
            gc.collect()
            tasks_after = len(asyncio.all_tasks())
            rss_after = rss_bytes()
            return server, sessions, tasks_before, tasks_after, rss_before, rss_after, elapsed

    server, sessions, tasks_before, tasks_after, rss_before, rss_after, elapsed = asyncio.run(scenario())
    growth_mb = (rss_after - rss_before) / 2**20
    print(f"{cycles} cycles in {elapsed:.1f} s; tasks {tasks_before} -> {tasks_after}; "
          f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB (+{growth_mb:.1f})")
    assert server.peers == {}
    assert server.sessions_total == cycles + 3
    assert all(s.closed for s in sessions)
    assert tasks_after <= tasks_before
    assert growth_mb < 20


def test_malformed_and_audioless_offers_get_400_and_the_server_keeps_serving(speech_wav):
    async def scenario():
        app = create_app(loopback_factory)
        good = await offer_sdp()
        truncated = good[: good.index("a=ice-ufrag")]  # parses, but has no ICE credentials
        cases = [
            ("json", {"sdp": "this is not sdp", "type": "offer"}, "malformed"),
            ("json", {"sdp": truncated, "type": "offer"}, "ICE"),
            ("json", {"sdp": good, "type": "answer"}, "type"),
            ("json", {"sdp": await offer_sdp(audio=None), "type": "offer"}, "no audio"),
            ("raw", b"\xff\xfe{not json", "JSON"),
            ("whip", truncated, "ICE"),
            ("whip", await offer_sdp(audio=None), "no audio"),
        ]
        async with serving(app) as url, http_client() as http:
            for kind, body, words in cases:
                if kind == "json":
                    request = http.post(f"{url}/offer", json=body)
                elif kind == "raw":
                    request = http.post(f"{url}/offer", data=body, headers={"Content-Type": "application/json"})
                else:
                    request = http.post(f"{url}/whip", data=body, headers={"Content-Type": "application/sdp"})
                async with request as response:
                    assert response.status == 400, (kind, words, await response.text())
                    assert words in (await response.json())["error"]
            assert app[SERVER_KEY].peers == {}
            assert app[SERVER_KEY].rejected["bad_offer"] == len(cases)

            client = RtcClient(url, WavMicrophoneTrack(speech_wav))
            await client.connect(http)
            await asyncio.wait_for(client.first_video.wait(), 5)
            await client.close(http)

    asyncio.run(scenario())


def test_whip_create_delete_and_errors(speech_wav):
    async def scenario():
        app = create_app(loopback_factory)
        server = app[SERVER_KEY]
        async with serving(app) as url, http_client() as http:
            async with http.post(f"{url}/whip", data=await offer_sdp(),
                                 headers={"Content-Type": "text/plain"}) as response:
                assert response.status == 415
                assert "application/sdp" in (await response.json())["error"]

            client = RtcClient(url, WavMicrophoneTrack(speech_wav), whip=True)
            await client.connect(http)  # raises unless 201
            assert client.resource_url.startswith(f"{url}/whip/")
            assert client.answer_sdp.startswith("v=0")
            await asyncio.wait_for(client.first_video.wait(), 5)
            assert list(server.peers) == [client.session_id]
            async with http.post(f"{url}/sessions/{client.session_id}/interrupt") as response:
                assert response.status == 204  # barge-in reaches the session
            assert server.peers[client.session_id].session.interrupts == 1

            async with http.delete(client.resource_url) as response:
                assert response.status == 200
            assert server.peers == {}
            async with http.delete(client.resource_url) as response:
                assert response.status == 404
            async with http.delete(f"{url}/whip/0123456789abcdef") as response:
                assert response.status == 404
                assert "no session" in (await response.json())["error"]
            async with http.get(f"{url}/sessions/{client.session_id}/stats") as response:
                assert response.status == 404  # gone with the session
            async with http.patch(f"{url}/whip/{client.session_id}") as response:
                assert response.status == 405  # no trickle ICE (RFC 9725 allows refusing it)
            await client.close()

    asyncio.run(scenario())


def test_client_that_vanishes_is_torn_down_within_seconds(speech_wav):
    """A client process killed with SIGKILL sends no BYE and no DTLS close: the server notices
    that the audio stopped and tears the session down well before aioice's 30 s consent check."""
    media_timeout = 2.0
    sessions: list[LoopbackSession] = []

    async def factory():
        sessions.append(LoopbackSession(size=64))
        return sessions[-1]

    async def scenario():
        app = create_app(factory, media_timeout_s=media_timeout)
        server = app[SERVER_KEY]
        async with serving(app) as url:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.rtc_client", url, str(speech_wav),
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                session_id = line.decode().strip()
                assert session_id in server.peers, (line, await proc.stderr.read())
                await wait_for(lambda: server.peers[session_id].audio_in.frames > 25, timeout=5)
            finally:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            killed = time.monotonic()
            took = await wait_for(lambda: not server.peers, timeout=media_timeout + 4)
            return took, time.monotonic() - killed

    took, _ = asyncio.run(scenario())
    print(f"vanished client torn down {took:.2f} s after SIGKILL (media timeout {media_timeout} s)")
    assert took < media_timeout + 3
    assert sessions and sessions[0].closed


@pytest.mark.parametrize(
    "wav_rate, codec, server_rate",
    [(8_000, None, 48_000), (44_100, None, 48_000), (16_000, "audio/PCMU", 8_000)],
    ids=["8kHz-wav-opus", "44.1kHz-wav-opus", "PCMU-8kHz-frames"],
)
def test_unusual_input_rates_arrive_whole(tmp_path, wav_rate, codec, server_rate):
    """WAVs at 8 and 44.1 kHz, and a client that forces PCMU so the server's frames are
    8 kHz mono instead of Opus' 48 kHz stereo: the speech still comes back whole."""
    wav = espeak_wav("Testing one two three.", tmp_path / f"speech{wav_rate}.wav", rate=wav_rate)

    async def scenario():
        app = create_app(loopback_factory)
        async with serving(app) as url, http_client() as http:
            mic = WavMicrophoneTrack(wav, lead_s=0.5)
            client = RtcClient(url, mic, audio_codec=codec)
            await client.connect(http)
            await asyncio.wait_for(client.first_video.wait(), 5)
            await asyncio.sleep(mic.speech_seconds + 1.5)
            stats = app[SERVER_KEY].peers[client.session_id].stats()
            await client.close(http)
            return client.recording, stats

    rec, stats = asyncio.run(scenario())
    assert stats["audio_in"]["sample_rate"] == server_rate
    assert stats["audio_in"]["peak"] > 0.1
    sent, rate = read_wav(wav)
    assert rate == wav_rate
    sent_start, sent_end = voiced_span(sent, rate)
    got_start, got_end = voiced_span(rec.audio, rec.audio_rate)
    sent_voiced, got_voiced = voiced_seconds(sent, rate), voiced_seconds(rec.audio, rec.audio_rate)
    print(f"{wav_rate} Hz via {codec or 'opus'}: voiced span sent {sent_end - sent_start:.3f} s, "
          f"received {got_end - got_start:.3f} s; voiced time sent {sent_voiced:.3f} s, "
          f"received {got_voiced:.3f} s")
    # The classic bug stretches 44.1 kHz speech 2.76x or squeezes 8 kHz speech to 0.5x; a loaded
    # machine may insert a short silent gap when a frame is late, which the span allows for but
    # the voiced time does not count.
    assert abs(got_voiced - sent_voiced) < max(0.15, 0.2 * sent_voiced)
    assert sent_end - sent_start - 0.1 < got_end - got_start < 1.2 * (sent_end - sent_start) + 0.1


def test_503_at_capacity_and_the_slot_comes_back(speech_wav):
    async def scenario():
        app = create_app(loopback_factory, max_sessions=1)
        async with serving(app) as url, http_client() as http:
            first = RtcClient(url, WavMicrophoneTrack(speech_wav))
            await first.connect(http)
            async with http.post(f"{url}/offer", json={"sdp": await offer_sdp(), "type": "offer"}) as response:
                assert response.status == 503
                assert "capacity" in (await response.json())["error"]
            async with http.get(f"{url}/health") as response:
                assert await response.json() == {"ok": True, "sessions": 1, "max_sessions": 1}
            await first.close(http)
            second = RtcClient(url, WavMicrophoneTrack(speech_wav))
            await second.connect(http)
            await asyncio.wait_for(second.first_video.wait(), 5)
            await second.close(http)
            assert app[SERVER_KEY].rejected == {"capacity": 1}

    asyncio.run(scenario())


def test_bearer_token_guards_signalling_stats_and_metrics(speech_wav):
    async def scenario():
        app = create_app(loopback_factory, token="s3cret")
        async with serving(app) as url, http_client() as http:
            offer = {"sdp": await offer_sdp(), "type": "offer"}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                async with http.post(f"{url}/offer", json=offer, headers=headers) as response:
                    assert response.status == 401
                    assert "token" in (await response.json())["error"]
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.get(f"{url}/metrics") as response:
                assert response.status == 401
            async with http.get(f"{url}/health") as response:
                assert response.status == 200  # health checks need no token
            async with http.get(f"{url}/") as response:
                assert response.status == 200  # nor does the page (it reads ?token=)

            client = RtcClient(url, WavMicrophoneTrack(speech_wav), token="s3cret", whip=True)
            await client.connect(http)
            async with http.get(f"{url}/sessions/{client.session_id}/stats") as response:
                assert response.status == 401
            async with http.get(f"{url}/sessions/{client.session_id}/stats",
                                headers={"Authorization": "Bearer s3cret"}) as response:
                assert response.status == 200
            async with http.delete(client.resource_url) as response:
                assert response.status == 401  # a stranger cannot hang up someone else's call
            await client.close(http)  # with the token
            assert app[SERVER_KEY].peers == {}

    asyncio.run(scenario())


def test_shutdown_closes_every_session(speech_wav):
    sessions: list[LoopbackSession] = []

    async def factory():
        sessions.append(LoopbackSession(size=64))
        return sessions[-1]

    async def scenario():
        app = create_app(factory)
        clients = []
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = "http://%s:%d" % runner.addresses[0][:2]
        async with http_client() as http:
            for _ in range(2):
                clients.append(RtcClient(url, WavMicrophoneTrack(speech_wav)))
                await within(15, clients[-1].connect(http), "connect")
            await within(10, asyncio.gather(*(c.first_video.wait() for c in clients)), "first frames")
            assert len(app[SERVER_KEY].peers) == 2
            await within(10, runner.cleanup(), "server shutdown")  # runs the app's on_shutdown
        assert app[SERVER_KEY].peers == {}
        assert len(sessions) == 2 and all(s.closed for s in sessions)
        for client in clients:
            await within(10, client.close(), "client hang-up")

    asyncio.run(scenario())


def test_factory_failure_is_a_500_that_says_why():
    async def broken_factory():
        raise RuntimeError("avatar cache /nowhere/avatar not found")

    async def scenario():
        app = create_app(broken_factory)
        async with serving(app) as url, http_client() as http:
            async with http.post(f"{url}/offer", json={"sdp": await offer_sdp(), "type": "offer"}) as response:
                assert response.status == 500
                assert "/nowhere/avatar" in (await response.json())["error"]
            assert app[SERVER_KEY].peers == {} and app[SERVER_KEY]._negotiating == 0

    asyncio.run(scenario())


def test_page_and_static_files_are_served():
    async def scenario():
        app = create_app(loopback_factory)
        async with serving(app) as url, http_client() as http:
            async with http.get(f"{url}/") as response:
                assert response.status == 200
                page = await response.text()
            assert "<video" in page and "web/app.js" in page
            async with http.get(f"{url}/web/app.js") as response:
                assert response.status == 200
                script = await response.text()
            assert "getUserMedia" in script and "echoCancellation: false" in script
            async with http.get(f"{url}/web/../server.py") as response:
                assert response.status in (403, 404)  # no escaping the web folder

    asyncio.run(scenario())
