"""StreamingWhisper: window planning (pure), exactly-once emission, and parity with the offline
full-segment features on real speech with the real tiny.en weights."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from realtime_avatar.audio_ring import AudioRing
from realtime_avatar.streaming_whisper import (
    StreamingConfig,
    StreamingWhisper,
    offline_features,
    plan_window,
)
from realtime_avatar.timing import SAMPLE_RATE, SEGMENT_FEATURES, num_features
from tests.speech import espeak_wav, read_wav

SENTENCE = (
    "The quick brown fox jumps over the lazy dog. Peter picked a peck of pickled peppers, "
    "while seven small waves broke on the shore."
)


def drain_plans(total: int, config: StreamingConfig, arrivals: list[int]) -> list:
    """Simulate audio arriving in steps (features available), planning until nothing is left."""
    plans, nxt = [], 0
    for available in arrivals + [total]:
        final = available == total
        while (p := plan_window(nxt, available, config, final)) is not None:
            plans.append(p)
            nxt = p.emit_to
    return plans


@pytest.mark.parametrize("total", [1, 37, 240, 1499, 1500, 1501, 3350])
@pytest.mark.parametrize("config", [StreamingConfig(), StreamingConfig(2.0, 0.1, 0.0), StreamingConfig(8.0, 0.5, 1.0)])
def test_every_feature_emitted_once_in_order_with_left_context(total, config):
    rng = np.random.default_rng(total)
    arrivals = sorted(rng.integers(0, total, size=30).tolist())
    plans = drain_plans(total, config, arrivals)
    emitted = [i for p in plans for i in range(p.emit_from, p.emit_to)]
    assert emitted == list(range(total))
    for p in plans:
        # a window never crosses a 30 s segment and always covers what it emits
        assert p.segment_start <= p.start < p.emit_from or p.start == p.segment_start
        assert p.emit_to <= p.end + p.zero_pad <= p.segment_start + SEGMENT_FEATURES
        assert p.end - p.start <= config.window_features + 1
        # before the end of the stream, emitted features have `lookahead` of real audio after them
        if p.zero_pad == 0 and p.end % SEGMENT_FEATURES != 0:
            assert p.end - p.emit_to >= config.lookahead_features or p.end == total


def test_nothing_emitted_until_lookahead_arrives():
    config = StreamingConfig(window_s=4.0, hop_s=0.2, lookahead_s=0.5)
    assert plan_window(0, 25, config, final=False) is None  # 0.5 s of audio: no feature final yet
    assert plan_window(0, 34, config, final=False) is None  # less than one hop is final
    p = plan_window(0, 35, config, final=False)  # one hop (10 features) + lookahead (25)
    assert (p.emit_from, p.emit_to) == (0, 10)
    # at the end of the stream the rest is emitted at once, padded with silence
    p = plan_window(0, 30, config, final=True)
    assert (p.emit_from, p.emit_to, p.zero_pad) == (0, 30, 25)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="longer than hop_s"):
        StreamingConfig(window_s=0.5, hop_s=0.2, lookahead_s=0.4)


@pytest.fixture(scope="module")
def encoder():
    from realtime_avatar.whisper_weights import load_whisper

    torch.set_num_threads(2)
    return load_whisper("tiny.en").encoder


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    wav = espeak_wav(SENTENCE, tmp_path_factory.mktemp("speech") / "s.wav", rate=SAMPLE_RATE, wpm=140)
    audio, rate = read_wav(wav)
    assert rate == SAMPLE_RATE and 7.0 < len(audio) / rate < 13.0
    return audio


def stream_all(encoder, audio: np.ndarray, config: StreamingConfig, chunk: int = 1234) -> np.ndarray:
    """Feed audio into a ring in odd-sized chunks and collect every streamed feature."""
    ring = AudioRing(capacity_samples=SAMPLE_RATE * 40)
    whisper = StreamingWhisper(encoder, ring, config)

    async def run():
        blocks = []

        async def produce():
            for i in range(0, len(audio), chunk):
                ring.write(audio[i : i + chunk])
                await asyncio.sleep(0)
            ring.close()

        producer = asyncio.create_task(produce())
        async for block in whisper.stream():
            blocks.append(block)
        await producer
        return blocks

    blocks = asyncio.run(run())
    starts = [b.first_index for b in blocks]
    assert starts == sorted(starts)
    out = np.concatenate([b.states for b in blocks])
    assert out.shape[0] == num_features(len(audio))
    # in order, without gaps or repeats
    assert [b.first_index for b in blocks] == list(np.cumsum([0] + [len(b.states) for b in blocks[:-1]]))
    return out


def layer_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean over time of the cosine similarity per layer -> [5]."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-8
    return (num / den).mean(0)


def test_parity_with_offline_features(encoder, speech):
    offline = offline_features(encoder, speech)
    assert offline.shape == (num_features(len(speech)), 5, 384)
    streamed = stream_all(encoder, speech, StreamingConfig(window_s=4.0, hop_s=0.2, lookahead_s=0.5))
    cos = layer_cosines(streamed, offline)
    print("per-layer cosine (10 s clip):", np.round(cos, 4))
    assert np.all(cos >= 0.95), cos
    assert cos[0] > 0.99  # the embedding stage barely depends on context


@pytest.mark.slow
def test_parity_on_a_stream_longer_than_30s(encoder, speech):
    gap = np.zeros(SAMPLE_RATE // 2, np.float32)
    long = np.concatenate([speech, gap] * 4)  # ~40 s: crosses a 30 s segment boundary
    assert len(long) > 30 * SAMPLE_RATE
    offline = offline_features(encoder, long)
    streamed = stream_all(encoder, long, StreamingConfig(window_s=4.0, hop_s=0.2, lookahead_s=0.5), chunk=16000)
    cos = layer_cosines(streamed, offline)
    print("per-layer cosine (40 s stream):", np.round(cos, 4))
    assert np.all(cos >= 0.95), cos
    # the second segment is encoded from its own start, as the offline pass does
    seg2 = slice(SEGMENT_FEATURES, SEGMENT_FEATURES + 50)
    assert layer_cosines(streamed[seg2], offline[seg2]).min() > 0.9


def test_stream_features_equals_the_live_stream(encoder, speech):
    from realtime_avatar.streaming_whisper import LOW_LATENCY, stream_features

    clip = speech[: 3 * SAMPLE_RATE + 123]
    fast = stream_features(encoder, clip, LOW_LATENCY)
    live = stream_all(encoder, clip, LOW_LATENCY, chunk=320 * 6)
    assert fast.shape == live.shape == (num_features(len(clip)), 5, 384)
    np.testing.assert_allclose(fast, live, atol=1e-4)
