"""The frame path on a CUDA GPU against the CPU reference (marked `cuda`, skipped without one).

Self-contained on purpose: benchmarks/gpu_check.py runs this file on a bare CUDA + PyTorch
machine (no mediapipe, no Whisper weights, maybe no aiortc/PyAV). So: the default compact
model (random seeded weights when safetensors is missing), an avatar loaded from a prepared
cache ($REALTIME_AVATAR_GPU_CHECK_AVATAR, written by `gpu_check.py --pack`; else prepared
here, which needs mediapipe), seeded audio windows, and a random Whisper tiny encoder for the
encoder checks (CPU vs CUDA on the same weights). The reference is the pre-engine path on the
CPU: model.render() + the numpy Blender.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (benchmarks/gpu_check.py runs these on a lent GPU)"),
]
AVATAR_ENV = "REALTIME_AVATAR_GPU_CHECK_AVATAR"


@pytest.fixture(scope="module")
def cpu_model():
    from realtime_avatar.models.compact import CompactModel

    try:
        from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS, load_model

        if DEFAULT_COMPACT_WEIGHTS.is_file():
            return load_model("default")
    except ImportError:  # no safetensors on a bare image: the same network with seeded weights
        pass
    return CompactModel.random(seed=0)


@pytest.fixture(scope="module")
def avatar(cpu_model, tmp_path_factory):
    from realtime_avatar.avatar import AvatarSettings, default_avatar_source, load_avatar, load_or_prepare_avatar

    packed = os.environ.get(AVATAR_ENV)
    if packed:
        prepared = load_avatar(Path(packed))
        if prepared.manifest.weights_hash != cpu_model.weights_hash():
            pytest.skip(f"{packed} was prepared for other weights than this machine's model")
        return prepared
    pytest.importorskip("mediapipe", reason=f"no mediapipe to prepare an avatar; set {AVATAR_ENV}")
    return load_or_prepare_avatar(default_avatar_source(), tmp_path_factory.mktemp("avatar"), cpu_model,
                                  AvatarSettings(idle_seconds=0.4), progress=False)


@pytest.fixture(scope="module")
def windows():
    return torch.randn(8, 50, 384, generator=torch.Generator().manual_seed(3)).numpy()


def reference_frames(model, avatar, positions, windows):
    with torch.inference_mode():
        patches = model.render(avatar.latents_at(positions), torch.from_numpy(np.ascontiguousarray(windows)))
    return [avatar.compose_into(avatar.new_frame_buffer(), p, pos) for p, pos in zip(patches, positions)]


def on_cuda(model):
    from realtime_avatar.models.compact import CompactModel

    return CompactModel(copy.deepcopy(model.net), device="cuda", notes=model.notes)


def max_level_error(got, want) -> int:
    return max(int(np.abs(g.astype(np.int16) - w.astype(np.int16)).max()) for g, w in zip(got, want))


@pytest.mark.parametrize("precision,limit", [("fp32", 1), ("fp16", 3)])
def test_cuda_engine_matches_the_cpu_reference(cpu_model, avatar, windows, precision, limit):
    from realtime_avatar.frame_engine import FrameEngine, FrameRequest

    engine = FrameEngine(on_cuda(cpu_model), "cuda", precision)
    slot = engine.add_avatar(avatar)
    assert slot.bank.frames.device.type == "cuda" and slot.latents.device.type == "cuda"
    frames = engine.render_now([FrameRequest(slot, tuple(range(6)), windows[:6])])[0]
    # DESIGN.md 11: fp16 patches within 1 grey level of fp32; resize + blend may add one more
    assert max_level_error(frames, reference_frames(cpu_model, avatar, list(range(6)), windows[:6])) <= limit


def test_cuda_engine_sessions_batched_get_their_own_frames(cpu_model, avatar, windows):
    import asyncio

    from realtime_avatar.frame_engine import FrameEngine, FrameRequest

    engine = FrameEngine(on_cuda(cpu_model), "cuda", "fp32")
    slot = engine.add_avatar(avatar)
    requests = [FrameRequest(slot, (k, k + 1), windows[k : k + 2]) for k in range(6)]

    async def go():
        out = await asyncio.gather(*(engine.render(r) for r in requests))
        await engine.close()
        return out

    for request, frames in zip(requests, asyncio.run(go())):
        assert max_level_error(frames, reference_frames(cpu_model, avatar, list(request.positions), request.windows)) <= 1
    assert engine.model_calls < len(requests)


def test_cuda_compiled_step_is_gated_and_matches(cpu_model, avatar, windows):
    from realtime_avatar.frame_engine import FrameEngine, FrameRequest

    engine = FrameEngine(on_cuda(cpu_model), "cuda", "fp16", step="compiled", buckets=(1, 2, 4, 8))
    assert engine.step == "compiled"
    slot = engine.add_avatar(avatar)
    engine.warm_up()  # captures every bucket, then the accuracy gate (raises when it fails)
    assert engine.gate.max_abs_error <= 96
    frames = engine.render_now([FrameRequest(slot, (0, 1, 2), windows[:3])])[0]  # bucket 4, padded
    assert max_level_error(frames, reference_frames(cpu_model, avatar, [0, 1, 2], windows[:3])) <= 3


def test_cuda_yuv420p_frames(cpu_model, avatar, windows):
    from realtime_avatar.compose import bgr_to_yuv420p
    from realtime_avatar.frame_engine import FrameEngine, FrameRequest

    engine = FrameEngine(on_cuda(cpu_model), "cuda", "fp32", frame_format="yuv420p")
    slot = engine.add_avatar(avatar)
    frames = engine.render_now([FrameRequest(slot, (0, 1), windows[:2])])[0]
    want = bgr_to_yuv420p(torch.from_numpy(np.stack(reference_frames(cpu_model, avatar, [0, 1], windows[:2])))).numpy()
    assert max_level_error(frames, list(want)) <= 1


def _random_tiny_encoder():
    from whisper.model import AudioEncoder

    torch.manual_seed(0)
    return AudioEncoder(n_mels=80, n_ctx=1500, n_state=384, n_head=6, n_layer=4).eval()


def test_cuda_whisper_offline_and_streaming_match_the_cpu():
    from realtime_avatar.streaming_whisper import LOW_LATENCY, offline_features, stream_features

    cpu = _random_tiny_encoder()
    gpu = copy.deepcopy(cpu).to("cuda")
    t = np.arange(16000 * 3) / 16000
    audio = (0.1 * np.sin(2 * np.pi * 220 * t) * (t % 0.5 < 0.3)).astype(np.float32)
    for features in (offline_features, lambda e, a: stream_features(e, a, LOW_LATENCY)):
        want, got = features(cpu, audio), features(gpu, audio)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-2 * max(1.0, np.abs(want).max())


def test_cuda_whisper_windows_of_many_sessions_in_one_call():
    from realtime_avatar.encoder_batching import EncodeRequest, EncoderBatcher
    from realtime_avatar.streaming_whisper import encoder_hidden_states

    gpu = _random_tiny_encoder().to("cuda")
    mels = torch.randn(5, 80, 200, generator=torch.Generator().manual_seed(1)).cuda()
    batcher = EncoderBatcher(gpu)
    requests = [EncodeRequest(mels[i], 10 * i, "v15") for i in range(5)]
    batched = batcher.encode_now(requests)
    assert batcher.calls == 1
    with torch.inference_mode():
        for r, states in zip(requests, batched):
            alone = encoder_hidden_states(gpu, r.mel, r.position_offset, r.layout)
            assert torch.allclose(states, alone, atol=1e-3)
