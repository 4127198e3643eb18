"""Frame engine: frames/s by device, backend and number of sessions; real WebRTC sessions.

Three measurements, each printed as JSON and a table (and plotted with --plots):

1. throughput: FrameEngine.render_now() at fixed batch sizes (one model call + one compose
   call per batch): frames/s of the whole frame path, uint8 frames on the host.
2. synthetic sessions (no network, no Whisper): N sessions each asking for 4 frames every
   160 ms (25 fps) with real audio windows, as AvatarSession's render loop does, all through
   the engine's 40 ms ticks. A level holds 25 fps when every session gets >= 24.5 frames/s
   and at most 1% of its frames arrive after their deadline (submit + --budget). The sweep
   doubles N until a level breaks.
3. --webrtc N: the real server (create_app, as `serve`) with N aiortc clients over loopback,
   each speaking for --webrtc-seconds; per session the server's fps / late frames and the
   frames/s the client received.

Devices: every one given with --devices that exists here (cuda is skipped without a GPU, and
the result says so). Backends: torch (eager) and compiled (CUDA graphs per bucket; on a CPU
it is the eager path, so it is measured on CUDA only).

    .venv/bin/python benchmarks/bench_frame_engine.py [--quick] [--devices cpu,cuda]
        [--sessions 1,2,4,8,...] [--webrtc 4 --webrtc-seconds 120] [--plots DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from realtime_avatar.timing import FPS  # noqa: E402

HOLD_FPS = 24.5
HOLD_LATE_SHARE = 0.01
SESSION_BATCH = 4  # frames per request: the session's default batch (160 ms of video)


def _engine(runtime, device: str, step: str, precision: str | None, frame_format: str):
    """A FrameEngine on `device` with the runtime's model weights and avatar."""
    import copy

    import torch

    from realtime_avatar.frame_engine import FrameEngine

    model = runtime.model
    base = getattr(model, "model", model)
    if torch.device(device).type != "cpu":
        from realtime_avatar.models.compact import CompactModel

        base = CompactModel(copy.deepcopy(base.net).cpu(), device=device, notes=getattr(base, "notes", {}))
    engine = FrameEngine(base, device, precision, step=step, frame_format=frame_format)
    slot = engine.add_avatar(runtime.avatar)
    return engine, slot


def _windows(runtime, n: int) -> np.ndarray:
    from realtime_avatar.frame_windows import offline_frame_windows

    windows = offline_frame_windows(runtime.clip_features(common.speech_of_length(4.0)))
    return np.resize(windows, (n, *windows.shape[1:])).astype(np.float32)


def throughput(engine, slot, windows: np.ndarray, batches: list[int], seconds: float) -> list[dict]:
    from realtime_avatar.frame_engine import FrameRequest

    rows = []
    for batch in batches:
        request = FrameRequest(slot, tuple(range(batch)), windows[:batch])
        engine.render_now([request])  # warm-up (and, compiled, capture)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            engine.render_now([request])
            n += 1
        elapsed = time.perf_counter() - t0
        rows.append({"batch": batch, "calls": n, "ms_per_call": round(1000 * elapsed / n, 2),
                     "frames_per_s": round(n * batch / elapsed, 1)})
    return rows


