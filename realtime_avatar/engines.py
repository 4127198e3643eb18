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

Engines are built on first use (or ahead of time by `python -m export.build_engines`) and
cached under the engines folder, one directory per model hash, precision and batch profile:

    <engines>/<model_id>-<weights_hash[:12]>/<backend>-<precision>-b<profile>[-<gpu>-trt<ver>]/
        model.onnx | model.engine    manifest.json

The accuracy gate: before an engine is used, it renders fixed seeded inputs and its uint8
patches are compared with the torch model's (max abs error, PSNR, SNR); an engine below the
thresholds of its precision is refused (a known trap: a wide-batch fp16 TensorRT engine that
renders a grey face). The ONNX graph outputs the family's own float range; the uint8
conversion is the family's own function, so engine and torch round the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .models.base import RendererModel
from .models.base import check_render_inputs
from .timing import AUDIO_TOKENS, WHISPER_DIM

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnx", "torch")
AUTO_ORDER = ("tensorrt", "onnx")  # tried in this order by "auto"; torch is the last resort
PRECISIONS = ("fp32", "fp16")
ONNX_OPSET = 17  # TorchScript exporter (dynamo=False); every op we use exists in 17
INPUT_LATENTS = "latents"  # [N, 2C, 32, 32] float32
INPUT_AUDIO = "audio"  # [N, 50, 384] float32, before positional encoding
OUTPUT_IMAGES = "images"  # [N, 3, 256, 256] float32 in the family's output range
ENGINES_ENV = "REALTIME_AVATAR_ENGINES"
MANIFEST_NAME = "manifest.json"
ONNX_FILE = "model.onnx"
TENSORRT_FILE = "model.engine"
DYNAMIC_PROFILE = "dyn"  # batch profile name of an engine with a dynamic batch (ONNX Runtime)
DEFAULT_BATCH = 8  # static TensorRT profile when the caller names none (the renderer's default)
GATE_SEED = 0
GATE_BATCH = 2  # frames the gate renders for a dynamic-batch engine (static: the profile)
UINT8_PEAK = 255.0
TENSORRT_HINT = "use --backend onnx or torch"


@dataclass(frozen=True)
class GateThreshold:
    min_psnr_db: float  # PSNR of the engine's uint8 patches against the torch model's
    min_snr_db: float  # the same error against the reference's own variance (see below)
    max_abs_error: int  # largest per-pixel difference allowed, in uint8 levels


# fp32 engines differ from torch only by summation order: a pixel may round the other way,
# PSNR stays far above 45 dB. fp16 is a real precision loss but still invisible at >= 30 dB.
# PSNR alone is blind to low-contrast output: against a reference of std 3 levels (a random
# decoder), a flat grey engine scores ~38 dB. SNR (reference variance / error) is ~0 dB for
# any flat output, whatever the reference: the grey-face failure cannot pass it.
GATE_THRESHOLDS = {"fp32": GateThreshold(45.0, 30.0, 16), "fp16": GateThreshold(30.0, 15.0, 96)}


class EngineError(RuntimeError):
    """Base of the errors of this module."""


class BackendUnavailable(EngineError):
    """The backend cannot run on this machine (library missing, no GPU, no engine built)."""


class EngineRejected(EngineError):
    """An engine failed the accuracy gate: it renders patches too unlike the torch model's."""


class EngineBuildError(EngineError):
    """Exporting or building an engine failed."""


# ------------------------------------------------------------------------------ render graph


