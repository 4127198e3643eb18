"""Training clips for the project's own lip-sync model, rendered by the procedural teacher.

One clip = speech from espeak-ng (random sentence, voice, rate, pitch), with silence before,
after and sometimes between two sentences, and the teacher's face video at 25 fps aligned to
it: frame i covers audio [40i, 40i+40) ms (realtime_avatar.timing). The face is augmented
once per clip (size in the frame, position, roll, colour, lighting, focus, mirror) and sways
slowly over the clip. Frames are what the model sees at run time: the MuseTalk v1.5 face box
of each frame (realtime_avatar.face.face_bbox on the moved landmarks), cut from the virtual
video frame at its own resolution and resized to 256x256 with LANCZOS4.

Splits (never mixed, so a held-out score measures generalisation, not memory):
- sentences: in each language, every sentence whose index % 10 == 9 is held out;
- voices: HELDOUT_VOICES (accents and voice variants) are never used for training;
- rates: training draws from TRAIN_RATES, held out from HELDOUT_RATES (a band in the middle
  and faster speech than any training clip).
Pitch (uniform 25-75) and the augmentations are drawn the same way in both splits. The only
face shipped is the astronaut photo, so faces are not split: pass your own with `faces=`.

`generate_clip(seed, split)` is deterministic: the same seed and split give the same clip,
bit for bit, in any process (see export.phonemes on espeak's hidden state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np
import soxr

from export.phonemes import Phoneme, synthesize
from export.teacher import FaceCanvas, MouthTeacher, face_canvas
from export.visemes import VisemeCurves, viseme_curves
from realtime_avatar.face import FaceLandmarks, detect_face_landmarks, face_bbox
from realtime_avatar.timing import FPS, SAMPLE_RATE, num_frames

CROP_SIZE = 256  # the model's face crop (MuseTalk)
SPLITS = ("train", "heldout")

SENTENCES: dict[str, tuple[str, ...]] = {
    "en": (
        "Hello, how are you today?",
        "The quick brown fox jumps over the lazy dog.",
        "Bob bought a big blue boat for the bay.",
        "Please put the paper back on the pile.",
        "My mother made a marvellous meal on Monday.",
        "We were wondering where you went last week.",
        "Who knew the moon would look so full tonight?",
        "Five very fine violins were found in the van.",
        "She sells sea shells by the sea shore.",
        "I think the theatre opens at three thirty.",
        "Could you open the window a little, please?",
        "The train to Boston leaves at half past nine.",
        "Peter picked a peck of pickled peppers.",
        "Amazing, I never thought I would see this.",
        "Why not meet me at the museum after lunch?",
        "Our food was cooked over an open fire.",
        "Maybe we should move the meeting to May.",
        "Everybody loves a good story by the fire.",
        "Put the blue box beside the brown bag.",
        "How much would you pay for a warm woollen hat?",
        "The weather forecast promises bright sunshine.",
        "Remember to buy bread, milk and apples.",
        "Few people ever visit the old mill by the river.",
        "Oh no, the bus is already full again.",
        "Good morning, everyone, and welcome back.",
        "I'd like a cup of coffee with a bit of sugar.",
        "Thank you very much for the lovely flowers.",
        "The children played happily in the park.",
        "Do you know what time the shop closes?",
        "We moved to a small town near the mountains.",
        "Every Wednesday we play music in the barn.",
        "That was the best pizza I have ever eaten.",
        "Open your books at page forty five.",
        "The baby was born on a beautiful May morning.",
        "Whoever wins will buy the whole team dinner.",
        "Fresh fruit and vegetables are full of vitamins.",
        "My phone battery is almost empty.",
        "Please pass the pepper and the parmesan.",
        "A warm wind moved over the wide open moor.",
        "Are you sure the oven is off?",
        "They opened a new bakery on Baker Street.",
        "It is far too hot to work outside today.",
        "Do not forget your umbrella, it may rain.",
        "The pilot spoke calmly to the passengers.",
        "Mum bought me a puppy for my birthday.",
        "We should probably book the tickets now.",
        "Who wants to go swimming in the pool?",
        "The museum was full of famous paintings.",
        "Lovely to meet you, my name is Pam.",
        "Move the map a bit further up, please.",
        "The fox found food behind the farm.",
        "Nobody knew the answer to the puzzle.",
        "Would you mind waiting a moment?",
        "Bread and butter pudding is my favourite.",
        "Apples, pears and plums were piled up high.",
        "The photographer took a photo of the frozen pond.",
        "We owe the whole village an apology.",
        "Room two hundred is on the fourth floor.",
        "Everything will be fine, I promise.",
        "Please remember to feed the fish.",
        "What a wonderful view from the balcony!",
        "My brother plays the bass in a blues band.",
        "Sometimes the simplest ideas work best.",
        "Pull the blinds down before the movie begins.",
        "Ruth threw the ball through the open window.",
        "I usually walk to work when the weather is good.",
        "The museum opens at ten and closes at five.",
        "Have you ever been to Mumbai or Bombay?",
        "Beautiful music filled the empty ballroom.",
        "You should move your foot before it falls asleep.",
        "Boil the water, then pour it over the tea.",
        "We bumped into Bill at the bus stop.",
        "Few of us knew how to fix the boiler.",
        "Very few vans were parked by the river.",
        "The ship sailed past the lighthouse at dawn.",
        "Mary married a man from Miami.",
        "Put your phone away and look at me.",
        "I hope the parcel arrives by Friday.",
        "Who moved my blue umbrella?",
        "Maybe the map in the box belongs to Paul.",
        "The zoo keeper fed the hungry hippos.",
        "A bowl of warm soup is perfect in winter.",
        "Both of them were born in February.",
        "Let me explain the plan one more time.",
        "The wolf howled at the pale full moon.",
        "Please write your phone number on the form.",
        "Big black bugs bleed blue black blood.",
        "We voted for the proposal by a wide margin.",
        "Our neighbours own a big brown poodle.",
        "Old photos remind me of my grandfather.",
        "Some people prefer tea, others prefer coffee.",
        "Whatever happens, we will move forward.",
        "Jump over the puddle, not into it.",
        "The baker baked a batch of brown buns.",
        "Mum made pancakes with maple syrup.",
        "Can you believe it is already November?",
        "Pick up the pieces and put them in the bin.",
        "The football match was postponed by a week.",
        "Wait for me by the big oak tree.",
        "Food is much better when you share it.",
        "A few white clouds floated over the valley.",
        "My favourite month is probably May.",
        "Push the button and wait for the beep.",
        "The bees buzzed busily among the blossoms.",
        "Would you like more mashed potatoes?",
        "Time flies when you are having fun.",
        "The lawyer argued that the proof was weak.",
        "Bring me the blue pen from the top shelf.",
        "Whales move through the ocean with amazing power.",
        "Open the map and point to where we are.",
        "Seven people moved the heavy table.",
        "It was a bright cold day in April.",
        "We measured the room before buying the rug.",
        "Please bear with me for a moment.",
        "The wind blew the papers off the table.",
        "Who would want to work on a Sunday?",
        "Ninety nine balloons floated up into the sky.",
        "Many moons ago, my mum moved to Malta.",
        "Pour the milk slowly into the bowl.",
        "Buy one, get one free, the poster promised.",
        "I will phone you when the film is finished.",
        "Both boys were very proud of the bike.",
        "The opera was wonderful from beginning to end.",
        "We walked along the beach at low tide.",
        "Be polite and wait for your turn.",
        "The puppy pulled the blanket off the bed.",
        "Oops, I spilled the soup on my shoe.",
        "Move over, there is room for one more.",
        "The football flew over the fence.",
        "My boss wants the report by Wednesday.",
        "Every morning I brush my teeth and comb my hair.",
        "You must be proud of what you have achieved.",
        "Please book a table for five at eight.",
        "An old woman sat by the window knitting.",
        "We found a warm room with a view.",
        "People put pebbles in the pond for fun.",
        "Thousands of fans poured into the stadium.",
        "The phone rang while I was in the bath.",
        "Whoops, who put the boots on the bed?",
        "Please pay at the booth before boarding.",
        "I am moving my office to the ground floor.",
        "Mountains may move but my mind will not.",
        "Feel free to bring a friend to the party.",
        "The bamboo bent but it did not break.",
        "Blueberries make a marvellous breakfast.",
        "The wolf and the fox were both very hungry.",
        "Summer is my favourite time of year.",
        "Mix the flour, butter and water in a bowl.",
        "Where would you go if money were no object?",
        "Every problem has more than one solution.",
        "The police officer waved the people through.",
        "I bought a pair of purple boots in Paris.",
        "Your room looks much brighter with white walls.",
        "A huge moth flew into the lamp.",
        "Please, do not move while the photo is taken.",
        "The broom is behind the bathroom door.",
        "Wow, what a beautiful rainbow!",
        "My voice sounds funny on the phone.",
        "We will meet by the fountain at noon.",
        "Bubbles floated up from the bottom of the pool.",
        "Grandpa wore a woollen cap and a warm scarf.",
        "Paul and Pam both play the piano.",
        "Before moving on, we should review the plan.",
        "One, two, three, four, five, six, seven.",
        "Maybe, maybe not, we will have to wait and see.",
    ),
    "de": (
        "Guten Morgen, wie geht es Ihnen heute?",
        "Der Bus fährt um neun Uhr vom Bahnhof ab.",
        "Meine Mutter backt jeden Sonntag Brot.",
        "Wir wohnen in einem kleinen Haus am Wald.",
        "Bitte bring mir ein Glas Wasser.",
        "Im Sommer fahren wir oft an die Ostsee.",
        "Das Museum ist montags geschlossen.",
        "Viele Blumen blühen im Mai.",
        "Zwölf Boxkämpfer jagen Viktor quer über den großen Deich.",
        "Hast du morgen Abend schon etwas vor?",
        "Die Kinder spielen Fußball im Park.",
        "Ich möchte bitte zwei Brötchen und Butter.",
    ),
    "fr": (
        "Bonjour, comment allez-vous aujourd'hui ?",
        "Le petit chat boit du lait dans un bol.",
        "Nous partons en vacances au mois de mai.",
        "Pouvez-vous m'aider à porter ce paquet ?",
        "Mon père mange une pomme tous les matins.",
        "Il fait beau, allons nous promener au bord de l'eau.",
        "Le musée ouvre ses portes à neuf heures.",
        "Je voudrais un café et un croissant, s'il vous plaît.",
        "Portez ce vieux whisky au juge blond qui fume.",
        "Où se trouve la boulangerie la plus proche ?",
        "Les enfants jouent au ballon dans le jardin.",
        "Merci beaucoup pour votre aide précieuse.",
    ),
    "es": (
        "Buenos días, ¿cómo estás hoy?",
        "Mi madre prepara una paella maravillosa.",
        "El autobús pasa cada media hora.",
        "Vamos a la playa el próximo verano.",
        "Por favor, abre la ventana un poco.",
        "Me gusta mucho la música popular.",
        "Bebo un vaso de agua por la mañana.",
        "El perro de mi vecino es muy bonito.",
        "Mañana por la tarde vamos al museo.",
        "¿Puedes pasarme el pan, por favor?",
        "Las montañas están cubiertas de nieve.",
        "Muchas gracias por tu ayuda, amigo.",
    ),
}
HELDOUT_SENTENCE_EVERY = 10  # sentence index % 10 == 9 is held out, in every language

TRAIN_VOICES: dict[str, tuple[str, ...]] = {
    "en": (
        "en-us", "en-us+f2", "en-us+m3", "en", "en+f3", "en+m1", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
    ),
    "de": ("de", "de+f2"),
    "fr": ("fr", "fr+f3"),
    "es": ("es", "es+m2"),
}
HELDOUT_VOICES: dict[str, tuple[str, ...]] = {
    "en": ("en-gb-scotland", "en-us-nyc+f4", "en-gb-x-gbcwmd+m4"),
    "de": ("de+m4",),
    "fr": ("fr-be+f1",),
    "es": ("es-419+f4",),
}
TRAIN_RATES = (115, 125, 135, 145, 155, 165, 190, 200, 210, 220)  # words per minute
HELDOUT_RATES = (175, 180, 235, 245)
PITCH_RANGE = (25, 75)
LANGUAGE_WEIGHTS = {"en": 0.76, "de": 0.08, "fr": 0.08, "es": 0.08}

LEAD_SILENCE_S = (0.15, 0.8)  # before the first word
GAP_SILENCE_S = (0.3, 1.0)  # between two sentences
TRAIL_SILENCE_S = (0.15, 0.8)
SECOND_SENTENCE_P = 0.35

# Per-clip augmentation ranges.
FACE_SCALE = (0.75, 1.25)  # size of the face in the virtual frame, relative to the photo
FACE_SHIFT = 0.12  # of the frame size, either way
FACE_ROLL_DEG = 7.0
SWAY_ROLL_DEG = (0.3, 2.5)  # slow head sway: amplitude of roll
SWAY_SHIFT = (0.002, 0.015)  # of the frame size
SWAY_PERIOD_S = (2.0, 7.0)
BOX_JITTER = 0.03  # face-box offset/size error, of the box size (landmark detectors differ)
GAIN_RANGE = (0.85, 1.15)  # per colour channel
CONTRAST_RANGE = (0.8, 1.2)
BRIGHTNESS_RANGE = (-20.0, 20.0)
GAMMA_RANGE = (0.8, 1.25)
SATURATION_RANGE = (0.7, 1.3)
LIGHT_GRADIENT = 0.2  # directional light: brightness changes by up to +-20% across the crop
BLUR_SIGMA = (0.0, 0.8)
MIRROR_P = 0.5


def is_heldout_sentence(index: int) -> bool:
    return index % HELDOUT_SENTENCE_EVERY == HELDOUT_SENTENCE_EVERY - 1


def sentences_for(language: str, split: str) -> list[str]:
    _check_split(split)
    heldout = split == "heldout"
    return [s for i, s in enumerate(SENTENCES[language]) if is_heldout_sentence(i) == heldout]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@dataclass(frozen=True)
class SpeechPlan:
    """What a clip says and how."""

    language: str
    sentences: tuple[str, ...]
    voice: str
    rate_wpm: int
    pitch: int
    lead_s: float
    gap_s: float
    trail_s: float


@dataclass(frozen=True)
class Augmentation:
    """How a clip's face is placed and coloured (constant over the clip, plus a slow sway)."""

    scale: float
    shift: tuple[float, float]  # of the frame size
    roll_deg: float
    sway_roll_deg: float
    sway_shift: tuple[float, float]
    sway_periods_s: tuple[float, float, float]
    sway_phases: tuple[float, float, float]
    box_jitter: tuple[float, float, float, float]  # x, y offsets and w, h scale, of the box size
    gains: tuple[float, float, float]
    contrast: float
    brightness: float
    gamma: float
    saturation: float
    light_angle: float
    light_strength: float
    blur_sigma: float
    mirror: bool


