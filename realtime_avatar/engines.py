"""Run-time renderer backends: torch, ONNX Runtime and TensorRT, chosen by one call.

    model = select_backend(load_model(spec), "auto")   # -> RendererModel with .backend_name

The returned model keeps the wrapped model's `encode` (torch: it runs once per avatar frame
at preparation) and runs `render` (UNet + latent decoder, per frame) on the chosen engine:

    torch     the model itself, eager (torch.compile took 2.5 minutes to compile the compact
              model here, recompiles per batch size, and was slower at batch 1: not used)
    onnx      ONNX Runtime on a model.onnx with a dynamic batch: CUDA execution provider when
              it is really active in the session, else CPU with the thread settings below
    tensorrt  a TensorRT engine built from the ONNX file with a static batch profile (GPU only)
    auto      tensorrt, then onnx, then torch: the first that loads and passes the gate

This module only loads and selects engines. They are built by build-time code (export/):
ahead of time by `python -m export.build_engines`, or on first use when a caller passes
export.engine_build's builder (`export.engine_build.select_or_build`). Without one, a missing
or stale engine is BackendUnavailable with the command that builds it, and auto moves on.
They are cached under the engines folder, one directory per model hash, precision and batch
profile:

    <engines>/<model_id>-<weights_hash[:12]>/<backend>-<precision>-b<profile>[-<gpu>-trt<ver>]/
        model.onnx | model.engine    manifest.json

The accuracy gate (engine_gate.py): before an engine is used, it renders fixed seeded inputs and
its uint8 patches are compared with the torch model's; an engine below the thresholds of its
precision is refused. Runners (engine_runners.py) open and run the built files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .engine_gate import (  # noqa: F401 - re-exported: the names engines are checked with
    GATE_BATCH,
    GATE_SEED,
    GATE_THRESHOLDS,
    INPUT_AUDIO,
    INPUT_LATENTS,
    OUTPUT_IMAGES,
    PRECISIONS,
    BackendUnavailable,
    EngineBuildError,
    EngineError,
    EngineRejected,
    EngineRunner,
    GateResult,
    GateThreshold,
    MuseTalkRenderGraph,
    PatchMetrics,
    _graph_device_dtype,
    accuracy_gate,
    example_inputs,
    judge,
    output_to_patches,
    patch_metrics,
    reference_render,
    render_graph,
)
from .engine_runners import (  # noqa: F401 - re-exported: the runners engines are opened with
    DEFAULT_GPU_PROVIDERS,
    GPU_PROVIDERS,
    OnnxRuntimeRunner,
    TensorRTRunner,
    cpu_cores,
    gpu_slug,
    onnxruntime_version,
    ort_session_options,
    requested_ort_providers,
    tensorrt_input_shapes,
    tensorrt_unavailable_reason,
    tensorrt_version,
)
from .models.base import RendererModel, check_render_inputs

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnx", "torch")
AUTO_ORDER = ("tensorrt", "onnx")  # tried in this order by "auto"; torch is the last resort
ONNX_OPSET = 17  # TorchScript exporter (dynamo=False); every op we use exists in 17
ENGINES_ENV = "REALTIME_AVATAR_ENGINES"
MANIFEST_NAME = "manifest.json"
ONNX_FILE = "model.onnx"
TENSORRT_FILE = "model.engine"
DYNAMIC_PROFILE = "dyn"  # batch profile name of an engine with a dynamic batch (ONNX Runtime)
DEFAULT_BATCH = 8  # static TensorRT profile when the caller names none (the renderer's default)
TENSORRT_HINT = "use --backend onnx or torch"


# ------------------------------------------------------------------------------ engine cache


def default_engines_dir() -> Path:
    """$REALTIME_AVATAR_ENGINES, else the checkout's engines/ folder, else the user cache."""
    override = os.environ.get(ENGINES_ENV)
    if override:
        return Path(override).expanduser()
    checkout = Path(__file__).resolve().parent.parent / "engines"
    if (checkout / "README.md").is_file():
        return checkout
    from .whisper_weights import realtime_avatar_cache_dir

    return realtime_avatar_cache_dir() / "engines"


@dataclass(frozen=True)
class EngineKey:
    """What an engine is built for; its folder name is derived from it."""

    model_id: str
    weights_hash: str
    backend: str  # "onnx" | "tensorrt"
    precision: str
    profile: str  # DYNAMIC_PROFILE or the static batch
    gpu: str | None = None  # TensorRT only
    tensorrt: str | None = None  # TensorRT version, TensorRT only
    rows_from: int = 0  # the first patch row the graph draws (compact: BLEND_ROWS_FROM)

    def folder(self, root: Path) -> Path:
        name = f"{self.backend}-{self.precision}-b{self.profile}"
        if self.backend == "tensorrt":
            name += f"-{self.gpu}-trt{self.tensorrt}"
        if self.rows_from:  # a different graph from the same weights: an engine of its own
            name += f"-rows{self.rows_from}"
        return root / f"{self.model_id}-{self.weights_hash[:12]}" / name


