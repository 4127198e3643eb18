"""Everything sessions share, loaded once per process: Whisper encoder, renderer model, avatar.

A server holds one Runtime and creates an AvatarSession per connection from it; the heavy parts
(weights, the avatar cache, idle frames) are never duplicated per session.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from whisper.model import AudioEncoder

from .avatar import (
    Avatar,
    AvatarSettings,
    default_avatar_dir,
    default_avatar_source,
    load_avatar,
    load_or_prepare_avatar,
    read_manifest,
)
from .device import choose_device, choose_precision
from .encoder_batching import EncoderBatcher
from .frame_engine import FrameEngine
from .models.audio_contract import AudioContract, model_audio_contract
from .models.base import RendererModel
from .models.registry import load_model
from .renderer import AvatarRenderer, silence_window
from .streaming_whisper import StreamingConfig, offline_features, stream_features
from .timing import AudioWindow
from .whisper_weights import load_whisper

log = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now into the garbage collector's permanent
    generation (gc.freeze, Python >= 3.7); returns how many were frozen.

    Call it once in a long-running process after the runtime is loaded and before serving
    (serve and live do). Torch, Whisper, the model, mediapipe and aiortc leave ~227,000 tracked
    objects that live as long as the process, and every full (generation 2) collection walks all
    of them with the GIL held, stalling the event loop, the encoder and the render at once.
    Measured on the 2-core machine with the runtime loaded: a full collection takes 184 ms, and
    0.0 ms once they are frozen. CPython runs one when the objects that survived into the old
    generation since the last one reach a quarter of it (~57,000 here): a server that keeps
    taking sessions for hours gets there (not measured here); a one-session 40 s benchmark
    run does not (bench_e2e_webrtc reports the collections it saw).
    Not for tests or library use: objects frozen are never collected, garbage cycles included.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def model_streaming_config(model: RendererModel) -> tuple[StreamingConfig, bool]:
    """The encoder setting a model was trained with, and whether it wants offline features.

    Read from the model's audio contract (models/audio_contract.py): our compact models record
    the live setting they were trained on; MuseTalk was trained on offline (whole-segment)
    features, so live sessions use the parity setting (4 s windows, 0.5 s lookahead) and offline
    renders use the offline pass itself.
    """
    contract = model_audio_contract(model)
    return contract.streaming, contract.offline


@dataclass
class Runtime:
    encoder: AudioEncoder
    model: RendererModel
    avatar: Avatar
    renderer: AvatarRenderer

    @property
    def engine(self) -> FrameEngine:
        """The process's FrameEngine: every session's frames are rendered through it."""
        return self.renderer.engine

    @property
    def device(self) -> torch.device:
        return self.engine.device

    async def close(self) -> None:
        """Stop the engine's and the encoder batcher's tick loops on this event loop (their
        waiting requests are cancelled). Sessions close first; the weights stay loaded."""
        await self.engine.close()
        batcher = getattr(self.renderer, "encoder_batcher", None)
        if batcher is not None:
            await batcher.close()

    @property
    def audio_contract(self) -> AudioContract:
        """The model's audio window and encoder setting (what sessions and renders derive from)."""
        return model_audio_contract(self.model)

    @property
    def streaming(self) -> StreamingConfig:
        return self.audio_contract.streaming

    @property
    def window(self) -> AudioWindow:
        return self.audio_contract.window

    def clip_features(self, audio16k: np.ndarray) -> np.ndarray:
        """Features of a whole clip, computed the way the model was trained to hear them."""
        contract = self.audio_contract
        if contract.offline:
            return offline_features(self.encoder, audio16k)
        return stream_features(self.encoder, audio16k, contract.streaming)

    def measure_compute_s(self, batch_size: int, runs: int = 12) -> float:
        """p99 (of `runs`) of one live encoder run plus one render batch of `batch_size`, in
        seconds, measured now on this machine: the compute term of a session's first output
        delay (delays.py). Cached per batch size; about `runs` x (encoder + batch) to measure."""
        cache = self.__dict__.setdefault("_compute_s", {})
        if batch_size not in cache:
            import torch
            from whisper.audio import log_mel_spectrogram

            from .delays import quantile
            from .session import session_streaming
            from .streaming_whisper import encoder_hidden_states

            streaming = session_streaming(self.streaming)
            rng = np.random.default_rng(0)
            audio = (0.05 * rng.standard_normal(int(streaming.window_s * 16000))).astype(np.float32)
            windows = rng.standard_normal((batch_size, self.window.tokens, 384)).astype(np.float32)
            times = []
            with torch.no_grad():
                for k in range(runs + 2):  # two warm-up runs
                    t0 = time.perf_counter()
                    mel = log_mel_spectrogram(torch.from_numpy(audio), n_mels=self.encoder.conv1.in_channels)
                    mel = mel.to(self.encoder.conv1.weight.device)  # the encoder's device (cpu or cuda)
                    encoder_hidden_states(self.encoder, mel, 0, streaming.layout)
                    self.renderer.render(list(range(batch_size)), windows)
                    if k >= 2:
                        times.append(time.perf_counter() - t0)
            cache[batch_size] = quantile(times, 0.99)
        return cache[batch_size]

    def session_config(self, batch_size: int = 4, **overrides):
        """A SessionConfig for this model: its audio window, its trained encoder setting with the
        hop cut to 40 ms, and the compute term measured on this machine (overrides win)."""
        from .session import SessionConfig, session_streaming

        values = {"streaming": session_streaming(self.streaming), "window": self.window, "batch_size": batch_size}
        if "compute_s" not in overrides and overrides.get("render_budget_s") is None and overrides.get("delay_s") is None:
            values["compute_s"] = self.measure_compute_s(batch_size)
        values.update(overrides)
        return SessionConfig(**values)

    def describe(self) -> str:
        a = self.avatar
        return (f"model {self.model.model_id} ({self.model.weights_hash()[:12]}), avatar {a.path} "
                f"({a.num_frames} frames {a.frame_shape[1]}x{a.frame_shape[0]}), {self.engine.describe()}, "
                f"whisper encoder on {'onnxruntime' if hasattr(self.encoder, 'onnx_runner') else 'torch'}")


