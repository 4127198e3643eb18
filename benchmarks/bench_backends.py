"""Patches per second of the compact model's render() per run-time backend and batch size.

    .venv/bin/python benchmarks/bench_backends.py [--weights file.safetensors]
        [--batches 1,4,8,16] [--runs 5] [--seconds 1.0] [--threads 2]
        [--backends torch-fp32,torch-bf16-cl,ort-fp32]

What is timed is the whole render() the renderer calls (graph + uint8 BGR conversion), under
torch.inference_mode as in AvatarRenderer:

    torch-fp32      the CompactModel itself, eager fp32 (the "torch" backend)
    torch-bf16-cl   the CompactModel with bf16 autocast and channels_last weights
    ort-fp32        select_backend(model, "onnx"): the ONNX Runtime engine with the project's
                    CPU settings (built into a temporary engines folder, accuracy-gated)
    ort-fp32-spin   the same engine with spinning worker threads (for the record: see
                    ort_session_options)

Cells are interleaved across runs so that load from other processes spreads over all of them;
medians are reported, with the load average before and after. Run it with and without
OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads spin after each op by default, which decides
torch's speed whenever other work shares the cores. The ratio ORT / torch eager
fp32 is reported at batch 1 and at ORT's best batch. Prints one JSON object, then a table.
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

import torch

from export.engine_build import select_or_build  # noqa: E402
from realtime_avatar.engines import BackendModel, OnnxRuntimeRunner, example_inputs
from realtime_avatar.models.compact import CompactModel, CompactNet

BACKENDS = ("torch-fp32", "torch-bf16-cl", "ort-fp32", "ort-fp32-spin")


def patches_per_second(render: Callable, latents: torch.Tensor, audio: torch.Tensor, seconds: float) -> float:
    with torch.inference_mode():
        render(latents, audio)  # warm-up for this shape
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or calls < 2:
            render(latents, audio)
            calls += 1
    return calls * len(latents) / elapsed


def copy_model(model: CompactModel, **kwargs) -> CompactModel:
    net = CompactNet(model.config)
    net.load_state_dict(model.net.state_dict())
    return CompactModel(net, **kwargs)


def make_renderers(model: CompactModel, backends: list[str], engines_dir: Path, threads: int) -> dict[str, Callable]:
    renderers: dict[str, Callable] = {}
    onnx_engine = None
    for backend in backends:
        if backend == "torch-fp32":
            renderers[backend] = copy_model(model).render
        elif backend == "torch-bf16-cl":
            renderers[backend] = copy_model(model, precision="bf16", channels_last=True).render
        elif backend in ("ort-fp32", "ort-fp32-spin"):
            if onnx_engine is None:
                onnx_engine = select_or_build(model, "onnx", engines_dir, precision="fp32", threads=threads)
            if backend == "ort-fp32":
                renderers[backend] = onnx_engine.render
            else:
                runner = OnnxRuntimeRunner(onnx_engine.engine_dir / onnx_engine.manifest.engine_file, threads=threads, spin=True)
                renderers[backend] = BackendModel(model, "onnx", runner).render
        else:
            raise SystemExit(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return renderers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="compact-v1 safetensors (default: random init; speed is the same)")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per cell per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="torch-fp32,torch-bf16-cl,ort-fp32")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    backends = args.backends.split(",")
    model = CompactModel.load(args.weights) if args.weights else CompactModel.random(seed=0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as engines_dir:
        renderers = make_renderers(model, backends, Path(engines_dir), args.threads)
        samples: dict[tuple[str, int], list[float]] = {(b, n): [] for b in backends for n in batches}
        for _ in range(args.runs):
            for batch in batches:
                latents, audio = example_inputs(model, batch, seed=1)
                for backend in backends:
                    samples[backend, batch].append(patches_per_second(renderers[backend], latents, audio, args.seconds))
    load_after = os.getloadavg()

    medians = {b: {n: statistics.median(samples[b, n]) for n in batches} for b in backends}
    ratios = {}
    if "ort-fp32" in backends and "torch-fp32" in backends:
        best = max(batches, key=lambda n: medians["ort-fp32"][n])
        torch_best = max(batches, key=lambda n: medians["torch-fp32"][n])
        ratios = {
            "ort_over_torch_fp32_at_batch_1": round(medians["ort-fp32"][1] / medians["torch-fp32"][1], 2)
            if 1 in batches else None,
            "ort_best_batch": best,
            "ort_over_torch_fp32_at_ort_best_batch": round(medians["ort-fp32"][best] / medians["torch-fp32"][best], 2),
            "ort_best_over_torch_fp32_best": round(medians["ort-fp32"][best] / medians["torch-fp32"][torch_best], 2),
        }
    result = {
        "model": model.model_id,
        "weights": str(args.weights) if args.weights else "random",
        "threads": args.threads,
        "cpu_cores": os.cpu_count(),
        "runs": args.runs,
        "seconds_per_cell": args.seconds,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "torch": torch.__version__,
        # libgomp threads spin ~ms after each parallel region unless PASSIVE: under shared
        # load that decides torch's speed (and ORT's, when torch ran just before it)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "patches_per_s_median": {b: {str(n): round(v, 1) for n, v in medians[b].items()} for b in backends},
        "patches_per_s_all_runs": {b: {str(n): [round(v, 1) for v in samples[b, n]] for n in batches} for b in backends},
        **ratios,
    }
    print(json.dumps(result))
    print()
    print(f"{'backend':<16}" + "".join(f"{'batch ' + str(n):>10}" for n in batches))
    for backend in backends:
        print(f"{backend:<16}" + "".join(f"{medians[backend][n]:>10.1f}" for n in batches))
    print("(patches/s: render() incl. uint8 conversion, median of runs)")
    for key, value in ratios.items():
        print(f"{key}: {value}")
    print(f"load average before {result['loadavg_before']}, after {result['loadavg_after']}; "
          f"OMP_WAIT_POLICY {result['omp_wait_policy']}")


if __name__ == "__main__":
    main()