@dataclass
class EngineManifest:
    model_id: str
    weights_hash: str
    backend: str
    precision: str
    batch_profile: str
    engine_file: str
    opset: int
    onnxruntime_version: str | None
    tensorrt_version: str | None
    torch_version: str
    onnx_version: str
    gpu: str | None
    external_data: bool
    build_seconds: float
    created: str
    gate: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        path = folder / MANIFEST_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, folder: Path) -> EngineManifest | None:
        """The manifest in `folder`, or None when it is missing or unreadable."""
        try:
            values = json.loads((folder / MANIFEST_NAME).read_text())
            return cls(**values)
        except (OSError, ValueError, TypeError):
            return None

    @property
    def gate_passed(self) -> bool:
        return bool(self.gate and self.gate.get("passed"))


def stale_reason(manifest: EngineManifest | None, folder: Path, key: EngineKey) -> str | None:
    """Why the cached engine in `folder` cannot be used as is (None: it can)."""
    if manifest is None:
        return "no engine built yet"
    if not (folder / manifest.engine_file).is_file():
        return f"{manifest.engine_file} is missing"
    if manifest.weights_hash != key.weights_hash or manifest.model_id != key.model_id:
        return f"built for {manifest.model_id} {manifest.weights_hash[:12]}, the model is now {key.weights_hash[:12]}"
    if key.backend == "onnx" and manifest.onnxruntime_version != onnxruntime_version():
        return f"built with onnxruntime {manifest.onnxruntime_version}, now {onnxruntime_version()}"
    if key.backend == "tensorrt" and manifest.tensorrt_version != key.tensorrt:
        return f"built with TensorRT {manifest.tensorrt_version}, now {key.tensorrt}"
    return None


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Serialise builds of one engine across processes (two servers starting at once)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)



# ---------------------------------------------------------------------------- backend model


class BackendModel:
    """A RendererModel running `render` on an engine (or on the torch model itself).

    encode(), weights_hash(), model_id, latent_channels, latent_size and notes are the wrapped
    model's; `backend_name` says where render runs; `gate` holds the accuracy-gate result
    (None for torch) and `reason` why this backend was chosen. On an engine, render() leaves
    patch rows above `rows_from` at 0 (the compact graph does not draw what no blend reads);
    on torch it draws every row, as the model's own render().
    """

    def __init__(
        self,
        model: RendererModel,
        backend_name: str,
        runner: EngineRunner | None = None,
        *,
        engine_dir: Path | None = None,
        manifest: EngineManifest | None = None,
        gate: GateResult | None = None,
        reason: str = "",
    ):
        self.model = model
        self.backend_name = backend_name
        self.runner = runner
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.gate = gate
        self.reason = reason
        self.model_id = model.model_id
        self.latent_channels = model.latent_channels
        self.latent_size = model.latent_size
        self.rows_from = getattr(model, "rows_from", 0)  # render() leaves the rows above at 0 on an engine
        if hasattr(model, "notes"):
            self.notes = model.notes
        self._to_patches = output_to_patches(model) if runner is not None else None

    @property
    def description(self) -> str:
        return self.runner.description if self.runner is not None else "torch (the model itself)"

    def weights_hash(self) -> str:
        return self.model.weights_hash()

    def encode(self, crops_bgr: np.ndarray, *args, **kwargs) -> torch.Tensor:
        return self.model.encode(crops_bgr, *args, **kwargs)

    @torch.no_grad()
    def render(self, latents: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
        if self.runner is None:
            return self.model.render(latents, audio)
        check_render_inputs(latents, audio, self.latent_channels, self.latent_size)
        images = self.runner(_as_float32_array(latents), _as_float32_array(audio))
        return self._to_patches(torch.from_numpy(images))

    def __repr__(self) -> str:
        return f"BackendModel({self.model_id} {self.weights_hash()[:12]} on {self.description})"


def _as_float32_array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())


# ------------------------------------------------------------------------------- backends


def torch_backend(model: RendererModel, reason: str = "asked for") -> BackendModel:
    return BackendModel(model, "torch", reason=reason)


def _resolve_precision(precision: str | None, on_gpu: bool) -> str:
    if precision is None:
        return "fp16" if on_gpu else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"engine precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _ort_gpu_usable(providers: Sequence[str] | None) -> bool:
    requested = requested_ort_providers(providers)
    return torch.cuda.is_available() and any(p in GPU_PROVIDERS for p in requested)


