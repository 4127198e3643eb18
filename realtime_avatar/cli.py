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


def _device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compute device")
    g.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where the Whisper encoder, the renderer and the frame compose run: auto = the "
                        "first CUDA GPU when torch sees one, else the CPU (logged); cuda without a GPU "
                        "is an error (default auto)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="renderer precision: auto = fp16 on CUDA, fp32 on CPU; bf16 where the CPU has "
                        "fast bf16 (check with benchmarks/bench_frame_engine.py) (default auto)")


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

    encoder = load_whisper(args.whisper, device=args.torch_device).encoder
    config = _streaming_config(args)
    if args.mic:
        async def feed(ring, arrived):
            with MicrophoneSource(ring, device=_input_device(args.input_device)):
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


# -- prepare / render ----------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="renderer model: 'default' (the bundled compact model), 'compact:FILE.safetensors' "
                        "or 'musetalk-v15:DIR' (a directory laid out as the official MuseTalk release)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="if the default model's weights are missing, run with random ones (pipeline tests only)")
    p.add_argument("--avatar", default=None,
                   help="avatar directory made by 'prepare', or an image/video of one face "
                        "(prepared and cached on first use); default: the bundled astronaut photo")
    from .avatar import add_face_arguments

    add_face_arguments(p)  # --face, --face-box, --background: how an image/video --avatar is prepared
    p.add_argument("--whisper", default="tiny.en", help="Whisper weights (default tiny.en, offline copy)")
    p.add_argument("--batch", type=int, default=8, help="frames per model call (default 8)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "tensorrt", "compiled"],
                   help="where the UNet and decoder run: auto picks the fastest engine that passes its "
                        "accuracy gate on this machine (TensorRT on a GPU, else ONNX Runtime, else torch); "
                        "engines are built once and cached in engines/; compiled = torch.compile with CUDA "
                        "graphs of model + compose per batch bucket, compiled and gated at startup (CUDA "
                        "only: on a CPU the same torch code runs eagerly) (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def _runtime(args, frame_format: str = "bgr24"):
    from .avatar import settings_from_args
    from .runtime import load_runtime

    return load_runtime(args.model, args.avatar, args.whisper, allow_random=args.allow_random_weights,
                        frame_format=frame_format,
                        backend=args.backend, batch_size=args.batch, threads=args.threads,
                        avatar_settings=settings_from_args(args),
                        device=args.torch_device, precision=None if args.precision == "auto" else args.precision)


def _input_device(value: str | None):
    """A microphone given by index (digits) or by name."""
    return int(value) if value is not None and value.isdigit() else value


def cmd_prepare(args) -> int:
    from .avatar import prepare_main

    return prepare_main(args)


def _rtmp_url_ok(url: str | None, command: str) -> bool:
    """False (after one line on stderr) when --rtmp URL cannot be an RTMP URL; True when it can
    or when no --rtmp was given. Checked before the model loads, so a typo costs no wait."""
    if not url:
        return True
    from .rtmp import RtmpError, check_rtmp_url

    try:
        check_rtmp_url(url)
    except RtmpError as exc:
        print(f"realtime-avatar {command}: --rtmp: {exc}", file=sys.stderr)
        return False
    return True


def cmd_render(args) -> int:
    """Render an audio file into an MP4 of the avatar speaking it (offline, whole clip at once)."""
    from .offline_render import render_clip

    if not _rtmp_url_ok(args.rtmp, "render"):
        return 2
    runtime = _runtime(args)
    audio = Path(args.audio) if args.audio else speech_sample()
    result = render_clip(runtime.renderer, runtime.clip_features, audio, args.output, progress=not args.no_progress,
                         window=runtime.window)
    summary = {
        "output": str(result.path), "frames": result.frames, "audio_seconds": round(result.audio_seconds, 3),
        "features_seconds": round(result.features_seconds, 2), "render_seconds": round(result.render_seconds, 2),
        "render_fps": round(result.frames / max(result.render_seconds, 1e-9), 1),
    }
    if args.rtmp:
        summary["rtmp"] = _push_rendered(result.path, args.rtmp)
    print(json.dumps(summary, indent=2))
    return 0


def _push_rendered(mp4: Path, url: str) -> dict:
    """Push a rendered MP4 to RTMP at the pace of a live source (25 fps, real time)."""
    from .rtmp import RtmpPusher, push_clip_realtime, read_clip

    frames, audio16k = read_clip(mp4)
    pusher = RtmpPusher(url, frames[0].shape[1], frames[0].shape[0], name="render")
    pusher.start()
    print(f"pushing {len(frames)} frames to {url} in real time ...", file=sys.stderr)
    try:
        asyncio.run(push_clip_realtime(pusher, frames, audio16k))
    finally:
        pusher.close()
    return pusher.stats.as_dict()


# -- serve ---------------------------------------------------------------------------------------


def _session_factory(runtime, args):
    from .session import AvatarSession

    config = runtime.session_config(args.session_batch)

    async def factory():
        return AvatarSession(runtime.encoder, runtime.renderer, config)

    return factory, config


def _broadcast_options(args):
    """BroadcastOptions from serve's flags (always on: WHEP and POST /sessions cost nothing idle)."""
    from .broadcast import BroadcastOptions

    if args.janus and not args.janus.startswith(("http://", "https://")):
        raise ValueError(f"--janus {args.janus!r}: use the Janus HTTP API URL, e.g. http://127.0.0.1:8088/janus")
    if args.broadcast and not (args.rtmp or args.janus):
        print("note: --broadcast without --rtmp/--janus: watch it at /watch/" + args.broadcast, file=sys.stderr)
    return BroadcastOptions(rtmp_url=args.rtmp, rtmp_sessions=args.rtmp_sessions, janus_url=args.janus,
                            janus_room=args.room, max_viewers=args.max_viewers,
                            broadcast_session=args.broadcast, whep_shared_encode=args.whep_encode == "shared",
                            whep_peers=args.whep_peers)


def cmd_serve(args) -> int:
    """Serve the avatar over WebRTC: open the printed address in a browser and speak."""
    from .runtime import freeze_startup_objects
    from .server import run_server

    try:
        broadcast = _broadcast_options(args)
    except ValueError as exc:  # RtmpError, JanusError-like URL checks, option combinations
        print(f"realtime-avatar serve: {exc}", file=sys.stderr)
        return 2
    from .engine_runners import cpu_cores
    from .priority import compute_threads

    threads = compute_threads(cpu_cores(), bool(args.rtmp or args.janus), args.threads)
    if threads != args.threads:
        print(f"compute threads: {threads} of {cpu_cores()} cores (the rest is left to the RTMP/Janus "
              f"encoders; --threads N to choose)", file=sys.stderr)
        args.threads = threads
    # auto: yuv420p straight from the engine on a GPU (every output encoder takes it; no
    # conversion on the host), bgr24 on a CPU (see load_runtime)
    runtime = _runtime(args, frame_format="auto")
    factory, config = _session_factory(runtime, args)
    freeze_startup_objects()  # full GC passes would walk them all, stalling every session
    print(f"model {runtime.model.model_id}, avatar {runtime.avatar.path.name}, encoder window "
          f"{config.streaming.window_s:g} s / hop {config.streaming.hop_s:g} s / lookahead "
          f"{config.streaming.lookahead_s:g} s, output delay {1000 * config.output_delay_s:.0f} ms", file=sys.stderr)
    print(f"open http://{args.host}:{args.port}/ in a browser (Ctrl+C to stop)", file=sys.stderr)
    async def serve() -> None:
        try:
            await run_server(args.host, args.port, session_factory=factory,
                             max_sessions=args.max_sessions, token=args.token, broadcast=broadcast)
        finally:
            await runtime.close()  # the engine's tick loops, after every session has closed

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


# -- live (microphone) ----------------------------------------------------------------------------


class PreviewError(Exception):
    """A preview that cannot be shown here (the message says what to do instead)."""


def choose_preview(requested: str) -> str:
    """'auto' -> 'window' when this machine has a display, else 'page'; others pass through."""
    from .preview import display_available

    if requested == "auto":
        return "window" if display_available() is None else "page"
    if requested == "window" and (why := display_available()) is not None:
        raise PreviewError(f"--preview window: {why}; use --preview page and open the printed address")
    return requested


async def run_live(runtime, config, device=None, seconds: float | None = None, record: Path | None = None,
                   report_every: float = 1.0, preview: str = "none", preview_port: int = 8080,
                   started=None, rtmp: str | None = None) -> dict:
    """Microphone -> avatar on this machine, with an optional preview ('window' or 'page') and
    MP4 recording. `started(parts)` is called once everything runs (tests and embedders use it)."""
    from .audio_sources import MicrophoneSource
    from .preview import PagePreview, WindowPreview
    from .recorder import Mp4Recorder
    from .session import AvatarSession

    session = AvatarSession(runtime.encoder, runtime.renderer, config)
    recorder = window = page = None
    if record is not None:
        height, width = runtime.avatar.frame_shape[:2]
        recorder = Mp4Recorder(record, width, height)
    if preview == "window":
        window = WindowPreview(f"realtime-avatar: {runtime.avatar.path.name}")
    elif preview == "page":
        page = PagePreview(session, port=preview_port)
    elif preview != "none":
        raise ValueError(f"preview must be 'window', 'page' or 'none', not {preview!r}")

    def on_tick(n, frame, image, pcm) -> None:
        if recorder is not None:
            recorder.write(image, pcm)
        if window is not None:
            window.show(image)

    session.on_tick = on_tick
    mic = MicrophoneSource(session.ring, device=device)
    await session.start()
    broadcast = None
    if rtmp is not None:
        from .broadcast import SessionOutputsRunner
        from .fanout import outputs_of

        broadcast = SessionOutputsRunner("live", outputs_of(session))
        broadcast.start_rtmp(rtmp)
    mic.start()
    tasks = []
    if window is not None:
        tasks.append(asyncio.create_task(window.run(), name="preview-window"))
    if page is not None:
        url = await page.start()
        print(f"preview: open {url} in a browser", file=sys.stderr)
    if started is not None:
        started({"session": session, "window": window, "page": page, "microphone": mic})
    loop = asyncio.get_running_loop()
    t_end = None if seconds is None else loop.time() + seconds
    try:
        while (t_end is None or loop.time() < t_end) and not (window is not None and window.closed):
            await asyncio.sleep(report_every)
            s = session.stats()
            print(f"\r  heard {s['input_seconds']:7.1f} s  fps {s['fps']:5.1f}  rendered {s['rendered_frames']:6d}  "
                  f"late {s['late_frames']:4d}  latency {s['latency_ms'] or 0:6.0f} ms", end="", file=sys.stderr)
    finally:
        print(file=sys.stderr)
        mic.stop()
        session.end_of_input()
        await asyncio.sleep(config.output_delay_s + 0.2)  # let the last words play out
        stats = session.stats()
        stats["microphone"] = mic.stats()
        if window is not None:
            stats["preview_frames_shown"] = window.frames_shown
            window.close()
        for task in tasks:
            await task
        if page is not None:
            stats["preview_viewers"] = len(page.peers)
            await page.close()
        if broadcast is not None:
            stats["rtmp"] = broadcast.stats()["rtmp"]
            await broadcast.close()
        await session.close()
        if recorder is not None:
            await asyncio.to_thread(recorder.close)
            stats["recorded_frames"], stats["recording_dropped"] = recorder.frames, recorder.dropped
    return stats


def cmd_live(args) -> int:
    """Microphone -> avatar on this machine (PortAudio), shown in a window (or, with no display, on
    a local page) and recorded to an MP4 when --record is given."""
    from .audio_sources import list_input_devices
    from .runtime import freeze_startup_objects

    if args.list_devices:
        for d in list_input_devices():
            print(f"{d.index:3d}  {d.name}  ({d.hostapi}, {d.max_input_channels} ch, {d.default_samplerate:.0f} Hz)")
        return 0
    try:
        preview = choose_preview(args.preview)
    except PreviewError as exc:
        print(f"realtime-avatar live: {exc}", file=sys.stderr)
        return 2
    if not _rtmp_url_ok(args.rtmp, "live"):
        return 2
    runtime = _runtime(args)
    config = runtime.session_config(args.session_batch)
    device = _input_device(args.input_device)
    freeze_startup_objects()
    print("listening: speak into the microphone (Ctrl+C to stop)", file=sys.stderr)
    try:
        stats = asyncio.run(run_live(runtime, config, device, args.seconds, Path(args.record) if args.record else None,
                                     preview=preview, preview_port=args.preview_port, rtmp=args.rtmp))
    except KeyboardInterrupt:
        return 0
    print(json.dumps(stats, indent=2))
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
    p.add_argument("--input-device", default=None, help="microphone device name or index (with --mic)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to listen with --mic (default 10)")
    p.add_argument("--fast", action="store_true", help="feed the file as fast as possible, not in real time")
    _streaming_args(p)
    _device_args(p)
    p.set_defaults(func=cmd_features)

    from .avatar import add_prepare_arguments

    p = sub.add_parser("prepare", help="prepare (and cache) an avatar from an image or a video",
                       description="Detect the face in every frame, crop it, encode the model's latents and "
                                   "the blending masks, and cache it all in a versioned directory.")
    add_prepare_arguments(p)
    _device_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("render", help="render an audio file into an MP4 of the avatar speaking it",
                       description=cmd_render.__doc__)
    p.add_argument("--audio", help="speech audio or video file; default: the built-in speech sample")
    p.add_argument("-o", "--output", default="out/avatar.mp4", help="output MP4 (default out/avatar.mp4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--rtmp", default=None, metavar="URL",
                   help="after rendering, push the MP4 to this RTMP URL at real-time pace (25 fps), "
                        "e.g. rtmp://127.0.0.1/live/avatar")
    _model_args(p)
    _device_args(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("serve", help="serve the avatar over WebRTC (browser page, /offer, WHIP, /metrics)",
                       description=cmd_serve.__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--max-sessions", type=int, default=4, help="concurrent sessions before 503 (default 4)")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (the page takes ?token=)")
    p.add_argument("--session-batch", type=int, default=4,
                   help="frames per model call in live sessions (default 4: 160 ms of video)")
    g = p.add_argument_group("broadcast (RTMP, Janus, WHEP viewers, audio-push API)")
    g.add_argument("--rtmp", default=None, metavar="URL",
                   help="push sessions to this RTMP URL (H.264 + AAC in FLV), e.g. rtmp://127.0.0.1/live/avatar; "
                        "{session} in it is replaced by the session id")
    g.add_argument("--rtmp-sessions", choices=("broadcast", "all"), default="broadcast",
                   help="which sessions --rtmp pushes: 'broadcast' (those made by POST /sessions with the rtmp "
                        "output, and --broadcast) or 'all' (every WebRTC session too; needs {session} in the URL)")
    g.add_argument("--janus", default=None, metavar="URL",
                   help="publish broadcast sessions into a Janus VideoRoom via its HTTP API, e.g. http://127.0.0.1:8088/janus")
    g.add_argument("--room", type=int, default=1234, help="Janus VideoRoom room number (created if missing; default 1234)")
    g.add_argument("--broadcast", default=None, metavar="NAME",
                   help="create a session NAME at start, fed only by the audio-push API (ws /sessions/NAME/audio), "
                        "published to --rtmp and --janus and watchable at /watch/NAME")
    g.add_argument("--max-viewers", type=int, default=50, help="WHEP viewers per server before 503 (default 50)")
    g.add_argument("--whep-encode", choices=("shared", "per-viewer"), default="shared",
                   help="'shared' (default): a session's video is VP8-encoded once for all its WHEP viewers "
                        "(fixed 1 Mbit/s); 'per-viewer': aiortc's own encoder per viewer (adapts to each "
                        "viewer's bandwidth, costs one encode per viewer)")
    g.add_argument("--whep-peers", choices=("process", "inline"), default="process",
                   help="where WHEP viewers' peer connections run: 'process' (default) in one child process fed "
                        "the shared VP8/Opus packets, so their RTP/SRTP work is off the event loop that drives "
                        "the sessions; 'inline': in the serving process")
    _model_args(p)
    _device_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("live", help="microphone -> avatar on this machine, with a preview, optionally recorded to MP4",
                       description=cmd_live.__doc__)
    p.add_argument("--mic", action="store_true", help="use the microphone (the default and only live input)")
    p.add_argument("--input-device", default=None, help="microphone: input device index or name (see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: Ctrl+C)")
    p.add_argument("--record", default=None, help="write the avatar video with its audio to this MP4")
    p.add_argument("--preview", choices=("auto", "window", "page", "none"), default="auto",
                   help="where to watch the avatar: a window on this display, a page served on 127.0.0.1 "
                        "(for machines without a display), or none; auto picks window when a display exists")
    p.add_argument("--preview-port", type=int, default=8080, help="port of the preview page (default 8080)")
    p.add_argument("--rtmp", default=None, metavar="URL",
                   help="also push the avatar to this RTMP URL (H.264 + AAC in FLV), e.g. rtmp://127.0.0.1/live/avatar")
    p.add_argument("--session-batch", type=int, default=4, help="frames per model call (default 4)")
    _model_args(p)
    _device_args(p)
    p.set_defaults(func=cmd_live)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .audio_sources import AudioSourceError
    from .avatar import AvatarError
    from .device import DeviceUnavailable, choose_device

    try:
        # resolved once, before anything loads: a missing GPU is one line and exit 2
        args.torch_device = choose_device(args.device)
    except DeviceUnavailable as e:
        print(f"realtime-avatar {args.command}: {e}", file=sys.stderr)
        return 2
    from .engines import EngineError
    from .models.registry import ModelLoadError
    from .whisper_weights import WhisperWeightsError

    try:
        return args.func(args)
    except (AudioSourceError, AvatarError, EngineError, ModelLoadError, WhisperWeightsError) as e:
        # user-facing errors already say which file and what to do: no traceback
        print(f"realtime-avatar {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
