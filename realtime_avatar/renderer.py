"""AvatarRenderer: one avatar's view of the process's FrameEngine.

    renderer = AvatarRenderer(model, avatar, silence_window(encoder))          # own CPU engine
    renderer = AvatarRenderer(model, avatar, idle_window, engine=runtime.engine)  # shared one
    frames = renderer.render(positions, windows)              # synchronous (offline render)
    frames = await renderer.render_async(positions, windows)  # live sessions: batched per tick

The renderer also owns the idle frames: every cached frame rendered once with the audio window
of silence, so that an avatar that listens shows the same (closed) mouth the model draws in
pauses, not the source photo's own mouth. Rendering and compose run in the engine
(frame_engine.py): on its device, one batched call for all sessions.
"""

from __future__ import annotations

import numpy as np
import torch
from whisper.model import AudioEncoder

from .avatar import Avatar
from .frame_engine import FrameEngine, FrameRequest
from .frame_windows import offline_frame_windows
from .models.base import RendererModel
from .streaming_whisper import offline_features
from .timing import SAMPLE_RATE


def silence_window(encoder: AudioEncoder) -> np.ndarray:
    """The [50,384] audio window of a frame in the middle of two seconds of silence."""
    features = offline_features(encoder, np.zeros(2 * SAMPLE_RATE, np.float32))
    windows = offline_frame_windows(features)
    return windows[len(windows) // 2]


class AvatarRenderer:
    def __init__(
        self,
        model: RendererModel,
        avatar: Avatar,
        idle_window: np.ndarray,
        batch_size: int = 8,
        *,
        engine: FrameEngine | None = None,
        device: torch.device | str = "cpu",
    ):
        """engine: the process's FrameEngine (the Runtime's); None makes a private one on
        `device`. batch_size: frames per call of the synchronous render_batched()."""
        self.model = model
        self.avatar = avatar
        self.batch_size = batch_size
        self.cycle_length = avatar.cycle_length
        self.engine = engine if engine is not None else FrameEngine(model, device)
        self.idle_window = np.asarray(idle_window, np.float32)  # what a silent frame hears (probes use it)
        self.slot = self.engine.add_avatar(avatar, idle_window)
        self.frame_format = self.engine.frame_format
        # set by load_runtime: sessions encode their Whisper windows through it (batched per tick)
        self.encoder_batcher = None

    def _request(self, positions: list[int], windows: np.ndarray) -> FrameRequest:
        return FrameRequest(self.slot, tuple(positions), np.asarray(windows, np.float32))

    def render(self, positions: list[int], windows: np.ndarray) -> list[np.ndarray]:
        """Frames for cycle positions `positions` with audio windows [N,50,384] (one model
        call), [H,W,3] uint8 BGR each (the engine's frame format)."""
        if len(positions) != len(windows):
            raise ValueError(f"{len(positions)} positions but {len(windows)} audio windows")
        return self.engine.render_now([self._request(positions, windows)])[0]

    async def render_async(self, positions: list[int], windows: np.ndarray, *, probe: bool = False) -> list[np.ndarray]:
        """render(), batched with every other session's frames in the engine's next tick
        (probe: a one-off timing render, see FrameEngine.render)."""
        return await self.engine.render(self._request(positions, windows), probe=probe)

    def render_batched(self, positions: list[int], windows: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(positions), self.batch_size):
            out += self.render(positions[i : i + self.batch_size], windows[i : i + self.batch_size])
        return out

    def idle_frame(self, position: int) -> np.ndarray:
        """The avatar at cycle position `position`, listening (read-only)."""
        return self.slot.idle_frame(position)
