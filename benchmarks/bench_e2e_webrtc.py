"""End-to-end latency through a real WebRTC loopback: mic audio sent -> mouth frame received.

The real server (create_app, the `realtime-avatar serve` app) runs in this process with real
AvatarSessions on the bench runtime; an aiortc client (tests/rtc_client.py), in a child process
of its own as a remote client would be (`--client in-process` puts it on the server's event
loop, as this benchmark did until 2026-11-30), connects over 127.0.0.1 and sends, in real time, espeak-ng words separated by silence, each onset marked by a
click. The client keeps the face region of every received video frame (and a mouth thumbnail,
for diagnostics) and all received audio. From those alone it finds, per word:

- mouth-onset latency: onset sent -> first received frame whose mouth is open (mediapipe's
  inner-lip gap above 0.01 face heights, measured after the run, after >= 5 closed frames);
- audio latency: onset sent -> onset heard in the returned audio;
- A/V offset of the returned stream: mouth onset minus audio onset, by receive time; and the
  same measured on the same audio rendered offline (the content's own lead: a frame's window
  hears 80 ms ahead), so that their difference is the offset streaming and the network add,
  split into the transport skew (video vs audio path to the client) and streaming alone.

The session is instrumented (logging only), so each mouth onset is also split into where the
time went: network in, waiting for the window's right context + lookahead + hop (and the encoder
run), render queue + render, held until the frame's tick (the fixed output delay), network out.

    .venv/bin/python benchmarks/bench_e2e_webrtc.py [--quick] [--words 16] [--plots DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import pickle
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import FRAME_MS  # noqa: E402
from e2e_client import _run_client  # noqa: E402

from realtime_avatar.runtime import freeze_startup_objects  # noqa: E402

from export.evaluate import CLOSED_GAP, measure_openings  # noqa: E402

from realtime_avatar.session import VIDEO_CLOCK_RATE, SessionConfig  # noqa: E402
from realtime_avatar.timing import (  # noqa: E402
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FEATURE,
    SAMPLES_PER_FRAME,
    window_last_feature,
)

PTS_PER_FRAME = VIDEO_CLOCK_RATE // FPS  # RTP video clock ticks per frame (3600)
LEAD_S = 1.5  # silence before the first word: idle frames (codec-noise diagnostics, closed mouths)
GAP_S = 1.0  # silence after each word: every mouth returns to idle before the next onset
QUIET_FRAMES = 5  # still frames (200 ms) before a moving one for it to count as a mouth onset


def _log_sender_pulls(session, find_sender) -> None:
    """Note every frame aiortc's sender takes from the session's video track, and the RTP
    timestamp origin of its stream.

    The client's frames carry RTP timestamps (a random origin + tick x 3600); to know which
    tick each received frame is, the origin is read from the server's RTCRtpSender: when it
    asks for the next frame, its last sent timestamp belongs to the frame it took before.
    (`_RTCRtpSender__rtp_timestamp` is aiortc-private; without it the alignment falls back to
    images and timing.)"""
    track = session.video_track
    recv = track.recv
    session.pull_log = []  # (time, pts) of frames handed to the sender
    session.rtp_origins = []

    async def logged_recv():
        sender = find_sender(track)
        last_sent = getattr(sender, "_RTCRtpSender__rtp_timestamp", None) if sender is not None else None
        if last_sent is not None and session.pull_log:
            session.rtp_origins.append((last_sent - session.pull_log[-1][1]) % 2**32)
        frame = await recv()
        session.pull_log.append((time.monotonic(), frame.pts))
        return frame

    track.recv = logged_recv


async def run_loopback(bench: common.BenchRuntime, signal: common.OnsetSignal, config: SessionConfig,
                       tail_s: float, client_process: bool = True) -> dict:
    """Serve, connect one client, stream `signal`, and return the raw logs of both sides.

    client_process: the client runs in a child process (its own event loop and GIL, as a remote
    client's are; it still shares the CPU); False runs it on this process's event loop, beside
    the server (how this benchmark measured until 2026-11-30, session 7)."""
    from realtime_avatar.server import SERVER_KEY, create_app
    from tests.rtc_client import serving

    runtime = bench.runtime
    box = common.mouth_box(runtime.avatar.landmarks, runtime.avatar.frame_shape)
    face = common.face_region(runtime.avatar.landmarks, runtime.avatar.frame_shape)
    sessions = []

    app = None

    def find_sender(track):
        for peer in app[SERVER_KEY].peers.values():
            for sender in peer.pc.getSenders():
                if sender.track is track:
                    return sender
        return None

    async def factory():
        session = common.instrumented_session(runtime.encoder, runtime.renderer, config, signature_box=box)
        _log_sender_pulls(session, find_sender)
        sessions.append(session)
        return session

    app = create_app(factory)

    with tempfile.TemporaryDirectory() as tmp:
        wav = signal.write_wav(Path(tmp) / "onsets.wav")
        async with serving(app) as url:
            spec = {"url": url, "wav": wav, "box": box, "face": face, "frame_shape": runtime.avatar.frame_shape,
                    "speech_s": signal.seconds, "tail_s": tail_s}
            if client_process:
                with open(Path(tmp) / "spec.pkl", "wb") as f:
                    pickle.dump(spec, f)
                child = await asyncio.create_subprocess_exec(
                    sys.executable, str(Path(__file__).resolve().parent / "e2e_client.py"),
                    "--client-spec", str(Path(tmp) / "spec.pkl"),
                    "--client-out", str(Path(tmp) / "client.pkl"), cwd=common.REPO)
                if await asyncio.wait_for(child.wait(), signal.seconds + tail_s + 120) != 0:
                    raise RuntimeError(f"the client process failed (exit code {child.returncode})")
                with open(Path(tmp) / "client.pkl", "rb") as f:
                    logs = pickle.load(f)
            else:
                logs = await _run_client(**spec)
            stats = sessions[0].stats()
    client = SimpleNamespace(frames=logs["frames"], faces=logs["faces"], recording=logs["recording"],
                             rtp_first_timestamp=logs["rtp_first_timestamp"])
    return {
        "session": sessions[0], "stats": stats, "client": client,
        "mic": SimpleNamespace(speech_started_at=logs["speech_started_at"]),
        "box": box, "face": face, "connected_s": logs["connected_s"],
    }


def _audio_onset_times(chunks: list[np.ndarray], arrivals: list[float], rate: int) -> list[float]:
    """Receive times of onsets in the returned audio: chunk arrival + position inside it."""
    if not chunks:
        return []
    audio = np.concatenate(chunks)
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]])
    out = []
    for onset in common.detect_onsets(audio, rate):
        sample = int(round(onset * rate))
        c = int(np.searchsorted(starts, sample, side="right") - 1)
        out.append(arrivals[c] + (sample - starts[c]) / rate)
    return out


def _ticks_of_received(session, frames, ticks, client_first_timestamp: int | None) -> tuple[list[int], dict]:
    """The server tick of every received frame: from the RTP timestamp origin read at the
    sender and the client when both are known (exact; aiortc-private attributes), else by
    matching thumbnails and timing (align_stream: may be a frame late on idle video)."""
    origins, first = session.rtp_origins, client_first_timestamp
    info: dict = {}
    if origins and first is not None:
        # received pts = RTP timestamp - the first one the client saw; RTP timestamp = origin + pts sent
        origin = max(set(origins), key=origins.count)
        tick_of = [((first + pts - origin) % 2**32) // PTS_PER_FRAME for _, pts, _ in frames]
        info = {"method": "rtp timestamps", "origin_agreement": round(origins.count(origin) / len(origins), 4)}
    else:
        pts0 = frames[0][1]
        offsets = [((pts - pts0) % 2**32) // PTS_PER_FRAME for _, pts, _ in frames]
        found = common.align_stream(offsets, [f[0] for f in frames], [f[2] for f in frames],
                                    [t.t for t in ticks], [t.signature for t in ticks])
        if found is None:
            raise RuntimeError("the received frames match no sequence of sent ticks")
        tick_of = [found.start + d for d in offsets]
        info = {"method": "images and timing", "candidates_alike": found.tied}
    emitted = {t.n: t.t for t in ticks}
    delays = [a - emitted[n] for (a, _, _), n in zip(frames, tick_of) if n in emitted]
    info.update({"first_frame_tick": tick_of[0], "frames_matched": len(delays),
                 "min_network_out_ms": round(1000 * min(delays), 1) if delays else None})
    return tick_of, info


def _first_after(times: list[float], t: float, until: float) -> float | None:
    return next((x for x in times if t <= x < until), None)


def bgr(renderer, image: np.ndarray) -> np.ndarray:
    """A frame of the engine as BGR (the bench runs the engine in yuv420p, as serve does)."""
    if renderer.frame_format == "yuv420p":
        import cv2

        return cv2.cvtColor(image, cv2.COLOR_YUV2BGR_I420)
    return image


def analyse(raw: dict, signal: common.OnsetSignal, runtime, min_latency_s: float = 0.0) -> dict:
    """Per-onset latencies and their breakdown from the logs of both sides."""
    session, client, mic = raw["session"], raw["client"], raw["mic"]
    ticks = session.tick_log
    cycle = runtime.renderer.cycle_length
    idle_sigs = [common.mouth_signature(bgr(runtime.renderer, runtime.renderer.idle_frame(p)), raw["box"])
                 for p in range(cycle)]
    frames = client.frames  # (arrival, pts, signature)
    if not frames or not ticks:
        raise RuntimeError("no video frames were received: the loopback did not stream")

    tick_of, alignment = _ticks_of_received(session, frames, ticks, getattr(client, "rtp_first_timestamp", None))
    by_tick = {t.n: t for t in ticks}

    # Codec noise on idle frames: frames received before the first word was sent.
    t_sent = [mic.speech_started_at + s for s in signal.onsets_s]
    idle_d = [common.signature_distance(sig, idle_sigs[n % cycle])
              for (arrival, _, sig), n in zip(frames, tick_of) if arrival < t_sent[0]]
    threshold = common.motion_threshold(idle_d)
    # How far the rendered mouths are from the idle one (server truth): with random weights the
    # mouth hardly depends on the audio, and no pixel detector can see it move.
    rendered_d = [common.signature_distance(sig, idle_sigs[n % cycle])
                  for (_, _, sig), n in zip(frames, tick_of) if n in by_tick and by_tick[n].rendered]
    # A moving mouth: mediapipe's inner-lip gap above CLOSED_GAP face heights, the measure of the
    # lip-sync evaluation (a rendered closed mouth measures 0.001-0.002; a random-weights model's
    # mouth never opens, so nothing is detected with it). Pixel distances to the idle mouth
    # (kept above for the diagnostics) cannot tell a soft re-rendered closed mouth from an open one.
    openings = measure_openings(client.faces)
    moving = [bool(o > CLOSED_GAP) for o in openings]
    # a mouth onset: a moving frame after at least QUIET_FRAMES still ones (not the tail of the
    # previous word, which can still be arriving when the next word is sent)
    motion_onsets = [(frames[k][0], tick_of[k]) for k in range(len(frames))
                     if moving[k] and not any(moving[max(0, k - QUIET_FRAMES):k])]

    # Onsets as the server heard them (its own 16 kHz input) and as the client heard them back.
    server_input = np.concatenate(session.input_chunks) if session.input_chunks else np.zeros(0, np.float32)
    server_onsets = [round(s * SAMPLE_RATE) for s in common.detect_onsets(server_input, SAMPLE_RATE)]
    rec = client.recording
    audio_back = _audio_onset_times(rec.audio_chunks, rec.audio_arrivals, rec.audio_rate or common.WEBRTC_RATE)

    events = []
    for j, sent in enumerate(t_sent):
        until = t_sent[j + 1] if j + 1 < len(t_sent) else float("inf")
        event: dict = {"word": signal.labels[j], "sent_s": round(sent - t_sent[0], 3)}
        # Nothing of a word can come back before the session's output delay minus the window's
        # lead: search from there, so that a slow previous word is not taken for this one.
        earliest = min_latency_s
        mouth = next(((a, n) for a, n in motion_onsets if sent + earliest <= a < until + earliest), None)
        event["mouth_latency_ms"] = None if mouth is None else 1000 * (mouth[0] - sent)
        heard = _first_after(audio_back, sent + earliest, until + earliest)
        event["audio_latency_ms"] = None if heard is None else 1000 * (heard - sent)
        if mouth is not None and heard is not None:
            event["av_offset_received_ms"] = 1000 * (mouth[0] - heard)
        # the server's view: the onset sample in its ring, the first tick it rendered after it
        s_on = next((s for s in server_onsets
                     if (t := common.time_ring_reached(session.input_log, s)) is not None and sent - 0.05 <= t < until),
                    None)
        if s_on is not None:
            event.update(_server_breakdown(session, ticks, by_tick, frames, tick_of, s_on, sent, mouth, heard))
        events.append(event)
    return {
        "events": events,
        "alignment": {**alignment,
                      "idle_distance_p95": round(float(np.percentile(idle_d, 95)), 3) if idle_d else None,
                      "motion_threshold": round(threshold, 3), "idle_frames_calibrated": len(idle_d),
                      "rendered_distance_median": round(float(np.median(rendered_d)), 3) if rendered_d else None,
                      "rendered_frames_received": len(rendered_d),
                      "open_threshold_face_heights": CLOSED_GAP,
                      "faces_not_found": int(np.isnan(openings).sum())},
        "received": {"video_frames": len(frames), "audio_seconds": round(len(rec.audio) / max(1, rec.audio_rate), 2),
                     "fps": round(len(frames) / max(1e-9, frames[-1][0] - frames[0][0]), 2)},
        "onsets_found": {"sent": len(t_sent), "server_input": len(server_onsets), "audio_back": len(audio_back),
                         "mouth_detected": sum(e["mouth_latency_ms"] is not None for e in events)},
    }


def _server_breakdown(session, ticks, by_tick, frames, tick_of, s_on, sent, mouth, heard) -> dict:
    """Where the time from `sent` to the mouth frame went, from the session's own logs."""
    t_in = common.time_ring_reached(session.input_log, s_on)
    onset_frame = s_on // SAMPLES_PER_FRAME
    out: dict = {"network_in_ms": 1000 * (t_in - sent)}
    # the first tick after the onset that shows a rendered mouth, and the tick that plays the onset audio
    mouth_tick = next((t for t in ticks if t.rendered and t.frame is not None and t.frame >= onset_frame - 3
                       and t.t >= t_in - 0.05), None)
    audio_tick = next((t for t in ticks if t.frame == onset_frame), None)
    if mouth_tick is None:
        return out
    i = mouth_tick.frame
    final = common.features_final_at(session.encoder_log, window_last_feature(i, session.config.window))
    rendered_at = session._rendered.set_at.get(i)
    out["window_lead_ms"] = (s_on - (i + 1) * SAMPLES_PER_FRAME) / SAMPLE_RATE * 1000
    if final is not None:
        out["wait_context_lookahead_hop_ms"] = 1000 * (final[0] - final[1] - t_in)
        out["encoder_run_ms"] = 1000 * final[1]
        if rendered_at is not None:
            call = common.render_call_before(session.render_log, rendered_at)
            out["render_queue_and_render_ms"] = 1000 * (rendered_at - final[0])
            out["render_call_ms"] = 1000 * call[1] if call else None
            out["held_for_tick_ms"] = 1000 * (mouth_tick.t - rendered_at)
    received = next((a for (a, _, _), n in zip(frames, tick_of) if n == mouth_tick.n), None)
    if received is not None:
        out["network_out_ms"] = 1000 * (received - mouth_tick.t)
        out["mouth_latency_true_ms"] = 1000 * (received - sent)
        if mouth is not None:
            out["detection_error_frames"] = mouth[1] - mouth_tick.n
    if audio_tick is not None:
        # what the stream carries: the mouth tick's time minus the onset's time in the audio
        onset_in_tick_ms = (s_on % SAMPLES_PER_FRAME) / SAMPLE_RATE * 1000
        out["av_offset_content_ms"] = (mouth_tick.n - audio_tick.n) * FRAME_MS - onset_in_tick_ms
        if heard is not None and "network_out_ms" in out:
            # the same tick's audio and video take different paths to the client (Opus and its
            # jitter buffer vs VP8 and its frame buffer); the difference shifts lips against voice
            audio_out_ms = 1000 * (heard - audio_tick.t) - onset_in_tick_ms
            out["av_transport_skew_ms"] = out["network_out_ms"] - audio_out_ms
    return out


BREAKDOWN = (
    ("network_in_ms", "network in: mic packet -> server ring (Opus, RTP, jitter buffer, resample)"),
    ("wait_context_lookahead_hop_ms", "wait for the window's right context + lookahead + next hop"),
    ("encoder_run_ms", "Whisper encoder run"),
    ("render_queue_and_render_ms", "render queue + render (UNet, decoder, blend)"),
    ("held_for_tick_ms", "held until the frame's tick (fixed output delay)"),
    ("network_out_ms", "network out: tick -> frame decoded at the client (VP8, RTP, jitter buffer)"),
    ("mouth_latency_true_ms", "= mouth-onset latency (onset sent -> first rendered mouth received)"),
    ("window_lead_ms", "(onset position after the end of the mouth frame's own audio)"),
)


def offline_reference(runtime, signal: common.OnsetSignal, config: SessionConfig, face) -> list[float | None]:
    """Per word, the A/V offset the content itself has: the same signal through the offline,
    non-streaming pipeline (features of the whole clip, a window per frame, MuseTalk's way),
    frames with a silent window shown as the idle frame exactly as the session does, and the
    mouth onset found by the same detector (mediapipe's inner-lip gap) as in the received video.

    Each frame's window hears two frames (80 ms) past the frame, so the mouth can move before
    its sound in any MuseTalk-style renderer; subtracting this from the received offset leaves
    the error the streaming pipeline and the network add (the "A/V offset" a viewer judges)."""
    import soxr

    from realtime_avatar.frame_windows import offline_frame_windows
    from realtime_avatar.session import window_audio_range
    from realtime_avatar.timing import num_frames

    audio = soxr.resample(signal.samples, signal.rate, SAMPLE_RATE).astype(np.float32)
    n_frames = num_frames(len(audio))
    windows = offline_frame_windows(runtime.clip_features(audio), n_frames, config.window)
    renderer, cycle = runtime.renderer, runtime.renderer.cycle_length

    def silent(i: int) -> bool:
        start, end = window_audio_range(i, config.window)
        clip = audio[max(0, start) : max(0, end)]
        return clip.size == 0 or float(np.sqrt(np.mean(clip * clip))) < config.silence_rms

    x1, y1, x2, y2 = face
    moving = np.zeros(n_frames, bool)
    speech = [i for i in range(n_frames) if not silent(i)]
    for k in range(0, len(speech), renderer.batch_size):
        batch = speech[k : k + renderer.batch_size]
        images = [bgr(renderer, im) for im in renderer.render([i % cycle for i in batch], windows[batch])]
        moving[batch] = measure_openings([image[y1:y2, x1:x2] for image in images]) > CLOSED_GAP
    onsets = [i for i in range(n_frames) if moving[i] and not moving[max(0, i - QUIET_FRAMES):i].any()]
    out = []
    for j, sent in enumerate(signal.onsets_s):
        until = signal.onsets_s[j + 1] if j + 1 < len(signal.onsets_s) else float("inf")
        # a frame leaves with its own 40 ms of audio: its time is the start of that audio
        mouth = next((i / FPS for i in onsets if sent - 0.2 <= i / FPS < until - 0.2), None)
        out.append(None if mouth is None else 1000 * (mouth - sent))
    return out


def summarise(analysis: dict, config: SessionConfig, raw: dict) -> dict:
    events = analysis["events"]

    def column(key: str) -> dict:
        return common.summarize([e[key] for e in events if e.get(key) is not None], 1)

    s = config.streaming
    stats = raw["stats"]
    design = {
        "window_right_context_ms": round(1000 * config.window.right_context_s, 1),
        "lookahead_ms": round(1000 * s.lookahead_s, 1),
        "hop_ms": round(1000 * s.hop_s, 1),
        "encoder_window_s": s.window_s,
        # None: sized from measurements (compute p99 + input jitter), re-sized between spurts
        "render_budget_ms": None if config.render_budget_s is None else round(1000 * config.render_budget_s, 1),
        "start_output_delay_ms": round(1000 * config.output_delay_s, 1),
        "output_delay_ms": stats.get("output_delay_ms"),  # the session's delay at the end of the run
        "encoder_p99_ms": stats.get("encoder_p99_ms"),
        "render_p99_ms": stats.get("render_p99_ms"),
        "input_jitter_ms": stats.get("input_jitter_ms"),
    }
    return {
        "mouth_onset_latency_ms": column("mouth_latency_ms"),
        "mouth_onset_latency_true_ms": column("mouth_latency_true_ms"),
        "audio_latency_ms": column("audio_latency_ms"),
        "av_offset_received_ms": column("av_offset_received_ms"),
        "av_offset_content_ms": column("av_offset_content_ms"),
        "av_offset_offline_ms": column("av_offset_offline_ms"),
        "av_offset_pipeline_ms": column("av_offset_pipeline_ms"),
        "av_transport_skew_ms": column("av_transport_skew_ms"),
        "av_offset_streaming_ms": column("av_offset_streaming_ms"),
        "detection_error_frames": column("detection_error_frames"),
        "breakdown_ms": {key: column(key) for key, _ in BREAKDOWN},
        "design_ms": design,
        "session_stats": {k: raw["stats"].get(k) for k in (
            "fps", "frames_sent", "late_frames", "dropped_frames", "rendered_frames", "latency_ms",
            "encoder_ms_per_run", "encoder_runs", "tick_lateness_p99_ms", "spurt_delays_ms", "retimed_frames",
            "need_ms", "need_excess_p99_ms", "input_jitter_ms", "encoder_p99_ms", "render_p99_ms")},
        "connect_s": round(raw["connected_s"], 2),
    }


def markdown(result: dict) -> str:
    s = result["summary"]
    rows = [
        {"measure": "mouth-onset latency (detected in received video)", **_cols(s["mouth_onset_latency_ms"])},
        {"measure": "mouth-onset latency (first rendered mouth, server truth)", **_cols(s["mouth_onset_latency_true_ms"])},
        {"measure": "audio latency (sent -> heard back)", **_cols(s["audio_latency_ms"])},
        {"measure": "A/V offset received (mouth - audio onset)", **_cols(s["av_offset_received_ms"])},
        {"measure": "A/V offset in the stream (tick pts)", **_cols(s["av_offset_content_ms"])},
        {"measure": "A/V offset of the same audio rendered offline (the content's own)", **_cols(s["av_offset_offline_ms"])},
        {"measure": "A/V offset added by streaming + network (received - offline)", **_cols(s["av_offset_pipeline_ms"])},
        {"measure": "transport skew: video minus audio delay, tick -> client", **_cols(s["av_transport_skew_ms"])},
        {"measure": "A/V offset added by streaming alone (received - offline - skew)", **_cols(s["av_offset_streaming_ms"])},
    ]
    text = "End-to-end over WebRTC loopback (ms; n = onsets)\n\n" + common.markdown_table(rows)
    rows = [{"component": label, **_cols(s["breakdown_ms"][key])} for key, label in BREAKDOWN]
    text += "\nBreakdown of the mouth-onset latency (ms)\n\n" + common.markdown_table(rows)
    d = s["design_ms"]
    budget = (f"render budget {d['render_budget_ms']:.0f}" if d["render_budget_ms"] is not None else
              f"measured compute p99 {d['encoder_p99_ms']} + {d['render_p99_ms']} and input jitter {d['input_jitter_ms']}")
    text += (f"\nDesign: output delay {d['output_delay_ms']:.0f} ms (started at {d['start_output_delay_ms']:.0f}) = right "
             f"context {d['window_right_context_ms']:.0f} + lookahead {d['lookahead_ms']:.0f} + hop {d['hop_ms']:.0f} + "
             f"{budget}; receivers: {result['settings'].get('receivers')}\n")
    pauses = result.get("gc_pauses_ms")
    if pauses:
        text += (f"GC pauses during the run (startup objects {'frozen' if result['settings'].get('gc_freeze') else 'not frozen'}): "
                 + ", ".join(f"{g} {p['n']} (max {p['max']} ms)" for g, p in pauses.items()) + "\n")
    return text


def _cols(stats: dict) -> dict:
    return {"min": stats.get("min"), "median": stats["median"], "p90": stats["p90"], "p99": stats.get("p99"),
            "max": stats["max"], "n": stats["n"]}


def plot(result: dict, plots: Path | None) -> list[str]:
    if plots is None:
        return []
    plt = common.pyplot()
    events = [e for e in result["events"] if e.get("mouth_latency_true_ms") is not None]
    keys = [k for k, _ in BREAKDOWN[:6]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bottoms = np.zeros(len(events))
    for key in keys:
        values = np.array([max(0.0, e.get(key) or 0.0) for e in events])
        ax.bar(range(len(events)), values, bottom=bottoms, label=key.replace("_ms", "").replace("_", " "))
        bottoms += values
    detected = [e.get("mouth_latency_ms") for e in events]
    ax.plot(range(len(events)), [d if d is not None else np.nan for d in detected], "k.", label="detected in video")
    ax.set_xticks(range(len(events)), [e["word"] for e in events], rotation=45, fontsize=7)
    ax.set_ylabel("ms from onset sent")
    ax.set_title("Mouth-onset latency per word over WebRTC loopback")
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    return [p for p in [common.save_figure(fig, plots, "e2e_webrtc")] if p]


class GcPauses:
    """Times every garbage collection while active (gc.callbacks): the collector holds the GIL,
    so a pause stalls the event loop, the encoder and the render together."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []  # (generation, ms)
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], 1000 * (time.perf_counter() - self._start)))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        out = {}
        for generation in (0, 1, 2):
            ms = [p for g, p in self.pauses if g == generation]
            out[f"gen{generation}"] = {"n": len(ms), "max": round(max(ms), 1) if ms else 0.0,
                                       "total": round(sum(ms), 1)}
        return out


def run(args: argparse.Namespace, bench: common.BenchRuntime | None = None) -> dict:
    bench = bench or common.load_bench_runtime(args.quick, threads=args.threads, backend=args.backend, model=args.model,
                                              frame_format="auto")  # as serve
    words = args.words or (3 if args.quick else 16)
    signal = common.onset_signal(common.onset_words(words), GAP_S, lead_s=LEAD_S, tail_s=0.5)
    from realtime_avatar import rtc_receive

    rtc_receive.ENABLED = not args.stock_receivers
    config = bench.runtime.session_config(args.session_batch, render_budget_s=args.render_budget)
    if args.hop is not None:
        config = dataclasses.replace(config, streaming=dataclasses.replace(config.streaming, hop_s=args.hop))
    if not args.no_gc_freeze:
        freeze_startup_objects()  # as serve does
    with GcPauses() as gc_pauses:
        raw = asyncio.run(run_loopback(bench, signal, config, tail_s=config.output_delay_s + 0.6,
                                       client_process=args.client == "process"))
    # a frame plays output_delay after its audio arrived, and its window hears (last+1) features ahead
    lead = (config.window.last + 1) * SAMPLES_PER_FEATURE / SAMPLE_RATE
    analysis = analyse(raw, signal, bench.runtime, max(0.0, config.output_delay_s - lead))
    reference = offline_reference(bench.runtime, signal, config, raw["face"])
    for event, offline in zip(analysis["events"], reference):
        event["av_offset_offline_ms"] = offline
        if offline is not None and event.get("av_offset_received_ms") is not None:
            event["av_offset_pipeline_ms"] = event["av_offset_received_ms"] - offline
            if event.get("av_transport_skew_ms") is not None:
                event["av_offset_streaming_ms"] = event["av_offset_pipeline_ms"] - event["av_transport_skew_ms"]
    result = common.header("e2e_webrtc", args, bench)
    result["settings"] = {"words": words, "gap_s": GAP_S, "session_batch": args.session_batch,
                          "render_budget_s": args.render_budget, "hop_s": config.streaming.hop_s,
                          "receivers": "aiortc stock" if args.stock_receivers else "frame-end (rtc_receive)",
                          "signal_s": round(signal.seconds, 2), "gc_freeze": not args.no_gc_freeze,
                          "client": args.client}
    result["gc_pauses_ms"] = gc_pauses.summary()
    result["summary"] = summarise(analysis, config, raw)
    result.update({k: v for k, v in analysis.items()})
    result["events"] = [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in e.items()}
                        for e in analysis["events"]]
    result["plots"] = plot(result, args.plots)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--words", type=int, default=None, help="onsets to send (default 16; --quick 3)")
    p.add_argument("--session-batch", type=int, default=4, help="frames per model call (serve's default 4)")
    p.add_argument("--render-budget", type=float, default=None,
                   help="fixed seconds the session allows for encoder + render + jitter before a frame is late "
                        "(default: sized from measured p99 compute and input jitter, as serve does)")
    p.add_argument("--hop", type=float, default=None, help="encoder hop in seconds (default: serve's, <= 0.04)")
    p.add_argument("--no-gc-freeze", action="store_true",
                   help="leave the startup objects in the garbage collector's generations (serve freezes "
                        "them: see runtime.freeze_startup_objects)")
    p.add_argument("--client", choices=("process", "in-process"), default="process",
                   help="where the WebRTC client runs: a child process (default; its own event loop, as a "
                        "remote client's, on the same cores) or this process's event loop beside the server")
    p.add_argument("--stock-receivers", action="store_true",
                   help="leave aiortc's receive jitter buffers as they are (measures what rtc_receive saves)")
    return p


def main(argv: list[str] | None = None, bench: common.BenchRuntime | None = None) -> dict:
    args = parser().parse_args(argv)
    return common.finish(run(args, bench), args, markdown)


if __name__ == "__main__":
    main()
