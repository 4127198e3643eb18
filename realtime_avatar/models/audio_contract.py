"""What a renderer model hears: its per-frame audio window and the encoder setting it was trained on.

A model is trained on windows of Whisper features cut a certain way (MuseTalk v1.5: features
2i-4 .. 2i+5 of the offline 30 s pass); fed anything else it mis-times the lips. So the window
and the streaming setting belong to the model, not to the session:

    AudioContract.window      timing.AudioWindow: which features frame i hears
    AudioContract.streaming   the live encoder setting (window, hop, lookahead) it was trained
                              with (compact models), or the parity setting (MuseTalk)
    AudioContract.offline     offline renders use the whole-segment pass (MuseTalk was trained
                              on it) instead of the streamed features

Stored in a compact checkpoint's safetensors metadata, inside the `notes` JSON, as
`"audio_window": {"first": f, "last": l}` and `"streaming": {"window_s", "hop_s",
"lookahead_s", "layout"}` (the trainer writes both). Files written before the window was
recorded fall back to MuseTalk's window, which is what they were trained on; files without a
streaming record to LOW_LATENCY (what the trainer used before it was an option). MuseTalk
releases get MUSETALK_CONTRACT, unless the release directory holds an `audio_contract.json`
({"audio_window": ..., "streaming": ...}) next to musetalk.json.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from realtime_avatar.streaming_whisper import LOW_LATENCY, StreamingConfig
from realtime_avatar.timing import MUSETALK_WINDOW, AudioWindow

WINDOW_KEY = "audio_window"
STREAMING_KEY = "streaming"
SIDE_FILE = "audio_contract.json"  # optional, next to a MuseTalk release's musetalk.json


@dataclass(frozen=True)
class AudioContract:
    window: AudioWindow = MUSETALK_WINDOW
    streaming: StreamingConfig = LOW_LATENCY
    offline: bool = False

    def to_notes(self) -> dict[str, str]:
        """The metadata entries (JSON strings) a checkpoint records this contract with."""
        return {
            WINDOW_KEY: self.window.to_json(),
            STREAMING_KEY: json.dumps(dataclasses.asdict(self.streaming), sort_keys=True),
        }

    @classmethod
    def from_notes(cls, notes: Mapping[str, str], default: AudioContract) -> AudioContract:
        """Read a contract back from checkpoint notes; absent entries keep `default`'s values.

        Raises ValueError naming the bad entry when one is malformed."""
        window, streaming = default.window, default.streaming
        try:
            if WINDOW_KEY in notes:
                window = AudioWindow.from_json(notes[WINDOW_KEY])
            if STREAMING_KEY in notes:
                streaming = StreamingConfig(**json.loads(notes[STREAMING_KEY]))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad audio contract in model metadata ({exc})") from exc
        # a recorded streaming setting means the model was trained on streamed features
        offline = default.offline and STREAMING_KEY not in notes
        return cls(window, streaming, offline)


# MuseTalk v1.5: trained on the offline pass; live sessions use the parity setting
# (4 s windows, 0.5 s lookahead: cosine >= 0.95 to the offline features, DESIGN.md 4).
MUSETALK_CONTRACT = AudioContract(MUSETALK_WINDOW, StreamingConfig(), offline=True)
# A compact checkpoint that records nothing: what export.train did before these were options.
LEGACY_COMPACT_CONTRACT = AudioContract(MUSETALK_WINDOW, LOW_LATENCY, offline=False)


def model_audio_contract(model) -> AudioContract:
    """The contract of a loaded model (or an engine wrapping one): its `audio_contract`
    attribute when it has one, else read from its notes (compact) or the MuseTalk default."""
    contract = getattr(model, "audio_contract", None)
    if isinstance(contract, AudioContract):
        return contract
    notes = getattr(model, "notes", None) or {}
    default = MUSETALK_CONTRACT if model.model_id.startswith("musetalk") else LEGACY_COMPACT_CONTRACT
    return AudioContract.from_notes(notes, default)


def read_side_file(folder: str | Path) -> AudioContract:
    """MUSETALK_CONTRACT, or the one in folder/audio_contract.json when present."""
    path = Path(folder) / SIDE_FILE
    if not path.is_file():
        return MUSETALK_CONTRACT
    try:
        values = json.loads(path.read_text())
        notes = {k: json.dumps(v) for k, v in values.items() if k in (WINDOW_KEY, STREAMING_KEY)}
        return AudioContract.from_notes(notes, MUSETALK_CONTRACT)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
