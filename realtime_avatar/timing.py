"""Every timing constant of the pipeline, in one place, each derived from the others.

The clocks: audio at 16 kHz, Whisper features at 50 Hz (one per 320 samples = 20 ms), video
at 25 fps (one frame per 640 samples = 40 ms, two features per frame). Frame i of MuseTalk v1.5
sees a 10-feature window: original features 2i-4 .. 2i+5, i.e. 80 ms of audio before the
frame starts and 80 ms after it ends. These pure functions are the only place that math lives.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

SAMPLE_RATE = 16_000  # Hz, what Whisper and every stage after the resampler works at
FEATURE_RATE = 50  # Whisper encoder outputs per second (after its stride-2 conv)
FPS = 25  # video frames per second
SAMPLES_PER_FEATURE = SAMPLE_RATE // FEATURE_RATE  # 320 samples = 20 ms
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 samples = 40 ms
FEATURES_PER_FRAME = FEATURE_RATE // FPS  # 2
WINDOW_FEATURES = 10  # features per frame window (MuseTalk v1.5)
WINDOW_PAD_LEFT = 4  # zero features padded before feature 0: frame 0 sees features -4 .. 5
WINDOW_PAD_RIGHT = 12  # zero features padded after the last one (MuseTalk pads 12)
WHISPER_LAYERS = 5  # stacked hidden states: embedding + blocks 1..4 (tiny has 4 blocks)
WHISPER_DIM = 384  # hidden size of Whisper tiny
AUDIO_TOKENS = WINDOW_FEATURES * WHISPER_LAYERS  # 50 cross-attention tokens per frame
SEGMENT_SECONDS = 30  # Whisper's context: positions are absolute inside a 30 s segment
SEGMENT_FEATURES = SEGMENT_SECONDS * FEATURE_RATE  # 1500 positional embeddings
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE  # 480000

assert SAMPLES_PER_FEATURE * FEATURE_RATE == SAMPLE_RATE
assert SAMPLES_PER_FRAME * FPS == SAMPLE_RATE
assert FEATURES_PER_FRAME * FPS == FEATURE_RATE


def num_frames(n_samples: int) -> int:
    """Video frames for a clip of n_samples at 16 kHz: floor(duration * 25) (MuseTalk)."""
    return n_samples // SAMPLES_PER_FRAME


def num_features(n_samples: int) -> int:
    """Whisper features kept for a clip of n_samples: floor(duration * 50) (MuseTalk)."""
    return n_samples // SAMPLES_PER_FEATURE


@dataclass(frozen=True)
class AudioWindow:
    """Which features a frame hears, as offsets from its own first feature 2i (inclusive).

    Frame i covers audio [40i, 40i+40) ms = features 2i and 2i+1. A window (first, last) hears
    features 2i+first .. 2i+last. MuseTalk v1.5 is (-4, 5): 80 ms before the frame, 80 ms after
    its end, 10 features. The window is a property of a model (it was trained on it); its right
    context, (last - 1) features, is audio the session must wait for before the frame can be
    rendered, so it is part of the output delay.

    Raises ValueError for windows that do not hear the whole frame (first > 0 or last < 1).
    """

    first: int = -WINDOW_PAD_LEFT  # -4
    last: int = WINDOW_FEATURES - WINDOW_PAD_LEFT - 1  # 5

    def __post_init__(self) -> None:
        if self.first > 0 or self.last < FEATURES_PER_FRAME - 1:
            raise ValueError(
                f"audio window {self.first}..{self.last} (offsets from feature 2i) must include the "
                f"frame's own features 0..{FEATURES_PER_FRAME - 1}"
            )

    @property
    def length(self) -> int:
        """Features in the window (MuseTalk: 10)."""
        return self.last - self.first + 1

    @property
    def tokens(self) -> int:
        """Cross-attention tokens per frame: length x 5 Whisper layers (MuseTalk: 50)."""
        return self.length * WHISPER_LAYERS

    @property
    def pad_left(self) -> int:
        """Zero features needed before feature 0 (MuseTalk: 4)."""
        return -self.first

    @property
    def right_context_features(self) -> int:
        """Features after the frame's own audio that the window reaches (MuseTalk: 4)."""
        return self.last - (FEATURES_PER_FRAME - 1)

    @property
    def right_context_s(self) -> float:
        """Seconds of audio after the frame's end the window needs (MuseTalk: 0.08)."""
        return self.right_context_features / FEATURE_RATE

    @classmethod
    def with_right_context(cls, right_context_ms: float, length: int = WINDOW_FEATURES) -> AudioWindow:
        """A `length`-feature window reaching right_context_ms (a multiple of 20 ms) past the
        frame's end; the rest of its length is left context. 80 ms, 10 features: MuseTalk's."""
        features = round(right_context_ms * FEATURE_RATE / 1000)
        if abs(features * 1000 / FEATURE_RATE - right_context_ms) > 1e-6 or features < 0:
            raise ValueError(f"right context {right_context_ms} ms is not a non-negative multiple of 20 ms")
        last = FEATURES_PER_FRAME - 1 + features
        return cls(last - length + 1, last)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AudioWindow:
        values = json.loads(text)
        if set(values) != {"first", "last"}:
            raise ValueError(f"an audio window is {{'first', 'last'}}, got {sorted(values)}")
        return cls(int(values["first"]), int(values["last"]))


MUSETALK_WINDOW = AudioWindow(-WINDOW_PAD_LEFT, WINDOW_FEATURES - WINDOW_PAD_LEFT - 1)  # 2i-4 .. 2i+5


def window_first_feature(frame: int, window: AudioWindow = MUSETALK_WINDOW) -> int:
    """Index (in original, unpadded features) of the first feature in frame's window: 2i-4."""
    return FEATURES_PER_FRAME * frame + window.first


def window_last_feature(frame: int, window: AudioWindow = MUSETALK_WINDOW) -> int:
    """Index of the last feature in frame's window (inclusive): 2i+5 for MuseTalk."""
    return FEATURES_PER_FRAME * frame + window.last


def frames_ready(n_features_final: int, total_features: int | None = None, window: AudioWindow = MUSETALK_WINDOW) -> int:
    """How many frames can be released once features [0, n_features_final) are final.

    Frame i needs original feature 2i+last (2i+5 for MuseTalk). When the clip has ended
    (total_features known and all of them final) the rest of every window is zero padding, so
    all frames are ready.
    """
    if total_features is not None and n_features_final >= total_features:
        return total_features // FEATURES_PER_FRAME
    features_for_frame0 = window.last + 1  # MuseTalk: 6, features 0..5
    return max(0, (n_features_final - features_for_frame0) // FEATURES_PER_FRAME + 1)


def samples_to_seconds(n_samples: int) -> float:
    return n_samples / SAMPLE_RATE
