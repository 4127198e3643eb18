"""Every timing constant of the pipeline, in one place, each derived from the others.

The clocks: audio at 16 kHz, Whisper features at 50 Hz (one per 320 samples = 20 ms), video
at 25 fps (one frame per 640 samples = 40 ms, two features per frame). Frame i of MuseTalk v1.5
sees a 10-feature window: original features 2i-4 .. 2i+5, i.e. 80 ms of audio before the
frame starts and 80 ms after it ends. These pure functions are the only place that math lives.
"""

from __future__ import annotations

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


def window_first_feature(frame: int) -> int:
    """Index (in original, unpadded features) of the first feature in frame's window."""
    return FEATURES_PER_FRAME * frame - WINDOW_PAD_LEFT


def window_last_feature(frame: int) -> int:
    """Index of the last feature in frame's window (inclusive): 2i+5."""
    return window_first_feature(frame) + WINDOW_FEATURES - 1


def frames_ready(n_features_final: int, total_features: int | None = None) -> int:
    """How many frames can be released once features [0, n_features_final) are final.

    Frame i needs original feature 2i+5. When the clip has ended (total_features known and
    all of them final) the rest of every window is zero padding, so all frames are ready.
    """
    if total_features is not None and n_features_final >= total_features:
        return total_features // FEATURES_PER_FRAME
    features_for_frame0 = WINDOW_FEATURES - WINDOW_PAD_LEFT  # 6: features 0..5
    return max(0, (n_features_final - features_for_frame0) // FEATURES_PER_FRAME + 1)


def samples_to_seconds(n_samples: int) -> float:
    return n_samples / SAMPLE_RATE