async def _synthetic_level(engine, slot, windows: np.ndarray, sessions: int, seconds: float, budget_s: float) -> dict:
    from realtime_avatar.frame_engine import FrameRequest

    period = SESSION_BATCH / FPS
    loop = asyncio.get_running_loop()

    async def session(k: int) -> dict:
        # sessions start spread over one period, as real sessions do
        await asyncio.sleep(k * period / max(1, sessions))
        t0 = loop.time()
        frames = late = 0
        latencies = []
        i = 0
        while loop.time() - t0 < seconds:
            due = t0 + i * period
            await asyncio.sleep(max(0.0, due - loop.time()))
            start = (k * 13 + i * SESSION_BATCH) % (len(windows) - SESSION_BATCH)
            request = FrameRequest(slot, tuple(range(i * SESSION_BATCH, (i + 1) * SESSION_BATCH)),
                                   windows[start : start + SESSION_BATCH])
            submitted = loop.time()
            await engine.render(request)
            done = loop.time()
            latencies.append(done - submitted)
            frames += SESSION_BATCH
            late += SESSION_BATCH if done - due > budget_s else 0
            i += 1
        elapsed = loop.time() - t0
        return {"fps": frames / elapsed, "late_share": late / max(1, frames), "latency_ms": latencies}

    per = await asyncio.gather(*(session(k) for k in range(sessions)))
    stats = engine.stats()["batches"]
    await engine.close()
    lat = sorted(x for p in per for x in p["latency_ms"])
    return {
        "sessions": sessions,
        "min_session_fps": round(min(p["fps"] for p in per), 2),
        "total_fps": round(sum(p["fps"] for p in per), 1),
        "max_late_share": round(max(p["late_share"] for p in per), 4),
        "latency_ms_median": round(1000 * lat[len(lat) // 2], 1),
        "latency_ms_p99": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
        "mean_batch_frames": stats.get("mean_batch"),
        "holds_25fps": min(p["fps"] for p in per) >= HOLD_FPS and max(p["late_share"] for p in per) <= HOLD_LATE_SHARE,
    }


def synthetic(engine, slot, windows, levels: list[int], seconds: float, budget_s: float) -> list[dict]:
    rows = []
    for n in levels:
        row = asyncio.run(_synthetic_level(engine, slot, windows, n, seconds, budget_s))
        rows.append(row)
        print(f"  {n:4d} sessions: min {row['min_session_fps']:.2f} fps, late {row['max_late_share']:.3f}, "
              f"batch {row['mean_batch_frames']}", file=sys.stderr, flush=True)
        if not row["holds_25fps"]:
            break
    return rows


async def _webrtc(bench, n: int, seconds: float) -> dict:
    import wave

    from realtime_avatar.cli import _session_factory
    from realtime_avatar.server import SERVER_KEY, create_app
    from tests.rtc_client import RtcClient, WavMicrophoneTrack, http_client, serving

    runtime = bench.runtime
    args = argparse.Namespace(session_batch=SESSION_BATCH)
    factory, config = _session_factory(runtime, args)
    app = create_app(factory, max_sessions=n, media_timeout_s=seconds + 30)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        pcm = (np.clip(common.speech_of_length(seconds, common.WEBRTC_RATE), -1, 1) * 32767).astype(np.int16)
        with wave.open(str(wav), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(common.WEBRTC_RATE)
            out.writeframes(pcm.tobytes())
        async with serving(app) as url, http_client() as http:
            clients = [RtcClient(url, WavMicrophoneTrack(wav, total_s=seconds + 1)) for _ in range(n)]
            for client in clients:
                await client.connect(http)
            await asyncio.gather(*(asyncio.wait_for(c.first_video.wait(), 30) for c in clients))
            server = app[SERVER_KEY]
            last: dict[str, dict] = {}  # each peer's newest stats (a peer that closes early keeps its last)
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                await asyncio.sleep(min(2.0, max(0.0, t0 + seconds - time.monotonic())))
                for peer in list(server.peers.values()):
                    last[peer.id] = peer.stats()["session"]
            t1 = time.monotonic()
            still_open = len(server.peers)
            stats = list(last.values())
            received = [c.recording.fps(t0 + 1, t1) for c in clients]
            for client in clients:
                await client.close(http)
    return {
        "sessions": n,
        "seconds": seconds,
        "client_fps": [round(f, 2) for f in received],
        "server_fps": [s["fps"] for s in stats],
        "late_frames": [s["late_frames"] for s in stats],
        "rendered_frames": [s["rendered_frames"] for s in stats],
        "sessions_open_at_end": still_open,
        "engine": runtime.engine.stats(),
        "holds_25fps": bool(stats) and still_open == n and min(received) >= HOLD_FPS
        and all(s["late_frames"] == 0 for s in stats),
    }


def markdown(result: dict) -> str:
    out = []
    for run in result["runs"]:
        out.append(f"### {run['device']} / {run['backend']} / {run['frame_format']}"
                   f"{' (under load)' if result.get('under_load') else ''}\n")
        out.append(common.markdown_table(run["throughput"]))
        out.append("")
        out.append(common.markdown_table(run["synthetic"]))
        out.append("")
    for name in result.get("skipped", []):
        out.append(f"- skipped: {name}")
    if result.get("webrtc"):
        w = result["webrtc"]
        out.append(f"\n### WebRTC: {w['sessions']} sessions, {w['seconds']} s\n")
        out.append(common.markdown_table([{"session": i, "client_fps": f, "server_fps": s, "late_frames": l}
                                          for i, (f, s, l) in enumerate(zip(w["client_fps"], w["server_fps"], w["late_frames"]))]))
    return "\n".join(out)


def plot(result: dict, plots: Path | None) -> list[str]:
    if plots is None:
        return []
    plt = common.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        label = f"{run['device']} {run['backend']} {run['frame_format']}"
        a.plot([r["batch"] for r in run["throughput"]], [r["frames_per_s"] for r in run["throughput"]], "o-", label=label)
        b.plot([r["sessions"] for r in run["synthetic"]], [r["min_session_fps"] for r in run["synthetic"]], "o-", label=label)
    load = " (under load)" if result.get("under_load") else ""
    a.set(xlabel="batch (frames)", ylabel="frames/s", title="frame engine throughput" + load)
    b.axhline(25, color="grey", ls="--")
    b.set(xlabel="synthetic sessions", ylabel="worst session fps", title="sessions at 25 fps" + load)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    return [p for p in [common.save_figure(fig, plots, "frame_engine")] if p]


def run(args: argparse.Namespace, bench: common.BenchRuntime | None = None) -> dict:
    import torch

    bench = bench or common.load_bench_runtime(args.quick, threads=args.threads, backend=args.backend, model=args.model)
    result = common.header("frame_engine", args, bench)
    # other work on the cores makes every figure here a lower bound (the lead reruns on an idle machine)
    result["under_load"] = bool(common.competing_processes()) or os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    result["runs"], result["skipped"] = [], []
    windows = _windows(bench.runtime, 256)
    levels = [int(x) for x in args.sessions.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    for device in args.devices.split(","):
        if device.startswith("cuda") and not torch.cuda.is_available():
            result["skipped"].append(f"{device}: torch sees no CUDA GPU here")
            continue
        for backend in args.engine_backends.split(","):
            if backend == "compiled" and not device.startswith("cuda"):
                result["skipped"].append(f"{device}/compiled: CUDA graphs need CUDA (eager on a CPU)")
                continue
            for frame_format in args.formats.split(","):
                print(f"{device} {backend} {frame_format}", file=sys.stderr, flush=True)
                engine, slot = _engine(bench.runtime, device, backend, args.precision, frame_format)
                warm = engine.warm_up()
                result["runs"].append({
                    "device": device, "backend": backend, "frame_format": frame_format,
                    "precision": engine.precision, "warm_up_s": round(warm, 2),
                    "throughput": throughput(engine, slot, windows, batches, args.seconds_per_batch),
                    "synthetic": synthetic(engine, slot, windows, levels, args.seconds, args.budget),
                })
    if args.webrtc:
        result["webrtc"] = asyncio.run(_webrtc(bench, args.webrtc, args.webrtc_seconds))
    result["plots"] = plot(result, args.plots)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--devices", default="cpu,cuda", help="devices to measure (default cpu,cuda: cuda skipped without a GPU)")
    p.add_argument("--engine-backends", default="torch,compiled", help="frame engine steps (default torch,compiled)")
    p.add_argument("--formats", default="bgr24", help="frame formats: bgr24, yuv420p (default bgr24)")
    p.add_argument("--precision", default=None, help="fp32, fp16, bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--batches", default="1,4,8,16,32", help="throughput batch sizes (default 1,4,8,16,32)")
    p.add_argument("--seconds-per-batch", type=float, default=2.0, help="throughput: seconds per batch size")
    p.add_argument("--sessions", default="1,2,4,8,16", help="synthetic session levels, stops at the first break")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per synthetic level (default 10)")
    p.add_argument("--budget", type=float, default=0.15, help="deadline after a request is due, s (default 0.15: "
                   "SessionConfig.render_budget_s)")
    p.add_argument("--webrtc", type=int, default=0, help="also run N real WebRTC sessions (default 0: no)")
    p.add_argument("--webrtc-seconds", type=float, default=120.0, help="length of the WebRTC run (default 120)")
    return p


def main(argv: list[str] | None = None, bench: common.BenchRuntime | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.quick:
        args.seconds, args.seconds_per_batch = min(args.seconds, 3.0), min(args.seconds_per_batch, 0.5)
        args.webrtc_seconds = min(args.webrtc_seconds, 10.0)  # --quick: a smoke run
    return common.finish(run(args, bench), args, markdown)


if __name__ == "__main__":
    main()
