"""Held-out lip sync of the SHIPPED default model, measured through the runtime path
(export.evaluate): held-out voices, sentences and rates rendered on the bundled avatar, the
mouth measured with mediapipe on the finished frames.

Skipped only when the trained weights file is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import evaluate as ev
from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS

pytestmark = pytest.mark.skipif(
    not DEFAULT_COMPACT_WEIGHTS.is_file(),
    reason=f"trained default weights not installed ({DEFAULT_COMPACT_WEIGHTS} is missing; "
    "train them with `python -m export.train`)",
)

HELDOUT_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    torch.set_num_threads(2)
    model, encoder, avatar, idle = ev.load_for_evaluation(
        "default", idle_seconds=0.6, cache_dir=tmp_path_factory.mktemp("lipsync")
    )
    report, kept = ev.evaluate(model, encoder, avatar, HELDOUT_SEEDS, idle_frames=idle, keep_frames=True)
    print(report.table())
    return report, kept


def test_mouth_opening_follows_the_heldout_speech(scored):
    report, _ = scored
    assert report.undetected == 0  # mediapipe finds the face in every rendered frame
    assert report.pearson_r >= ev.THRESHOLDS["pearson_r"], report.table()


def test_mouth_is_closed_in_silence(scored):
    report, kept = scored
    assert report.silence_frames >= 50
    assert report.silence_closed >= ev.THRESHOLDS["silence_closed"], report.table()
    # and it really opens in speech: the widest measured openings are far from closed
    openings = np.concatenate([c["openings"] for c in kept["clips"]])
    assert np.nanpercentile(openings, 90) > 2 * ev.CLOSED_GAP


def test_identity_kept_and_nothing_changed_outside_the_mask(scored):
    report, _ = scored
    # the upper half of the patch is the avatar's own (eyes, nose): the model must keep it
    assert report.upper_psnr_db >= ev.THRESHOLDS["upper_psnr_db"], report.table()
    assert report.outside_mask_changed == 0


def test_metric_pieces():
    assert ev.pearson(np.arange(10), 2 * np.arange(10) + 1) == pytest.approx(1.0)
    assert ev.pearson(np.arange(10), -np.arange(10)) == pytest.approx(-1.0)
    assert ev.psnr(0.0) == float("inf") and ev.psnr(255.0**2) == pytest.approx(0.0)
    poses = np.zeros((12, 5))
    poses[6, 0] = 0.5
    pauses = ev.pause_frames(poses, margin=3)
    assert pauses.tolist() == [True] * 3 + [False] * 7 + [True] * 2
