"""AvatarRenderer: audio windows in, finished avatar frames out.

One model call renders a batch of 256x256 mouth patches (UNet single step + latent decoder);
each patch is blended into the avatar frame of its cycle position. The renderer also owns the
idle frames: every cached frame rendered once with the audio window of silence, so that an
avatar that listens shows the same (closed) mouth the model draws in pauses, not the source
photo's own mouth.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from whisper.model import AudioEncoder

from .avatar import Avatar
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
    def __init__(self, model: RendererModel, avatar: Avatar, idle_window: np.ndarray, batch_size: int = 8):
        self.model = model
        self.avatar = avatar
        self.batch_size = batch_size
        self.cycle_length = avatar.cycle_length
        # Sessions share one renderer; torch inference is thread-safe, but one call at a time
        # keeps two sessions from fighting over the same 2 cores with 2x the threads.
        self._lock = threading.Lock()
        n = avatar.num_frames
        idle_windows = np.repeat(idle_window[None], n, axis=0)
        self._idle = self.render_batched(list(range(n)), idle_windows)
        for frame in self._idle:
            frame.flags.writeable = False

    def render(self, positions: list[int], windows: np.ndarray) -> list[np.ndarray]:
        """Frames for cycle positions `positions` with audio windows [N,50,384] (one model call)."""
        if len(positions) != len(windows):
            raise ValueError(f"{len(positions)} positions but {len(windows)} audio windows")
        latents = self.avatar.latents_at(positions)
        with self._lock, torch.inference_mode():
            patches = self.model.render(latents, torch.from_numpy(np.ascontiguousarray(windows)))
        return [
            self.avatar.compose_into(self.avatar.new_frame_buffer(), patch, position)
            for patch, position in zip(patches, positions)
        ]

    def render_batched(self, positions: list[int], windows: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(positions), self.batch_size):
            out += self.render(positions[i : i + self.batch_size], windows[i : i + self.batch_size])
        return out

    def idle_frame(self, position: int) -> np.ndarray:
        """The avatar at cycle position `position`, listening (read-only)."""
        return self._idle[self.avatar.cycle_index(position)]
