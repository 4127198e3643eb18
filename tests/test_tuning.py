"""Per-avatar tuning (`prepare --tune`): tuned weights with the avatar, used automatically,
Ctrl+C keeps the last checkpoint, bad photos are refused with nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from realtime_avatar.avatar import AvatarSettings, prepare_avatar
from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS, load_model
from realtime_avatar.tuning import (
    TUNED_INFO,
    TuneSettings,
    load_tuned,
    read_tuned_info,
    tune_avatar,
    tune_main,
    tuned_dir,
)
from tests.face_photos import photo_or_skip
from tests.test_teacher_faces import cover_mouth

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not DEFAULT_COMPACT_WEIGHTS.is_file(), reason="the default model is not installed")


@pytest.fixture(scope="module")
def encoder():
    from realtime_avatar.whisper_weights import load_whisper

    torch.set_num_threads(2)
    return load_whisper("tiny.en").encoder


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.slow
def test_tune_saves_and_runtime_uses_tuned_weights(tmp_path, encoder):
    from realtime_avatar.runtime import load_runtime

    base = load_model("default")
    avatar = prepare_avatar(photo_or_skip("men/90"), tmp_path / "avatar", base, AvatarSettings(idle_seconds=0.4),
                            progress=False)
    # a budget far longer than needed: the clip and step caps end it (no timing dependence)
    settings = TuneSettings(minutes=30, max_clips=2, data_share=0.0, max_steps=3)
    result = tune_avatar(avatar, base, encoder, settings, progress=False)
    assert not result.interrupted and result.steps == 3 and result.clips == 2
    assert result.check.pearson_r >= 0.9
    info = read_tuned_info(avatar.path)
    assert info["final"] and info["steps"] == 3 and info["base_weights_hash"] == base.weights_hash()
    tuned = load_tuned(avatar, base)
    assert tuned is not None and tuned.weights_hash() == info["weights_hash"] != base.weights_hash()
    # the encoder is not tuned: the avatar's cached latents stay valid
    for k, v in base.net.encoder.state_dict().items():
        assert torch.equal(v, tuned.net.encoder.state_dict()[k])
    # another base model does not pick these weights up
    from realtime_avatar.models.compact import CompactModel

    assert load_tuned(avatar, CompactModel.random(seed=3)) is None
    # the runtime uses them automatically with this avatar
    runtime = load_runtime("default", avatar.path, backend="torch", progress=False)
    assert runtime.model.weights_hash() == info["weights_hash"]
    assert not leftovers(tmp_path)


@pytest.mark.slow
def test_covered_mouth_refused_nothing_written(tmp_path, encoder, capsys):
    from realtime_avatar.face import detect_face_landmarks

    photo = cv2.imread(str(photo_or_skip("women/50")))
    covered = cover_mouth(photo, detect_face_landmarks(photo).points)
    source = tmp_path / "hand_over_mouth.png"
    cv2.imwrite(str(source), covered)
    base = load_model("default")
    avatar = prepare_avatar(source, tmp_path / "avatar", base, AvatarSettings(idle_seconds=0.4), progress=False)
    assert tune_main(avatar, base, 0.5, progress=False) == 2
    err = capsys.readouterr().err.strip()
    assert "hand_over_mouth.png" in err and "mouth visible" in err and "\n" not in err
    assert not tuned_dir(avatar.path).exists()
    assert not leftovers(tmp_path)


def _sigint_as_in_a_terminal() -> None:
    """Child pre-exec: SIGINT back to its default disposition. A command started in the
    background of a non-interactive shell (`pytest ... &`, nohup, some CI runners) inherits
    SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler at all: the
    SIGINT below would be dropped and tuning would run to its end (exit 0, seen in clean
    clones run in the background). A user pressing Ctrl+C in a terminal has the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_keeps_last_checkpoint(tmp_path):
    """A real SIGINT to `realtime-avatar prepare --tune`: exit 130, the last checkpoint kept
    and loadable, no temporary files."""
    out = tmp_path / "avatar"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "realtime_avatar.cli", "prepare", str(photo_or_skip("men/91")), "--out", str(out),
         # 2 minutes: the SIGINT (2 s after the first checkpoint) lands long before the end
         "--idle-seconds", "0.4", "--no-progress", "--tune", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 900  # minutes on a loaded 2-core machine
        while not (out / "tuned" / TUNED_INFO).is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.5)
        first = read_tuned_info(out)
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted; kept the checkpoint of step" in err
    info = read_tuned_info(out)
    assert info is not None and not info["final"] and info["steps"] >= first["steps"]
    from realtime_avatar.avatar import load_avatar

    avatar = load_avatar(out)
    tuned = load_tuned(avatar, load_model("default"))
    assert tuned is not None and tuned.weights_hash() == info["weights_hash"]
    assert [p.name for p in (out / "tuned").iterdir()] and not leftovers(tmp_path)
    assert len(list((out / "tuned").glob("model-*.safetensors"))) == 1
