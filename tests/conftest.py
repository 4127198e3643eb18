"""Shared fixtures: one Runtime (Whisper tiny.en, a renderer model, the bundled avatar) per test run.

The renderer model is the trained default when its weights are installed, else a seeded random
compact model (the pipeline is the same; only what the mouth looks like differs). The avatar is
the bundled astronaut with a short idle cycle, prepared once into a temporary cache.
"""

from __future__ import annotations

# First, before torch: realtime_avatar sets OMP_WAIT_POLICY=PASSIVE, which libgomp reads once, when
# torch loads it. Imported after torch (as here until session 11), the tests ran with spinning
# OpenMP threads, unlike the CLI: the tests now run the threads as the product does. (The live
# preview test's late frames were measured both ways, 4-5 runs each: no clear difference.)
import realtime_avatar  # noqa: F401, I001

import pytest
import torch


@pytest.fixture(scope="session")
def runtime(tmp_path_factory):
    from realtime_avatar.avatar import AvatarSettings, default_avatar_source, load_or_prepare_avatar
    from realtime_avatar.models.compact import CompactModel
    from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS, load_model
    from realtime_avatar.renderer import AvatarRenderer, silence_window
    from realtime_avatar.runtime import Runtime
    from realtime_avatar.whisper_weights import load_whisper

    torch.set_num_threads(2)
    encoder = load_whisper("tiny.en").encoder
    model = load_model("default") if DEFAULT_COMPACT_WEIGHTS.is_file() else CompactModel.random(seed=0)
    settings = AvatarSettings(idle_seconds=0.4)  # 10 frames: enough motion, quick to prepare
    avatar = load_or_prepare_avatar(
        default_avatar_source(), tmp_path_factory.mktemp("avatar"), model, settings, progress=False
    )
    renderer = AvatarRenderer(model, avatar, silence_window(encoder), batch_size=4)
    return Runtime(encoder, model, avatar, renderer)
