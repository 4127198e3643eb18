"""One command for a lent GPU machine: the CUDA-marked tests and the frame-engine benchmark.

    # here (the dev machine, once): carry what a bare CUDA + PyTorch image lacks
    .venv/bin/python benchmarks/gpu_check.py --pack gpu_check_carry
    # there (Python 3.12, torch + CUDA, numpy, OpenCV; no network, no downloads)
    python benchmarks/gpu_check.py --carry gpu_check_carry --out $OUT/gpu_check.json

Under 5 minutes on an H200 (2026-11-30: 227 s, of which compiling the buckets ~2 min; --quick
for less; --configs/--levels/--skip-tests/--skip-encoder for a part alone). It never downloads
anything. Its results so far: benchmarks/results/gpu_check_h200.json.

What a bare image may lack, and what happens then:

    pytest, pluggy, iniconfig, packaging,   pure Python: copied into the carry folder by --pack
    openai-whisper, tqdm
    numba, tiktoken (whisper's imports     replaced by empty stand-ins: only the transcription
      for transcription, not the encoder)  code whisper never runs here uses them
    mediapipe (avatar preparation)         the avatars are prepared here and carried, one per
                                           weights the run may use (trained / seeded random)
    safetensors (trained weights)          the seeded random compact model (same network, same
                                           compute; the CPU reference uses the same weights)
    PyAV, aiortc (WebRTC)                  not needed: no network part runs there

Without CUDA (as on the dev machine) it runs anyway: the CUDA tests report skipped, the
benchmark runs a short CPU pass, and the table says there was no GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PURE_PYTHON = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "whisper", "tqdm", "more_itertools", "py.py")
STAND_INS = ("numba", "tiktoken")  # imported by whisper's transcription code only
OPTIONAL = ("whisper", "mediapipe", "safetensors", "av", "aiortc", "onnxruntime", "pytest", "cv2")
AVATAR_ENV = "REALTIME_AVATAR_GPU_CHECK_AVATAR"
CUDA_TESTS = "tests/test_frame_engine_cuda.py"


# -- packing (dev machine) ----------------------------------------------------------------------


def pack(folder: Path) -> None:
    """Copy the pure-Python packages and one prepared avatar per model weights into `folder`."""
    import torch

    from realtime_avatar.avatar import AvatarSettings, default_avatar_source, load_or_prepare_avatar
    from realtime_avatar.models.compact import CompactModel
    from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS, load_model

    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    for name in PURE_PYTHON:
        spec = importlib.util.find_spec(name.removesuffix(".py"))
        if spec is None or spec.origin is None:
            print(f"  {name}: not installed here, not carried")
            continue
        src = Path(spec.origin)
        src = src.parent if src.name == "__init__.py" else src
        dst = site / src.name
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    torch.set_num_threads(2)
    models = [CompactModel.random(seed=0)]
    if DEFAULT_COMPACT_WEIGHTS.is_file():
        models.append(load_model("default"))
    for model in models:
        out = folder / f"avatar-{model.weights_hash()}"
        load_or_prepare_avatar(default_avatar_source(), out, model, AvatarSettings(idle_seconds=0.4), progress=False)
        print(f"  avatar for {model.model_id} {model.weights_hash()}: {out}")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"packed {folder} ({size / 2**20:.1f} MiB)")


# -- environment ----------------------------------------------------------------------------------


def use_carry(folder: Path | None) -> list[str]:
    """Put the carried packages after the installed ones on sys.path; stand in for numba and
    tiktoken when missing. Returns what was stood in for."""
    if folder is not None and (folder / "site").is_dir():
        sys.path.append(str(folder / "site"))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(folder / "site")]))
    stood_in = []
    for name in STAND_INS:
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.jit = lambda *a, **k: (lambda f: f)  # numba.jit(...) as a decorator
            sys.modules[name] = module
            stood_in.append(name)
    return stood_in


def environment() -> dict:
    import numpy
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "cuda": torch.cuda.is_available()}
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda_version"] = torch.version.cuda
    for name in OPTIONAL:
        try:
            module = importlib.import_module(name)
            env[name] = getattr(module, "__version__", "yes")
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
            env[name] = f"missing ({type(exc).__name__})"
    return env


def model_and_avatar(carry: Path | None):
    """The compact model (trained when safetensors and the weights are here, else seeded
    random) and a prepared avatar for exactly those weights (carried, or prepared here)."""
    from realtime_avatar.avatar import AvatarSettings, default_avatar_source, load_avatar, load_or_prepare_avatar
    from realtime_avatar.models.compact import CompactModel

    model = None
    try:
        from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS, load_model

        if DEFAULT_COMPACT_WEIGHTS.is_file():
            model = load_model("default")
    except ImportError:
        pass
    weights = "trained"
    if model is None:
        model, weights = CompactModel.random(seed=0), "random (seeded)"
    packed = carry / f"avatar-{model.weights_hash()}" if carry is not None else None
    if packed is not None and packed.is_dir():
        return model, weights, load_avatar(packed), str(packed)
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return model, weights, None, "no carried avatar for these weights and no mediapipe to prepare one"
    from realtime_avatar.avatar import avatar_cache_root

    folder = avatar_cache_root() / "avatars" / f"gpu-check-{model.weights_hash()}"
    avatar = load_or_prepare_avatar(default_avatar_source(), folder, model, AvatarSettings(idle_seconds=0.4),
                                    progress=False)
    return model, weights, avatar, str(folder)


# -- the two parts --------------------------------------------------------------------------------


class _Collect:
    """A pytest plugin that keeps each test's outcome."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            reason = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                reason = report.longrepr[2]
            elif report.failed:
                reason = str(report.longrepr).strip().splitlines()[-1][:160]
            self.rows.append({"test": report.nodeid.split("::")[-1], "outcome": report.outcome,
                              "seconds": round(report.duration, 2), "detail": reason})


