"""export.dataset: splits, determinism, audio/frame alignment and real crops of the teacher."""

from __future__ import annotations

import time

import numpy as np
import pytest

from export.dataset import (
    CROP_SIZE,
    HELDOUT_RATES,
    HELDOUT_VOICES,
    SENTENCES,
    TRAIN_RATES,
    TRAIN_VOICES,
    Augmentation,
    SpeechPlan,
    assemble_speech,
    colour_lut,
    compose,
    default_generator,
    generate_clip,
    head_pose,
    invert,
    jitter_box,
    light_field,
    plan_speech,
    sentences_for,
)
from export.phonemes import synthesize
from realtime_avatar.face import detect_face_landmarks
from realtime_avatar.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, num_frames

STILL = Augmentation(
    scale=1.0, shift=(0.0, 0.0), roll_deg=0.0, sway_roll_deg=0.0, sway_shift=(0.0, 0.0),
    sway_periods_s=(3.0, 4.0, 5.0), sway_phases=(0.0, 0.0, 0.0), box_jitter=(0.0, 0.0, 0.0, 0.0),
    gains=(1.0, 1.0, 1.0), contrast=1.0, brightness=0.0, gamma=1.0, saturation=1.0,
    light_angle=0.0, light_strength=0.0, blur_sigma=0.0, mirror=False,
)  # fmt: skip


# ---------------------------------------------------------------- splits


def test_splits_are_disjoint_and_documented_sizes():
    assert sum(len(v) for v in SENTENCES.values()) >= 200
    for language in SENTENCES:
        train, heldout = sentences_for(language, "train"), sentences_for(language, "heldout")
        assert heldout and train
        assert not set(train) & set(heldout)
        assert len(train) + len(heldout) == len(SENTENCES[language])
        assert not set(TRAIN_VOICES[language]) & set(HELDOUT_VOICES[language])
    assert not set(TRAIN_RATES) & set(HELDOUT_RATES)
    assert max(HELDOUT_RATES) > max(TRAIN_RATES)  # faster speech than any training clip
    with pytest.raises(ValueError, match="split must be one of"):
        sentences_for("en", "test")


def test_every_voice_exists():
    for voices in list(TRAIN_VOICES.values()) + list(HELDOUT_VOICES.values()):
        for voice in voices:
            assert synthesize("ma", voice=voice).duration_s > 0.05, voice


# ---------------------------------------------------------------- pure pieces


