"""Phonemes -> mouth articulation curves sampled at the video frame rate.

Each espeak phoneme mnemonic is read as a short sequence of articulation targets: a
diphthong like 'aI' is two targets (open 'a', then close-front 'I'), an affricate 'tS' is 't'
then 'S'. A target says how far the jaw drops, how far the lips spread or round, and whether
the lips close (p/b/m) or the lower lip meets the upper teeth (f/v).

The targets become curves on a 1 ms grid. Jaw, spread and rounding are smoothed with a
Gaussian (coarticulation: neighbouring sounds blend; rounding starts earlier than the jaw).
Lip closures are not smoothed away: espeak's p/b events last ~18-35 ms and the silent closure
of a voiceless stop lies *before* its event, so each closure is held flat from a short lead
before the event to its end, and every closure is guaranteed to reach 1.0 in at least one
video frame. Pauses are the neutral, closed mouth.

Frame i covers audio [i/FPS, (i+1)/FPS): its value is the mean of the curve over that
window (the max-coverage rule for closures), matching the frame/audio alignment of timing.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from realtime_avatar.phonemes import PAUSE_SYMBOLS, Phoneme
from realtime_avatar.timing import FPS

GRID_RATE = 1000  # Hz: curves are built on a 1 ms grid, then averaged per video frame
GRID_PER_FRAME = GRID_RATE // FPS  # 40 grid steps per frame
assert GRID_PER_FRAME * FPS == GRID_RATE

JAW_SMOOTHING_S = 0.022  # Gaussian sigma for jaw opening and lip spread
ROUND_SMOOTHING_S = 0.035  # rounding is anticipated further ahead than jaw movement
CONTACT_SMOOTHING_S = 0.012  # closures/labiodentals ramp in and out quickly
CLOSURE_HOLDS_JAW = 0.7  # a full lip closure removes this share of the jaw opening
# A closure reaches 1.0 in a frame when it covers at least this fraction of the frame.
CONTACT_FULL_COVERAGE = 0.5


@dataclass(frozen=True)
class Target:
    """Articulation target of one sound; every value in [0, 1]."""

    jaw: float = 0.0  # jaw/inner-lip opening: 0 closed at rest, 1 wide open ('a')
    spread: float = 0.0  # lip corners pulled outward ('i', 'e')
    round: float = 0.0  # lips rounded and protruded, mouth narrower ('u', 'o', 'w', 'S')
    closure: float = 0.0  # lips pressed together (p, b, m)
    labiodental: float = 0.0  # lower lip raised under the upper teeth (f, v)


NEUTRAL = Target()

# One character = one articulation. Vowels (Kirshenbaum-like espeak mnemonics). The numbers
# are judgement, ordered by the usual vowel chart: open vowels drop the jaw most, front
# vowels spread, back vowels round.
VOWEL_TARGETS: dict[str, Target] = {
    "a": Target(jaw=1.00, spread=0.35),
    "A": Target(jaw=1.00, spread=0.15, round=0.05),  # back open (father)
    "&": Target(jaw=0.90, spread=0.50),  # ae (cat)
    "0": Target(jaw=0.85, round=0.45),  # British 'lot'
    "V": Target(jaw=0.75, spread=0.25),  # strut
    "E": Target(jaw=0.65, spread=0.55),
    "e": Target(jaw=0.50, spread=0.65),
    "@": Target(jaw=0.40, spread=0.20),  # schwa
    "3": Target(jaw=0.45, spread=0.15, round=0.10),  # nurse
    "i": Target(jaw=0.22, spread=0.90),
    "I": Target(jaw=0.30, spread=0.70),
    "y": Target(jaw=0.22, round=0.90),  # French u, German ue
    "Y": Target(jaw=0.35, round=0.70),  # oe (close-mid front rounded)
    "W": Target(jaw=0.50, round=0.60),  # oe (open-mid front rounded)
    "o": Target(jaw=0.50, round=0.80),
    "O": Target(jaw=0.70, round=0.55),
    "u": Target(jaw=0.25, round=1.00),
    "U": Target(jaw=0.32, round=0.75),
}
# Digits are vowels only as the first character ('0' lot, '3' nurse, '2'/'9' front rounded);
# after another character they are espeak's variant markers ('@2', 'z2', 'i@3').
LEADING_DIGIT_VOWELS: dict[str, Target] = {
    "0": VOWEL_TARGETS["0"],
    "3": VOWEL_TARGETS["3"],
    "2": Target(jaw=0.35, round=0.70),
    "9": Target(jaw=0.50, round=0.60),
}
CONSONANT_TARGETS: dict[str, Target] = {
    # bilabials: lips together
    "p": Target(jaw=0.05, closure=1.0),
    "b": Target(jaw=0.05, closure=1.0),
    "m": Target(jaw=0.05, closure=1.0),
    "B": Target(jaw=0.08, closure=0.7),  # Spanish bilabial fricative: nearly closed
    # labiodentals: lower lip under the upper teeth
    "f": Target(jaw=0.10, labiodental=1.0),
    "v": Target(jaw=0.10, labiodental=1.0),
    # dental/alveolar: small opening, teeth nearly together for sibilants
    "T": Target(jaw=0.20, spread=0.30),
    "D": Target(jaw=0.20, spread=0.30),
    "t": Target(jaw=0.18, spread=0.35),
    "d": Target(jaw=0.18, spread=0.35),
    "n": Target(jaw=0.18, spread=0.35),
    "l": Target(jaw=0.22, spread=0.30),
    "L": Target(jaw=0.22, spread=0.30),
    "s": Target(jaw=0.10, spread=0.50),
    "z": Target(jaw=0.10, spread=0.50),
    # postalveolar: lips protruded
    "S": Target(jaw=0.15, round=0.65),
    "Z": Target(jaw=0.15, round=0.65),
    # velar, palatal, uvular, glottal-ish
    "k": Target(jaw=0.28, spread=0.25),
    "g": Target(jaw=0.28, spread=0.25),
    "N": Target(jaw=0.25, spread=0.25),
    "x": Target(jaw=0.28, spread=0.20),
    "Q": Target(jaw=0.28, spread=0.20),  # Spanish voiced velar fricative
    "C": Target(jaw=0.20, spread=0.55),  # German ich-laut
    "j": Target(jaw=0.20, spread=0.70),
    "w": Target(jaw=0.12, round=1.00),
    "r": Target(jaw=0.25, round=0.40),  # English r rounds the lips
    "R": Target(jaw=0.30, spread=0.20),  # uvular / Italian r
    "*": Target(jaw=0.28, spread=0.20),  # trill ('**' in Spanish)
    "?": Target(jaw=0.20),  # glottal stop
}
# Sounds with no lip shape of their own take the shape of the sound that follows ('h' before
# a vowel is that vowel, breathed).
TRANSPARENT = frozenset({"h"})
# Modifiers that change no lip shape: length, stress, syllabicity, nasality, palatalisation.
IGNORED_MARKS = frozenset(":;#-~^'`,!=|_")
# How long before its event a closure starts: a voiceless stop's silent closure precedes the
# event (which marks the burst); a voiced stop's event already includes most of its closure.
CLOSURE_LEAD_S = {"p": 0.045, "b": 0.015, "m": 0.0, "B": 0.0, "f": 0.02, "v": 0.01}


@dataclass(frozen=True)
class MouthPose:
    """The articulation of one video frame (what the teacher renders)."""

    jaw: float
    spread: float
    round: float
    closure: float
    labiodental: float


@dataclass(frozen=True)
class VisemeCurves:
    """Per-frame articulation curves, each float32 [n_frames] in [0, 1]."""

    jaw: np.ndarray
    spread: np.ndarray
    round: np.ndarray
    closure: np.ndarray
    labiodental: np.ndarray

    def __len__(self) -> int:
        return len(self.jaw)

    def at(self, frame: int) -> MouthPose:
        return MouthPose(*(float(getattr(self, f.name)[frame]) for f in fields(self)))

    def as_array(self) -> np.ndarray:
        """[n_frames, 5] in field order (jaw, spread, round, closure, labiodental)."""
        return np.stack([getattr(self, f.name) for f in fields(self)], axis=1)


@dataclass(frozen=True)
class Articulation:
    """One target held over [start_s, end_s)."""

    start_s: float
    end_s: float
    sound: str  # the single character that produced it ('' for a pause)
    target: Target


def parse_symbol(symbol: str) -> list[tuple[str, Target | None]]:
    """The articulations of one espeak phoneme mnemonic, in order.

    'aI' -> a, I; 'tS' -> t, S; '@L' -> @, L; 'i:' -> i; 'E~' -> E; '@2' -> @. A pause gives
    one neutral target; a transparent sound ('h') gives None (filled from its successor).
    Characters we have no table entry for fall back to a schwa-like target.
    """
    if symbol in PAUSE_SYMBOLS or not symbol or symbol.startswith("_"):
        return [("", NEUTRAL)]
    sounds: list[str] = []
    for position, char in enumerate(symbol):
        if char in IGNORED_MARKS:
            continue
        if char.isdigit() and position > 0:
            continue  # espeak variant marker
        if sounds and sounds[-1] == char:
            continue  # 'aa', 'ss', '**': one sound, long
        sounds.append(char)
    if not sounds:
        return [("", NEUTRAL)]
    parts: list[tuple[str, Target | None]] = []
    for position, char in enumerate(sounds):
        if char in TRANSPARENT:
            parts.append((char, None))
        elif position == 0 and char in LEADING_DIGIT_VOWELS:
            parts.append((char, LEADING_DIGIT_VOWELS[char]))
        elif char in VOWEL_TARGETS:
            parts.append((char, VOWEL_TARGETS[char]))
        elif char in CONSONANT_TARGETS:
            parts.append((char, CONSONANT_TARGETS[char]))
        else:
            parts.append((char, VOWEL_TARGETS["@"]))
    return parts


def unknown_sounds(symbol: str) -> set[str]:
    """Characters of `symbol` that parse_symbol maps to the schwa fallback (for coverage checks)."""
    known = set(VOWEL_TARGETS) | set(CONSONANT_TARGETS) | set(LEADING_DIGIT_VOWELS) | TRANSPARENT
    if symbol in PAUSE_SYMBOLS or symbol.startswith("_"):
        return set()
    return {c for c, _ in parse_symbol(symbol) if c and c not in known}


def articulations(phonemes: list[Phoneme]) -> list[Articulation]:
    """Split every phoneme into its articulations, sharing its time equally between them,
    and resolve transparent sounds to the next real target (or neutral at the end)."""
    out: list[Articulation] = []
    for phoneme in phonemes:
        parts = parse_symbol(phoneme.symbol)
        step = phoneme.duration_s / len(parts)
        for k, (sound, target) in enumerate(parts):
            start = phoneme.start_s + k * step
            out.append(Articulation(start, start + step, sound, target))  # type: ignore[arg-type]
    following: Target = NEUTRAL
    for k in range(len(out) - 1, -1, -1):
        if out[k].target is None:
            out[k] = Articulation(out[k].start_s, out[k].end_s, out[k].sound, following)
        following = out[k].target if out[k].sound else NEUTRAL
    return out


def gaussian_smooth(signal: np.ndarray, sigma_steps: float) -> np.ndarray:
    """Gaussian blur with edge values held (the clip starts and ends at rest anyway)."""
    if sigma_steps <= 0:
        return signal.copy()
    radius = int(np.ceil(3 * sigma_steps))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma_steps) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(signal, radius, mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def frame_means(signal: np.ndarray, n_frames: int) -> np.ndarray:
    """Mean of a 1 ms grid signal over each frame window [40i, 40i+40) ms."""
    return signal[: n_frames * GRID_PER_FRAME].reshape(n_frames, GRID_PER_FRAME).mean(axis=1)


def contact_curve(holds: list[tuple[float, float, float]], n_frames: int) -> np.ndarray:
    """Per-frame strength of lip contacts (closure or labiodental) held over intervals.

    holds: (start_s, end_s, strength). A frame reaches the full strength when the contact
    covers CONTACT_FULL_COVERAGE of it, and the frame holding the middle of every contact is
    at full strength, so a contact shorter than a frame is never missed. A quickly smoothed
    copy adds the ramps into and out of the contact.
    """
    n_grid = n_frames * GRID_PER_FRAME
    grid = np.zeros(n_grid)
    curve = np.zeros(n_frames)
    for start_s, end_s, strength in holds:
        a = int(np.clip(round(start_s * GRID_RATE), 0, n_grid))
        b = int(np.clip(round(end_s * GRID_RATE), 0, n_grid))
        if b <= a:
            continue
        grid[a:b] = np.maximum(grid[a:b], strength)
        middle_frame = min((a + b) // 2 // GRID_PER_FRAME, n_frames - 1)
        curve[middle_frame] = max(curve[middle_frame], strength)
    coverage = frame_means(grid, n_frames)
    curve = np.maximum(curve, np.clip(coverage / CONTACT_FULL_COVERAGE, 0.0, 1.0))
    ramps = frame_means(gaussian_smooth(grid, CONTACT_SMOOTHING_S * GRID_RATE), n_frames)
    return np.maximum(curve, ramps)


def viseme_curves(phonemes: list[Phoneme], n_frames: int) -> VisemeCurves:
    """Articulation curves for n_frames video frames at FPS from a phoneme track.

    Time beyond the last phoneme is silence. Frame i covers [i/FPS, (i+1)/FPS).
    """
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if n_frames == 0:
        empty = np.zeros(0, np.float32)
        return VisemeCurves(empty, empty, empty, empty, empty)
    n_grid = n_frames * GRID_PER_FRAME
    jaw, spread, round_ = (np.zeros(n_grid) for _ in range(3))
    closures: list[tuple[float, float, float]] = []
    labiodentals: list[tuple[float, float, float]] = []
    for art in articulations(phonemes):
        a = int(np.clip(round(art.start_s * GRID_RATE), 0, n_grid))
        b = int(np.clip(round(art.end_s * GRID_RATE), 0, n_grid))
        jaw[a:b], spread[a:b], round_[a:b] = art.target.jaw, art.target.spread, art.target.round
        lead = CLOSURE_LEAD_S.get(art.sound, 0.0)
        if art.target.closure > 0:
            closures.append((art.start_s - lead, art.end_s, art.target.closure))
        if art.target.labiodental > 0:
            labiodentals.append((art.start_s - lead, art.end_s, art.target.labiodental))
    closure = contact_curve(closures, n_frames)
    # Lips pressed together hold the jaw nearly shut too, whatever the smoothing brought in.
    jaw_frames = frame_means(gaussian_smooth(jaw, JAW_SMOOTHING_S * GRID_RATE), n_frames)
    curves = VisemeCurves(
        jaw=jaw_frames * (1.0 - CLOSURE_HOLDS_JAW * closure),
        spread=frame_means(gaussian_smooth(spread, JAW_SMOOTHING_S * GRID_RATE), n_frames),
        round=frame_means(gaussian_smooth(round_, ROUND_SMOOTHING_S * GRID_RATE), n_frames),
        closure=closure,
        labiodental=contact_curve(labiodentals, n_frames),
    )
    return VisemeCurves(
        *(np.clip(getattr(curves, f.name), 0.0, 1.0).astype(np.float32) for f in fields(curves))
    )


def silent_curves(n_frames: int) -> VisemeCurves:
    """The neutral, closed mouth for n_frames."""
    return viseme_curves([], n_frames)
