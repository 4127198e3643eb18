"""Build, check and time the render engines of a model (build time).

    python -m export.build_engines --model SPEC [--backend onnx|tensorrt]
        [--precision fp32|fp16] [--batch 1,4,8,16] [--engines-dir DIR] [--rebuild]

onnx      one ONNX Runtime engine with a dynamic batch (CUDA execution provider when it is
          really active, else CPU); --batch lists the batch sizes it is timed at.
tensorrt  one TensorRT engine per --batch entry, each with a static batch profile (GPU
          hosts with TensorRT only; on other machines this says so and exits with status 2).

Every engine is checked by the accuracy gate against the torch model before it is kept as
usable (see export/engine_build.py and realtime_avatar/engines.py); then each batch size is timed against the torch
model on the same device. Prints one JSON object, then a table. Exit status: 0 when every
engine passed its gate, 1 when one was refused or failed to build, 2 when the backend
cannot run here.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from export.engine_build import build_engine
from realtime_avatar.engines import (
    BackendModel,
    EngineError,
    example_inputs,
    load_onnx_backend,
    load_tensorrt_backend,
    tensorrt_unavailable_reason,
    TENSORRT_HINT,
)

EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE = 0, 1, 2


def patches_per_second(render: Callable, latents: torch.Tensor, audio: torch.Tensor, seconds: float) -> float:
    """Rendered patches per second of `render(latents, audio)` over about `seconds`."""
    render(latents, audio)  # warm-up: allocator, ORT/TRT first-run setup for this shape
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 2:
        render(latents, audio)
        calls += 1
    return calls * len(latents) / elapsed


def median_speed(render: Callable, model, batch: int, seconds: float, runs: int) -> float:
    latents, audio = example_inputs(model, batch, seed=1)
    return statistics.median(patches_per_second(render, latents, audio, seconds) for _ in range(runs))


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes comma-separated integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"--batch needs batch sizes >= 1, got {text!r}")
    return batches


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.build_engines", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="default", help="model spec: default | compact:<file> | musetalk-v15:<dir>")
    parser.add_argument("--allow-random", action="store_true", help="random weights when 'default' has none (testing)")
    parser.add_argument("--backend", choices=("onnx", "tensorrt"), default="onnx")
    parser.add_argument("--precision", choices=("fp32", "fp16"), help="default: fp16 on a GPU, fp32 on CPU")
    parser.add_argument("--batch", type=parse_batches, default=[1, 4, 8, 16], help="e.g. 1,4,8,16")
    parser.add_argument("--engines-dir", type=Path, help="default: $REALTIME_AVATAR_ENGINES or ./engines")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even when a cached engine is usable")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: all cores)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per measurement")
    parser.add_argument("--runs", type=int, default=3, help="measurements per batch size (median)")
    parser.add_argument("--no-torch", action="store_true", help="do not time the torch model for comparison")
    return parser


def build_and_time(args: argparse.Namespace, model) -> tuple[list[dict], bool]:
    """Build (or reuse) and gate each engine, time it; returns rows and whether all passed."""
    rows: list[dict] = []
    all_passed = True
    profiles = args.batch if args.backend == "tensorrt" else [None]  # ONNX: one dynamic engine
    for profile in profiles:
        try:
            if args.backend == "tensorrt":
                engine: BackendModel = load_tensorrt_backend(
                    model, args.engines_dir, precision=args.precision, batch_size=profile, rebuild=args.rebuild,
                    builder=build_engine,
                )
            else:
                engine = load_onnx_backend(
                    model, args.engines_dir, precision=args.precision, rebuild=args.rebuild, threads=args.threads,
                    builder=build_engine,
                )
        except EngineError as exc:
            print(f"engine {args.backend} batch {profile or 'dynamic'}: {exc}", file=sys.stderr)
            all_passed = False
            rows.append({"profile": profile or "dynamic", "error": str(exc)})
            continue
        print(f"{engine.engine_dir}: {engine.gate.describe()}", file=sys.stderr)
        for batch in [profile] if profile else args.batch:
            row = {
                "profile": profile or "dynamic",
                "batch": batch,
                "engine": engine.description,
                "engine_dir": str(engine.engine_dir),
                "gate": engine.gate.to_dict(),
                "engine_patches_per_s": round(median_speed(engine.render, model, batch, args.seconds, args.runs), 1),
            }
            if not args.no_torch:
                torch_speed = median_speed(model.render, model, batch, args.seconds, args.runs)
                row["torch_patches_per_s"] = round(torch_speed, 1)
                row["speedup"] = round(row["engine_patches_per_s"] / torch_speed, 2)
            rows.append(row)
    return rows, all_passed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.backend == "tensorrt":
        reason = tensorrt_unavailable_reason()
        if reason is not None:  # say so before loading a model for nothing
            print(f"TensorRT is not installed / no CUDA GPU: {TENSORRT_HINT} ({reason})", file=sys.stderr)
            return EXIT_UNAVAILABLE
    if args.threads:
        torch.set_num_threads(args.threads)

    from realtime_avatar.models.registry import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device, allow_random=args.allow_random)
    rows, all_passed = build_and_time(args, model)
    print(json.dumps({
        "model": model.model_id,
        "weights_hash": model.weights_hash(),
        "backend": args.backend,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "results": rows,
    }))
    print()
    print(f"{'profile':>8} {'batch':>6} {'engine/s':>10} {'torch/s':>10} {'speedup':>8}  gate")
    for row in rows:
        if "error" in row:
            print(f"{row['profile']!s:>8} {'-':>6} {'-':>10} {'-':>10} {'-':>8}  {row['error'][:80]}")
            continue
        gate = "passed" if row["gate"]["passed"] else "FAILED"
        print(
            f"{row['profile']!s:>8} {row['batch']:>6} {row['engine_patches_per_s']:>10.1f} "
            f"{row.get('torch_patches_per_s', float('nan')):>10.1f} {row.get('speedup', float('nan')):>8.2f}  {gate}"
        )
    print("(patches/s: 256x256 uint8 patches rendered, median of runs)")
    return EXIT_OK if all_passed else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