def _run_gate(model, runner, precision, batch, folder, backend) -> GateResult:
    gate = accuracy_gate(model, runner, precision, batch)
    log.info("%s engine %s: %s", backend, folder, gate.describe())
    return gate




@dataclass(frozen=True)
class EngineRecipe:
    """What one engine is and how to open and check it; shared by the ONNX and TensorRT loaders
    and handed to a builder (export.engine_build.build_engine) when it must be made."""

    key: EngineKey
    folder: Path
    engine_file: str
    open_runner: Callable[[Path], EngineRunner]
    gate_batch: int
    build_hint: str  # the command that builds it ahead of time
    refused_hint: str  # what to try when the gate refuses it

    def gate(self, model: RendererModel, runner: EngineRunner) -> GateResult:
        return _run_gate(model, runner, self.key.precision, self.gate_batch, self.folder, self.key.backend)


class EngineBuilder(Protocol):
    """Build-time code that makes the engine of a recipe (export.engine_build.build_engine):
    files installed in recipe.folder, gated, manifest written; returns (manifest, runner, gate)."""

    def __call__(self, model: RendererModel, recipe: EngineRecipe) -> tuple[EngineManifest, EngineRunner, GateResult]: ...


def _load_or_build(
    model: RendererModel, recipe: EngineRecipe, *, builder: EngineBuilder | None, rebuild: bool
) -> BackendModel:
    """The cached engine if it is current, loads and passes the gate; else (given a builder)
    a fresh build. An engine that passed its gate when built but cannot load or fails it now
    was damaged since: it is rebuilt. One that failed at build is refused, not rebuilt
    (the same weights would fail the same way)."""
    build_missing = builder is not None
    key, folder = recipe.key, recipe.folder
    with _build_lock(folder):
        manifest = EngineManifest.read(folder)
        stale = "rebuild requested" if rebuild else stale_reason(manifest, folder, key)
        if stale is not None and not build_missing:
            raise BackendUnavailable(
                f"{folder}: no usable {key.backend} engine ({stale}); build it with "
                f"`{recipe.build_hint}` or allow building"
            )
        if stale is not None:
            log.info("%s engine %s: %s", key.backend, folder, stale)
            manifest, runner, gate = builder(model, recipe)
        else:
            try:
                runner = recipe.open_runner(folder / recipe.engine_file)
                gate = recipe.gate(model, runner)
                damaged = None if gate.passed else gate.describe()
            except EngineBuildError as exc:  # it no longer loads or runs
                if not (build_missing and manifest.gate_passed):
                    raise
                damaged = str(exc)
            if damaged is not None and manifest.gate_passed and build_missing:
                log.warning("%s engine %s passed its gate when built but now: %s; rebuilding",
                            key.backend, folder, damaged)
                manifest, runner, gate = builder(model, recipe)
    if not gate.passed:
        raise EngineRejected(f"{folder / recipe.engine_file}: refused, {gate.describe()}. {recipe.refused_hint}")
    return BackendModel(model, key.backend, runner, engine_dir=folder, manifest=manifest, gate=gate)