class MuseTalkRenderGraph(nn.Module):
    """MuseTalk's render() without the uint8 conversion: PE -> UNet at t=0 -> VAE decode.

    The timestep is a buffer of shape [1]; diffusers expands it to the batch inside, which the
    ONNX tracer records as a shape-dependent expand, so the batch stays dynamic.
    """

    def __init__(self, model: RendererModel):
        super().__init__()
        self.unet = model.unet
        self.vae = model.vae
        self.pe = model.pe
        self.register_buffer("timestep", model.timestep.clone(), persistent=False)
        self.scaling_factor = model.scaling_factor

    def forward(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        tokens = self.pe(audio.float()).to(latents.dtype)
        predicted = self.unet(latents, self.timestep, encoder_hidden_states=tokens).sample
        return self.vae.decode(predicted / self.scaling_factor).sample


def render_graph(model: RendererModel) -> nn.Module:
    """The torch module that computes `model`'s float render output (the graph engines are
    built from): compact -> its CompactNet; musetalk -> MuseTalkRenderGraph."""
    if model.model_id.startswith("compact"):
        return model.net
    if model.model_id.startswith("musetalk"):
        return MuseTalkRenderGraph(model)
    raise EngineBuildError(
        f"no render graph for model family {model.model_id!r}: engines support compact and "
        "musetalk models; use --backend torch"
    )


def output_to_patches(model: RendererModel) -> Callable[[torch.Tensor], np.ndarray]:
    """The family's own float-output -> [N,256,256,3] uint8 BGR conversion."""
    if model.model_id.startswith("compact"):
        from .models.compact import tensor_to_crops

        return tensor_to_crops
    if model.model_id.startswith("musetalk"):
        from .models.musetalk import vae_output_to_crops

        return vae_output_to_crops
    raise EngineBuildError(f"no output conversion for model family {model.model_id!r}")


def _graph_device_dtype(graph: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = next(p for p in graph.parameters() if p.is_floating_point())
    return weight.device, weight.dtype


@torch.no_grad()
def reference_render(model: RendererModel, latents: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
    """The torch model's patches for the gate: its render graph at the dtype its weights are
    held in, without autocast (for fp32 weights this is exactly model.render)."""
    graph = render_graph(model)
    device, dtype = _graph_device_dtype(graph)
    images = graph(latents.to(device, dtype), audio.to(device, torch.float32))
    return output_to_patches(model)(images)


def example_inputs(model: RendererModel, batch: int, seed: int = GATE_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded standard-normal latents [batch,2C,h,w] and audio windows [batch,50,384] (CPU).

    Cached latents of both families are roughly unit-variance (MuseTalk scales its VAE latents
    by 0.18215 for that), and Whisper hidden states are of order 1, so these exercise the
    graph in the range real inputs take.
    """
    generator = torch.Generator().manual_seed(seed)
    size, channels = model.latent_size, 2 * model.latent_channels
    latents = torch.randn(batch, channels, size, size, generator=generator)
    audio = torch.randn(batch, AUDIO_TOKENS, WHISPER_DIM, generator=generator)
    return latents, audio


# ------------------------------------------------------------------------------ accuracy gate


@dataclass(frozen=True)
class GateResult:
    passed: bool
    precision: str
    batch: int
    seed: int
    max_abs_error: int  # uint8 levels
    mean_abs_error: float
    psnr_db: float | None  # None: the patches are identical (infinite PSNR and SNR)
    snr_db: float | None
    min_psnr_db: float
    min_snr_db: float
    max_abs_allowed: int
    seconds: float

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        if self.psnr_db is None:
            quality = "identical patches"
        else:
            quality = (
                f"PSNR {self.psnr_db:.1f} dB (need >= {self.min_psnr_db:g}), SNR {self.snr_db:.1f} dB "
                f"(need >= {self.min_snr_db:g})"
            )
        return (
            f"accuracy gate {verdict} ({self.precision}, {self.batch} patches): {quality}, max abs "
            f"error {self.max_abs_error} (allowed {self.max_abs_allowed}), mean {self.mean_abs_error:.3f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PatchMetrics:
    max_abs_error: int  # uint8 levels
    mean_abs_error: float
    psnr_db: float | None  # 10 log10(255^2 / MSE); None when identical
    snr_db: float | None  # 10 log10(var(reference) / MSE); None when identical


def patch_metrics(reference: np.ndarray, candidate: np.ndarray) -> PatchMetrics:
    """Error of uint8 `candidate` patches against `reference` ones."""
    if reference.shape != candidate.shape:
        raise ValueError(f"patch shapes differ: {reference.shape} vs {candidate.shape}")
    diff = reference.astype(np.int16) - candidate.astype(np.int16)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    if mse == 0.0:
        psnr = snr = None
    else:
        psnr = 10.0 * math.log10(UINT8_PEAK**2 / mse)
        variance = float(reference.astype(np.float64).var())
        snr = 10.0 * math.log10(max(variance, 1e-6) / mse)  # a flat reference: very low
    return PatchMetrics(int(np.abs(diff).max()), float(np.abs(diff).mean()), psnr, snr)


def judge(metrics: PatchMetrics, precision: str) -> bool:
    threshold = GATE_THRESHOLDS[precision]
    if metrics.psnr_db is None:
        return True
    return (
        metrics.psnr_db >= threshold.min_psnr_db
        and metrics.snr_db >= threshold.min_snr_db
        and metrics.max_abs_error <= threshold.max_abs_error
    )


class EngineRunner(Protocol):
    """An engine's forward pass: float32 latents [N,2C,h,w] and audio [N,50,384] (numpy) ->
    float32 images [N,3,256,256] in the family's output range."""

    description: str

    def __call__(self, latents: np.ndarray, audio: np.ndarray) -> np.ndarray: ...


def accuracy_gate(model: RendererModel, run: EngineRunner, precision: str, batch: int = GATE_BATCH) -> GateResult:
    """Render GATE_SEED inputs with the engine and the torch model; compare the uint8 patches."""
    start = time.perf_counter()
    latents, audio = example_inputs(model, batch)
    reference = reference_render(model, latents, audio)
    try:
        images = run(latents.numpy(), audio.numpy())
    except Exception as exc:  # noqa: BLE001 - e.g. an op without a kernel for this provider
        raise EngineBuildError(f"{run.description}: the engine failed to run ({type(exc).__name__}: {exc})") from exc
    if images.shape[0] != batch or images.dtype != np.float32:
        raise EngineBuildError(f"{run.description}: engine output is {images.dtype} {images.shape}, "
                               f"expected float32 [{batch},3,256,256]")
    candidate = output_to_patches(model)(torch.from_numpy(images))
    metrics = patch_metrics(reference, candidate)
    threshold = GATE_THRESHOLDS[precision]
    return GateResult(
        passed=judge(metrics, precision),
        precision=precision,
        batch=batch,
        seed=GATE_SEED,
        max_abs_error=metrics.max_abs_error,
        mean_abs_error=round(metrics.mean_abs_error, 6),
        psnr_db=None if metrics.psnr_db is None else round(metrics.psnr_db, 2),
        snr_db=None if metrics.snr_db is None else round(metrics.snr_db, 2),
        min_psnr_db=threshold.min_psnr_db,
        min_snr_db=threshold.min_snr_db,
        max_abs_allowed=threshold.max_abs_error,
        seconds=round(time.perf_counter() - start, 3),
    )


# ---------------------------------------------------------------------------- ONNX Runtime


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except Exception:  # noqa: BLE001 - a broken install must read as "not installed"
        return None
    return onnxruntime.__version__


def ort_session_options(threads: int | None = None, *, spin: bool = False):
    """Settings that make ORT fast on a few CPU cores (measured: benchmarks/bench_backends.py).

    intra-op threads = cores (one op at a time, split across the cores); no inter-op pool and
    sequential execution (the graph is a chain: parallel branches would only oversubscribe);
    all graph optimisations (conv+activation fusion, constant folding, NCHWc layouts).
    Worker threads do not spin while waiting: the renderer shares the cores with Whisper,
    the event loop and the video encoder, and spinning threads steal their time slices
    (measured with other work on the cores: 1.2-3x fewer patches/s with spinning).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    return options


DEFAULT_GPU_PROVIDERS = ("CUDAExecutionProvider",)  # asked for by default when listed
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def requested_ort_providers(providers: Sequence[str] | None = None) -> list[str]:
    """Providers to ask ORT for: the given ones, else CUDA when this build lists it, then CPU.

    Listed is not active: onnxruntime-gpu lists CUDA without a GPU (DESIGN.md 5); the session
    says what it really uses (OnnxRuntimeRunner.active_providers).
    """
    if providers:
        return list(providers)
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in DEFAULT_GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


class OnnxRuntimeRunner:
    """One ORT InferenceSession on a model.onnx (dynamic batch)."""

    def __init__(
        self,
        path: Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        spin: bool = False,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        self.requested_providers = requested_ort_providers(providers)
        try:
            self.session = ort.InferenceSession(
                str(self.path), ort_session_options(threads, spin=spin), providers=self.requested_providers
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise EngineBuildError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from exc
        self.active_providers = self.session.get_providers()
        self.provider = self.active_providers[0]
        self.on_gpu = self.provider != "CPUExecutionProvider"
        self.description = f"onnxruntime {ort.__version__} {self.provider}"
        silently_dropped = [p for p in self.requested_providers if p not in self.active_providers]
        if silently_dropped:
            log.warning(
                "%s: ONNX Runtime lists %s but the session runs on %s (no usable GPU or CUDA "
                "libraries missing)", self.path, ", ".join(silently_dropped), self.provider,
            )

    def __call__(self, latents: np.ndarray, audio: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_IMAGES], {INPUT_LATENTS: latents, INPUT_AUDIO: audio})[0]


# -------------------------------------------------------------------------------- TensorRT


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can run here, else why not (checked without crashing: importing
    torch_tensorrt without TensorRT raises a plain Exception, DESIGN.md 5)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return f"TensorRT is not installed ({type(exc).__name__}: {exc})"
    return None


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except Exception:  # noqa: BLE001
        return None
    return tensorrt.__version__


def gpu_slug() -> str:
    """The GPU's name as a folder-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _tensorrt_input_shapes(model: RendererModel, batch: int) -> dict[str, tuple[int, ...]]:
    size = model.latent_size
    return {
        INPUT_LATENTS: (batch, 2 * model.latent_channels, size, size),
        INPUT_AUDIO: (batch, AUDIO_TOKENS, WHISPER_DIM),
    }


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


class TensorRTRunner:
    """A TensorRT engine with a static batch: inputs are split into chunks of that batch (the
    last one zero-padded); device buffers are allocated once and reused."""

    def __init__(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]]):
        import tensorrt as trt

        self.path = Path(engine_path)
        self.batch = input_shapes[INPUT_LATENTS][0]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"{self.path}: TensorRT cannot deserialize it (built by another version?)")
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream(self.device)
        self.buffers: dict[str, torch.Tensor] = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        for name in names:  # inputs first: output shapes resolve once the inputs have theirs
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.context.set_input_shape(name, input_shapes[name])
        for name in names:
            dtype = torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            shape = tuple(self.context.get_tensor_shape(name))
            self.buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        self._lock = threading.Lock()  # one set of buffers: one call at a time
        self.description = f"tensorrt {trt.__version__} {torch.cuda.get_device_name(0)} batch {self.batch}"

    def __call__(self, latents: np.ndarray, audio: np.ndarray) -> np.ndarray:
        outputs = []
        with self._lock, torch.cuda.stream(self.stream):
            for start in range(0, len(latents), self.batch):
                n = min(self.batch, len(latents) - start)
                for name, array in ((INPUT_LATENTS, latents), (INPUT_AUDIO, audio)):
                    buffer = self.buffers[name]
                    buffer[:n].copy_(torch.from_numpy(array[start : start + n]))
                    buffer[n:].zero_()
                self.context.execute_async_v3(self.stream.cuda_stream)
                outputs.append(self.buffers[OUTPUT_IMAGES][:n].float().cpu())  # syncs the stream
        return torch.cat(outputs).numpy()


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

    def folder(self, root: Path) -> Path:
        name = f"{self.backend}-{self.precision}-b{self.profile}"
        if self.backend == "tensorrt":
            name += f"-{self.gpu}-trt{self.tensorrt}"
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


def _import_exporter():
    """export.onnx_export, the build-time exporter. It lives in the checkout's top-level
    export/ package, which an editable install does not put on sys.path: when the server
    runs from elsewhere, the checkout root (next to this package) is appended to it."""
    try:
        from export import onnx_export
    except ImportError:
        checkout = Path(__file__).resolve().parent.parent
        if not (checkout / "export" / "onnx_export.py").is_file():
            raise
        import sys

        sys.path.append(str(checkout))
        from export import onnx_export
    return onnx_export


def _export_onnx(model: RendererModel, path: Path, precision: str):
    try:
        export_onnx = _import_exporter().export_onnx
    except ImportError as exc:
        raise EngineBuildError(
            "the ONNX exporter (export/onnx_export.py in the source checkout) is not importable "
            f"({exc}); build engines from a checkout with `python -m export.build_engines`"
        ) from exc
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


# ---------------------------------------------------------------------------- backend model


class BackendModel:
    """A RendererModel running `render` on an engine (or on the torch model itself).

    encode(), weights_hash(), model_id, latent_channels, latent_size and notes are the wrapped
    model's; `backend_name` says where render runs; `gate` holds the accuracy-gate result
    (None for torch) and `reason` why this backend was chosen.
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
class _EngineRecipe:
    """How to make, open and check one engine; shared by the ONNX and TensorRT loaders."""

    key: EngineKey
    folder: Path
    engine_file: str
    make_files: Callable[[Path], Any]  # staging folder -> ExportResult (writes engine_file)
    open_runner: Callable[[Path], EngineRunner]
    gate_batch: int
    build_hint: str  # the command that builds it ahead of time
    refused_hint: str  # what to try when the gate refuses it


def _build_engine(model: RendererModel, recipe: _EngineRecipe) -> tuple[EngineManifest, EngineRunner, GateResult]:
    """Make the engine files in a staging folder, move them into place, gate the engine there
    and write its manifest last: a folder without one reads as "not built" (a crash halfway
    leaves nothing that looks usable). Called under the engine's build lock."""
    key, folder = recipe.key, recipe.folder
    log.info("building %s engine %s", key.backend, folder)
    start = time.perf_counter()
    staging = _staging_folder(folder)
    try:
        exported = recipe.make_files(staging)
        _install(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    runner = recipe.open_runner(folder / recipe.engine_file)
    gate = _run_gate(model, runner, key.precision, recipe.gate_batch, folder, key.backend)
    manifest = _new_manifest(key, recipe.engine_file, exported, start, gate)
    if isinstance(runner, OnnxRuntimeRunner):
        manifest.extra["providers"] = runner.active_providers
    manifest.write(folder)
    log.info("built %s engine %s in %.1f s", key.backend, folder, manifest.build_seconds)
    return manifest, runner, gate


def _load_or_build(
    model: RendererModel, recipe: _EngineRecipe, *, build_missing: bool, rebuild: bool
) -> BackendModel:
    """The cached engine if it is current, loads and passes the gate; else (when allowed) a
    fresh build. An engine that passed its gate when built but cannot load or fails it now
    was damaged since: it is rebuilt. One that failed at build is refused, not rebuilt
    (the same weights would fail the same way)."""
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
            manifest, runner, gate = _build_engine(model, recipe)
        else:
            try:
                runner = recipe.open_runner(folder / recipe.engine_file)
                gate = _run_gate(model, runner, key.precision, recipe.gate_batch, folder, key.backend)
                damaged = None if gate.passed else gate.describe()
            except EngineBuildError as exc:  # it no longer loads or runs
                if not (build_missing and manifest.gate_passed):
                    raise
                damaged = str(exc)
            if damaged is not None and manifest.gate_passed and build_missing:
                log.warning("%s engine %s passed its gate when built but now: %s; rebuilding",
                            key.backend, folder, damaged)
                manifest, runner, gate = _build_engine(model, recipe)
    if not gate.passed:
        raise EngineRejected(f"{folder / recipe.engine_file}: refused, {gate.describe()}. {recipe.refused_hint}")
    return BackendModel(model, key.backend, runner, engine_dir=folder, manifest=manifest, gate=gate)


def load_onnx_backend(
    model: RendererModel,
    engines_dir: Path | None = None,
    *,
    precision: str | None = None,
    build_missing: bool = True,
    rebuild: bool = False,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> BackendModel:
    """ONNX Runtime render backend for `model`: the cached engine, built first if missing or
    stale (when build_missing) or when `rebuild`, checked by the accuracy gate. Raises
    BackendUnavailable, EngineBuildError or EngineRejected."""
    if onnxruntime_version() is None:
        raise BackendUnavailable("onnxruntime is not installed: pip install 'realtime-avatar[cpu]' (or [gpu])")
    precision = _resolve_precision(precision, _ort_gpu_usable(providers))
    root = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    key = EngineKey(model.model_id, model.weights_hash(), "onnx", precision, DYNAMIC_PROFILE)
    recipe = _EngineRecipe(
        key=key,
        folder=key.folder(root),
        engine_file=ONNX_FILE,
        make_files=lambda staging: _export_onnx(model, staging / ONNX_FILE, precision),
        open_runner=lambda path: OnnxRuntimeRunner(path, providers=providers, threads=threads),
        gate_batch=GATE_BATCH,
        build_hint=f"python -m export.build_engines --backend onnx --precision {precision}",
        refused_hint="Delete the folder to rebuild it, or use --backend torch",
    )
    return _load_or_build(model, recipe, build_missing=build_missing, rebuild=rebuild)


def load_tensorrt_backend(
    model: RendererModel,
    engines_dir: Path | None = None,
    *,
    precision: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    build_missing: bool = True,
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
        model.model_id, model.weights_hash(), "tensorrt", precision, str(batch_size), gpu_slug(), tensorrt_version()
    )
    shapes = _tensorrt_input_shapes(model, batch_size)

    def make_files(staging: Path):
        exported = _export_onnx(model, staging / ONNX_FILE, precision)
        build_tensorrt_engine(staging / ONNX_FILE, staging / TENSORRT_FILE, shapes)
        for leftover in staging.glob(ONNX_FILE + "*"):  # the engine holds the weights now
            leftover.unlink()
        return exported

    recipe = _EngineRecipe(
        key=key,
        folder=key.folder(root),
        engine_file=TENSORRT_FILE,
        make_files=make_files,
        open_runner=lambda path: TensorRTRunner(path, shapes),
        gate_batch=batch_size,
        build_hint=f"python -m export.build_engines --backend tensorrt --precision {precision} --batch {batch_size}",
        refused_hint="Try another --batch or --precision fp32, or use --backend onnx",
    )
    return _load_or_build(model, recipe, build_missing=build_missing, rebuild=rebuild)


def select_backend(
    model: RendererModel,
    backend: str = "auto",
    engines_dir: Path | None = None,
    *,
    build_missing: bool = True,
    precision: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    threads: int | None = None,
    ort_providers: Sequence[str] | None = None,
) -> BackendModel:
    """A RendererModel for `model` whose render runs on `backend`.

    backend: "auto" | "tensorrt" | "onnx" | "torch". An explicit engine backend that cannot
    run raises (BackendUnavailable, EngineBuildError, EngineRejected); "auto" tries
    tensorrt, then onnx (skipped when ONNX Runtime would run on the CPU while the model is on
    a GPU), then falls back to torch, and logs what it chose and why.
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
            model, engines_dir, precision=precision, batch_size=batch_size, build_missing=build_missing
        ),
        "onnx": lambda: load_onnx_backend(
            model, engines_dir, precision=precision, build_missing=build_missing, threads=threads,
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
