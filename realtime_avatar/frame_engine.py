"""FrameEngine: one batched render per tick for every live session of the process.

    engine = FrameEngine(model, device, precision)             # one per process (the Runtime's)
    slot = engine.add_avatar(avatar, idle_window)              # sessions may use different avatars
    frames = await engine.render(FrameRequest(slot, positions, windows))   # from a session
    frames = engine.render_now([request, ...])                 # offline / tests: synchronous

Per tick (40 ms, `batching.TickBatcher`) the engine takes the requests of all sessions that
are due, and for all of them together makes

    1. ONE model call: latents (device-resident, gathered per avatar and cycle position) and
       audio windows [N,50,384] -> float patches [N,3,256,256] on the device;
    2. ONE compose call per frame size (compose.ComposeBank: all avatars of a size share
       one bank; usually all avatars have one size): patches -> grey levels -> blended into copies of the cached frames, uint8
       BGR or yuv420p, on the device;
    3. one copy of the finished uint8 frames to the host (pinned memory on CUDA), split back
       per request.

Nothing else crosses to the host. On a CPU with bgr24 frames, step 2 is the host path instead:
the family's own uint8 conversion and the numpy Blender (cv2) per frame, straight into each
frame's own buffer (no step 3): the reference blend itself, and cheaper there (2 cores, batch 8,
session 12: 0.78 vs 1.27 ms a frame, p90 0.90 vs 2.20: torch's elementwise ops on a CPU cost
more than cv2's). The model part is one of: the torch render graph (eager,
autocast at the chosen precision), an ONNX Runtime / TensorRT engine (BackendModel runner:
numpy in/out, the rest stays the same), or the same torch graph + compose compiled with
torch.compile(mode="reduce-overhead") per batch bucket (CUDA graphs; see CompiledStep).

Batch buckets: with a compiled step a batch of n frames is padded to the smallest bucket >= n
(BUCKETS) so each bucket's graph is captured once at warm-up and reused. Eager steps run the
exact n (padding only wastes work when nothing is captured).

Deadlines and faults: a session whose frame is not ready when its clock tick comes shows the
idle frame and counts a late frame (session.py); it never waits, and nothing here waits for
it. A session that closes while its request is in a batch only loses its own frames
(TickBatcher drops the result). Frames are copied out per request: no session holds a view
into another's memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .avatar import Avatar
from .batching import TickBatcher
from .compose import FRAME_FORMATS, ComposeBank, bgr_to_yuv420p, family_levels
from .device import autocast, choose_precision, synchronize
from .models.base import RendererModel
from .timing import AUDIO_TOKENS, FPS, WHISPER_DIM

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TICK_S = 1.0 / FPS
STEP_KINDS = ("torch", "compiled", "engine")


def bucket_size(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= n; past the largest, the next multiple of the largest (a batch
    that large is run as several calls of the largest bucket)."""
    if n < 1:
        raise ValueError(f"a batch has at least one frame, got {n}")
    for b in buckets:
        if b >= n:
            return b
    top = buckets[-1]
    return -(-n // top) * top


class AvatarSlot:
    """One avatar inside the engine: latents on the device, frames in a ComposeBank, idle
    frames on the host (the clock loop shows them when no rendered frame is due)."""

    def __init__(self, avatar: Avatar, bank: ComposeBank, first: int, latents: torch.Tensor):
        self.avatar = avatar
        self.bank = bank
        self.first = first  # bank index of the avatar's cached frame 0
        self.latents = latents  # [n, 2C, h, w] on the engine's device, the model's input dtype
        self.cycle_length = avatar.cycle_length
        self.idle: list[np.ndarray] = []

    def cached_indices(self, positions: Sequence[int]) -> list[int]:
        return [self.avatar.cycle_index(p) for p in positions]

    def idle_frame(self, position: int) -> np.ndarray:
        """The avatar at cycle position `position`, listening (read-only)."""
        return self.idle[self.avatar.cycle_index(position)]


@dataclass(frozen=True)
class FrameRequest:
    """Frames one session wants: cycle positions (the poses they will be shown on) and the
    audio window [50, 384] float32 of each."""

    slot: AvatarSlot
    positions: tuple[int, ...]
    windows: np.ndarray  # [n, 50, 384] float32

    def __post_init__(self) -> None:
        if self.windows.ndim != 3 or self.windows.shape[1:] != (AUDIO_TOKENS, WHISPER_DIM):
            raise ValueError(f"audio windows must be [n,{AUDIO_TOKENS},{WHISPER_DIM}], got {self.windows.shape}")
        if len(self.positions) != len(self.windows):
            raise ValueError(f"{len(self.positions)} positions but {len(self.windows)} audio windows")


RenderFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # latents, audio -> float images


def torch_render_fn(model: RendererModel, device: torch.device, precision: str) -> RenderFn:
    """The model's render graph (engines.render_graph) on `device` under autocast."""
    from .engines import render_graph

    graph = render_graph(model)
    weight = next(p for p in graph.parameters() if p.is_floating_point())
    if weight.device != device:
        raise ValueError(f"the model is on {weight.device} but the frame engine on {device}: "
                         "load the model on the engine's device")
    dtype = weight.dtype

    def render(latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return graph(latents.to(dtype), audio.float())

    return render


def engine_render_fn(runner, device: torch.device) -> RenderFn:
    """An ONNX Runtime / TensorRT runner (numpy float32 in and out) as a RenderFn."""

    def render(latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        images = runner(latents.float().cpu().numpy(), audio.float().cpu().numpy())
        return torch.from_numpy(images).to(device)

    return render


_graphs_asked = 0  # compiled graphs asked of dynamo by every engine of this process


def allow_recompiles(more: int) -> None:
    """Let dynamo keep `more` graphs more of one function.

    Dynamo caches compiled graphs per code object, whichever torch.compile wrapper (or engine)
    asked, so every bucket of every engine (and, for compose, every frame size) is one more entry
    of the same cache; past torch._dynamo.config.recompile_limit (8 in torch 2.11-2.13) it warns
    and runs the function eagerly: the 9th bucket (256) silently lost its CUDA graph, and on the
    H200 a second engine in the same process lost several. The limit follows the process total."""
    import torch._dynamo.config as config

    global _graphs_asked
    _graphs_asked += more
    config.recompile_limit = max(config.recompile_limit, _graphs_asked)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * _graphs_asked)


def _split(frames, sizes: Sequence[int]) -> list:
    """`frames` (a list or a tensor) cut into consecutive parts of `sizes` rows; rows past
    sum(sizes) (bucket padding) are dropped."""
    parts, start = [], 0
    for n in sizes:
        parts.append(frames[start : start + n])
        start += n
    return parts


def _chunk_requests(request_sizes: Sequence[int], chunk_sizes: Sequence[int]) -> list[list[int]]:
    """Cut consecutive requests' rows at chunk boundaries: for each chunk, the row counts of the
    request pieces it holds, in order (a request that straddles two chunks is in both).
    _chunk_requests([3, 2, 4], [4, 5]) == [[3, 1], [1, 4]]."""
    out: list[list[int]] = []
    pending = list(request_sizes)
    k = 0
    for size in chunk_sizes:
        pieces = []
        while size > 0:
            take = min(size, pending[k])
            pieces.append(take)
            size -= take
            pending[k] -= take
            if pending[k] == 0:
                k += 1
        out.append(pieces)
    return out


class FrameEngine:
    """See the module docstring. Thread-safe: render_now() calls are serialised (one batch
    at a time on the device)."""

    def __init__(
        self,
        model: RendererModel,
        device: torch.device | str = "cpu",
        precision: str | None = None,
        *,
        step: str = "torch",
        buckets: Sequence[int] = BUCKETS,
        frame_format: str = "bgr24",
        tick_s: float = TICK_S,
        max_pending: int = 256,
    ):
        """model: a RendererModel (or engines.BackendModel; an engine runner is used when it
        has one); step: "torch" (eager), "compiled" (CUDA only; on a CPU it runs eager and
        says so) or "engine"; frame_format: "bgr24" or "yuv420p" (what from_ndarray takes);
        max_pending: requests that may wait for a batch (back-pressure beyond it)."""
        if frame_format not in FRAME_FORMATS:
            raise ValueError(f"frame_format must be one of {FRAME_FORMATS}, got {frame_format!r}")
        if step not in STEP_KINDS:
            raise ValueError(f"step must be one of {STEP_KINDS}, got {step!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # "cuda" means the current GPU; tensors report it as cuda:N, so compare against that
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = choose_precision(precision, self.device)
        if self.device.type == "cuda" and self.precision == "fp32":
            # PyTorch lets cuDNN convolutions use TF32 by default (10-bit mantissa): measured on
            # an H200, 2 grey levels off the CPU reference instead of 1. fp32 asked is fp32 done.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model = model
        self.model_id = model.model_id
        # the first patch row the render graph draws (compact: models.base.BLEND_ROWS_FROM)
        self.rows_from = int(getattr(model, "rows_from", 0))
        self.frame_format = frame_format
        self.buckets = tuple(sorted(buckets))
        self.tick_s = tick_s
        self.max_pending = max_pending
        runner = getattr(model, "runner", None)
        if runner is not None:
            step = "engine"
            self._render = engine_render_fn(runner, self.device)
        else:
            torch_model = getattr(model, "model", model)  # a BackendModel on torch wraps the model
            self._render = torch_render_fn(torch_model, self.device, self.precision)
        if step == "compiled" and self.device.type != "cuda":
            # torch.compile on this CPU: minutes per shape and slower at small batches
            # (engines.py); CUDA graphs, the point of "compiled", do not exist here.
            log.info("backend compiled: CUDA graphs need a CUDA device; on %s the frame engine runs "
                     "the same torch code eagerly", self.device)
            step = "torch"
        self.step = step
        from .engine_gate import output_to_patches

        self._to_patches = output_to_patches(model)  # the host compose path's uint8 conversion
        self._compiled: dict[int, Callable] = {}
        self._banks: dict[tuple[int, int], ComposeBank] = {}
        self.slots: list[AvatarSlot] = []
        self._lock = threading.Lock()
        # Every device call of this engine runs on one thread of its own. PyTorch keeps cuDNN /
        # cuBLAS handles and torch.compile's CUDA graph trees per Python thread: batches handed
        # to whichever pool thread was free re-created handles and re-recorded every bucket's
        # graph per thread (H200: 3.8-7.7% late frames, p99 137-172 ms at 128-384 sessions),
        # and graphs captured by warm_up() on the caller's thread were never replayed.
        self._thread_id: int | None = None  # set by the thread itself before its first task
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="frame-engine",
                                                               initializer=self._mark_engine_thread)
        self._batcher: TickBatcher | None = None
        self._batcher_loop: asyncio.AbstractEventLoop | None = None
        self.frames_rendered = 0
        self.model_calls = 0
        self.compose_calls = 0

    # -- avatars -----------------------------------------------------------------------------

    def add_avatar(self, avatar: Avatar, idle_window: np.ndarray | None = None) -> AvatarSlot:
        """Register an avatar (frames, masks, latents to the device); with `idle_window`, its
        idle frames are rendered (every cached frame with that audio window, usually silence)."""
        shape = tuple(avatar.frame_shape[:2])
        first_read = avatar.blender.first_patch_row()
        if first_read < self.rows_from:
            raise ValueError(
                f"avatar {avatar.manifest.source_name}: its blend mask reads patch row {first_read}, above "
                f"row {self.rows_from} from which the {self.model_id} render graph draws; the mask "
                "predates the cut at that row: prepare the avatar again (--force)"
            )
        with self._lock:
            bank = self._banks.get(shape)
            if bank is None:
                bank = self._banks[shape] = ComposeBank(shape, self.device)
            # composed on the host: the bank only indexes the avatar (its windows are built if a
            # device compose is ever asked for)
            first = bank.add(np.asarray(avatar.frames), avatar.blender, build=not self.host_compose)
            latents = avatar.latents.to(self.device, torch.float32)
            slot = AvatarSlot(avatar, bank, first, latents)
            self.slots.append(slot)
            self._compiled.clear()  # the bank changed: captured graphs are stale
        if idle_window is not None:
            n = avatar.num_frames
            windows = np.repeat(np.asarray(idle_window, np.float32)[None], n, axis=0)
            step = self.buckets[-1]
            idle: list[np.ndarray] = []
            for i in range(0, n, step):
                idle += self.render_now([FrameRequest(slot, tuple(range(i, min(n, i + step))), windows[i : i + step])])[0]
            for frame in idle:
                frame.flags.writeable = False
            slot.idle = idle
        return slot

    # -- the batch ---------------------------------------------------------------------------

    def _compiled_fn(self, key: tuple, fn: Callable) -> Callable:
        """fn compiled once per key (bucket, bank) with CUDA graphs; eager when not compiled."""
        if self.step != "compiled":
            return fn
        compiled = self._compiled.get(key)
        if compiled is None:
            allow_recompiles(1)
            compiled = self._compiled[key] = torch.compile(fn, mode="reduce-overhead", dynamic=False)
        return compiled

    def _model_levels(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return family_levels(self.model_id, self._render(latents, audio))

    def render_now(self, requests: Sequence[FrameRequest]) -> list[list[np.ndarray]]:
        """Frames of every request (same order), in one model call and one compose call per
        frame size (per bucket chunk for batches past the largest bucket). Synchronous: call
        it from a worker thread when on an event loop."""
        if not requests:
            return []
        return self.on_engine_thread(self._render_here, requests)

    def on_engine_thread(self, fn: Callable, *args):
        """fn(*args) on the engine's own thread (see __init__); called there, it runs directly."""
        if threading.get_ident() == self._thread_id:
            return fn(*args)
        return self._executor.submit(fn, *args).result()

    def _mark_engine_thread(self) -> None:
        self._thread_id = threading.get_ident()

    def _render_here(self, requests: Sequence[FrameRequest]) -> list[list[np.ndarray]]:
        with self._lock, torch.inference_mode():
            return self._render_locked(requests)

    def _render_locked(self, requests: Sequence[FrameRequest]) -> list[list[np.ndarray]]:
        # requests grouped by frame size (bank), so that each bank's frames are contiguous
        order = sorted(range(len(requests)), key=lambda i: id(requests[i].slot.bank))
        group = [requests[i] for i in order]
        latents = torch.cat([r.slot.latents[r.slot.cached_indices(r.positions)] for r in group])
        audio = torch.from_numpy(np.concatenate([np.asarray(r.windows, np.float32) for r in group]))
        audio = audio.to(self.device, non_blocking=True)
        ids = torch.tensor([r.slot.first + c for r in group for c in r.slot.cached_indices(r.positions)],
                           dtype=torch.int64, device=self.device)
        banks: list[tuple[ComposeBank, int, int]] = []  # bank, first row, end row
        row = 0
        for r in group:
            if banks and banks[-1][0] is r.slot.bank:
                banks[-1] = (r.slot.bank, banks[-1][1], row + len(r.positions))
            else:
                banks.append((r.slot.bank, row, row + len(r.positions)))
            row += len(r.positions)
        # uint8 frames on the device per bank chunk, in `group` order (host path: lists of frames)
        outs: list[torch.Tensor | list[np.ndarray]] = []
        shown = [(r.slot, p) for r in group for p in r.positions]  # row -> (avatar, cycle position)
        top = self.buckets[-1]
        for s in range(0, row, top):  # one model call per largest bucket (usually just one)
            e = min(row, s + top)
            if self.host_compose:
                patches = self._host_patches(self._call(("model",), self._render, latents[s:e], audio[s:e]))
            else:
                levels = self._call(("model",), self._model_levels, latents[s:e], audio[s:e])
            self.model_calls += 1
            for bank, b0, b1 in banks:  # one compose call per frame size
                lo, hi = max(b0, s), min(b1, e)
                if lo < hi:
                    if self.host_compose:
                        outs.append([self._compose_on_host(*shown[k], patches[k - s]) for k in range(lo, hi)])
                    else:
                        outs.append(self._call(("compose", id(bank)), functools.partial(self._compose, bank),
                                               levels[lo - s : hi - s], ids[lo:hi]))
                    self.compose_calls += 1
        # frames of different sizes cannot share a tensor: one host copy per bank chunk, each
        # cut into its requests' own buffers
        host: list[np.ndarray] = []
        for out, sizes in zip(outs, _chunk_requests([len(r.positions) for r in group], [len(o) for o in outs])):
            host += _split(out, sizes) if isinstance(out, list) else self._to_host(out, sizes)
        if self.device.type == "cuda":
            synchronize(self.device)
        frames: list[list[np.ndarray] | None] = [None] * len(requests)
        parts = iter(host)
        for i, r in zip(order, group):
            got: list[np.ndarray] = []
            while len(got) < len(r.positions):
                got += list(next(parts))
            frames[i] = got
        self.frames_rendered += row
        return frames  # type: ignore[return-value]

    def _call(self, key: tuple, fn: Callable, *args: torch.Tensor) -> torch.Tensor:
        """fn(*args) on a batch: compiled steps get it padded to its bucket (copies of the last
        row, their output dropped) so each bucket's CUDA graph is captured once."""
        m = args[0].shape[0]
        if not self._padded:
            return fn(*args)
        size = bucket_size(m, self.buckets)
        if size > m:
            args = tuple(torch.cat([a, a[-1:].expand(size - m, *a.shape[1:])]) for a in args)
        return self._compiled_fn(key + (size,), fn)(*args)[:m].clone()  # graphs reuse outputs

    @property
    def host_compose(self) -> bool:
        """CPU, bgr24, not compiled: the family's uint8 patches + the numpy Blender per frame
        (module docstring)."""
        return self.device.type == "cpu" and self.frame_format == "bgr24" and self.step != "compiled"

    @property
    def _padded(self) -> bool:
        # Batches are padded to a bucket when compiled (one CUDA graph per bucket) and on any
        # CUDA device (cuDNN builds an execution plan for every new shape: tens of ms each, a
        # stall a live session sees as late frames); a CPU runs exact sizes (padding only adds work).
        return self.step == "compiled" or self.device.type == "cuda"

    def _compose(self, bank: ComposeBank, levels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = bank.compose(levels, ids)
        # converted on the device, inside the compiled step: half the bytes to copy to the host
        return bgr_to_yuv420p(out) if self.frame_format == "yuv420p" else out

    def _host_patches(self, images: torch.Tensor) -> np.ndarray:
        """The family's uint8 patches [N,256,256,3] of the render output, converting only the
        rows the graph draws (compact: 96-255; the rest stay 0, as drawn)."""
        if not self.rows_from:
            return self._to_patches(images)
        patches = np.zeros((len(images), *images.shape[2:], 3), np.uint8)
        patches[:, self.rows_from :] = self._to_patches(images[:, :, self.rows_from :])
        return patches

    @staticmethod
    def _compose_on_host(slot: AvatarSlot, position: int, patch: np.ndarray) -> np.ndarray:
        """The host path's compose: a new buffer holding the cached frame with `patch` [256,256,3]
        uint8 BGR blended in by the avatar's numpy Blender."""
        return slot.avatar.compose_into(slot.avatar.new_frame_buffer(), patch, position)

    def _to_host(self, frames: torch.Tensor, sizes: Sequence[int]) -> list[np.ndarray]:
        """The one host copy of the frame path: `frames` [N,...] uint8 cut into consecutive
        parts of `sizes` rows, each copied into memory of its own (one request's frames are never
        a view of memory another session reads). On CUDA each part goes by DMA straight into
        its own pinned buffer (no CPU memcpy; the caller synchronises once for all); on a CPU a
        copy of the slice. Rows past sum(sizes) (bucket padding) are dropped."""
        parts = []
        for piece in _split(frames, sizes):
            if frames.device.type == "cpu":
                parts.append(piece.numpy().copy())  # numpy-owned: no tensor kept alive
            else:
                host = torch.empty(piece.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(piece, non_blocking=True)
                parts.append(host.numpy())
        return parts

    # -- sessions ----------------------------------------------------------------------------

    def _session_batcher(self) -> TickBatcher:
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher_loop is not loop:
            # one per event loop (a test or tool may run several loops one after the other)
            self._batcher = TickBatcher(
                self.render_now, tick_s=self.tick_s, max_pending=self.max_pending, max_batch=self.buckets[-1],
                size=lambda r: len(r.positions), name="frame-engine", executor=self._executor,
            )
            self._batcher_loop = loop
        return self._batcher

    async def render(self, request: FrameRequest, *, probe: bool = False) -> list[np.ndarray]:
        """The frames of `request`, rendered in the next tick's batch together with every
        other session's. Cancelling the caller drops only its own frames. probe: a one-off
        timing request (session idle probes), which no later batch waits for."""
        return await self._session_batcher().submit(request, regular=not probe)

    async def close(self) -> None:
        """Stop the tick loop of the current event loop; waiting requests are cancelled."""
        if self._batcher is not None:
            await self._batcher.close()
            self._batcher = None

    def warm_up(self) -> float:
        """Run (and, compiled, capture) every bucket once before serving, on the engine's thread
        (where batches will replay them): the compile time is paid here, not on the first user's
        frames. Returns seconds spent."""
        return self.on_engine_thread(self._warm_up_here)

    def _warm_up_here(self) -> float:
        if not self.slots:
            return 0.0
        t0 = time.perf_counter()
        slot = self.slots[0]
        sizes = self.buckets if self._padded else self.buckets[:1]
        for size in sizes:
            windows = np.zeros((size, AUDIO_TOKENS, WHISPER_DIM), np.float32)
            self.render_now([FrameRequest(slot, tuple(range(size)), windows)])
        if self.step == "compiled":
            self.gate = self.accuracy_gate()
        seconds = time.perf_counter() - t0
        log.info("frame engine warm-up (%s, buckets %s): %.1f s", self.step, list(sizes), seconds)
        return seconds

    def accuracy_gate(self, batch: int = 4):
        """The engines' accuracy gate for the compiled step: its frames for seeded inputs
        against the eager fp32 torch graph + compose, judged at this engine's precision
        (bf16 by the fp16 thresholds). Raises engines.EngineRejected when it fails."""
        from .engines import GATE_SEED, EngineRejected, judge, patch_metrics

        slot = self.slots[0]
        generator = torch.Generator().manual_seed(GATE_SEED)
        windows = torch.randn(batch, AUDIO_TOKENS, WHISPER_DIM, generator=generator).numpy()
        request = FrameRequest(slot, tuple(range(batch)), windows)
        candidate = np.stack(self.render_now([request])[0])
        eager = torch_render_fn(getattr(self.model, "model", self.model), self.device, "fp32")
        with self._lock, torch.inference_mode():
            ids = torch.tensor([slot.first + c for c in slot.cached_indices(request.positions)], device=self.device)
            images = eager(slot.latents[slot.cached_indices(request.positions)], torch.from_numpy(windows).to(self.device))
            reference = slot.bank.compose(family_levels(self.model_id, images), ids)
            if self.frame_format == "yuv420p":
                reference = bgr_to_yuv420p(reference)
            reference = reference.cpu().numpy()
        metrics = patch_metrics(reference, candidate)
        passed = judge(metrics, "fp32" if self.precision == "fp32" else "fp16")
        verdict = (f"compiled frame step {self.precision}: max abs error {metrics.max_abs_error}, "
                   f"PSNR {metrics.psnr_db if metrics.psnr_db is not None else 'inf'} dB")
        log.info("accuracy gate %s: %s", "passed" if passed else "FAILED", verdict)
        if not passed:
            raise EngineRejected(f"{verdict}: refused; use --backend torch")
        return metrics

    def describe(self) -> str:
        compose = ", numpy compose" if self.host_compose else ""
        return f"frame engine on {self.device} ({self.precision}, {self.step}, {self.frame_format}{compose})"

    def stats(self) -> dict:
        batcher = self._batcher.stats.as_dict() if self._batcher is not None else {}
        return {"device": str(self.device), "precision": self.precision, "step": self.step,
                "compose": "numpy" if self.host_compose else "torch",
                "frames_rendered": self.frames_rendered, "model_calls": self.model_calls,
                "compose_calls": self.compose_calls, "avatars": len(self.slots), "batches": batcher}