@dataclass
class Clip:
    seed: int
    split: str
    audio: np.ndarray  # float32 mono, 16 kHz
    frames: np.ndarray  # uint8 [n, 256, 256, 3] BGR face crops; frame i = audio [40i, 40i+40) ms
    curves: VisemeCurves  # the teacher's articulation per frame
    boxes: np.ndarray  # int32 [n, 4] (x1, y1, x2, y2): each frame's face box in its video frame
    frame_shape: tuple[int, int]  # (height, width) of the virtual video frame
    phonemes: list[Phoneme]  # in clip time
    speech: SpeechPlan
    augmentation: Augmentation
    face_index: int = 0
    sample_rate: int = field(default=SAMPLE_RATE)

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


def plan_speech(rng: np.random.Generator, split: str) -> SpeechPlan:
    _check_split(split)
    languages = list(LANGUAGE_WEIGHTS)
    language = languages[rng.choice(len(languages), p=list(LANGUAGE_WEIGHTS.values()))]
    pool = sentences_for(language, split)
    count = min(2 if rng.random() < SECOND_SENTENCE_P else 1, len(pool))
    picks = rng.choice(len(pool), size=count, replace=False)
    voices = (TRAIN_VOICES if split == "train" else HELDOUT_VOICES)[language]
    rates = TRAIN_RATES if split == "train" else HELDOUT_RATES
    return SpeechPlan(
        language=language,
        sentences=tuple(pool[i] for i in picks),
        voice=voices[rng.integers(len(voices))],
        rate_wpm=int(rates[rng.integers(len(rates))]),
        pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
        lead_s=float(rng.uniform(*LEAD_SILENCE_S)),
        gap_s=float(rng.uniform(*GAP_SILENCE_S)),
        trail_s=float(rng.uniform(*TRAIL_SILENCE_S)),
    )


