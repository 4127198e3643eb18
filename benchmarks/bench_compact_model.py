"""Patches per second of the compact-v1 render graph (UNet + latent decoder) per CPU backend.

    .venv/bin/python benchmarks/bench_compact_model.py [--weights file.safetensors]
        [--batches 1,4,8,16] [--runs 5] [--seconds 1.0] [--threads 2]

Backends: torch fp32; torch bf16 autocast + channels_last; ONNX Runtime fp32 (exported with
the TorchScript exporter, opset 17, dynamic batch). Each (backend, batch) cell is timed for
`--seconds` per run; runs are interleaved across cells so that load from other processes
spreads over all of them, and the median (and best) over runs is reported. The graph's float
output is timed; the uint8 conversion in render() is timed separately, per patch.

On a shared machine wall-clock numbers fall apart (torch's 2-thread pool collapses by 10-100x
when other processes hold the cores). `--clock cpu --threads 1` measures process CPU time
instead: with one thread that is close to the wall time the same work takes on an idle core,
whatever else runs. Prints one JSON object, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# before torch: realtime_avatar sets OMP_WAIT_POLICY=PASSIVE, which libgomp reads when torch
# loads it; measured as the CLI runs (spinning OpenMP threads slow the other pools here)
import realtime_avatar  # noqa: F401
import torch

from realtime_avatar.models.compact import CompactModel, CompactNet, count_parameters, tensor_to_crops
from realtime_avatar.timing import AUDIO_TOKENS, WHISPER_DIM

ONNX_OPSET = 17


def make_inputs(model: CompactModel, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size, channels = model.latent_size, 2 * model.latent_channels
    latents = torch.randn(batch, channels, size, size, generator=generator)
    audio = torch.randn(batch, AUDIO_TOKENS, WHISPER_DIM, generator=generator)
    return latents, audio


def torch_runner(net: CompactNet, precision: str) -> Callable[[torch.Tensor, torch.Tensor], object]:
    channels_last = precision == "bf16"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)

    @torch.no_grad()
    def run(latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        latents = latents.contiguous(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return net(latents, audio)

    return run


def export_onnx(net: CompactNet, path: Path) -> None:
    latents, audio = make_inputs(CompactModel(net), 1)
    torch.onnx.export(
        net,
        (latents, audio),
        str(path),
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=["latents", "audio"],
        output_names=["images"],
        dynamic_axes={"latents": {0: "batch"}, "audio": {0: "batch"}, "images": {0: "batch"}},
    )


def ort_runner(path: Path, threads: int) -> Callable[[torch.Tensor, torch.Tensor], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(latents: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
        return session.run(None, {"latents": latents.numpy(), "audio": audio.numpy()})[0]

    return run


def patches_per_second(
    run: Callable, latents: torch.Tensor, audio: torch.Tensor, seconds: float, clock: Callable[[], float]
) -> float:
    run(latents, audio)  # warm caches / allocator for this shape
    calls, start = 0, clock()
    while (elapsed := clock() - start) < seconds or calls < 2:
        run(latents, audio)
        calls += 1
    return calls * len(latents) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="compact-v1 safetensors (default: random init)")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per cell per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="torch-fp32,torch-bf16-cl,ort-fp32")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    batches = [int(b) for b in args.batches.split(",")]
    model = CompactModel.load(args.weights) if args.weights else CompactModel.random(seed=0)
    net = model.net

    runners: dict[str, Callable] = {}
    backends = args.backends.split(",")
    onnx_max_abs_diff = None
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            if backend == "torch-fp32":
                runners[backend] = torch_runner(CompactModel(net).net, "fp32")
            elif backend == "torch-bf16-cl":
                bf16_net = CompactNet(net.config)
                bf16_net.load_state_dict(net.state_dict())
                runners[backend] = torch_runner(bf16_net.eval(), "bf16")
            elif backend == "ort-fp32":
                onnx_path = Path(tmp) / "compact.onnx"
                export_onnx(net, onnx_path)
                runners[backend] = ort_runner(onnx_path, args.threads)
                latents, audio = make_inputs(model, 4, seed=1)
                with torch.no_grad():
                    reference = net(latents, audio).numpy()
                onnx_max_abs_diff = float(np.abs(runners[backend](latents, audio) - reference).max())
            else:
                parser.error(f"unknown backend {backend}")

        samples: dict[tuple[str, int], list[float]] = {(b, n): [] for b in backends for n in batches}
        for _ in range(args.runs):
            for backend in backends:
                for batch in batches:
                    latents, audio = make_inputs(model, batch)
                    samples[backend, batch].append(
                        patches_per_second(runners[backend], latents, audio, args.seconds, clock)
                    )

    # the uint8 BGR conversion render() adds after the graph, per patch
    images = torch.rand(8, 3, 256, 256)
    start = time.perf_counter()
    for _ in range(20):
        tensor_to_crops(images)
    to_uint8_ms = (time.perf_counter() - start) / (20 * 8) * 1e3

    result = {
        "model": model.model_id,
        "weights": str(args.weights) if args.weights else "random",
        "params": {
            "unet": count_parameters(net.unet),
            "decoder": count_parameters(net.decoder),
            "encoder": count_parameters(net.encoder),
        },
        "threads": args.threads,
        "clock": args.clock,
        "load_average_1min": os.getloadavg()[0],
        "runs": args.runs,
        "onnx_max_abs_diff": onnx_max_abs_diff,
        "to_uint8_ms_per_patch": round(to_uint8_ms, 3),
        "patches_per_s_median": {
            backend: {str(n): round(statistics.median(samples[backend, n]), 1) for n in batches}
            for backend in backends
        },
        "patches_per_s_best": {
            backend: {str(n): round(max(samples[backend, n]), 1) for n in batches} for backend in backends
        },
        "patches_per_s_all_runs": {
            backend: {str(n): [round(v, 1) for v in samples[backend, n]] for n in batches}
            for backend in backends
        },
    }
    print(json.dumps(result))
    print()
    print(f"{'backend':<16}" + "".join(f"{'batch ' + str(n):>16}" for n in batches))
    for backend in backends:
        median, best = result["patches_per_s_median"][backend], result["patches_per_s_best"][backend]
        print(f"{backend:<16}" + "".join(f"{f'{median[str(n)]:.1f} ({best[str(n)]:.1f})':>16}" for n in batches))
    print(
        f"(patches/s: median (best) of {args.runs} runs, {args.clock} clock, {args.threads} threads, "
        f"load average {result['load_average_1min']:.1f}; UNet + decoder graph, float output)"
    )


if __name__ == "__main__":
    main()