def test_geometry_helpers():
    centre = np.array([200.0, 150.0])
    pose = head_pose(STILL, 0.0, (480, 640), centre)
    np.testing.assert_allclose(pose @ [*centre, 1.0], [320.0, 240.0])  # face centred
    rolled = Augmentation(**{**STILL.__dict__, "roll_deg": 90.0, "scale": 2.0})
    pose = head_pose(rolled, 0.0, (480, 640), centre)
    moved = pose @ [centre[0] + 10.0, centre[1], 1.0] - [320.0, 240.0]
    np.testing.assert_allclose(moved, [0.0, -20.0], atol=1e-9)  # cv2: positive angle turns x up
    np.testing.assert_allclose(compose(invert(pose), pose), [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    assert jitter_box((10, 20, 110, 220), (0.0, 0.0, 0.0, 0.0)) == (10, 20, 110, 220)
    assert jitter_box((10, 20, 110, 220), (0.1, -0.05, 0.2, 0.0)) == (10, 10, 130, 210)


def test_colour_helpers():
    identity = colour_lut(STILL)
    np.testing.assert_array_equal(identity[:, 0, 0], np.arange(256))
    darker = colour_lut(Augmentation(**{**STILL.__dict__, "gamma": 1.2, "gains": (0.9, 1.0, 1.1)}))
    assert darker[128, 0, 0] < 128 and darker[255, 0, 2] == 255
    light = light_field(Augmentation(**{**STILL.__dict__, "light_strength": 0.2, "light_angle": 0.0}))
    assert light.shape == (CROP_SIZE, CROP_SIZE, 1)
    assert light.mean() == pytest.approx(1.0, abs=1e-3)
    assert light[0, 0, 0] == pytest.approx(0.8, abs=1e-3) and light[0, -1, 0] == pytest.approx(1.2, abs=1e-3)


def test_assembled_speech_has_its_silences_where_planned():
    plan = SpeechPlan("en", ("Bob moves.", "Who?"), "en-us", 170, 50, lead_s=0.3, gap_s=0.5, trail_s=0.2)
    audio, rate, phonemes = assemble_speech(plan)
    assert rate == 22050
    assert phonemes[0].start_s == 0.0 and phonemes[0].symbol == "_"
    assert phonemes[-1].end_s == pytest.approx(len(audio) / rate, abs=1e-9)
    assert np.all(audio[: int(0.3 * rate)] == 0.0)
    first_word = next(p for p in phonemes if not p.is_pause)
    assert first_word.start_s == pytest.approx(0.3 + 0.013, abs=0.01)  # espeak starts ~13 ms in
    assert np.abs(audio[int(first_word.start_s * rate) : int((first_word.start_s + 0.1) * rate)]).max() > 0.05


# ---------------------------------------------------------------- whole clips


@pytest.fixture(scope="module")
def clips():
    start = time.perf_counter()
    made = [generate_clip(seed) for seed in (1, 4)]
    elapsed = time.perf_counter() - start
    frames = sum(c.n_frames for c in made)
    print(f"\n{len(made)} clips, {frames} frames in {elapsed:.2f} s: "
          f"{len(made) / elapsed:.2f} clips/s, {1000 * elapsed / frames:.1f} ms/frame")  # fmt: skip
    return made


def test_clip_shapes_and_alignment(clips):
    for clip in clips:
        assert clip.audio.dtype == np.float32 and clip.sample_rate == SAMPLE_RATE
        n = num_frames(len(clip.audio))
        assert clip.n_frames == n == len(clip.curves) == len(clip.boxes)
        assert clip.frames.shape == (n, CROP_SIZE, CROP_SIZE, 3) and clip.frames.dtype == np.uint8
        # The phoneme track covers the audio, and the lead silence is silent in both.
        assert clip.phonemes[-1].end_s == pytest.approx(clip.duration_s, abs=2e-3)
        lead_frames = int(clip.speech.lead_s * FPS) - 2
        assert lead_frames >= 1
        assert np.abs(clip.audio[: lead_frames * SAMPLES_PER_FRAME]).max() < 1e-3
        assert clip.curves.as_array()[:lead_frames].max() < 0.02
        # Frame i covers audio [40i, 40i+40) ms: loud frames are the open-mouthed ones.
        energy = np.sqrt((clip.audio[: n * SAMPLES_PER_FRAME].reshape(n, -1) ** 2).mean(axis=1))
        assert np.corrcoef(energy, clip.curves.jaw)[0, 1] > 0.4
        # Boxes are MuseTalk face boxes inside (or at the edge of) the video frame.
        h, w = clip.frame_shape
        widths, heights = clip.boxes[:, 2] - clip.boxes[:, 0], clip.boxes[:, 3] - clip.boxes[:, 1]
        assert np.all(widths > 40) and np.all(heights > widths)
        assert np.all(clip.boxes[:, 0] > -w // 4) and np.all(clip.boxes[:, 2] < w + w // 4)
        # The head sways: the box moves a little over the clip.
        assert np.ptp(clip.boxes[:, 1]) >= 1


def test_clip_frames_show_the_mouth_moving(clips):
    clip = clips[0]
    jaw = clip.curves.jaw
    open_frames = np.argsort(jaw)[-3:]
    closed_frames = np.flatnonzero(clip.curves.as_array().max(axis=1) < 0.02)[:3]
    assert jaw[open_frames].min() > 0.45 and len(closed_frames) == 3

    def gap(frame):
        found = detect_face_landmarks(clip.frames[frame])
        assert found is not None, f"mediapipe found no face in frame {frame} of clip {clip.seed}"
        p = found.points
        return np.linalg.norm(p[14] - p[13]) / np.linalg.norm(p[152] - p[10])

    closed_gap = max(gap(i) for i in closed_frames)
    open_gap = min(gap(i) for i in open_frames)
    assert closed_gap < 0.015
    assert open_gap > 0.03 and open_gap > 3 * closed_gap


def test_untouched_photo_crops_match_the_clip_frames_but_the_mouth(clips):
    """render_frames(curves=None) cuts the original photo exactly as the clip's frames: same
    pose, box, colour and mirror (the trainer's reference crops), only the mouth differs."""
    clip = clips[0]
    jaw = clip.curves.jaw
    picks = [int(np.argmax(jaw)), int(np.argmin(jaw)), 0]
    photos, boxes = default_generator().render_frames(clip.face_index, None, clip.augmentation, picks)
    assert photos.shape == (3, CROP_SIZE, CROP_SIZE, 3)
    np.testing.assert_array_equal(boxes, clip.boxes[picks])
    upper = slice(0, CROP_SIZE // 3)  # forehead and eyes: the teacher never draws there
    diff_upper = np.abs(photos[:, upper].astype(int) - clip.frames[picks][:, upper].astype(int))
    assert diff_upper.mean() < 1.0
    mouth = (slice(CROP_SIZE // 2, CROP_SIZE), slice(CROP_SIZE // 4, 3 * CROP_SIZE // 4))
    open_diff = np.abs(photos[0][mouth].astype(int) - clip.frames[picks[0]][mouth].astype(int)).mean()
    assert open_diff > 5 * max(diff_upper.mean(), 0.5)  # the teacher's open mouth is not the photo's


def test_clips_are_deterministic_and_differ_by_seed(clips):
    again = generate_clip(1)
    first = clips[0]
    np.testing.assert_array_equal(again.audio, first.audio)
    np.testing.assert_array_equal(again.frames, first.frames)
    np.testing.assert_array_equal(again.boxes, first.boxes)
    assert again.speech == first.speech and again.augmentation == first.augmentation
    other = clips[1]
    assert other.speech != first.speech or other.augmentation != first.augmentation


def test_heldout_clips_use_only_heldout_material():
    for seed in range(40):  # plans only: no rendering
        rng = np.random.default_rng([seed, 1])
        plan = plan_speech(rng, "heldout")
        assert plan.voice in HELDOUT_VOICES[plan.language]
        assert plan.rate_wpm in HELDOUT_RATES
        assert set(plan.sentences) <= set(sentences_for(plan.language, "heldout"))
        train_plan = plan_speech(np.random.default_rng([seed, 0]), "train")
        assert train_plan.voice in TRAIN_VOICES[train_plan.language]
        assert set(train_plan.sentences) <= set(sentences_for(train_plan.language, "train"))
