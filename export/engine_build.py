"""Building engines (build time): ONNX export, TensorRT build, staging, gate, manifest.

    from export.engine_build import build_engine, select_or_build
    model = select_or_build(load_model(spec), "onnx")      # build when missing, then load

The run time (realtime_avatar/engines.py) only loads and selects engines: when one is missing
or stale it says how to build it; `select_or_build` passes it `build_engine`, which makes the
files in a staging folder, moves them into place, gates the engine there and writes its
manifest last (a folder without one reads as "not built": a crash halfway leaves nothing that
looks usable). `python -m export.build_engines` builds and times them ahead of time.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from export.onnx_export import export_onnx
from realtime_avatar.engine_gate import EngineBuildError, EngineError, GateResult
from realtime_avatar.engine_runners import OnnxRuntimeRunner, onnxruntime_version, tensorrt_input_shapes
from realtime_avatar.engines import (
    ONNX_FILE,
    TENSORRT_FILE,
    EngineKey,
    EngineManifest,
    EngineRecipe,
    select_backend,
)
from realtime_avatar.models.base import RendererModel

log = logging.getLogger(__name__)


def build_tensorrt_engine(onnx_path: Path, engine_path: Path, input_shapes: dict[str, tuple[int, ...]]) -> None:
    """Build a TensorRT engine from an ONNX file with one static profile (min = opt = max).

    Strongly typed: the ONNX file's own types decide the precision (an fp16 export gives an
    fp16 engine). TensorRT 11 removed the weakly typed FP16 builder flag; on 10.x the
    strongly typed flag is the supported way to get the same. Static batch because a dynamic
    fp16 MuseTalk engine was measured to fail accuracy where a static batch-8 one passed.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, shape in input_shapes.items():
        profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))



def _export_onnx(model: RendererModel, path: Path, precision: str):
    try:
        return export_onnx(model, path, precision=precision)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is a build failure
        if isinstance(exc, EngineError):
            raise
        raise EngineBuildError(f"exporting {model.model_id} to ONNX failed: {type(exc).__name__}: {exc}") from exc


def _install(staging: Path, folder: Path) -> None:
    """Move a finished build into place (under the build lock), replacing a stale one."""
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)


def _staging_folder(folder: Path) -> Path:
    staging = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _new_manifest(key: EngineKey, engine_file: str, export_result, start: float, gate: GateResult) -> EngineManifest:
    import onnx

    return EngineManifest(
        model_id=key.model_id,
        weights_hash=key.weights_hash,
        backend=key.backend,
        precision=key.precision,
        batch_profile=key.profile,
        engine_file=engine_file,
        opset=export_result.opset,
        onnxruntime_version=onnxruntime_version(),
        tensorrt_version=key.tensorrt,
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
        gpu=key.gpu,
        external_data=export_result.external_data,
        build_seconds=round(time.perf_counter() - start, 2),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        gate=gate.to_dict(),
    )



def _make_files(model: RendererModel, key: EngineKey, staging: Path):
    """The engine's files in `staging`: model.onnx, or (TensorRT) model.engine built from it."""
    exported = _export_onnx(model, staging / ONNX_FILE, key.precision)
    if key.backend == "tensorrt":
        build_tensorrt_engine(staging / ONNX_FILE, staging / TENSORRT_FILE, tensorrt_input_shapes(model, int(key.profile)))
        for leftover in staging.glob(ONNX_FILE + "*"):  # the engine holds the weights now
            leftover.unlink()
    return exported


def build_engine(model: RendererModel, recipe: EngineRecipe):
    """Make the engine files in a staging folder, move them into place, gate the engine there
    and write its manifest last: a folder without one reads as "not built" (a crash halfway
    leaves nothing that looks usable). Called under the engine's build lock."""
    key, folder = recipe.key, recipe.folder
    log.info("building %s engine %s", key.backend, folder)
    start = time.perf_counter()
    staging = _staging_folder(folder)
    try:
        exported = _make_files(model, key, staging)
        _install(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    runner = recipe.open_runner(folder / recipe.engine_file)
    gate = recipe.gate(model, runner)
    manifest = _new_manifest(key, recipe.engine_file, exported, start, gate)
    manifest.extra["rows_from"] = key.rows_from  # the graph draws patch rows rows_from..255
    if isinstance(runner, OnnxRuntimeRunner):
        manifest.extra["providers"] = runner.active_providers
    manifest.write(folder)
    log.info("built %s engine %s in %.1f s", key.backend, folder, manifest.build_seconds)
    return manifest, runner, gate


def select_or_build(model: RendererModel, backend: str = "auto", engines_dir: Path | None = None, **kwargs):
    """engines.select_backend that builds a missing or stale engine (and rebuilds a damaged
    one) with build_engine instead of refusing it."""
    return select_backend(model, backend, engines_dir, builder=build_engine, **kwargs)
