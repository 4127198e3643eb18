"""Running a built engine: ONNX Runtime sessions and TensorRT engines (numpy in, numpy out).

Each runner is an engine_gate.EngineRunner: float32 latents [N,2C,h,w] and audio [N,50,384]
-> float32 images [N,3,256,256] in the family's output range. Building the files they open is
build-time work (export/engine_build.py); here they are only opened and run.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .engine_gate import INPUT_AUDIO, INPUT_LATENTS, OUTPUT_IMAGES, EngineBuildError
from .models.base import RendererModel
from .timing import AUDIO_TOKENS, WHISPER_DIM

log = logging.getLogger(__name__)

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


# Sessions a CPU batch is split across (one ORT session per shard, its own thread): at most this
# many, whatever the core count (each shard's batch shrinks; batch 8 on 2 shards is 4 + 4).
MAX_CPU_SHARDS = 4


def cpu_shards(threads: int) -> int:
    """How many one-batch-part sessions a CPU runner with `threads` cores uses: one per core up to
    MAX_CPU_SHARDS (1: no sharding). Why shard at all: the compact render graph's convolutions are
    small (16-96 channels on 32x32 or less), and splitting each one across cores (ORT's intra-op
    threads) gains little; running half the batch on each core does better. Measured on v2.2's
    engine (engines/README.md, "CPU settings"; 2-core AMD EPYC avx2, session 14): batch 8
    5.70 -> 4.69 ms a frame (1.22x), identical output; batch 2 6.46 -> 4.64, but batch 1
    7.45 -> 8.39 (one core instead of two), so a batch smaller than the shard count runs on the
    whole-core session."""
    return max(1, min(int(threads), MAX_CPU_SHARDS))


def batch_parts(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) parts of a batch of n for `shards` sessions, sizes differing by at
    most one, earliest part largest; one part (the whole batch) when n < shards or shards == 1.
    Raises ValueError for n < 0 or shards < 1."""
    if n < 0 or shards < 1:
        raise ValueError(f"batch_parts: n must be >= 0 and shards >= 1, got n={n}, shards={shards}")
    if shards == 1 or n < shards:
        return [(0, n)]
    base, extra = divmod(n, shards)
    parts, start = [], 0
    for k in range(shards):
        stop = start + base + (1 if k < extra else 0)
        parts.append((start, stop))
        start = stop
    return parts


class OnnxRuntimeRunner:
    """One ORT InferenceSession on a model.onnx (dynamic batch), and on the CPU one more session
    per shard of a batch (cpu_shards): a batch of at least `shards` frames is split into
    contiguous parts (batch_parts), each run by a one-thread session, in parallel (ORT releases
    the GIL); the parts' outputs are the same numbers the whole batch gives (each frame is
    computed on its own either way; measured identical). `shards=1` turns this off; GPU
    providers never shard.

    Thread-safe (ORT sessions are); the shard pool (shards - 1 threads, the caller's thread runs
    the first part) is made on first use and shut down by close().
    """

    def __init__(
        self,
        path: Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        spin: bool = False,
        shards: int | None = None,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        self.requested_providers = requested_ort_providers(providers)
        threads = threads or cpu_cores()
        self.session = self._open(ort, threads, spin)
        self.active_providers = self.session.get_providers()
        self.provider = self.active_providers[0]
        self.on_gpu = self.provider != "CPUExecutionProvider"
        self.shards = 1 if self.on_gpu else (cpu_shards(threads) if shards is None else max(1, int(shards)))
        per_shard = max(1, threads // self.shards)
        self._shard_sessions = ([self._open(ort, per_shard, spin) for _ in range(self.shards)]
                                if self.shards > 1 else [])
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        sharding = f", {self.shards} shards x {per_shard} thread(s)" if self.shards > 1 else ""
        self.description = f"onnxruntime {ort.__version__} {self.provider}{sharding}"
        silently_dropped = [p for p in self.requested_providers if p not in self.active_providers]
        if silently_dropped:
            log.warning(
                "%s: ONNX Runtime lists %s but the session runs on %s (no usable GPU or CUDA "
                "libraries missing)", self.path, ", ".join(silently_dropped), self.provider,
            )

    def _open(self, ort, threads: int, spin: bool):
        try:
            return ort.InferenceSession(
                str(self.path), ort_session_options(threads, spin=spin), providers=self.requested_providers
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise EngineBuildError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from exc

    def __call__(self, latents: np.ndarray, audio: np.ndarray) -> np.ndarray:
        parts = batch_parts(len(latents), self.shards)
        if len(parts) == 1:
            return self._run(self.session, latents, audio)
        pool = self._shard_pool()
        futures = [pool.submit(self._run, session, latents[a:b], audio[a:b])
                   for session, (a, b) in zip(self._shard_sessions[1:], parts[1:])]
        a, b = parts[0]
        first = self._run(self._shard_sessions[0], latents[a:b], audio[a:b])
        return np.concatenate([first] + [f.result() for f in futures])

    @staticmethod
    def _run(session, latents: np.ndarray, audio: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_IMAGES], {INPUT_LATENTS: latents, INPUT_AUDIO: audio})[0]

    def _shard_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.shards - 1, thread_name_prefix="ort-shard")
            return self._pool

    def close(self) -> None:
        """Stop the shard threads (idempotent; a later call starts them again)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


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



def tensorrt_input_shapes(model: RendererModel, batch: int) -> dict[str, tuple[int, ...]]:
    size = model.latent_size
    return {
        INPUT_LATENTS: (batch, 2 * model.latent_channels, size, size),
        INPUT_AUDIO: (batch, AUDIO_TOKENS, WHISPER_DIM),
    }



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

