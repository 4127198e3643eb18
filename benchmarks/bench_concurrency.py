"""Concurrency: 1, 2 and 4 live sessions at once on one shared Runtime (as a server holds it).

Every session gets the same continuous speech (espeak-ng sentences with short pauses, each
onset clicked) at the same moment, in real time, as 48 kHz stereo 20 ms packets: the worst
case, everyone talking at once. Sessions share the encoder weights and the renderer (whose lock
lets one render run at a time). Each session also encodes its output with aiortc's VP8 encoder
in a worker thread, as its WebRTC sender would, so the video encoding cost is counted (no
network, no client decoding: clients are elsewhere).

Per session: output fps, tick lateness, late frames (a speech frame due before its render
finished: the idle mouth was shown), stale and dropped frames, audio-in -> frame-out latency
(the session's own stat) and the mouth-onset latency per onset. A level "holds 25 fps" when
every session delivers >= 24.5 frames/s with at most 1% of its speech frames late.

    .venv/bin/python benchmarks/bench_concurrency.py [--quick] [--sessions 1,2,4] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import FRAME_MS  # noqa: E402

from realtime_avatar.session import VIDEO_CLOCK_RATE, VIDEO_TIME_BASE, SessionConfig  # noqa: E402
from realtime_avatar.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402

HOLD_FPS = 24.5  # a level holds 25 fps when every session delivers at least this ...
HOLD_LATE_SHARE = 0.01  # ... and at most this share of its speech frames is late


class _VideoSender:
    """Encodes every emitted video frame with aiortc's VP8 encoder off the event loop, dropping
    frames it cannot keep up with (one in flight, the newest waiting), as a sender would."""

    def __init__(self) -> None:
        from aiortc.codecs.vpx import Vp8Encoder

        self._encoder = Vp8Encoder()
        self._pending = None
        self._task: asyncio.Task | None = None
        self.encoded = 0
        self.skipped = 0
        self.encode_ms: list[float] = []

    def offer(self, n: int, image: np.ndarray) -> None:
        if self._pending is not None:
            self.skipped += 1
        self._pending = (n, image)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        import av

        while self._pending is not None:
            n, image = self._pending
            self._pending = None
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts, frame.time_base = n * (VIDEO_CLOCK_RATE // FPS), VIDEO_TIME_BASE
            t0 = time.perf_counter()
            await asyncio.to_thread(self._encoder.encode, frame, False)
            self.encode_ms.append(1000 * (time.perf_counter() - t0))
            self.encoded += 1

    async def close(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


async def run_level(bench: common.BenchRuntime, n_sessions: int, signal: common.OnsetSignal, seconds: float,
                    config: SessionConfig, encode: bool) -> list[dict]:
    runtime = bench.runtime
    sessions, senders = [], []
    for _ in range(n_sessions):
        session = common.instrumented_session(runtime.encoder, runtime.renderer, config, keep_audio=True)
        if encode:
            sender = _VideoSender()
            record = session.on_tick

            def on_tick(n, frame, image, audio, record=record, sender=sender):
                record(n, frame, image, audio)
                sender.offer(n, image)

            session.on_tick = on_tick
            senders.append(sender)
        sessions.append(session)
    for session in sessions:
        await session.start()
    await common.push_realtime(sessions, signal.samples, signal.rate, stop_after_s=seconds)
    for session in sessions:
        # the speakers hang up mid-word: without this the last frames wait for audio that
        # never comes (their windows' right context and the lookahead) and count as late
        session.end_of_input()
    await asyncio.sleep(config.output_delay_s + 0.3)
    stats = [s.stats() for s in sessions]
    for session in sessions:
        await session.close()
    for sender in senders:
        await sender.close()
    return [_per_session(s, st, senders[k] if senders else None) for k, (s, st) in enumerate(zip(sessions, stats))]


def _per_session(session, stats: dict, sender) -> dict:
    ticks = session.tick_log
    t0 = session.started_at
    elapsed = ticks[-1].t - t0 if len(ticks) > 1 else 0.0
    lateness = [1000 * (t.t - (t0 + t.n / FPS)) for t in ticks]
    server_input = np.concatenate(session.input_chunks) if session.input_chunks else np.zeros(0, np.float32)
    onsets = [round(s * SAMPLE_RATE) for s in common.detect_onsets(server_input, SAMPLE_RATE, min_gap_s=0.3)]
    mouth_ms = []
    for s_on in onsets:
        t_in = common.time_ring_reached(session.input_log, s_on)
        frame = s_on // SAMPLES_PER_FRAME
        mouth = next((t for t in ticks if t.rendered and t.frame is not None and t.frame >= frame - 3), None)
        if mouth is not None and t_in is not None and mouth.t - t_in < 5.0:
            mouth_ms.append(1000 * (mouth.t - t_in))
    speech = stats["rendered_frames"] + stats["late_frames"]
    return {
        "fps": round((len(ticks) - 1) / elapsed, 2) if elapsed else None,  # ticks 0..N-1 span N-1 periods
        "late_ticks": sum(1 for x in lateness if x > FRAME_MS),
        "tick_lateness_p99_ms": common.summarize(lateness, 1)["p99"],
        "late_frames": stats["late_frames"],
        "late_share": round(stats["late_frames"] / speech, 4) if speech else 0.0,
        "stale_frames": stats["stale_frames"],
        "dropped_frames": stats["dropped_frames"],
        "rendered_frames": stats["rendered_frames"],
        "latency_ms": stats["latency_ms"],
        "mouth_onset_latency_ms": common.summarize(mouth_ms, 1)["median"],
        "render_call_ms": common.summarize(1000 * session.render_log["seconds"], 1)["median"],
        "encoder_ms_per_run": stats["encoder_ms_per_run"],
        "vp8_encode_ms": common.summarize(sender.encode_ms, 2)["median"] if sender else None,
        "vp8_frames_skipped": sender.skipped if sender else None,
    }


def level_summary(n: int, per_session: list[dict]) -> dict:
    fps = [s["fps"] or 0.0 for s in per_session]
    holds = all(f >= HOLD_FPS for f in fps) and all(s["late_share"] <= HOLD_LATE_SHARE for s in per_session)
    return {
        "sessions": n,
        "min_fps": min(fps),
        "mean_fps": round(float(np.mean(fps)), 2),
        "late_frames_total": sum(s["late_frames"] for s in per_session),
        "worst_late_share": max(s["late_share"] for s in per_session),
        "stale_frames_total": sum(s["stale_frames"] for s in per_session),
        "median_latency_ms": _median([s["latency_ms"] for s in per_session]),
        "median_mouth_onset_ms": _median([s["mouth_onset_latency_ms"] for s in per_session]),
        "median_render_call_ms": _median([s["render_call_ms"] for s in per_session]),
        "holds_25fps": holds,
    }


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 1) if values else None


def markdown(result: dict) -> str:
    cols = ["sessions", "min_fps", "mean_fps", "late_frames_total", "worst_late_share", "stale_frames_total",
            "median_latency_ms", "median_mouth_onset_ms", "median_render_call_ms", "holds_25fps"]
    text = "Concurrent sessions on one shared runtime\n\n" + common.markdown_table(result["levels"], cols)
    text += f"\nMost sessions holding 25 fps here: {result['max_sessions_holding_25fps']}\n"
    return text


def plot(result: dict, plots: Path | None) -> list[str]:
    if plots is None:
        return []
    plt = common.pyplot()
    levels = result["levels"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
    for level in result["per_session"]:
        n = level["sessions"]
        ax1.plot([n] * len(level["sessions_detail"]), [s["fps"] for s in level["sessions_detail"]], "o", ms=4, color="tab:blue")
        ax2.plot([n] * len(level["sessions_detail"]), [s["late_share"] * 100 for s in level["sessions_detail"]], "o",
                 ms=4, color="tab:orange")
    ax1.axhline(FPS, color="tab:red", lw=0.6, ls="--")
    ax1.set_ylim(0, FPS + 2)
    ax1.set_xlabel("concurrent sessions")
    ax1.set_ylabel("frames/s per session")
    ax1.set_xticks([lv["sessions"] for lv in levels])
    ax2.set_xlabel("concurrent sessions")
    ax2.set_ylabel("late speech frames (%)")
    ax2.set_xticks([lv["sessions"] for lv in levels])
    fig.suptitle("Concurrency on one shared runtime")
    fig.tight_layout()
    return [p for p in [common.save_figure(fig, plots, "concurrency")] if p]


def run(args: argparse.Namespace, bench: common.BenchRuntime | None = None) -> dict:
    bench = bench or common.load_bench_runtime(args.quick, threads=args.threads, backend=args.backend, model=args.model)
    levels = [int(n) for n in (args.sessions or ("1,2" if args.quick else "1,2,4")).split(",")]
    seconds = args.seconds or (4.0 if args.quick else 20.0)
    texts = [common.SENTENCES[k % len(common.SENTENCES)] for k in range(int(seconds // 3) + 2)]
    signal = common.onset_signal(texts, 0.4, lead_s=0.5, tail_s=0.0)
    config = bench.runtime.session_config(args.session_batch)
    per_level, summaries = [], []
    for n in levels:
        detail = asyncio.run(run_level(bench, n, signal, seconds, config, encode=not args.no_encode))
        per_level.append({"sessions": n, "sessions_detail": detail})
        summaries.append(level_summary(n, detail))
    holding = [s["sessions"] for s in summaries if s["holds_25fps"]]
    result = common.header("concurrency", args, bench)
    result["settings"] = {"levels": levels, "seconds": seconds, "session_batch": args.session_batch,
                          "vp8_encode": not args.no_encode, "hold_fps": HOLD_FPS, "hold_late_share": HOLD_LATE_SHARE}
    result["levels"] = summaries
    result["per_session"] = per_level
    result["max_sessions_holding_25fps"] = max(holding) if holding else 0
    result["plots"] = plot(result, args.plots)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--sessions", default=None, help="comma-separated session counts (default 1,2,4; --quick 1,2)")
    p.add_argument("--seconds", type=float, default=None, help="speech per level (default 20; --quick 4)")
    p.add_argument("--session-batch", type=int, default=4, help="frames per model call (serve's default 4)")
    p.add_argument("--no-encode", action="store_true", help="leave out the per-session VP8 encoding")
    return p


def main(argv: list[str] | None = None, bench: common.BenchRuntime | None = None) -> dict:
    args = parser().parse_args(argv)
    return common.finish(run(args, bench), args, markdown)


if __name__ == "__main__":
    main()
