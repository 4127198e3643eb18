"""The streaming encoder's latency-quality trade: lookahead vs end-to-end latency vs parity.

For each lookahead (0, 0.1, 0.2, 0.5, 1.0 s) at 2 s and 4 s encoder windows:

- latency by design: the frame window's right context (80 ms) + lookahead + one hop (the worst
  wait for the next encoder run);
- measured compute: the encoder's median run at that setting + one session batch of rendering
  (AvatarRenderer.render, blend included), measured on this machine;
- end-to-end estimate = design + compute (network not included: see bench_e2e_webrtc);
- the session's output delay for that setting (design + its fixed render budget), i.e. what a
  live session would actually schedule;
- parity: mean cosine similarity of the streamed last-layer features to the offline 30 s pass
  (run_setting of bench_streaming_whisper.py, on its built-in speech sample).

MuseTalk weights need parity (they were trained on offline features); our own models are trained
on the streamed features at their live setting, so they can take the low-latency end.

    .venv/bin/python benchmarks/bench_lookahead.py [--quick] [--hop 0.12] [--plots DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_streaming_whisper import run_setting  # noqa: E402

from realtime_avatar.audio_sources import read_audio_file  # noqa: E402
from realtime_avatar.cli import speech_sample  # noqa: E402
from realtime_avatar.frame_windows import offline_frame_windows  # noqa: E402
from realtime_avatar.delays import DEFAULT_JITTER_S  # noqa: E402
from realtime_avatar.session import WINDOW_RIGHT_CONTEXT_S, SessionConfig, pipeline_delay  # noqa: E402
from realtime_avatar.streaming_whisper import LOW_LATENCY, StreamingConfig, offline_features  # noqa: E402
from realtime_avatar.timing import SAMPLE_RATE  # noqa: E402

LOOKAHEADS = (0.0, 0.1, 0.2, 0.5, 1.0)
WINDOWS = (2.0, 4.0)


def render_batch_ms(bench: common.BenchRuntime, batch: int, repeats: int) -> float:
    rt = bench.runtime
    windows = offline_frame_windows(rt.clip_features(common.speech_of_length(1.0, SAMPLE_RATE)))
    positions = list(range(batch))
    w = np.ascontiguousarray(windows[[k % len(windows) for k in positions]])
    times = common.time_calls(lambda: rt.renderer.render(positions, w), repeats, warmup=1)
    return float(np.median(times))


def run(args: argparse.Namespace, bench: common.BenchRuntime | None = None) -> dict:
    bench = bench or common.load_bench_runtime(args.quick, threads=args.threads, backend=args.backend, model=args.model)
    encoder = bench.runtime.encoder
    lookaheads = [float(x) for x in (args.lookaheads or ("0,0.5" if args.quick else ",".join(map(str, LOOKAHEADS)))).split(",")]
    windows = [float(x) for x in (args.windows or ("2" if args.quick else ",".join(map(str, WINDOWS)))).split(",")]
    audio = read_audio_file(args.audio or speech_sample())
    if args.quick:
        audio = audio[: 4 * SAMPLE_RATE]
    offline = offline_features(encoder, audio)
    render_ms = render_batch_ms(bench, args.session_batch, 3 if args.quick else 15)
    budget = SessionConfig().compute_s + DEFAULT_JITTER_S  # a session's starting budget (delays.py)
    rows = []
    for window in windows:
        for lookahead in lookaheads:
            measured = run_setting(encoder, audio, offline, window, args.hop, lookahead)
            design_ms = 1000 * (WINDOW_RIGHT_CONTEXT_S + lookahead + args.hop)
            compute_ms = measured["encoder_ms_median"] + render_ms
            config = StreamingConfig(window_s=window, hop_s=args.hop, lookahead_s=lookahead)
            rows.append({
                "window_s": window,
                "lookahead_s": lookahead,
                "hop_s": args.hop,
                "design_latency_ms": round(design_ms, 1),
                "encoder_ms": measured["encoder_ms_median"],
                "render_batch_ms": round(render_ms, 1),
                "e2e_estimate_ms": round(design_ms + compute_ms, 1),
                "session_output_delay_ms": round(1000 * pipeline_delay(config, budget), 1),
                "parity_cos_last_layer": measured["parity_cos_last_layer"],
            })
    live = bench.runtime.streaming
    result = common.header("lookahead", args, bench)
    result["settings"] = {"hop_s": args.hop, "audio_s": round(len(audio) / SAMPLE_RATE, 2),
                          "session_batch": args.session_batch, "render_budget_ms": round(1000 * budget, 1),
                          "live_setting": {"window_s": live.window_s, "hop_s": live.hop_s,
                                           "lookahead_s": live.lookahead_s},
                          "low_latency_default": {"window_s": LOW_LATENCY.window_s, "hop_s": LOW_LATENCY.hop_s,
                                                  "lookahead_s": LOW_LATENCY.lookahead_s}}
    result["rows"] = rows
    result["plots"] = plot(result, args.plots)
    return result


def markdown(result: dict) -> str:
    return ("Lookahead: latency vs parity with the offline features (ms; parity = mean cosine, last layer)\n\n"
            + common.markdown_table(result["rows"]))


def plot(result: dict, plots: Path | None) -> list[str]:
    if plots is None:
        return []
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for window in sorted({r["window_s"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["window_s"] == window]
        ax.plot([r["e2e_estimate_ms"] for r in rows], [r["parity_cos_last_layer"] for r in rows], "o-",
                label=f"{window:g} s window")
        for r in rows:
            ax.annotate(f"{r['lookahead_s']:g}", (r["e2e_estimate_ms"], r["parity_cos_last_layer"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("end-to-end estimate without network (ms)")
    ax.set_ylabel("cosine to offline features")
    ax.set_title("Lookahead (s, labels): latency vs feature parity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return [p for p in [common.save_figure(fig, plots, "lookahead")] if p]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--lookaheads", default=None, help="seconds, comma-separated (default 0,0.1,0.2,0.5,1.0)")
    p.add_argument("--windows", default=None, help="encoder windows in s (default 2,4)")
    p.add_argument("--hop", type=float, default=LOW_LATENCY.hop_s, help=f"encoder hop in s (default {LOW_LATENCY.hop_s})")
    p.add_argument("--audio", type=Path, default=None, help="speech file (default: the built-in sample)")
    p.add_argument("--session-batch", type=int, default=4, help="frames per render call (serve's default 4)")
    return p


def main(argv: list[str] | None = None, bench: common.BenchRuntime | None = None) -> dict:
    args = parser().parse_args(argv)
    return common.finish(run(args, bench), args, markdown)


if __name__ == "__main__":
    main()
