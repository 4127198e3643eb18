"""Everything sessions share, loaded once per process: Whisper encoder, renderer model, avatar.

A server holds one Runtime and creates an AvatarSession per connection from it; the heavy parts
(weights, the avatar cache, idle frames) are never duplicated per session.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
from pathlib import Path

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
from .models.base import RendererModel
from .models.registry import load_model
from .renderer import AvatarRenderer, silence_window
from .streaming_whisper import LOW_LATENCY, StreamingConfig, offline_features, stream_features
from .whisper_weights import load_whisper

log = logging.getLogger(__name__)


def model_streaming_config(model: RendererModel) -> tuple[StreamingConfig, bool]:
    """The encoder setting a model was trained with, and whether it wants offline features.

    Our compact models record the live setting they were trained on in their notes; MuseTalk was
    trained on offline (whole-segment) features, so live sessions use the parity setting
    (4 s windows, 0.5 s lookahead) and offline renders use the offline pass itself.
    """
    notes = getattr(model, "notes", {}) or {}
    if "streaming" in notes:
        return StreamingConfig(**json.loads(notes["streaming"])), False
    if model.model_id.startswith("musetalk"):
        return StreamingConfig(), True
    return LOW_LATENCY, False


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
    def streaming(self) -> StreamingConfig:
        return model_streaming_config(self.model)[0]

    def clip_features(self, audio16k: np.ndarray) -> np.ndarray:
        """Features of a whole clip, computed the way the model was trained to hear them."""
        config, offline = model_streaming_config(self.model)
        return offline_features(self.encoder, audio16k) if offline else stream_features(self.encoder, audio16k, config)

    def describe(self) -> str:
        a = self.avatar
        return (f"model {self.model.model_id} ({self.model.weights_hash()[:12]}), avatar {a.path} "
                f"({a.num_frames} frames {a.frame_shape[1]}x{a.frame_shape[0]}), {self.engine.describe()}")


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
    "compiled" (torch.compile with CUDA graphs per batch bucket; eager on a CPU). The Whisper
    encoder, the renderer model and the compose step all run on the device; with "compiled" the
    buckets are compiled and gated here, before anything is served."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    target = choose_device(device)
    precision = choose_precision(precision, target)
    encoder = load_whisper(whisper, device=target).encoder
    renderer_model = load_model(model, device=target, allow_random=allow_random)
    step = "compiled" if backend == "compiled" else "torch"
    if backend not in ("torch", "compiled"):
        from .engines import select_backend

        # encode() stays the torch model's (avatar preparation); render() runs on the engine
        renderer_model = select_backend(renderer_model, backend, batch_size=batch_size, threads=threads)
    prepared = resolve_avatar(avatar, renderer_model, progress, avatar_settings)
    engine = FrameEngine(renderer_model, target, precision, step=step, frame_format=frame_format)
    renderer = AvatarRenderer(renderer_model, prepared, silence_window(encoder), batch_size=batch_size, engine=engine)
    # the Whisper windows of all sessions, one encoder call per tick (owned here, like the engine)
    renderer.encoder_batcher = EncoderBatcher(encoder)
    engine.warm_up()  # compiled: every bucket captured and gated before the server is healthy
    runtime = Runtime(encoder, renderer_model, prepared, renderer)
    log.info("runtime ready in %.1f s: %s", time.perf_counter() - t0, runtime.describe())
    return runtime