def run_cuda_tests(avatar_dir: str | None) -> list[dict]:
    try:
        import pytest
    except ImportError:
        return [{"test": CUDA_TESTS, "outcome": "not run", "seconds": 0, "detail": "pytest is not importable"}]
    if avatar_dir:
        os.environ[AVATAR_ENV] = avatar_dir
    collect = _Collect()
    pytest.main([str(REPO / CUDA_TESTS), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                 "-W", "ignore::pytest.PytestConfigWarning"], plugins=[collect])
    return collect.rows


# The compiled configurations capture these buckets only (the runtime's default is frame_engine.
# BUCKETS, 1..256 in powers of two): every bucket is two graphs to compile (model, compose), and
# the lent machine's minutes are few. The throughput batches are buckets, so nothing is padded.
GPU_BUCKETS = (1, 8, 32, 64, 256)


def run_benchmark(model, avatar, cuda: bool, quick: bool, deadline: float, save,
                  only: list[tuple[str, str]] | None = None, only_levels: list[int] | None = None) -> list[dict]:
    """The frame engine's frames/s per batch and the synthetic sessions it holds at 25 fps, per
    (device, step, frame format). Each configuration is a part of its own: one that fails is
    recorded with its error and the next one runs; `save(rows)` after each."""
    import numpy as np
    import torch

    from bench_frame_engine import synthetic, throughput
    from realtime_avatar.frame_engine import BUCKETS, FrameEngine

    windows = torch.randn(256, 50, 384, generator=torch.Generator().manual_seed(0)).numpy().astype(np.float32)
    if cuda:
        import copy

        from realtime_avatar.models.compact import CompactModel

        configs = [("cuda", "torch", "bgr24"), ("cuda", "compiled", "bgr24"), ("cuda", "compiled", "yuv420p")]
        batches = list(GPU_BUCKETS) if not quick else [1, 32, 256]
        levels = [1, 16, 64, 128, 192, 256, 384, 512, 1024]
        seconds, per_batch = (4.0, 1.0) if not quick else (2.0, 0.3)
    else:
        configs = [("cpu", "torch", "bgr24")]
        batches, levels, seconds, per_batch = [1, 4], [1, 2], 2.0, 0.3
    if only:
        configs = [c for c in configs if (c[1], c[2]) in only]
    if only_levels:
        levels = only_levels
    rows = []
    for device, step, fmt in configs:
        row = {"device": device, "backend": step, "format": fmt}
        rows.append(row)
        if time.monotonic() > deadline:
            row["skipped"] = "time budget spent"
            continue
        t0 = time.monotonic()
        try:
            m = model if device == "cpu" else CompactModel(copy.deepcopy(model.net), device=device, notes=model.notes)
            engine = FrameEngine(m, device, step=step, frame_format=fmt,
                                 buckets=GPU_BUCKETS if step == "compiled" else BUCKETS)
            slot = engine.add_avatar(avatar)
            row["precision"] = engine.precision
            row["warm_up_s"] = round(engine.warm_up(), 1)
            for r in throughput(engine, slot, windows, batches, per_batch):
                row[f"fps@b{r['batch']}"] = r["frames_per_s"]
            save(rows)
            row["synthetic"] = synthetic(engine, slot, windows, levels, seconds, 0.15)
            held = [r["sessions"] for r in row["synthetic"] if r["holds_25fps"]]
            row["sessions_at_25fps"] = max(held) if held else 0
        except Exception as exc:  # noqa: BLE001 - record it and go on with the next part
            row["error"] = failure(exc)
        row["part_s"] = round(time.monotonic() - t0, 1)
        save(rows)
    return rows


