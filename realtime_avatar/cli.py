"""The `realtime-avatar` command line: one subcommand per job a user has."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path

from .timing import FEATURE_RATE, SAMPLE_RATE


def speech_sample() -> Path:
    """The built-in speech clip (espeak-ng, 9 s, 16 kHz): the demo's input when none is given."""
    return Path(str(resources.files("realtime_avatar") / "assets" / "speech_sample.wav"))


def _streaming_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("streaming Whisper encoder")
    g.add_argument("--window", type=float, default=4.0, help="encoder window in seconds (default 4.0)")
    g.add_argument("--hop", type=float, default=0.2, help="seconds between encoder runs (default 0.2)")
    g.add_argument("--lookahead", type=float, default=0.5,
                   help="seconds of audio a feature waits for before it is final (default 0.5)")
    g.add_argument("--whisper", default="tiny.en",
                   help="Whisper weights: a name in ~/.cache/whisper, a .pt path, or tiny.en "
                        "(offline copy, converted once) (default tiny.en)")


def _streaming_config(args):
    from .streaming_whisper import StreamingConfig

    return StreamingConfig(window_s=args.window, hop_s=args.hop, lookahead_s=args.lookahead)


# -- features -------------------------------------------------------------------------------------


async def _stream_features(encoder, config, feed, duration_hint: float | None) -> dict:
    from .audio_ring import AudioRing
    from .frame_windows import StreamingFrameWindows
    from .streaming_whisper import StreamingWhisper
    from .timing import num_features

    ring = AudioRing(SAMPLE_RATE * 60)
    whisper = StreamingWhisper(encoder, ring, config)
    windows = StreamingFrameWindows()
    arrived: dict[int, float] = {}  # sample index -> wall time, to measure audio-to-feature latency
    producer = asyncio.create_task(feed(ring, arrived))
    n_features = n_frames = 0
    lags = []
    last_print = 0.0
    async for block in whisper.stream():
        n_features += len(block.states)
        n_frames += len(windows.push(block.first_index, block.states))
        # the newest sample any feature of this block depends on, with lookahead
        needed = min(ring.write_index, (block.first_index + len(block.states)) * 320 + int(config.lookahead_s * SAMPLE_RATE))
        t_arrival = next((t for idx, t in sorted(arrived.items()) if idx >= needed), None)
        if t_arrival is not None:
            lags.append(block.encoded_at - t_arrival)
        if time.monotonic() - last_print > 0.5:
            last_print = time.monotonic()
            print(f"\r  features {n_features:5d} ({n_features / FEATURE_RATE:6.2f} s)  frames {n_frames:4d}  "
                  f"encoder runs {whisper.runs:4d}", end="", file=sys.stderr, flush=True)
    n_frames += len(windows.finish(num_features(ring.write_index)))
    await producer
    print(file=sys.stderr)
    lags.sort()
    return {
        "audio_seconds": round(ring.write_index / SAMPLE_RATE, 3),
        "features": n_features,
        "frames": n_frames,
        "encoder_runs": whisper.runs,
        "encoder_ms_per_run": round(1000 * whisper.encode_seconds / max(1, whisper.runs), 2),
        "feature_lag_ms_median": round(1000 * lags[len(lags) // 2], 1) if lags else None,
    }


def cmd_features(args) -> int:
    """Stream Whisper features from a file (paced like a live source) or the microphone."""
    import numpy as np

    from .audio_sources import MicrophoneSource, read_audio_file
    from .whisper_weights import load_whisper

    encoder = load_whisper(args.whisper).encoder
    config = _streaming_config(args)
    if args.mic:
        async def feed(ring, arrived):
            with MicrophoneSource(ring, device=args.device):
                end = time.monotonic() + args.seconds
                while time.monotonic() < end:
                    arrived[ring.write_index] = time.monotonic()
                    await asyncio.sleep(0.02)
            ring.close()
        print(f"listening on the microphone for {args.seconds:.0f} s ...", file=sys.stderr)
    else:
        path = Path(args.audio) if args.audio else speech_sample()
        audio = read_audio_file(path)
        print(f"streaming {path} ({len(audio) / SAMPLE_RATE:.2f} s) in real time"
              f"{' (built-in speech sample)' if not args.audio else ''} ...", file=sys.stderr)
        chunk = SAMPLE_RATE // 50  # 20 ms packets, like WebRTC

        async def feed(ring, arrived):
            t0 = time.monotonic()
            for i in range(0, len(audio), chunk):
                if not args.fast:
                    await asyncio.sleep(max(0.0, t0 + i / SAMPLE_RATE - time.monotonic()))
                ring.write(audio[i : i + chunk])
                arrived[ring.write_index] = time.monotonic()
                await asyncio.sleep(0)
            ring.close()

    summary = asyncio.run(_stream_features(encoder, config, feed, None))
    summary["settings"] = {"window_s": config.window_s, "hop_s": config.hop_s, "lookahead_s": config.lookahead_s}
    print(json.dumps(summary, indent=2))
    return 0


# -- main -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="realtime-avatar",
        description="Real-time streaming talking avatar: speech in, lip-synced avatar video out.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("features", help="stream Whisper features from an audio file or the microphone",
                       description=cmd_features.__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--audio", help="audio or video file (anything FFmpeg decodes); default: built-in sample")
    src.add_argument("--mic", action="store_true", help="use the default microphone (needs the 'mic' extra)")
    p.add_argument("--device", default=None, help="microphone device name or index (with --mic)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to listen with --mic (default 10)")
    p.add_argument("--fast", action="store_true", help="feed the file as fast as possible, not in real time")
    _streaming_args(p)
    p.set_defaults(func=cmd_features)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
