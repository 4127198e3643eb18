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
    def streaming(self) -> StreamingConfig:
        return model_streaming_config(self.model)[0]

    def clip_features(self, audio16k: np.ndarray) -> np.ndarray:
        """Features of a whole clip, computed the way the model was trained to hear them."""
        config, offline = model_streaming_config(self.model)
        return offline_features(self.encoder, audio16k) if offline else stream_features(self.encoder, audio16k, config)

    def describe(self) -> str:
        a = self.avatar
        return (f"model {self.model.model_id} ({self.model.weights_hash()[:12]}), avatar {a.path} "
                f"({a.num_frames} frames {a.frame_shape[1]}x{a.frame_shape[0]})")


def resolve_avatar(avatar: str | Path | None, model: RendererModel, progress: bool = True) -> Avatar:
    """An avatar directory (made by `prepare`) is loaded as is; an image or video is prepared
    (or its cache reused); None means the bundled default face."""
    if avatar is not None and Path(avatar).is_dir() and read_manifest(Path(avatar)) is not None:
        prepared = load_avatar(Path(avatar))
        prepared.check_model(model)  # latents of another model would render garbage
        return prepared
    source = Path(avatar) if avatar is not None else default_avatar_source()
    return load_or_prepare_avatar(source, default_avatar_dir(source, model), model, AvatarSettings(), progress=progress)


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
) -> Runtime:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    encoder = load_whisper(whisper).encoder
    renderer_model = load_model(model, allow_random=allow_random)
    if backend != "torch":
        from .engines import select_backend

        # encode() stays the torch model's (avatar preparation); render() runs on the engine
        renderer_model = select_backend(renderer_model, backend, batch_size=batch_size, threads=threads)
    prepared = resolve_avatar(avatar, renderer_model, progress)
    from .tuning import load_tuned

    tuned = load_tuned(prepared, renderer_model)  # weights `prepare --tune` made for this avatar
    if tuned is not None:
        log.info("using the weights tuned for %s", prepared.path)
        renderer_model = tuned
        if backend != "torch":
            from .engines import select_backend

            renderer_model = select_backend(tuned, backend, batch_size=batch_size, threads=threads)
    renderer = AvatarRenderer(renderer_model, prepared, silence_window(encoder), batch_size=batch_size)
    runtime = Runtime(encoder, renderer_model, prepared, renderer)
    log.info("runtime ready in %.1f s: %s", time.perf_counter() - t0, runtime.describe())
    return runtime
