"""Per-stage latency of the live pipeline, per packet / encoder hop / model call / frame.

Each stage runs on real data the way a live session runs it, one call at a time, and every call
is timed (median, p90, p99, max in ms):

    resample      48 kHz stereo s16 20 ms packets (what WebRTC delivers) -> 16 kHz mono (soxr)
    encoder hop   one StreamingWhisper run, for the model's live setting and the MuseTalk parity
                  setting (4 s window, 0.2 s hop, 0.5 s lookahead)
    windows       StreamingFrameWindows.push of one hop's features -> that hop's frame windows
    unet/decoder  the renderer model split in two (compact family: model.net.unet and
                  model.net.decoder), per batch size and torch precision; the decoder also on the
                  latent rows the render graph decodes (patch rows 96-255: what the blend reads)
    render graph  model.render (UNet + decoder + uint8 patches) per backend: torch fp32, torch
                  bf16 autocast, ONNX Runtime (realtime_avatar.engines) when it loads here; a CPU
                  engine split across one-thread sessions (engine_runners.cpu_shards) is also
                  run on one whole-core session (`onnx-1session`), for the ratio
    blend         one 256x256 patch pasted into its avatar frame (Avatar.compose_into)
    renderer      AvatarRenderer.render: everything a session calls per batch, blend included
    video encode  one avatar frame through aiortc's own VP8 and H.264 encoders (what is sent)

    .venv/bin/python benchmarks/bench_stages.py [--quick] [--batches 1,4,8] [--plots DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

# before torch: realtime_avatar sets OMP_WAIT_POLICY=PASSIVE, which libgomp reads when torch
# loads it; measured as the CLI runs (spinning OpenMP threads slow the other pools here)
import realtime_avatar  # noqa: F401
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from realtime_avatar.audio_ring import AudioRing  # noqa: E402
from realtime_avatar.audio_sources import StreamResampler  # noqa: E402
from realtime_avatar.frame_windows import StreamingFrameWindows, offline_frame_windows  # noqa: E402
from realtime_avatar.models.compact import CompactRenderGraph  # noqa: E402
from realtime_avatar.session import VIDEO_CLOCK_RATE, VIDEO_TIME_BASE  # noqa: E402
from realtime_avatar.streaming_whisper import StreamingConfig, StreamingWhisper  # noqa: E402
from realtime_avatar.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FEATURE  # noqa: E402

PARITY = StreamingConfig()  # MuseTalk parity: 4 s window, 0.2 s hop, 0.5 s lookahead


def _row(stage: str, setting: str, per_call_ms: list[float], frames_per_call: float | None = None) -> dict:
    stats = common.summarize(per_call_ms, 3)
    row = {"stage": stage, "setting": setting, **{k: stats[k] for k in ("n", "median", "p90", "p99", "max")}}
    if frames_per_call:
        row["frames_per_call"] = round(frames_per_call, 2)
        row["per_frame_ms"] = round(stats["median"] / frames_per_call, 3) if stats["median"] is not None else None
    return row


def _copy_net(net, memory_format=torch.contiguous_format):
    """A separate copy of a compact net (changing the memory format of the runtime's own
    parameters would change what the other rows measure)."""
    copy = type(net)(net.config)
    copy.load_state_dict(net.state_dict())
    return copy.to(memory_format=memory_format).eval().requires_grad_(False)


def bench_resample(audio48: np.ndarray, packets: int) -> dict:
    """Per 20 ms packet: 960 stereo s16 frames -> 320 mono float32 samples at 16 kHz."""
    packet = int(common.PACKET_S * common.WEBRTC_RATE)
    pcm = np.clip(audio48 * 32767, -32768, 32767).astype(np.int16)
    stereo = np.repeat(pcm[:, None], 2, axis=1)
    resampler = StreamResampler(common.WEBRTC_RATE, 2)
    times = []
    for k in range(packets):
        chunk = stereo[(k * packet) % (len(stereo) - packet):][:packet]
        t0 = time.perf_counter()
        resampler.process(chunk)
        times.append(1000 * (time.perf_counter() - t0))
    return _row("resample 48k stereo -> 16k", "per 20 ms packet", times[5:])


def bench_encoder(encoder, audio16: np.ndarray, config: StreamingConfig, label: str) -> tuple[dict, dict]:
    """Encoder runs as a live stream makes them (20 ms packets), and the window assembly of
    each run's features."""
    ring = AudioRing(len(audio16) + SAMPLE_RATE)
    whisper = StreamingWhisper(encoder, ring, config)
    windows = StreamingFrameWindows()
    run_ms, window_ms = [], []
    for i in range(0, len(audio16), SAMPLES_PER_FEATURE):
        ring.write(audio16[i : i + SAMPLES_PER_FEATURE])
        while (plan := whisper.plan()) is not None:
            t0 = time.perf_counter()
            block = whisper.run(plan)
            t1 = time.perf_counter()
            windows.push(block.first_index, block.states)
            t2 = time.perf_counter()
            run_ms.append(1000 * (t1 - t0))
            window_ms.append(1000 * (t2 - t1))
    setting = f"{label}: window {config.window_s:g} s, hop {config.hop_s:g} s, lookahead {config.lookahead_s:g} s"
    return _row("whisper encoder hop", setting, run_ms[1:]), _row("window assembly", setting, window_ms[1:])


