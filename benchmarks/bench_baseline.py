"""Baseline: the same model and avatar through the offline, non-streaming pipeline (the way
MuseTalk's scripts work: the whole utterance is encoded first, then frames are rendered) next to
the live streaming session. Time to first frame on utterances of 3, 10 and 30 s.

Offline: `render_clip` (the `realtime-avatar render` path) on a WAV of the utterance: features of
the whole clip, then batched rendering into an MP4. It can only start once the utterance is over,
so in a conversation its first frame comes `duration + processing` after the speaker began.
Also timed: the MuseTalk feature step itself (the offline 30 s Whisper pass on the utterance).

Streaming: an AvatarSession fed the utterance in real time (20 ms packets). Its first frame of
the utterance (input frame 0) and its first rendered mouth leave `output delay` after the audio
arrives, whatever the utterance's length.

    .venv/bin/python benchmarks/bench_baseline.py [--quick] [--durations 3,10,30]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from realtime_avatar.offline_render import render_clip  # noqa: E402
from realtime_avatar.session import SessionConfig  # noqa: E402
from realtime_avatar.streaming_whisper import offline_features  # noqa: E402
from realtime_avatar.timing import SAMPLE_RATE  # noqa: E402


def offline_ttff(bench: common.BenchRuntime, audio16: np.ndarray, workdir: Path) -> dict:
    rt = bench.runtime
    wav = common.OnsetSignal(audio16, SAMPLE_RATE, (0.0,), ("utterance",)).write_wav(workdir / "utterance.wav")
    result = render_clip(rt.renderer, rt.clip_features, wav, workdir / "utterance.mp4", progress=False)
    t0 = time.perf_counter()
    offline_features(rt.encoder, audio16)
    musetalk_features_s = time.perf_counter() - t0
    duration = len(audio16) / SAMPLE_RATE
    return {
        "offline_ttff_after_end_ms": round(1000 * result.first_frame_seconds, 1),
        "offline_ttff_from_speech_start_ms": round(1000 * (duration + result.first_frame_seconds), 1),
        "offline_features_ms": round(1000 * result.features_seconds, 1),
        "musetalk_30s_pass_features_ms": round(1000 * musetalk_features_s, 1),
        "offline_total_ms": round(1000 * (result.features_seconds + result.render_seconds), 1),
        "offline_render_fps": round(result.frames / max(1e-9, result.render_seconds), 1),
    }


async def streaming_ttff(bench: common.BenchRuntime, audio16: np.ndarray, config: SessionConfig) -> dict:
    rt = bench.runtime
    session = common.instrumented_session(rt.encoder, rt.renderer, config, keep_audio=False)
    await session.start()
    audio48 = _to_48k(audio16)
    t_first = asyncio.get_running_loop().time()
    pusher = asyncio.create_task(common.push_realtime([session], audio48, common.WEBRTC_RATE))
    first_frame = first_mouth = None
    deadline = t_first + len(audio16) / SAMPLE_RATE + 10.0
    ticks = session.tick_log
    while (first_frame is None or first_mouth is None) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        played = np.flatnonzero(ticks.column("frame") >= 0)
        rendered = np.flatnonzero(ticks.column("rendered") > 0)
        if first_frame is None and len(played):
            first_frame = float(ticks.column("t")[played[0]])
        if first_mouth is None and len(rendered):
            first_mouth = float(ticks.column("t")[rendered[0]])
    pusher.cancel()
    await asyncio.gather(pusher, return_exceptions=True)
    stats = session.stats()
    await session.close()
    return {
        "streaming_ttff_ms": None if first_frame is None else round(1000 * (first_frame - t_first), 1),
        "streaming_first_mouth_ms": None if first_mouth is None else round(1000 * (first_mouth - t_first), 1),
        "streaming_late_frames": stats["late_frames"],
    }


def _to_48k(audio16: np.ndarray) -> np.ndarray:
    import soxr

    return soxr.resample(audio16, SAMPLE_RATE, common.WEBRTC_RATE).astype(np.float32)


def run(args: argparse.Namespace, bench: common.BenchRuntime | None = None) -> dict:
    bench = bench or common.load_bench_runtime(args.quick, threads=args.threads, backend=args.backend, model=args.model)
    durations = [float(d) for d in (args.durations or ("3" if args.quick else "3,10,30")).split(",")]
    config = bench.runtime.session_config(args.session_batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for duration in durations:
            audio16 = common.speech_of_length(duration, SAMPLE_RATE)
            row = {"utterance_s": duration}
            row.update(offline_ttff(bench, audio16, Path(tmp)))
            row.update(asyncio.run(streaming_ttff(bench, audio16, config)))
            rows.append(row)
    result = common.header("baseline", args, bench)
    result["settings"] = {"durations_s": durations, "session_batch": args.session_batch,
                          "renderer_batch": bench.runtime.renderer.batch_size,
                          "output_delay_ms": round(1000 * config.output_delay_s, 1)}
    result["rows"] = rows
    result["plots"] = plot(result, args.plots)
    return result


COLUMNS = ["utterance_s", "offline_ttff_from_speech_start_ms", "offline_ttff_after_end_ms", "offline_features_ms",
           "musetalk_30s_pass_features_ms", "offline_render_fps", "streaming_ttff_ms", "streaming_first_mouth_ms"]


def markdown(result: dict) -> str:
    text = ("Time to first frame: offline whole-utterance pipeline vs live streaming session (ms)\n\n"
            + common.markdown_table(result["rows"], COLUMNS))
    return text + ("\nOffline from speech start = utterance length + processing until its first frame "
                   "(it cannot start before the utterance ends).\n")


def plot(result: dict, plots: Path | None) -> list[str]:
    if plots is None:
        return []
    plt = common.pyplot()
    rows = result["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(x - 0.2, [r["offline_ttff_from_speech_start_ms"] / 1000 for r in rows], 0.4, label="offline (MuseTalk-style)")
    ax.bar(x + 0.2, [(r["streaming_ttff_ms"] or 0) / 1000 for r in rows], 0.4, label="streaming session")
    ax.set_xticks(x, [f"{r['utterance_s']:g} s utterance" for r in rows])
    ax.set_ylabel("seconds from speech start to first frame")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Time to first frame")
    fig.tight_layout()
    return [p for p in [common.save_figure(fig, plots, "baseline")] if p]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--durations", default=None, help="utterance lengths in s (default 3,10,30; --quick 3)")
    p.add_argument("--session-batch", type=int, default=4, help="frames per model call of the session")
    return p


def main(argv: list[str] | None = None, bench: common.BenchRuntime | None = None) -> dict:
    args = parser().parse_args(argv)
    return common.finish(run(args, bench), args, markdown)


if __name__ == "__main__":
    main()