def load_onnx_backend(
    model: RendererModel,
    engines_dir: Path | None = None,
    *,
    precision: str | None = None,
    builder: EngineBuilder | None = None,
    rebuild: bool = False,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> BackendModel:
    """ONNX Runtime render backend for `model`: the cached engine, checked by the accuracy
    gate; a missing or stale one (or any, with `rebuild`) is made by `builder` when given
    (export.engine_build.build_engine), else refused. Raises BackendUnavailable,
    EngineBuildError or EngineRejected."""
    if onnxruntime_version() is None:
        raise BackendUnavailable("onnxruntime is not installed: pip install 'realtime-avatar[cpu]' (or [gpu])")
    precision = _resolve_precision(precision, _ort_gpu_usable(providers))
    root = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    key = EngineKey(model.model_id, model.weights_hash(), "onnx", precision, DYNAMIC_PROFILE,
                    rows_from=getattr(model, "rows_from", 0))
    recipe = EngineRecipe(
        key=key,
        folder=key.folder(root),
        engine_file=ONNX_FILE,
        open_runner=lambda path: OnnxRuntimeRunner(path, providers=providers, threads=threads),
        gate_batch=GATE_BATCH,
        build_hint=f"python -m export.build_engines --backend onnx --precision {precision}",
        refused_hint="Delete the folder to rebuild it, or use --backend torch",
    )
    return _load_or_build(model, recipe, builder=builder, rebuild=rebuild)


def load_tensorrt_backend(
    model: RendererModel,
    engines_dir: Path | None = None,
    *,
    precision: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    builder: EngineBuilder | None = None,
    rebuild: bool = False,
) -> BackendModel:
    """TensorRT render backend with a static batch profile of `batch_size`. Raises
    BackendUnavailable on machines without TensorRT or a CUDA GPU."""
    unavailable = tensorrt_unavailable_reason()
    if unavailable is not None:
        raise BackendUnavailable(f"TensorRT is not installed / no CUDA GPU: {TENSORRT_HINT} ({unavailable})")
    precision = _resolve_precision(precision, on_gpu=True)
    root = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    key = EngineKey(
        model.model_id, model.weights_hash(), "tensorrt", precision, str(batch_size), gpu_slug(), tensorrt_version(),
        getattr(model, "rows_from", 0),
    )
    shapes = tensorrt_input_shapes(model, batch_size)
    recipe = EngineRecipe(
        key=key,
        folder=key.folder(root),
        engine_file=TENSORRT_FILE,
        open_runner=lambda path: TensorRTRunner(path, shapes),
        gate_batch=batch_size,
        build_hint=f"python -m export.build_engines --backend tensorrt --precision {precision} --batch {batch_size}",
        refused_hint="Try another --batch or --precision fp32, or use --backend onnx",
    )
    return _load_or_build(model, recipe, builder=builder, rebuild=rebuild)


def select_backend(
    model: RendererModel,
    backend: str = "auto",
    engines_dir: Path | None = None,
    *,
    builder: EngineBuilder | None = None,
    precision: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    threads: int | None = None,
    ort_providers: Sequence[str] | None = None,
) -> BackendModel:
    """A RendererModel for `model` whose render runs on `backend`.

    backend: "auto" | "tensorrt" | "onnx" | "torch". An explicit engine backend that cannot
    run raises (BackendUnavailable, EngineBuildError, EngineRejected); "auto" tries
    tensorrt, then onnx (skipped when ONNX Runtime would run on the CPU while the model is on
    a GPU), then falls back to torch, and logs what it chose and why. builder: build-time code
    that makes missing or stale engines (export.engine_build.build_engine; see
    export.engine_build.select_or_build); without one they are BackendUnavailable.
    precision: engine precision, default fp16 on a GPU and fp32 on CPU. batch_size: the
    static TensorRT profile (use the renderer's batch size). threads: ORT CPU threads
    (default: the cores this process may use). ort_providers: ONNX Runtime execution
    providers to ask for, e.g. ["TensorrtExecutionProvider", "CUDAExecutionProvider",
    "CPUExecutionProvider"] (default: CUDA when this onnxruntime build has it, then CPU). engines_dir: default $REALTIME_AVATAR_ENGINES,
    else the checkout's engines/, else the user cache.
    """
    if isinstance(model, BackendModel):
        model = model.model
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    loaders: dict[str, Callable[[], BackendModel]] = {
        "tensorrt": lambda: load_tensorrt_backend(
            model, engines_dir, precision=precision, batch_size=batch_size, builder=builder
        ),
        "onnx": lambda: load_onnx_backend(
            model, engines_dir, precision=precision, builder=builder, threads=threads,
            providers=ort_providers,
        ),
    }
    def onnx_if_not_slower() -> BackendModel:
        # a model on a GPU renders faster in torch there than ONNX Runtime does on the CPU
        on_gpu = _graph_device_dtype(render_graph(model))[0].type == "cuda"
        cpu_only = "ONNX Runtime would run on the CPU while the model is on a GPU (torch there is faster)"
        if on_gpu and not _ort_gpu_usable(ort_providers):
            raise BackendUnavailable(cpu_only)
        engine = loaders["onnx"]()
        if on_gpu and not engine.runner.on_gpu:
            raise BackendUnavailable(cpu_only + f": the session is on {engine.runner.provider}")
        return engine

    if backend == "torch":
        chosen = torch_backend(model)
    elif backend != "auto":
        chosen = loaders[backend]()
        chosen.reason = "asked for"
    else:
        skipped: list[str] = []
        chosen = None
        auto_loaders = {"tensorrt": loaders["tensorrt"], "onnx": onnx_if_not_slower}
        for candidate in AUTO_ORDER:
            try:
                chosen = auto_loaders[candidate]()
                break
            except EngineError as exc:
                skipped.append(f"{candidate}: {exc}")
        if chosen is None:
            chosen = torch_backend(model, "no engine backend works here")
        chosen.reason = "auto: first of tensorrt, onnx, torch that works" + (
            f"; skipped {' | '.join(skipped)}" if skipped else ""
        )
        for line in skipped:
            log.info("backend auto: skipped %s", line)
    log.info(
        "renderer backend %s for %s %s: %s%s (%s)",
        chosen.backend_name, model.model_id, model.weights_hash()[:12], chosen.description,
        f", {chosen.gate.describe()}" if chosen.gate else "", chosen.reason,
    )
    return chosen