def _inputs(batch: int, windows: np.ndarray, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = [k % len(latents) for k in range(batch)]
    audio = torch.from_numpy(np.ascontiguousarray(windows[[k % len(windows) for k in range(batch)]]))
    return latents[idx].contiguous(), audio


def bench_split(nets: dict, batch: int, windows: np.ndarray, latents: torch.Tensor, repeats: int) -> list[dict]:
    """UNet and latent decoder timed apart (compact family: model.net.unet, model.net.decoder)."""
    rows = []
    lat, audio = _inputs(batch, windows, latents)
    for precision, net in nets.items():
        memory_format = torch.channels_last if precision == "bf16" else torch.contiguous_format
        x = lat.contiguous(memory_format=memory_format)

        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

        with torch.inference_mode():
            with autocast():
                latent_out = net.unet(x, audio)

            def unet():
                with autocast():
                    net.unet(x, audio)

            def decoder():
                with autocast():
                    net.decoder(latent_out)

            rows.append(_row("unet", f"torch {precision}, batch {batch}", common.time_calls(unet, repeats), batch))
            rows.append(_row("decoder", f"torch {precision}, batch {batch}", common.time_calls(decoder, repeats), batch))
            graph = CompactRenderGraph(net)  # the rows engines and the frame engine decode
            drawn_rows = latent_out[:, :, graph.first_latent_row :].contiguous(memory_format=memory_format)

            def decoder_drawn_rows():
                with autocast():
                    net.decoder(drawn_rows)

            rows.append(_row(f"decoder, patch rows {graph.rows_from}-255", f"torch {precision}, batch {batch}",
                             common.time_calls(decoder_drawn_rows, repeats), batch))
    return rows


def base_model(model):
    """The family's own model under an engine wrapper (realtime_avatar.engines.BackendModel)."""
    return model.model if hasattr(model, "backend_name") and hasattr(model, "model") else model


def split_nets(model) -> dict:
    """{precision: net} for models that split into .net.unet and .net.decoder (compact family)."""
    net = getattr(base_model(model), "net", None)
    if net is None or not hasattr(net, "unet") or not hasattr(net, "decoder"):
        return {}
    return {"fp32": net, "bf16": _copy_net(net, torch.channels_last)}


def backends_for(model, threads: int, quick: bool) -> tuple[dict, dict]:
    """RendererModels per backend available here, and why the others are not."""
    from realtime_avatar.models.compact import CompactModel

    model = base_model(model)
    out, skipped = {"torch-fp32": model}, {}
    if isinstance(model, CompactModel):
        out["torch-bf16"] = CompactModel(_copy_net(model.net), precision="bf16", channels_last=True,
                                         notes=model.notes)
    try:
        from export.engine_build import select_or_build
        from realtime_avatar.engines import EngineError
    except ImportError as exc:
        skipped["onnx"] = f"realtime_avatar.engines not importable ({exc})"
        return out, skipped
    try:
        out["onnx"] = select_or_build(model, "onnx", threads=threads)
    except (EngineError, ImportError, OSError) as exc:
        skipped["onnx"] = str(exc)
        return out, skipped
    onnx = out["onnx"]
    if getattr(onnx.runner, "shards", 1) > 1:  # the same engine on one session, for the ratio
        from realtime_avatar.engines import BackendModel
        from realtime_avatar.engine_runners import OnnxRuntimeRunner

        whole = OnnxRuntimeRunner(onnx.runner.path, threads=threads, shards=1)
        out["onnx-1session"] = BackendModel(model, "onnx", whole, engine_dir=onnx.engine_dir,
                                            manifest=onnx.manifest, gate=onnx.gate)
    return out, skipped


def bench_render_graph(models: dict, batch: int, windows: np.ndarray, latents: torch.Tensor, repeats: int) -> list[dict]:
    rows = []
    for name, model in models.items():
        lat, audio = _inputs(batch, windows, latents)
        with torch.inference_mode():
            times = common.time_calls(lambda: model.render(lat, audio), repeats)
        drawn = f", rows {model.rows_from}-255" if getattr(model, "rows_from", 0) and name.startswith("onnx") else ""
        rows.append(_row("render graph (unet+decoder+uint8)", f"{name}, batch {batch}{drawn}", times, batch))
    return rows


def bench_renderer(renderer, batch: int, windows: np.ndarray, repeats: int) -> dict:
    positions = list(range(batch))
    w = np.ascontiguousarray(windows[:batch])
    times = common.time_calls(lambda: renderer.render(positions, w), repeats)
    backend = getattr(renderer.model, "backend_name", "torch")
    return _row("AvatarRenderer.render (graph + blend)", f"runtime ({backend}), batch {batch}", times, batch)


def bench_blend(avatar, patches: np.ndarray, repeats: int) -> dict:
    out = avatar.new_frame_buffer()
    k = iter(range(10**9))

    def blend():
        i = next(k)
        avatar.compose_into(out, patches[i % len(patches)], i)

    return _row("blend patch into frame", f"{avatar.frame_shape[1]}x{avatar.frame_shape[0]} frame", common.time_calls(blend, repeats))


def bench_video_encode(frames: list[np.ndarray], repeats: int) -> list[dict]:
    """aiortc's own encoders (the ones its RTCRtpSender calls), real frames of the avatar."""
    import av
    from aiortc.codecs.h264 import H264Encoder
    from aiortc.codecs.vpx import Vp8Encoder

    rows = []
    for name, encoder in (("VP8 (aiortc, libvpx)", Vp8Encoder()), ("H.264 (aiortc, libx264)", H264Encoder())):
        times = []
        for n in range(repeats + 5):
            frame = av.VideoFrame.from_ndarray(frames[n % len(frames)], format="bgr24")
            frame.pts = n * (VIDEO_CLOCK_RATE // FPS)
            frame.time_base = VIDEO_TIME_BASE
            t0 = time.perf_counter()
            encoder.encode(frame, force_keyframe=(n == 0))
            times.append(1000 * (time.perf_counter() - t0))
        h, w = frames[0].shape[:2]
        rows.append(_row("video encode", f"{name} {w}x{h}", times[5:]))
    return rows


def run(args: argparse.Namespace, bench: common.BenchRuntime | None = None) -> dict:
    bench = bench or common.load_bench_runtime(args.quick, threads=args.threads, backend=args.backend, model=args.model)
    rt = bench.runtime
    repeats = args.repeats or (3 if args.quick else 60)
    batches = [int(b) for b in (args.batches or ("1,4" if args.quick else "1,4,8")).split(",")]
    seconds = 2.0 if args.quick else 12.0
    audio16 = common.speech_of_length(seconds, SAMPLE_RATE)
    audio48 = common.speech_of_length(min(seconds, 4.0), common.WEBRTC_RATE)

    rows = [bench_resample(audio48, 30 if args.quick else 1000)]
    for config, label in ((rt.streaming, "live (model's setting)"), (PARITY, "MuseTalk parity")):
        rows += bench_encoder(rt.encoder, audio16, config, label)

    windows = offline_frame_windows(rt.clip_features(audio16))
    latents = rt.avatar.latents_at(list(range(max(8, *batches))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models, skipped = backends_for(rt.model, args.threads, args.quick)
    nets = split_nets(rt.model)
    for batch in batches:
        rows += bench_split(nets, batch, windows, latents, repeats)
    for batch in batches:
        rows += bench_render_graph(models, batch, windows, latents, repeats)
    for batch in batches:
        rows.append(bench_renderer(rt.renderer, batch, windows, max(3, repeats // 2)))

    with torch.inference_mode():
        patches = rt.model.render(latents[:8], torch.from_numpy(np.ascontiguousarray(windows[:8])))
    rows.append(bench_blend(rt.avatar, patches, max(20, repeats * 4)))
    frames = rt.renderer.render(list(range(4)), np.ascontiguousarray(windows[8:12]))
    frames += [rt.renderer.idle_frame(p) for p in range(4)]
    rows += bench_video_encode(frames, max(10, repeats * 4))

    result = common.header("stages", args, bench)
    result["settings"] = {"repeats": repeats, "batches": batches, "speech_s": seconds}
    result["backends"] = {name: getattr(m, "description", None) or getattr(m, "precision", name)
                          for name, m in models.items()}
    result["backends_skipped"] = skipped
    result["rows"] = rows
    result["per_frame_budget_ms"] = round(1000 / FPS, 1)
    result["plots"] = plot(result, args.plots)
    return result


def markdown(result: dict) -> str:
    cols = ["stage", "setting", "median", "p90", "p99", "max", "per_frame_ms", "n"]
    text = "Stage latency (ms per call; per_frame_ms = median / frames per call)\n\n"
    text += common.markdown_table(result["rows"], cols)
    if result.get("backends_skipped"):
        text += "\nBackends not measured: " + "; ".join(f"{k}: {v}" for k, v in result["backends_skipped"].items()) + "\n"
    return text


def plot(result: dict, plots: Path | None) -> list[str]:
    if plots is None:
        return []
    plt = common.pyplot()
    rows = [r for r in result["rows"] if r.get("median") is not None]
    labels = [f"{r['stage']} | {r['setting']}" for r in rows]
    per_frame = [r.get("per_frame_ms") or r["median"] for r in rows]
    p99 = [r["p99"] / r.get("frames_per_call", 1) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(rows) + 1.2))
    y = np.arange(len(rows))
    ax.barh(y, per_frame, color="tab:blue", label="median (per frame where a call makes several)")
    ax.plot(p99, y, "k|", markersize=6, label="p99")
    ax.axvline(result["per_frame_budget_ms"], color="tab:red", lw=0.8, label="40 ms frame period")
    ax.set_yticks(y, labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms (log scale)")
    ax.set_title("Per-stage latency")
    ax.legend(fontsize=6, loc="lower right")
    return [p for p in [common.save_figure(fig, plots, "stages")] if p]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batches", default=None, help="model batch sizes (default 1,4,8; --quick 1,4)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 60; --quick 3)")
    return p


def main(argv: list[str] | None = None, bench: common.BenchRuntime | None = None) -> dict:
    args = parser().parse_args(argv)
    return common.finish(run(args, bench), args, markdown)


if __name__ == "__main__":
    main()