def run_encoder_batching(cuda: bool) -> list[dict]:
    """ms per call of the Whisper encoder (tiny's shape, seeded random weights: the time does
    not depend on the values) for N sessions' 2 s windows in one call (EncoderBatcher), fp32."""
    import torch

    from realtime_avatar.encoder_batching import EncodeRequest, EncoderBatcher
    from whisper.model import AudioEncoder

    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    encoder = AudioEncoder(n_mels=80, n_ctx=1500, n_state=384, n_head=6, n_layer=4).eval().to(device)
    batcher = EncoderBatcher(encoder)
    rows = []
    for n in ([1, 8, 64, 256] if cuda else [1, 4]):
        mels = torch.randn(n, 80, 200, generator=torch.Generator().manual_seed(n)).to(device)
        requests = [EncodeRequest(mels[i], 10 * (i % 100), "v15") for i in range(n)]  # offsets < 1500 - 100
        with torch.inference_mode():
            batcher.encode_now(requests)
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.0 or calls < 3:
                states = batcher.encode_now(requests)
                calls += 1
            if cuda:
                torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t0) / calls
        rows.append({"windows": n, "window_s": 2.0, "ms_per_call": round(ms, 2),
                     "windows_per_s": round(1000 * n / ms, 1), "out_shape": list(states[0].shape)})
    return rows


def failure(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(exc)[-6:])[-1500:]


def table(rows: list[dict], columns: list[str]) -> str:
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(str(r.get(c, "")) for c in columns) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, default=None, help="dev machine: write the carry folder and exit")
    p.add_argument("--carry", type=Path, default=REPO / "gpu_check_carry",
                   help="the carry folder made by --pack (default gpu_check_carry/)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--quick", action="store_true", help="fewer batches and sessions (about a minute)")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new benchmark parts after this")
    p.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    p.add_argument("--configs", default=None,
                   help="only these frame-engine configurations, e.g. compiled:yuv420p,torch:bgr24")
    p.add_argument("--levels", default=None, help="synthetic session counts, e.g. 384,448,512")
    p.add_argument("--skip-encoder", action="store_true", help="no Whisper encoder timing")
    args = p.parse_args(argv)
    if args.pack is not None:
        pack(args.pack)
        return 0
    t0 = time.monotonic()
    carry = args.carry if args.carry.is_dir() else None
    stood_in = use_carry(carry)
    env = environment()
    env["stood_in"] = stood_in
    print(table([env], list(env)))
    if not env["cuda"]:
        print("\nno CUDA GPU visible to torch: the CUDA tests will report skipped and the benchmark runs "
              "a short CPU pass")
    model, weights, avatar, avatar_from = model_and_avatar(carry)
    print(f"\nmodel {model.model_id} {model.weights_hash()} ({weights}); avatar: {avatar_from}")
    result = {"environment": env, "weights": weights, "avatar": avatar_from}

    def save(**parts) -> None:
        # written after every part: a run cut off by its time limit still leaves what it measured
        result.update(parts)
        result["seconds"] = round(time.monotonic() - t0, 1)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    if not args.skip_tests:
        save(tests=run_cuda_tests(avatar_from if avatar is not None else None))
        print("\nCUDA tests\n" + table(result["tests"], ["test", "outcome", "seconds", "detail"]), flush=True)
    if not args.skip_encoder:
        try:
            save(encoder=run_encoder_batching(env["cuda"]))
        except Exception as exc:  # noqa: BLE001
            save(encoder=[{"error": failure(exc)}])
        print("\nWhisper encoder, N sessions' windows in one call\n"
              + table(result["encoder"], list(result["encoder"][0])), flush=True)
    if avatar is None:
        save(benchmark=[{"skipped": avatar_from}])
    else:
        only = [tuple(c.split(":")) for c in args.configs.split(",")] if args.configs else None
        levels = [int(n) for n in args.levels.split(",")] if args.levels else None
        run_benchmark(model, avatar, env["cuda"], args.quick, t0 + args.budget_s, lambda rows: save(benchmark=rows),
                      only, levels)
        columns = sorted({k for r in result["benchmark"] for k in r if k not in ("synthetic", "error")},
                         key=lambda c: (not c.isalpha(), c))
        print("\nframe engine (frames/s at batch b; sessions holding 25 fps)\n" + table(result["benchmark"], columns))
        for r in result["benchmark"]:
            if "error" in r:
                print(f"\n{r['device']} {r['backend']} {r['format']} FAILED:\n{r['error']}")
    save()
    print(f"\ngpu_check done in {result['seconds']} s")
    failed = [t for t in result.get("tests", []) if t["outcome"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
