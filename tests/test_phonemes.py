"""export.phonemes (libespeak-ng through ctypes) and export.visemes (pure curve math)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from export.phonemes import (
    EspeakError,
    Phoneme,
    phonemes_from_events,
    synthesize,
)
from export.visemes import (
    GRID_PER_FRAME,
    parse_symbol,
    silent_curves,
    unknown_sounds,
    viseme_curves,
)
from realtime_avatar.timing import FPS


def spoken(utterance) -> list[str]:
    return [p.symbol for p in utterance.phonemes if not p.is_pause]


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if len(audio) else 0.0


# ---------------------------------------------------------------- phonemes


def test_known_word_gives_expected_phonemes():
    hello = synthesize("Hello", voice="en")
    assert hello.sample_rate == 22050
    assert hello.audio.dtype == np.float32
    assert spoken(hello) == ["h", "@", "l", "oU"]
    assert 0.3 < hello.duration_s < 1.0
    assert 0.05 < np.abs(hello.audio).max() <= 1.0
    guten = synthesize("Guten", voice="de")
    assert spoken(guten) == ["g", "u:", "t", "@", "n"]


def test_phonemes_cover_the_audio_and_match_its_silences():
    utterance = synthesize("Bob moves. Pure people paint.", voice="en-us")
    phonemes = utterance.phonemes
    assert phonemes[0].start_s == 0.0
    assert phonemes[-1].end_s == pytest.approx(utterance.duration_s)
    for before, after in zip(phonemes, phonemes[1:]):
        assert before.end_s == after.start_s
    assert all(p.duration_s > 0 for p in phonemes)

    # The sentence pause is silent and the speech around it is not: the timings describe
    # this audio, not some other rendering of the text.
    sr = utterance.sample_rate
    pause = max((p for p in phonemes if p.is_pause), key=lambda p: p.duration_s)
    assert pause.duration_s > 0.1
    pause_audio = utterance.audio[int(pause.start_s * sr) + 200 : int(pause.end_s * sr) - 200]
    vowels = [p for p in phonemes if p.symbol in ("0", "u:", "U@", "i:", "eI")]
    assert len(vowels) >= 4
    vowel_rms = np.mean([rms(utterance.audio[int(v.start_s * sr) : int(v.end_s * sr)]) for v in vowels])
    assert rms(pause_audio) < 0.01 * vowel_rms
    # Speech resumes where the next phoneme is said to start (within ~30 ms).
    onset = next(p for p in phonemes if p.start_s >= pause.end_s and not p.is_pause)
    middle_s = (pause.start_s + pause.end_s) / 2
    loud = np.flatnonzero(np.abs(utterance.audio[int(middle_s * sr) :]) > 0.02)
    first_sound_s = middle_s + loud[0] / sr
    assert abs(first_sound_s - onset.start_s) < 0.03


@pytest.mark.parametrize(
    "voice, text, expected",
    [
        ("en-us", "Bob", ["b", "0", "b"]),
        ("en-gb-x-rp", "Bob", ["b", "0", "b"]),
        ("en+f3", "moon", ["m", "u:", "n"]),
        ("fr-fr", "bonjour", ["b", "O~", "Z", "u", "r"]),
        ("es", "mapa", ["m", "a", "p", "a"]),
        ("it", "pane", ["p", "a", "n", "e"]),
    ],
)
def test_voices(voice, text, expected):
    utterance = synthesize(text, voice=voice)
    assert spoken(utterance) == expected
    assert rms(utterance.audio) > 0.01


def test_rate_and_pitch_change_the_speech():
    text = "Seven people moved the table."
    slow = synthesize(text, rate_wpm=110)
    fast = synthesize(text, rate_wpm=260)
    assert 1.6 < slow.duration_s / fast.duration_s < 3.0
    assert spoken(slow) == spoken(fast)
    low = synthesize(text, pitch=20)
    high = synthesize(text, pitch=85)
    assert spoken(low) == spoken(high)
    assert median_f0(high) > 1.2 * median_f0(low)


def median_f0(utterance) -> float:
    """Median autocorrelation pitch (60-400 Hz) over the vowels of an utterance."""
    sr = utterance.sample_rate
    estimates = []
    for p in utterance.phonemes:
        if p.symbol[0] not in "aeiouAEIOU@03V" or p.duration_s < 0.05:
            continue
        x = utterance.audio[int(p.start_s * sr) : int(p.end_s * sr)].astype(np.float64)
        x = x - x.mean()
        ac = np.correlate(x, x, mode="full")[len(x) - 1 :]
        lo, hi = sr // 400, sr // 60
        estimates.append(sr / (lo + np.argmax(ac[lo:hi])))
    assert len(estimates) >= 3
    return float(np.median(estimates))


def test_bad_requests_raise_clear_errors():
    with pytest.raises(EspeakError, match="no voice 'zz-nonexistent'"):
        synthesize("hello", voice="zz-nonexistent")
    with pytest.raises(ValueError, match="rate_wpm"):
        synthesize("hello", rate_wpm=20)
    with pytest.raises(ValueError, match="pitch"):
        synthesize("hello", pitch=150)
    with pytest.raises(ValueError, match="empty"):
        synthesize("   ")


def test_concurrent_calls_are_serialised_and_deterministic():
    # '+f2' breathes: its noise comes from the C library's rand(), seeded per call.
    jobs = [("Hello there.", "en"), ("Guten Tag.", "de"), ("Hola amigo.", "es"), ("Who?", "en-us+f2")]
    jobs *= 2
    serial = [synthesize(text, voice=voice) for text, voice in jobs]
    results: list = [None] * len(jobs)

    def work(k):
        results[k] = synthesize(jobs[k][0], voice=jobs[k][1])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results):
        np.testing.assert_array_equal(a.audio, b.audio)
        assert a.phonemes == b.phonemes


def test_phonemes_from_events_is_contiguous():
    events = [(0.05, "h"), (0.1, "@"), (0.1, "(en)"), (0.2, "_"), (0.2, "l"), (0.3, "oU")]
    phonemes = phonemes_from_events(events, duration_s=0.5)
    assert phonemes == [
        Phoneme(0.0, 0.05, "_"),
        Phoneme(0.05, 0.1, "h"),
        Phoneme(0.1, 0.2, "@"),
        Phoneme(0.2, 0.3, "l"),
        Phoneme(0.3, 0.5, "oU"),
    ]


# ---------------------------------------------------------------- visemes


def test_parse_symbol_splits_diphthongs_and_strips_marks():
    def sounds(symbol):
        return [s for s, _ in parse_symbol(symbol)]

    assert sounds("aI") == ["a", "I"]
    assert sounds("aI@") == ["a", "I", "@"]
    assert sounds("tS") == ["t", "S"]
    assert sounds("i:") == ["i"]
    assert sounds("@2") == ["@"]
    assert sounds("3:") == ["3"]
    assert sounds("E~") == ["E"]
    assert sounds("l^") == ["l"]
    assert sounds("**") == ["*"]
    assert sounds("_:") == [""]
    a, i = (t for _, t in parse_symbol("aI"))
    assert a.jaw > i.jaw and i.spread > a.spread
    (u,) = (t for _, t in parse_symbol("u:"))
    assert u.round == 1.0


def test_every_sound_of_our_languages_has_a_target():
    texts = {
        "en": "The quick brown fox jumps over the lazy dog; joy, thoughts, measure, choir.",
        "en-us": "Water, butter, north, thought, cot caught, pure azure vision.",
        "de": "Zwölf Boxkämpfer jagen Viktor quer über den großen Deich. Häuser, Feuer, ich.",
        "fr-fr": "Portez ce vieux whisky au juge blond qui fume. Un bon vin blanc, deux oeufs.",
        "es": "El veloz murciélago hindú comía feliz cardillo y kiwi. La cigüeña, el año.",
        "it": "Gli gnocchi sono buoni. Quel vituperabile xenofobo zelante assaggia il whisky.",
    }
    unknown = {}
    for voice, text in texts.items():
        for phoneme in synthesize(text, voice=voice).phonemes:
            missing = unknown_sounds(phoneme.symbol)
            if missing:
                unknown[(voice, phoneme.symbol)] = missing
    assert not unknown


def test_silence_is_the_closed_neutral_mouth():
    curves = silent_curves(10)
    assert len(curves) == 10
    assert curves.as_array().shape == (10, 5)
    assert np.all(curves.as_array() == 0.0)
    # Speech followed by a long pause comes back to rest.
    phonemes = [Phoneme(0.0, 0.2, "a:"), Phoneme(0.2, 1.0, "_:")]
    curves = viseme_curves(phonemes, 25)
    assert curves.jaw[2] > 0.8
    assert np.all(curves.as_array()[10:] < 0.01)
    # Time beyond the last phoneme is silence too.
    assert np.all(viseme_curves([Phoneme(0.0, 0.1, "a")], 20).as_array()[8:] == 0.0)


def test_frame_i_covers_its_own_40ms():
    # A vowel held over frames 10..14 exactly: open there, shut well outside.
    frame_s = 1.0 / FPS
    phonemes = [
        Phoneme(0.0, 10 * frame_s, "_"),
        Phoneme(10 * frame_s, 15 * frame_s, "a"),
        Phoneme(15 * frame_s, 1.0, "_"),
    ]
    jaw = viseme_curves(phonemes, 25).jaw
    assert np.all(jaw[11:14] > 0.9)
    assert jaw[10] > 0.6 and jaw[14] > 0.6
    assert np.all(jaw[:8] < 0.01) and np.all(jaw[17:] < 0.01)
    assert GRID_PER_FRAME * FPS == 1000


@pytest.mark.parametrize("offset_ms", range(0, 40, 3))
def test_short_closures_are_never_missed(offset_ms):
    # espeak's 'b' can last ~18 ms; wherever it falls against the 40 ms frame grid, one frame
    # must show the lips fully closed and the vowels around it open.
    start = 0.2 + offset_ms / 1000.0
    phonemes = [
        Phoneme(0.0, start, "a"),
        Phoneme(start, start + 0.018, "b"),
        Phoneme(start + 0.018, 0.5, "a"),
    ]
    curves = viseme_curves(phonemes, 13)
    assert curves.closure.max() == 1.0
    closed = np.flatnonzero(curves.closure >= 0.99)
    assert closed.min() >= 3 and closed.max() <= 7
    assert curves.closure[0] == 0.0 and curves.closure[-1] == 0.0


def test_voiceless_stop_closure_starts_before_its_event():
    # The silent closure of 'p' precedes the burst espeak reports: the lips must already be
    # shut in the frame before the event's frame.
    phonemes = [Phoneme(0.0, 0.25, "i:"), Phoneme(0.25, 0.28, "p"), Phoneme(0.28, 0.5, "i:")]
    closure = viseme_curves(phonemes, 13).closure
    assert closure[5] > 0.5  # frame 5 = [200, 240) ms, before the event at 250 ms
    assert closure[6] == 1.0


def test_real_sentence_curves():
    utterance = synthesize("Bob moves. Who?", voice="en-us")
    n = int(utterance.duration_s * FPS)
    curves = viseme_curves(utterance.phonemes, n)
    assert all(0.0 <= v.min() and v.max() <= 1.0 for v in curves.as_array().T)

    def frames_of(symbol):
        return [
            int((p.start_s + p.end_s) / 2 * FPS) for p in utterance.phonemes if p.symbol == symbol
        ]

    for frame in frames_of("b") + frames_of("m"):
        assert curves.closure[frame] == 1.0
    for frame in frames_of("u:"):
        assert curves.round[frame] > 0.7 and curves.closure[frame] < 0.1
    for frame in frames_of("v"):
        assert curves.labiodental[frame] == 1.0
    for frame in frames_of("0"):
        assert curves.jaw[frame] > 0.5
    pause = max((p for p in utterance.phonemes if p.is_pause), key=lambda p: p.duration_s)
    middle = int((pause.start_s + pause.end_s) / 2 * FPS)
    assert curves.as_array()[middle].max() < 0.02