def plan_augmentation(rng: np.random.Generator) -> Augmentation:
    def pair(low, high):
        return (float(rng.uniform(low, high)), float(rng.uniform(low, high)))

    return Augmentation(
        scale=float(rng.uniform(*FACE_SCALE)),
        shift=pair(-FACE_SHIFT, FACE_SHIFT),
        roll_deg=float(rng.uniform(-FACE_ROLL_DEG, FACE_ROLL_DEG)),
        sway_roll_deg=float(rng.uniform(*SWAY_ROLL_DEG)),
        sway_shift=pair(*SWAY_SHIFT),
        sway_periods_s=tuple(float(rng.uniform(*SWAY_PERIOD_S)) for _ in range(3)),  # type: ignore
        sway_phases=tuple(float(rng.uniform(0, 2 * np.pi)) for _ in range(3)),  # type: ignore[arg-type]
        box_jitter=tuple(float(rng.uniform(-BOX_JITTER, BOX_JITTER)) for _ in range(4)),  # type: ignore
        gains=tuple(float(rng.uniform(*GAIN_RANGE)) for _ in range(3)),  # type: ignore[arg-type]
        contrast=float(rng.uniform(*CONTRAST_RANGE)),
        brightness=float(rng.uniform(*BRIGHTNESS_RANGE)),
        gamma=float(rng.uniform(*GAMMA_RANGE)),
        saturation=float(rng.uniform(*SATURATION_RANGE)),
        light_angle=float(rng.uniform(0, 2 * np.pi)),
        light_strength=float(rng.uniform(0, LIGHT_GRADIENT)),
        blur_sigma=float(rng.uniform(*BLUR_SIGMA)),
        mirror=bool(rng.random() < MIRROR_P),
    )


