"""Sustained run: one live session fed minutes of speech and silence in real time.

Speech (espeak-ng sentences and single words, each onset marked by a click) alternates with
silences of 0.6-3 s and is pushed into one AvatarSession in 20 ms stereo s16 packets at 48 kHz,
as WebRTC delivers it. The session's on_tick hook records every output tick (the frames and
audio its WebRTC tracks carry). Over time it reports:

- frames delivered vs expected (25 per second of wall time) and input frames played vs pushed;
- late ticks (the clock slipped more than a frame) and late frames (a frame due before its
  render finished: the idle mouth was shown instead);
- the A/V offset of every speech onset in the emitted stream (mouth-onset tick minus the tick
  whose audio holds the onset, found in the emitted audio) and its drift (slope over time), with
  the audio-in -> mouth-out latency per onset;
- memory: RSS of the process sampled every second (growth in MiB per minute).

    .venv/bin/python benchmarks/bench_sustained.py [--quick] [--seconds 600] [--plots DIR]
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

from realtime_avatar.session import SessionConfig  # noqa: E402
from realtime_avatar.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402

SAMPLE_EVERY_S = 1.0  # RSS and session-stats sampling period
MIN_GAP_S = 0.5  # quiet before a speech onset (the signal's pauses are 0.6-3 s)


def speech_and_silence(seconds: float, seed: int = 0) -> common.OnsetSignal:
    """Sentences and single words with clicked onsets, separated by 0.6-3 s of silence, at
    least `seconds` long (a deterministic mix)."""
    rng = np.random.default_rng(seed)
    texts, gaps, total = [], [], 1.0
    while total < seconds:
        text = common.SENTENCES[len(texts) % len(common.SENTENCES)] if rng.random() < 0.6 \
            else common.ONSET_WORDS[len(texts) % len(common.ONSET_WORDS)]
        gap = float(rng.uniform(0.6, 3.0))
        texts.append(text)
        gaps.append(gap)
        total += len(common.spoken(text)) / common.WEBRTC_RATE + gap
    return common.onset_signal(texts, gaps, lead_s=1.0, tail_s=0.0)


async def run_session(bench: common.BenchRuntime, signal: common.OnsetSignal, seconds: float,
                      config: SessionConfig) -> dict:
    runtime = bench.runtime
    # no audio kept and every log preallocated: RSS growth is the session's own
    session = common.instrumented_session(runtime.encoder, runtime.renderer, config, keep_audio=False,
                                          capacity_s=seconds + 60)
    samples = common.Columns(("t", "rss_mib", "late_frames"), int((seconds + 60) / SAMPLE_EVERY_S))

    async def sample() -> None:
        while True:
            samples.append(time.monotonic(), common.rss_mb(), session.late_frames)
            await asyncio.sleep(SAMPLE_EVERY_S)

    await session.start()
    sampler = asyncio.create_task(sample())
    await common.push_realtime([session], signal.samples, signal.rate, stop_after_s=seconds)
    await asyncio.sleep(config.output_delay_s + config.max_backlog_s + 0.3)  # let the last frames out
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    samples.append(time.monotonic(), common.rss_mb(), session.late_frames)
    stats = session.stats()
    await session.close()
    return {"session": session, "samples": samples, "stats": stats, "t0": session.started_at}


def onset_events(session) -> tuple[list[dict], int]:
    """Per speech onset in the emitted audio: the A/V offset in the emitted stream (mouth-onset
    tick minus the onset's position) and the in-session latencies."""
    ticks = session.tick_log
    n = ticks.column("n")
    frames = ticks.column("frame")
    rendered = ticks.column("rendered") > 0
    loud = ticks.column("loud_at")
    # the emitted audio is tick after tick of 640 samples: tick k holds samples [640k, 640k + 640)
    starts = n * SAMPLES_PER_FRAME
    gap = int(MIN_GAP_S * SAMPLE_RATE)
    emitted = common.chunk_onsets(np.where(loud >= 0, starts + loud, -1), starts + SAMPLES_PER_FRAME, gap)
    heard = common.chunk_onsets(session.input_log["loud_at"], session.input_log["write_index"], gap)
    events = []
    for s_out in emitted:
        k = s_out // SAMPLES_PER_FRAME
        if frames[k] < 0:
            continue
        frame = int(frames[k])  # the input frame whose audio holds the onset
        s_in = frame * SAMPLES_PER_FRAME + s_out % SAMPLES_PER_FRAME
        # the first tick showing a rendered mouth whose window reaches the onset (2i+5 >= onset)
        near = np.flatnonzero(rendered[max(0, k - 8): k + 25] & (frames[max(0, k - 8): k + 25] >= frame - 3))
        t_in = common.time_ring_reached(session.input_log, s_in)
        event = {"t_s": round(s_in / SAMPLE_RATE, 2)}
        if len(near):
            m = max(0, k - 8) + int(near[0])
            event["av_offset_ms"] = round((m - k) * FRAME_MS - (s_out % SAMPLES_PER_FRAME) / SAMPLE_RATE * 1000, 1)
            if t_in is not None:
                event["mouth_latency_ms"] = round(1000 * (ticks.column("t")[m] - t_in), 1)
        if t_in is not None:
            event["audio_latency_ms"] = round(1000 * (ticks.column("t")[k] - t_in), 1)
        events.append(event)
    return events, len(heard)


def time_series(session, samples: common.Columns, t0: float, bin_s: float) -> list[dict]:
    t = session.tick_log.column("t")
    lateness = 1000 * (t - (t0 + session.tick_log.column("n") / FPS))
    bins = []
    t_end = t[-1] if len(t) else t0
    for b0 in np.arange(t0, t_end - bin_s + 1e-6, bin_s):  # whole bins only
        in_bin = (t >= b0) & (t < b0 + bin_s)
        sampled = np.flatnonzero(samples["t"] < b0 + bin_s)
        bins.append({
            "t_s": round(b0 - t0, 1),
            "fps": round(int(in_bin.sum()) / bin_s, 2),
            "max_tick_lateness_ms": round(float(lateness[in_bin].max()), 1) if in_bin.any() else None,
            "late_frames_total": int(samples["late_frames"][sampled[-1]]) if len(sampled) else 0,
            "rss_mib": round(float(samples["rss_mib"][sampled[-1]]), 1) if len(sampled) else None,
        })
    return bins


def analyse(raw: dict, signal: common.OnsetSignal, seconds: float, bin_s: float) -> dict:
    session, samples, t0, final = raw["session"], raw["samples"], raw["t0"], raw["stats"]
    ticks = session.tick_log
    t = ticks.column("t")
    wall = float(samples["t"][-1] - t0)  # from the first tick to the end of the run
    lateness = 1000 * (t - (t0 + ticks.column("n") / FPS))
    events, heard = onset_events(session)
    with_offset = [e for e in events if "av_offset_ms" in e]
    with_latency = [e for e in with_offset if "mouth_latency_ms" in e]
    rss_t = (samples["t"] - t0) / 60
    rss = samples["rss_mib"]
    second_half = rss_t >= rss_t[-1] / 2
    speech_frames = final["rendered_frames"] + final["late_frames"]
    return {
        "frames": {
            "ticks": len(ticks),
            "expected_ticks": int(wall * FPS) + 1,
            "fps": round(len(ticks) / wall, 3) if wall > 0 else None,
            "input_frames_pushed": session.ring.write_index // SAMPLES_PER_FRAME,
            "input_frames_played": final["frames_played"],
            "input_frames_dropped": final["dropped_frames"],
            "late_ticks": int((lateness > FRAME_MS).sum()),
            "tick_lateness_ms": common.summarize(lateness, 1),
            "late_frames": final["late_frames"],
            "late_frames_share_of_speech": round(final["late_frames"] / speech_frames, 4) if speech_frames else None,
            "rendered_frames": final["rendered_frames"],
            "stale_frames": final["stale_frames"],
        },
        "av_offset_ms": common.summarize([e["av_offset_ms"] for e in with_offset], 1),
        "av_offset_drift_ms_per_min": _round(common.linear_slope([e["t_s"] / 60 for e in with_offset],
                                                                 [e["av_offset_ms"] for e in with_offset])),
        "mouth_latency_ms": common.summarize([e["mouth_latency_ms"] for e in with_latency], 1),
        "mouth_latency_drift_ms_per_min": _round(common.linear_slope([e["t_s"] / 60 for e in with_latency],
                                                                     [e["mouth_latency_ms"] for e in with_latency])),
        "onsets": {"sent": sum(1 for s in signal.onsets_s if s < seconds), "heard_by_session": heard,
                   "emitted": len(events), "with_mouth": len(with_offset)},
        "rss_mib": {"start": round(float(rss[0]), 1), "end": round(float(rss[-1]), 1), "max": round(float(rss.max()), 1),
                    "growth_mib_per_min_second_half": _round(common.linear_slope(rss_t[second_half], rss[second_half]))},
        "instrumentation_mib": round((ticks.columns.nbytes + session.input_log.nbytes + session.encoder_log.nbytes
                                      + session.render_log.nbytes + samples.nbytes) / 2**20, 2),
        "session_stats": {k: final.get(k) for k in ("fps", "latency_ms", "output_delay_ms", "encoder_ms_per_run",
                                                     "ring_overruns")},
        "series": time_series(session, samples, t0, bin_s),
        "events": events,
    }


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def markdown(result: dict) -> str:
    f, a = result["frames"], result
    rows = [
        {"measure": "wall time (s)", "value": result["settings"]["seconds"]},
        {"measure": "frames delivered / expected", "value": f"{f['ticks']} / {f['expected_ticks']} ({f['fps']} fps)"},
        {"measure": "input frames played / pushed (dropped)",
         "value": f"{f['input_frames_played']} / {f['input_frames_pushed']} ({f['input_frames_dropped']})"},
        {"measure": "late ticks (clock > 40 ms behind)", "value": f["late_ticks"]},
        {"measure": "tick lateness p99 / max (ms)", "value": f"{f['tick_lateness_ms']['p99']} / {f['tick_lateness_ms']['max']}"},
        {"measure": "late frames (idle mouth shown for speech)",
         "value": f"{f['late_frames']} ({_pct(f['late_frames_share_of_speech'])} of speech frames)"},
        {"measure": "A/V offset in the stream, median (p90, max) (ms)",
         "value": f"{a['av_offset_ms']['median']} (p90 {a['av_offset_ms']['p90']}, max {a['av_offset_ms']['max']})"},
        {"measure": "A/V offset drift (ms per minute)", "value": a["av_offset_drift_ms_per_min"]},
        {"measure": "audio in -> mouth out latency median / p90 (ms)",
         "value": f"{a['mouth_latency_ms']['median']} / {a['mouth_latency_ms']['p90']}"},
        {"measure": "latency drift (ms per minute)", "value": a["mouth_latency_drift_ms_per_min"]},
        {"measure": "onsets sent / emitted / with mouth",
         "value": f"{a['onsets']['sent']} / {a['onsets']['emitted']} / {a['onsets']['with_mouth']}"},
        {"measure": "RSS start / end / max (MiB)",
         "value": f"{a['rss_mib']['start']} / {a['rss_mib']['end']} / {a['rss_mib']['max']}"},
        {"measure": "RSS growth, second half (MiB per minute)", "value": a["rss_mib"]["growth_mib_per_min_second_half"]},
    ]
    return "Sustained single session\n\n" + common.markdown_table(rows)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def plot(result: dict, plots: Path | None) -> list[str]:
    if plots is None:
        return []
    plt = common.pyplot()
    series, events = result["series"], result["events"]
    t = [b["t_s"] / 60 for b in series]
    fig, axes = plt.subplots(4, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(t, [b["fps"] for b in series], "-", lw=1)
    axes[0].axhline(FPS, color="tab:red", lw=0.6, ls="--")
    axes[0].set_ylabel("frames/s")
    axes[0].set_title("Frames delivered per bin (expected 25)")
    axes[1].plot(t, [b["late_frames_total"] for b in series], "-", lw=1, label="late frames (cumulative)")
    axes[1].plot(t, [b["max_tick_lateness_ms"] or 0 for b in series], "-", lw=0.8, label="max tick lateness (ms)")
    axes[1].legend(fontsize=7)
    axes[1].set_title("Late frames and tick lateness")
    et = [e["t_s"] / 60 for e in events if "av_offset_ms" in e]
    axes[2].plot(et, [e["av_offset_ms"] for e in events if "av_offset_ms" in e], ".", ms=3, label="A/V offset (mouth - audio onset)")
    axes[2].plot([e["t_s"] / 60 for e in events if "mouth_latency_ms" in e],
                 [e["mouth_latency_ms"] for e in events if "mouth_latency_ms" in e], ".", ms=3, label="audio in -> mouth out")
    axes[2].set_ylabel("ms")
    axes[2].legend(fontsize=7)
    axes[2].set_title("Per speech onset")
    axes[3].plot(t, [b["rss_mib"] for b in series], "-", lw=1)
    axes[3].set_ylabel("MiB")
    axes[3].set_title("Resident memory (VmRSS)")
    axes[3].set_xlabel("minutes")
    fig.tight_layout()
    return [p for p in [common.save_figure(fig, plots, "sustained")] if p]


def run(args: argparse.Namespace, bench: common.BenchRuntime | None = None) -> dict:
    bench = bench or common.load_bench_runtime(args.quick, threads=args.threads, backend=args.backend, model=args.model)
    seconds = args.seconds or (30.0 if args.quick else 600.0)
    signal = speech_and_silence(seconds)
    config = bench.runtime.session_config(args.session_batch)
    raw = asyncio.run(run_session(bench, signal, seconds, config))
    result = common.header("sustained", args, bench)
    bin_s = 2.0 if seconds <= 60 else 10.0
    result["settings"] = {"seconds": seconds, "session_batch": args.session_batch, "bin_s": bin_s,
                          "output_delay_ms": round(1000 * config.output_delay_s, 1)}
    result.update(analyse(raw, signal, seconds, bin_s))
    result["plots"] = plot(result, args.plots)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--seconds", type=float, default=None, help="length of the run (default 600; --quick 30)")
    p.add_argument("--session-batch", type=int, default=4, help="frames per model call (serve's default 4)")
    return p


def main(argv: list[str] | None = None, bench: common.BenchRuntime | None = None) -> dict:
    args = parser().parse_args(argv)
    return common.finish(run(args, bench), args, markdown)


if __name__ == "__main__":
    main()
