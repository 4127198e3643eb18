"""What the teacher's clips say: sentences, voices, rates and silences, with their splits.

Used by the build-time training data (export.dataset) and by per-avatar tuning at run time
(realtime_avatar.tuning), which both need speech the teacher can animate. Splits (never mixed,
so a held-out score measures generalisation, not memory):
- sentences: in each language, every sentence whose index % 10 == 9 is held out;
- voices: HELDOUT_VOICES (accents and voice variants) are never used for training;
- rates: training draws from TRAIN_RATES, held out from HELDOUT_RATES (a band in the middle
  and faster speech than any training clip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from realtime_avatar.phonemes import Phoneme, synthesize

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