# ---------------------------------------------------------------- pure pieces


def head_pose(
    aug: Augmentation, t: float, frame_shape: tuple[int, int], centre: np.ndarray
) -> np.ndarray:
    """[2, 3] similarity: source-photo pixel -> virtual video frame pixel at time t (seconds).

    The face (around `centre`) is scaled, rolled and moved; the sway adds slow sinusoidal roll
    and drift on top."""
    h, w = frame_shape
    (p_roll, p_x, p_y), (f_roll, f_x, f_y) = aug.sway_periods_s, aug.sway_phases
    roll = aug.roll_deg + aug.sway_roll_deg * np.sin(2 * np.pi * t / p_roll + f_roll)
    dx = aug.shift[0] * w + aug.sway_shift[0] * w * np.sin(2 * np.pi * t / p_x + f_x)
    dy = aug.shift[1] * h + aug.sway_shift[1] * h * np.sin(2 * np.pi * t / p_y + f_y)
    m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(roll), aug.scale)
    m[:, 2] += np.array([w / 2 + dx, h / 2 + dy]) - centre
    return m


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine of applying `inner` first, then `outer`."""
    return (np.vstack([outer, [0, 0, 1]]) @ np.vstack([inner, [0, 0, 1]]))[:2]


def invert(affine: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(affine)


Box = tuple[int, int, int, int]


def jitter_box(box: Box, jitter: tuple[float, float, float, float]) -> Box:
    """Move a box by jitter[:2] and scale it by 1 + jitter[2:], all in units of its size."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + jitter[0] * w
    cy = (y1 + y2) / 2 + jitter[1] * h
    w, h = w * (1 + jitter[2]), h * (1 + jitter[3])
    return tuple(int(round(v)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))  # type: ignore


