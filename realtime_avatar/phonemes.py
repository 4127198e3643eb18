"""Speech with phoneme timings from libespeak-ng, through ctypes.

espeak-ng reports each phoneme it speaks as an espeakEVENT_PHONEME event (start time in ms,
mnemonic in `id.string`) when initialised with espeakINITIALIZE_PHONEME_EVENTS. In
AUDIO_OUTPUT_SYNCHRONOUS mode espeak_Synth calls our callback with audio buffers and event
lists on the calling thread and returns when the utterance is done, so one call gives the
whole waveform and its phoneme track. The library keeps all of its state in globals and is not
re-entrant: every call goes through one lock.

Some of that state (the waveform generator's) survives espeak_Terminate and shifts the output
by a few samples depending on what was spoken before. So that an utterance depends only on
its arguments (the training-data generator is deterministic from a seed), every call loads
the library afresh and unloads it afterwards (~2 ms). Voice variants with breath noise
('+f2', '+f4', ...) draw from the C library's rand(): it is seeded before each call.

The struct layouts and constants follow espeak-ng's speak_lib.h (API revision 12).
"""

from __future__ import annotations

import _ctypes
import ctypes
import threading
from dataclasses import dataclass

import numpy as np

LIBRARY_NAME = "libespeak-ng.so.1"

# espeak_AUDIO_OUTPUT: like RETRIEVAL (audio handed to the callback) but espeak_Synth returns
# only when synthesis is complete.
AUDIO_OUTPUT_SYNCHRONOUS = 2
espeakINITIALIZE_PHONEME_EVENTS = 0x0001
espeakINITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exit() when data is missing
espeakCHARS_UTF8 = 1
POS_CHARACTER = 1
espeakRATE = 1
espeakPITCH = 3
EE_OK = 0

# espeak_EVENT_TYPE
espeakEVENT_LIST_TERMINATED = 0
espeakEVENT_PHONEME = 7

RATE_MIN_WPM = 80  # espeakRATE_MINIMUM
RATE_MAX_WPM = 450  # espeakRATE_MAXIMUM
PITCH_MIN, PITCH_MAX = 0, 100  # espeak's pitch scale (50 = the voice's normal pitch)

# Phoneme mnemonics espeak uses for pauses. '_:' is a clause/sentence pause, '_' a short one
# (also emitted, with zero length, at the very end), '_!' a glottal-stop style break.
PAUSE_SYMBOLS = frozenset({"_", "_:", "_!", "_^_", "||", "|"})
SILENCE = "_"  # the symbol given to leading silence we add before the first event


def is_language_switch(symbol: str) -> bool:
    """'(en)', '(fr)': espeak marks a switch of language inside the text, not a sound."""
    return symbol.startswith("(") and symbol.endswith(")")


