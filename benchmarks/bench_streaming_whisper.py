"""Streaming Whisper encoder: cost per hop and audio-to-feature latency for several settings.

For each (window, hop, lookahead) the built-in speech sample is streamed through an AudioRing
exactly as a live session does (20 ms packets), but without real-time sleeps; the encoder's
wall time per run is measured. Latency of a feature = the audio it waits for (lookahead), plus
the wait for the next encoder run (hop/2 on average, a full hop at worst), plus the run itself.
The last column is the parity with the offline 30 s pass (mean cosine of the last layer).

    .venv/bin/python benchmarks/bench_streaming_whisper.py [--audio FILE] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# before torch: realtime_avatar sets OMP_WAIT_POLICY=PASSIVE, which libgomp reads when torch
# loads it; measured as the CLI runs (spinning OpenMP threads slow the other pools here)
import realtime_avatar  # noqa: F401
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realtime_avatar.audio_ring import AudioRing  # noqa: E402
from realtime_avatar.audio_sources import read_audio_file  # noqa: E402
from realtime_avatar.cli import speech_sample  # noqa: E402
from realtime_avatar.streaming_whisper import StreamingConfig, StreamingWhisper, offline_features  # noqa: E402
from realtime_avatar.timing import SAMPLE_RATE  # noqa: E402
from realtime_avatar.whisper_weights import load_whisper  # noqa: E402

SETTINGS = [  # window_s, hop_s, lookahead_s
    (2.0, 0.08, 0.0),
    (2.0, 0.08, 0.1),
    (2.0, 0.2, 0.2),
    (4.0, 0.2, 0.2),
    (4.0, 0.2, 0.5),
    (8.0, 0.2, 0.5),
]
PACKET = SAMPLE_RATE // 50  # 20 ms


def run_setting(encoder, audio, offline, window, hop, lookahead) -> dict:
    config = StreamingConfig(window_s=window, hop_s=hop, lookahead_s=lookahead)
    ring = AudioRing(len(audio) + SAMPLE_RATE)
    whisper = StreamingWhisper(encoder, ring, config)
    run_ms, blocks = [], []
    for i in range(0, len(audio), PACKET):
        ring.write(audio[i : i + PACKET])
        while (plan := whisper.plan()) is not None:
            t0 = time.perf_counter()
            blocks.append(whisper.run(plan))
            run_ms.append(1000 * (time.perf_counter() - t0))
    ring.close()
    while (block := whisper.step(final=True)) is not None:
        blocks.append(block)
    states = np.concatenate([b.states for b in blocks])
    a, b = states[:, -1], offline[:, -1]
    cos = float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-8)))
    median_run = statistics.median(run_ms)
    return {
        "window_s": window,
        "hop_s": hop,
        "lookahead_s": lookahead,
        "runs": len(run_ms),
        "encoder_ms_median": round(median_run, 2),
        "encoder_ms_p90": round(float(np.percentile(run_ms, 90)), 2),
        "cpu_share": round(median_run / 1000 / hop, 3),  # fraction of one process's time
        "latency_ms_mean": round(1000 * (lookahead + hop / 2) + median_run, 1),
        "latency_ms_worst": round(1000 * (lookahead + hop) + median_run, 1),
        "parity_cos_last_layer": round(cos, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", type=Path, default=None, help="speech file (default: built-in sample)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = load_whisper("tiny.en").encoder
    audio = read_audio_file(args.audio or speech_sample())
    offline = offline_features(encoder, audio)
    rows = [run_setting(encoder, audio, offline, *s) for s in SETTINGS]
    result = {"benchmark": "streaming_whisper", "audio_seconds": round(len(audio) / SAMPLE_RATE, 2),
              "torch_threads": args.threads, "model": "tiny.en", "rows": rows}
    print(json.dumps(result, indent=2))
    if not args.json_only:
        cols = list(rows[0])
        print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