def colour_lut(aug: Augmentation) -> np.ndarray:
    """[256, 1, 3] uint8 lookup table for gain, gamma, contrast and brightness per channel."""
    x = np.arange(256, dtype=np.float64)[:, None] / 255.0
    y = (x ** aug.gamma) * np.array(aug.gains)[None, :]
    y = (y - 0.5) * aug.contrast + 0.5 + aug.brightness / 255.0
    return np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8)[:, None, :]


def light_field(aug: Augmentation, size: int = CROP_SIZE) -> np.ndarray:
    """[size, size, 1] float32 multiplicative light: a linear ramp in a random direction."""
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / (size / 2)
    ramp = np.cos(aug.light_angle) * coords[None, :] + np.sin(aug.light_angle) * coords[:, None]
    return (1.0 + aug.light_strength * ramp)[..., None].astype(np.float32)


def apply_colour(frame: np.ndarray, lut: np.ndarray, light: np.ndarray, aug: Augmentation) -> np.ndarray:
    """Colour a uint8 BGR crop: per-channel curve (LUT), saturation, directional light, focus."""
    out = cv2.LUT(frame, lut).astype(np.float32)
    grey = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
    # saturation s: grey + (x - grey) * s, then the light ramp, all in one float pass
    out *= aug.saturation
    out += (grey * (1.0 - aug.saturation))[..., None]
    out *= light
    np.clip(out, 0, 255, out=out)
    out = out.astype(np.uint8)
    if aug.blur_sigma > 0.2:
        out = cv2.GaussianBlur(out, (0, 0), aug.blur_sigma)
    return out