def resolve_avatar(avatar: str | Path | None, model: RendererModel, progress: bool = True,
                   settings: AvatarSettings | None = None) -> Avatar:
    """An avatar directory (made by `prepare`) is loaded as is; an image or video is prepared
    with `settings` (face choice, background; default AvatarSettings()) or its cache reused;
    None means the bundled default face."""
    if avatar is not None and Path(avatar).is_dir() and read_manifest(Path(avatar)) is not None:
        prepared = load_avatar(Path(avatar))
        prepared.check_model(model)  # latents of another model would render garbage
        return prepared
    source = Path(avatar) if avatar is not None else default_avatar_source()
    return load_or_prepare_avatar(source, default_avatar_dir(source, model), model,
                                  settings if settings is not None else AvatarSettings(), progress=progress)


def load_runtime(
    model: str = "default",
    avatar: str | Path | None = None,
    whisper: str = "tiny.en",
    *,
    allow_random: bool = False,
    backend: str = "auto",
    batch_size: int = 8,
    threads: int | None = None,
    progress: bool = True,
    avatar_settings: AvatarSettings | None = None,
    device: str | torch.device = "auto",
    precision: str | None = None,
    frame_format: str = "bgr24",
) -> Runtime:
    """Load everything sessions share. device: "auto" | "cpu" | "cuda[:N]" (device.choose_device:
    raises DeviceUnavailable for a device this machine lacks); precision: None = fp16 on CUDA,
    fp32 on CPU, or "fp32" | "fp16" | "bf16"; backend: "auto" | "torch" | "onnx" | "tensorrt" |
    "compiled" (torch.compile with CUDA graphs per batch bucket; eager on a CPU); frame_format:
    "bgr24", "yuv420p" (composed in the format the video encoders take, so no colour conversion
    runs on the host; bgr24 for an odd frame size) or "auto" (serve: yuv420p on CUDA, bgr24 on a
    CPU, where it is cheaper). The Whisper
    encoder, the renderer model and the compose step all run on the device; with "compiled" the
    buckets are compiled and gated here, before anything is served."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    target = choose_device(device)
    precision = choose_precision(precision, target)
    encoder = load_whisper(whisper, device=target).encoder
    if backend != "torch":
        from .engines import default_engines_dir
        from .onnx_encoder import attach_onnx_encoder

        if attach_onnx_encoder(encoder, default_engines_dir(), threads):
            log.info("whisper encoder: ONNX Runtime (%s)", encoder.onnx_runner.path)
        elif target.type == "cpu":
            log.info("whisper encoder: torch (`python -m export.encoder_onnx` builds a graph that runs ~2x faster)")
    renderer_model = load_model(model, device=target, allow_random=allow_random)
    step = "compiled" if backend == "compiled" else "torch"
    if backend not in ("torch", "compiled"):
        from .engines import select_backend

        # encode() stays the torch model's (avatar preparation); render() runs on the engine
        renderer_model = select_backend(renderer_model, backend, batch_size=batch_size, threads=threads)
    prepared = resolve_avatar(avatar, renderer_model, progress, avatar_settings)
    from .tuning import load_tuned

    tuned = load_tuned(prepared, renderer_model)  # weights `prepare --tune` made for this avatar
    if tuned is not None:
        log.info("using the weights tuned for %s", prepared.path)
        renderer_model = tuned
        if backend not in ("torch", "compiled"):
            from .engines import select_backend

            renderer_model = select_backend(tuned, backend, batch_size=batch_size, threads=threads)
    if frame_format == "auto":
        # On a GPU the engine's yuv420p (torch, on the device) spares the host any colour
        # conversion. On a CPU its int32 arithmetic costs more than libswscale: measured in
        # bench_e2e_webrtc on 2 cores, render batch p99 257 ms in yuv420p vs 80 ms in bgr24.
        frame_format = "yuv420p" if target.type == "cuda" else "bgr24"
    height, width = prepared.frames.shape[1:3]
    if frame_format == "yuv420p" and (height % 2 or width % 2):
        log.info("frames stay bgr24: yuv420p needs an even frame size, the avatar's is %dx%d", width, height)
        frame_format = "bgr24"
    engine = FrameEngine(renderer_model, target, precision, step=step, frame_format=frame_format)
    renderer = AvatarRenderer(renderer_model, prepared, silence_window(encoder), batch_size=batch_size, engine=engine)
    # the Whisper windows of all sessions, one encoder call per tick (owned here, like the engine)
    renderer.encoder_batcher = EncoderBatcher(encoder)
    engine.warm_up()  # compiled: every bucket captured and gated before the server is healthy
    runtime = Runtime(encoder, renderer_model, prepared, renderer)
    log.info("runtime ready in %.1f s: %s", time.perf_counter() - t0, runtime.describe())
    return runtime
