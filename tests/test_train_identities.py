"""Training on many identities (`export.train --identities`): faces drawn per clip, clip cache
names per identity set, and a crashed run resumed with its own identities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from export import train as tr
from export.dataset import ClipGenerator, LazyFaces
from export.face_photos import identity_set
from tests.face_photos import photo_or_skip
from tests.test_train import TINY, Crash

PEOPLE = ("men/3", "women/12")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("people")
    for name in PEOPLE:
        shutil.copyfile(photo_or_skip(name), folder / f"{name.replace('/', '-')}.jpg")
    return folder


def test_faces_are_drawn_per_clip_and_loaded_lazily(photo_folder):
    generator = ClipGenerator.for_identities(identity_set(str(photo_folder)))
    assert isinstance(generator.faces, LazyFaces) and len(generator.faces) == 2
    assert not generator.faces._faces  # nothing read yet
    # the face is the first draw of a clip's generator: both people appear over a few seeds
    drawn = {int(np.random.default_rng([seed, 0]).integers(2)) for seed in range(8)}
    assert drawn == {0, 1}
    clip = generator.generate(0, "train")
    assert len(generator.faces._faces) == 1  # only the face that clip drew
    assert clip.frames.shape[1:] == (256, 256, 3) and len(clip.frames) == len(clip.curves)
    # the mouth moves with the teacher on this face: lower half changes, upper half stays put
    jaw = clip.curves.jaw
    a, b = int(np.argmin(jaw)), int(np.argmax(jaw))
    lower = np.abs(clip.frames[a, 150:220].astype(int) - clip.frames[b, 150:220]).mean()
    assert lower > 3


def test_clip_names_per_identity_set():
    assert tr.clip_name("train", 7) == "train-00007"  # v1 caches stay valid
    assert tr.clip_name("train", 7, "any-face", 136) == "train-any-face136-00007"
    assert tr.clip_name("train", 7, "/home/me/photos/", 2) == "train-photos2-00007"


@pytest.mark.slow
def test_identities_run_crashes_and_resumes_with_its_own_data(tmp_path, photo_folder):
    out = tmp_path / "run"
    settings = tr.TrainSettings(
        out=out, minutes=30.0, clips=2, workers=1, model=TINY, batch_size=4, log_every=1, precision="fp32",
        max_autoencoder_steps=2, max_unet_steps=4, checkpoint_minutes=0.0, identities=str(photo_folder),
    )

    def crash_at_unet_step_2(stage: str, step: int) -> None:
        if stage == "unet" and step == 2:
            raise Crash()

    with pytest.raises(Crash):
        tr.train(settings, on_step=crash_at_unet_step_2)
    names = sorted(p.name for p in (out / "clips").iterdir())
    tag = photo_folder.name
    assert names == [f"train-{tag}2-00000.npz", f"train-{tag}2-00001.npz"]
    state = torch.load(out / tr.CHECKPOINT, weights_only=False)
    assert state["settings"]["identities"] == str(photo_folder)

    # resumed as the CLI would, without --identities: the run keeps its own faces and clips
    seen = []
    resumed = tr.TrainSettings(out=out, minutes=30.0, workers=1, batch_size=4, log_every=1, precision="fp32",
                               max_autoencoder_steps=2, max_unet_steps=4, checkpoint_minutes=0.0)
    path = tr.train(resumed, resume=True, on_step=lambda stage, step: seen.append((stage, step)))
    assert seen == [("unet", 3), ("unet", 4)]
    assert sorted(p.name for p in (out / "clips").iterdir()) == names  # no astronaut clips made
    from realtime_avatar.models.compact import CompactModel

    notes = CompactModel.load(path).notes
    assert f"faces from {photo_folder}" in notes["data"]
    assert json.loads(notes["settings"])["identities"] == str(photo_folder)
