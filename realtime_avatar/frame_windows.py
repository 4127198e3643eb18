"""Per-frame audio windows, MuseTalk v1.5 style: features [T,5,384] at 50 Hz -> [50,384] per frame.

Frame i (video time [40i, 40i+40) ms) sees the 10 features 2i-4 .. 2i+5: 80 ms of audio before
the frame and 80 ms after it. Features outside the clip are zeros (MuseTalk pads 4 features on
the left and 12 on the right). The [10,5,384] window is flattened time-major into 50 tokens:
t0 layers 0-4, t1 layers 0-4, ... The sinusoidal positional encoding is part of the models
(realtime_avatar.models.audio_pe), so exported engines carry it; `with_positional_encoding`
adds the same table for callers that drive a bare UNet (MuseTalk's scripts add it outside).

The offline path (whole clip) and the streaming path (frames released as soon as their last
feature exists) produce identical windows for identical features.

The window is the model's (`timing.AudioWindow`, read from its weights' metadata): MuseTalk's
2i-4 .. 2i+5 is the default; our own models may hear less right context (e.g. 2i-8 .. 2i+1, the
same 10 features shifted left) so that a frame can be rendered sooner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .timing import (
    FEATURES_PER_FRAME,
    MUSETALK_WINDOW,
    WHISPER_DIM,
    WHISPER_LAYERS,
    AudioWindow,
    frames_ready,
    window_first_feature,
)


def frame_window(
    features: np.ndarray, frame: int, first_index: int = 0, window: AudioWindow = MUSETALK_WINDOW
) -> np.ndarray:
    """The [window.length*5, 384] window of one frame ([50,384] for 10-feature windows).

    `features` holds original features first_index .. first_index+len-1 ([n,5,384]); positions
    of the window outside that range (clip edges) are zeros. Callers must pass every feature of
    the window that exists in the clip.
    """
    layers, dim = features.shape[1:]
    out = np.zeros((window.length, layers, dim), dtype=np.float32)
    lo = window_first_feature(frame, window)  # absolute index of window slot 0
    src_lo = max(lo, first_index)
    src_hi = min(lo + window.length, first_index + len(features))
    if src_hi > src_lo:
        out[src_lo - lo : src_hi - lo] = features[src_lo - first_index : src_hi - first_index]
    return out.reshape(window.length * layers, dim)  # time-major: (t, layer) -> token


def offline_frame_windows(
    features: np.ndarray, n_frames: int | None = None, window: AudioWindow = MUSETALK_WINDOW
) -> np.ndarray:
    """All windows of a whole clip: features [T,5,384] -> [n_frames,50,384] (n_frames = T//2)."""
    if n_frames is None:
        n_frames = len(features) // FEATURES_PER_FRAME
    layers, dim = features.shape[1:]
    out = np.empty((n_frames, window.length * layers, dim), dtype=np.float32)
    for i in range(n_frames):
        out[i] = frame_window(features, i, 0, window)
    return out


def with_positional_encoding(windows: np.ndarray) -> np.ndarray:
    """Windows [..., 50, 384] plus MuseTalk's sinusoidal table over token positions 0-49."""
    from .models.audio_pe import sinusoidal_positions

    n_tokens, dim = windows.shape[-2:]
    return windows + sinusoidal_positions(n_tokens, dim).numpy()


@dataclass
class FrameAudio:
    """The audio window of one video frame, ready for the renderer."""

    index: int  # frame number: video time index/25 s
    window: np.ndarray  # [50,384] float32


class StreamingFrameWindows:
    """Collects streamed features and releases each frame's window once it is complete.

    Feed feature blocks in order with `push(first_index, states)`; `ready()` returns the new
    frames. `finish(total_features)` marks the end of the clip: the last frames are released
    with zero padding, exactly as the offline path pads. Only the features still needed are
    kept, so memory stays bounded on endless streams.
    """

    def __init__(self, layers: int = WHISPER_LAYERS, dim: int = WHISPER_DIM, window: AudioWindow = MUSETALK_WINDOW):
        self.window = window
        self._buffer = np.zeros((0, layers, dim), dtype=np.float32)
        self._buffer_first = 0  # absolute index of _buffer[0]
        self._received = 0  # features [0, _received) have arrived
        self._next_frame = 0
        self._total: int | None = None

    @property
    def next_frame(self) -> int:
        return self._next_frame

    def push(self, first_index: int, states: np.ndarray) -> list[FrameAudio]:
        if first_index != self._received:
            raise ValueError(
                f"features must arrive in order without gaps: expected index {self._received}, "
                f"got {first_index}"
            )
        if self._total is not None:
            raise ValueError("push() after finish()")
        self._buffer = np.concatenate([self._buffer, states.astype(np.float32, copy=False)])
        self._received += len(states)
        return self._release()

    def finish(self, total_features: int | None = None) -> list[FrameAudio]:
        """End of stream: release the remaining frames (windows run into zero padding)."""
        self._total = self._received if total_features is None else total_features
        if self._total > self._received:
            raise ValueError(f"finish({self._total}) but only {self._received} features arrived")
        return self._release()

    def reset(self, at_feature: int = 0, at_frame: int = 0) -> None:
        """Drop everything (barge-in): the stream restarts at the given indices."""
        self._buffer = self._buffer[:0]
        self._buffer_first = self._received = at_feature
        self._next_frame = at_frame
        self._total = None

    def _release(self) -> list[FrameAudio]:
        n_ready = frames_ready(self._received, self._total, self.window)
        frames = []
        for i in range(self._next_frame, n_ready):
            frames.append(FrameAudio(i, frame_window(self._buffer, i, self._buffer_first, self.window)))
        self._next_frame = max(self._next_frame, n_ready)
        # keep only what the next frame's window can still reach
        keep_from = max(self._buffer_first, window_first_feature(self._next_frame, self.window))
        self._buffer = self._buffer[keep_from - self._buffer_first :]
        self._buffer_first = keep_from
        return frames
