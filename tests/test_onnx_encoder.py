"""The Whisper encoder on ONNX Runtime: built from the exact weights, found by their fingerprint,
and giving the features torch gives (real whisper tiny.en weights, real onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.encoder_onnx import build_encoder_onnx
from realtime_avatar.onnx_encoder import attach_onnx_encoder, encoder_fingerprint, onnx_encoder_path
from realtime_avatar.streaming_whisper import LOW_LATENCY, StreamingConfig, batched_hidden_states, stream_features
from realtime_avatar.whisper_weights import load_whisper


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    engines = tmp_path_factory.mktemp("engines")
    path = build_encoder_onnx("tiny.en", engines)
    return engines, path


def test_the_graph_is_stored_under_the_weights_fingerprint_and_rebuilt_only_when_asked(built):
    engines, path = built
    encoder = load_whisper("tiny.en").encoder
    assert path == onnx_encoder_path(engines, encoder_fingerprint(encoder)) and path.stat().st_size > 1e6
    assert list(path.parent.iterdir()) == [path]  # no temporary file left beside it
    mtime = path.stat().st_mtime_ns
    assert build_encoder_onnx("tiny.en", engines) == path and path.stat().st_mtime_ns == mtime


def test_onnx_runtime_encoder_gives_torch_features(built):
    engines, _ = built
    reference = load_whisper("tiny.en").encoder
    fast = load_whisper("tiny.en").encoder
    assert attach_onnx_encoder(fast, engines, threads=2) and not hasattr(reference, "onnx_runner")
    generator = torch.Generator().manual_seed(0)
    mels = torch.randn(2, 80, 100, generator=generator)  # two 1 s windows
    with torch.inference_mode():
        for layout in ("v15", "v1"):
            a = batched_hidden_states(reference, mels, [0, 37], layout)
            b = batched_hidden_states(fast, mels, [0, 37], layout)
            assert a.shape == b.shape == (2, 50, 5, 384)
            assert float((a - b).abs().max()) < 1e-3
    # the whole streaming path (1 s windows at a 40 ms hop, what sessions run)
    t = np.arange(16_000 * 2) / 16_000
    audio = (0.1 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    config = StreamingConfig(window_s=1.0, hop_s=0.04, lookahead_s=0.04, layout=LOW_LATENCY.layout)
    fa, fb = stream_features(reference, audio, config), stream_features(fast, audio, config)
    assert fa.shape == fb.shape and np.abs(fa - fb).max() < 1e-3


def test_no_graph_for_other_weights(built):
    engines, _ = built
    encoder = load_whisper("tiny.en").encoder
    with torch.no_grad():
        encoder.blocks[0].mlp[0].bias[0] += 1.0  # other weights: another fingerprint
    assert not attach_onnx_encoder(encoder, engines) and not hasattr(encoder, "onnx_runner")
    assert not attach_onnx_encoder(load_whisper("tiny.en").encoder, engines / "empty")