def assemble_speech(plan: SpeechPlan) -> tuple[np.ndarray, int, list[Phoneme]]:
    """Synthesize the plan: audio at espeak's rate with the silences, and clip-time phonemes."""
    pieces: list[np.ndarray] = []
    phonemes: list[Phoneme] = []
    rate = 0
    cursor = 0  # samples

    def silence(seconds: float) -> None:
        nonlocal cursor
        n = int(round(seconds * rate))
        pieces.append(np.zeros(n, np.float32))
        phonemes.append(Phoneme(cursor / rate, (cursor + n) / rate, "_"))
        cursor += n

    for k, sentence in enumerate(plan.sentences):
        utterance = synthesize(sentence, voice=plan.voice, rate_wpm=plan.rate_wpm, pitch=plan.pitch)
        if rate == 0:
            rate = utterance.sample_rate
            silence(plan.lead_s)
        elif k > 0:
            silence(plan.gap_s)
        start = cursor / rate
        phonemes += [Phoneme(start + p.start_s, start + p.end_s, p.symbol) for p in utterance.phonemes]
        pieces.append(utterance.audio)
        cursor += len(utterance.audio)
    silence(plan.trail_s)
    return np.concatenate(pieces), rate, phonemes


# ---------------------------------------------------------------- the generator


@dataclass(frozen=True)
class FaceSource:
    """A face photo the generator can animate."""

    photo: np.ndarray  # uint8 BGR, the virtual video frame's size
    landmarks: FaceLandmarks  # in photo pixels