class _EventId(ctypes.Union):
    _fields_ = [
        ("number", ctypes.c_int),  # WORD and SENTENCE events
        ("name", ctypes.c_char_p),  # MARK and PLAY events
        ("string", ctypes.c_char * 8),  # PHONEME events: mnemonic, NUL-terminated unless 8 long
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of this utterance's audio
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _Voice(ctypes.Structure):
    """espeak_VOICE, used here as the selection criteria of espeak_SetVoiceByProperties."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),  # as a criterion: one language, e.g. b"fr-fr"
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


class EspeakError(RuntimeError):
    """libespeak-ng is missing, failed to initialise, or rejected a request."""


@dataclass(frozen=True)
class Phoneme:
    start_s: float
    end_s: float
    symbol: str  # espeak mnemonic, e.g. 'h', '@', 'oU', '_:' (pause)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def is_pause(self) -> bool:
        return self.symbol in PAUSE_SYMBOLS


@dataclass(frozen=True)
class Utterance:
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int  # 22050 for espeak-ng's own voices
    phonemes: list[Phoneme]  # contiguous, covering [0, duration_s]
    text: str
    voice: str
    rate_wpm: int
    pitch: int

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass
class _RawEvent:
    time_ms: int
    symbol: str


class _Espeak:
    """The process-wide libespeak-ng instance (the library itself is a singleton)."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL(LIBRARY_NAME)
        except OSError as exc:
            raise EspeakError(
                f"cannot load {LIBRARY_NAME}: install the Debian package espeak-ng ({exc})"
            ) from exc
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int

        options = espeakINITIALIZE_PHONEME_EVENTS | espeakINITIALIZE_DONT_EXIT
        self.sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, options)
        if self.sample_rate <= 0:
            raise EspeakError("espeak_Initialize failed: is espeak-ng-data installed?")
        # The callback object must outlive every synthesis call: keep it on the instance.
        self._callback = _SynthCallback(self._on_synth)
        lib.espeak_SetSynthCallback(self._callback)
        self._chunks: list[np.ndarray] = []
        self._events: list[_RawEvent] = []

    def _on_synth(self, wav, n_samples, events) -> int:
        if wav and n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        i = 0
        while events[i].type != espeakEVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == espeakEVENT_PHONEME:
                raw = bytes(event.id.string).split(b"\0", 1)[0]
                self._events.append(_RawEvent(event.audio_position, raw.decode("utf-8", "replace")))
            i += 1
        return 0  # continue synthesis

    def close(self) -> None:
        """Free espeak's memory and unload the library, so that the next load starts clean."""
        self.lib.espeak_Terminate()
        _ctypes.dlclose(self.lib._handle)

    def synthesize(self, text: str, voice: str, rate_wpm: int, pitch: int):
        lib = self.lib
        # By name matches a voice file ('en-us', 'fr', 'en+f3'); the language column of
        # `espeak-ng --voices` ('fr-fr', 'en-gb') needs selection by properties.
        if lib.espeak_SetVoiceByName(voice.encode()) != EE_OK and (
            "+" in voice or lib.espeak_SetVoiceByProperties(_Voice(languages=voice.encode())) != EE_OK
        ):
            raise EspeakError(f"espeak-ng has no voice {voice!r}: see `espeak-ng --voices`")
        if lib.espeak_SetParameter(espeakRATE, rate_wpm, 0) != EE_OK:
            raise EspeakError(f"espeak-ng rejected rate {rate_wpm} wpm")
        if lib.espeak_SetParameter(espeakPITCH, pitch, 0) != EE_OK:
            raise EspeakError(f"espeak-ng rejected pitch {pitch}")
        self._chunks, self._events = [], []
        _libc.srand(RAND_SEED)  # breath noise of some voice variants comes from rand()
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, espeakCHARS_UTF8, None, None)
        if status != EE_OK:
            raise EspeakError(f"espeak_Synth failed with status {status} for text {text!r}")
        lib.espeak_Synchronize()
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return pcm, self._events


_lock = threading.Lock()
_libc = ctypes.CDLL(None)  # the process's C library: espeak-ng calls its rand()
_libc.srand.argtypes = [ctypes.c_uint]
RAND_SEED = 22050


def phonemes_from_events(events: list[tuple[float, str]], duration_s: float) -> list[Phoneme]:
    """Turn (start_s, symbol) events into contiguous phonemes covering [0, duration_s].

    Each phoneme lasts until the next event; the last lasts to the end of the audio. Silence
    before the first event becomes a pause phoneme, and zero-length events (espeak emits a
    '_' at a clause boundary at the same time as the next phoneme) and language-switch markers
    are dropped.
    """
    events = sorted(
        ((min(max(t, 0.0), duration_s), s) for t, s in events if not is_language_switch(s)),
        key=lambda e: e[0],
    )
    if not events or events[0][0] > 0.0:
        events.insert(0, (0.0, SILENCE))
    phonemes = []
    for (start, symbol), (end, _) in zip(events, events[1:] + [(duration_s, "")]):
        if end > start:
            phonemes.append(Phoneme(start, end, symbol))
    return phonemes


def synthesize(text: str, voice: str = "en", rate_wpm: int = 160, pitch: int = 50) -> Utterance:
    """Speak `text` with espeak-ng; return its audio and phoneme timings.

    voice: any name `espeak-ng --voices` lists ('en', 'en-us', 'en-gb-x-rp', 'de', 'fr-fr',
    'es', ...), optionally with a variant ('en+f3', 'de+m2').
    """
    if not text.strip():
        raise ValueError("synthesize: text is empty")
    if not RATE_MIN_WPM <= rate_wpm <= RATE_MAX_WPM:
        raise ValueError(f"rate_wpm {rate_wpm} outside espeak's {RATE_MIN_WPM}..{RATE_MAX_WPM}")
    if not PITCH_MIN <= pitch <= PITCH_MAX:
        raise ValueError(f"pitch {pitch} outside espeak's {PITCH_MIN}..{PITCH_MAX}")
    with _lock:
        engine = _Espeak()
        try:
            pcm, raw_events = engine.synthesize(text, voice, rate_wpm, pitch)
            sample_rate = engine.sample_rate
        finally:
            engine.close()
    if len(pcm) == 0:
        raise EspeakError(f"espeak-ng produced no audio for {text!r} with voice {voice!r}")
    audio = pcm.astype(np.float32) / 32768.0
    duration_s = len(audio) / sample_rate
    phonemes = phonemes_from_events([(e.time_ms / 1000.0, e.symbol) for e in raw_events], duration_s)
    return Utterance(audio, sample_rate, phonemes, text, voice, rate_wpm, pitch)