def astronaut_face() -> FaceSource:
    """The public-domain NASA astronaut portrait shipped with scikit-image."""
    import skimage.data

    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    found = detect_face_landmarks(photo)
    if found is None:
        raise RuntimeError("mediapipe found no face in skimage.data.astronaut()")
    return FaceSource(photo, found)


class ClipGenerator:
    """Renders clips for a set of faces; keeps one teacher per face."""

    def __init__(self, faces: list[FaceSource] | None = None):
        self.faces = faces if faces is not None else [astronaut_face()]
        if not self.faces:
            raise ValueError("ClipGenerator needs at least one face")
        self._canvases: list[FaceCanvas] = [face_canvas(f.photo, f.landmarks) for f in self.faces]
        self._teachers = [MouthTeacher(c.image, c.landmarks) for c in self._canvases]

    def generate(self, seed: int, split: str = "train") -> Clip:
        _check_split(split)
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        face_index = int(rng.integers(len(self.faces)))
        plan = plan_speech(rng, split)
        aug = plan_augmentation(rng)

        audio_native, native_rate, phonemes = assemble_speech(plan)
        audio = soxr.resample(audio_native, native_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
        n = num_frames(len(audio))
        curves = viseme_curves(phonemes, n)
        frames, boxes = self.render_frames(face_index, curves, aug)
        face = self.faces[face_index]
        return Clip(
            seed=seed,
            split=split,
            audio=audio,
            frames=frames,
            curves=curves,
            boxes=boxes,
            frame_shape=face.photo.shape[:2],
            phonemes=phonemes,
            speech=plan,
            augmentation=aug,
            face_index=face_index,
        )

    def render_frames(
        self, face_index: int, curves: VisemeCurves | None, aug: Augmentation,
        indices: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The 256x256 crops [n, 256, 256, 3] and face boxes [n, 4] of frames `indices` (default:
        every frame of `curves`). With `curves` None the untouched photo (its own mouth, not the
        teacher's) is cut instead, under the same head pose, box, colour, light and mirror."""
        face, canvas = self.faces[face_index], self._canvases[face_index]
        teacher = self._teachers[face_index]
        if indices is None:
            if curves is None:
                raise ValueError("render_frames: give the frame indices when there are no curves")
            indices = range(len(curves))
        frame_shape = face.photo.shape[:2]
        points = face.landmarks.points.astype(np.float64)
        centre = (points[10] + points[152]) / 2  # forehead to chin midpoint
        canvas_to_source = invert(canvas.from_source)
        lut, light = colour_lut(aug), light_field(aug)
        frames = np.empty((len(indices), CROP_SIZE, CROP_SIZE, 3), np.uint8)
        boxes = np.empty((len(indices), 4), np.int32)
        for k, i in enumerate(indices):
            pose = head_pose(aug, i / FPS, frame_shape, centre)
            moved = points @ pose[:, :2].T + pose[:, 2]
            box = jitter_box(face_bbox(moved, frame_shape).as_tuple(), aug.box_jitter)
            x1, y1, x2, y2 = box
            # canvas -> source photo -> virtual frame -> this frame's box (at the frame's own
            # resolution, as a real video would have it), then the model's 256x256 resize.
            to_box = compose(np.array([[1.0, 0, -x1], [0, 1.0, -y1]]), compose(pose, canvas_to_source))
            drawn = canvas.image if curves is None else teacher.render(curves.at(i))
            cut = cv2.warpAffine(
                drawn, to_box, (x2 - x1, y2 - y1), flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT,
            )
            crop = cv2.resize(cut, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LANCZOS4)
            frames[k] = apply_colour(crop, lut, light, aug)
            boxes[k] = box
        if aug.mirror:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
            w = frame_shape[1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
            boxes = boxes.astype(np.int32)
        return frames, boxes


@lru_cache(maxsize=1)
def default_generator() -> ClipGenerator:
    return ClipGenerator()


def generate_clip(seed: int, split: str = "train") -> Clip:
    """One training (or held-out) clip of the astronaut speaking, deterministic from the seed."""
    return default_generator().generate(seed, split)
