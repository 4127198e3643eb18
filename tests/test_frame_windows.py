"""FrameWindows: index math, padding and layout pinned on small hand-checkable arrays."""

import numpy as np
import pytest

from realtime_avatar.frame_windows import StreamingFrameWindows, frame_window, offline_frame_windows
from realtime_avatar.timing import frames_ready, num_features, num_frames, window_first_feature, window_last_feature


def numbered_features(n: int, layers: int = 5, dim: int = 3) -> np.ndarray:
    """feature t, layer l, channel c holds 100*t + 10*l + c: every value says where it came from."""
    t, l, c = np.meshgrid(np.arange(n), np.arange(layers), np.arange(dim), indexing="ij")
    return (100 * t + 10 * l + c + 1000).astype(np.float32)  # +1000 so zero padding stands out


def test_clip_lengths_follow_musetalk():
    assert num_frames(16000) == 25 and num_features(16000) == 50
    assert num_frames(16000 * 10 + 639) == 250  # floor, never rounds up
    assert num_frames(44100 * 0) == 0
    assert num_features(1599) == 4  # 1599 samples = 99.9 ms -> 4 whole 20 ms features


def test_window_index_math():
    assert (window_first_feature(0), window_last_feature(0)) == (-4, 5)
    assert (window_first_feature(1), window_last_feature(1)) == (-2, 7)
    assert (window_first_feature(10), window_last_feature(10)) == (16, 25)


def test_frames_ready_needs_feature_2i_plus_5():
    assert frames_ready(5) == 0  # frame 0 needs features 0..5
    assert frames_ready(6) == 1
    assert frames_ready(7) == 1
    assert frames_ready(8) == 2
    assert frames_ready(0) == 0
    # at the end of a 20-feature clip all 10 frames are ready: the rest is zero padding
    assert frames_ready(20, total_features=20) == 10
    assert frames_ready(19, total_features=20) == 7


def test_first_window_is_zero_padded_on_the_left_and_time_major():
    feats = numbered_features(20)
    w = frame_window(feats, 0)  # features -4..5: 4 zero steps then features 0..5
    assert w.shape == (50, 3)
    assert np.all(w[:20] == 0)  # 4 time steps x 5 layers of padding
    # token 20 = time step 4 (feature 0), layer 0; token 21 = feature 0, layer 1
    assert w[20].tolist() == [1000, 1001, 1002]
    assert w[21].tolist() == [1010, 1011, 1012]
    assert w[25].tolist() == [1100, 1101, 1102]  # feature 1, layer 0
    assert w[49].tolist() == [1540, 1541, 1542]  # feature 5, layer 4


def test_middle_and_last_windows():
    feats = numbered_features(20)
    w = frame_window(feats, 5).reshape(10, 5, 3)  # features 6..15, no padding
    assert w[:, 0, 0].tolist() == [1000 + 100 * t for t in range(6, 16)]
    w = frame_window(feats, 9).reshape(10, 5, 3)  # features 14..23: 20..23 are padding
    assert w[:6, 0, 0].tolist() == [1000 + 100 * t for t in range(14, 20)]
    assert np.all(w[6:] == 0)


def test_offline_windows_count_and_content():
    feats = numbered_features(21)  # odd count: 10 frames
    windows = offline_frame_windows(feats)
    assert windows.shape == (10, 50, 3)
    for i in range(10):
        np.testing.assert_array_equal(windows[i], frame_window(feats, i))


@pytest.mark.parametrize("block_sizes", [[1] * 40, [7, 3, 11, 2, 17], [40], [5, 35]])
def test_streaming_windows_equal_offline(block_sizes):
    feats = numbered_features(40, dim=4)
    offline = offline_frame_windows(feats)
    stream = StreamingFrameWindows(layers=5, dim=4)
    got, at = [], 0
    for n in block_sizes:
        for fa in stream.push(at, feats[at : at + n]):
            # released as soon as its last feature (2i+5) exists
            assert 2 * fa.index + 5 <= at + n - 1
            got.append(fa)
        at += n
    got += stream.finish()
    assert [fa.index for fa in got] == list(range(20))
    for fa in got:
        np.testing.assert_array_equal(fa.window, offline[fa.index])


def test_streaming_releases_frame_exactly_when_complete_and_keeps_memory_bounded():
    feats = numbered_features(1000, dim=2)
    stream = StreamingFrameWindows(layers=5, dim=2)
    released = 0
    for t in range(1000):
        out = stream.push(t, feats[t : t + 1])
        released += len(out)
        assert released == frames_ready(t + 1)
        assert len(stream._buffer) <= 12  # only what the next window can reach
    assert released == 498 and len(stream.finish()) == 2


def test_streaming_rejects_gaps():
    stream = StreamingFrameWindows(layers=5, dim=2)
    stream.push(0, numbered_features(3, dim=2))
    with pytest.raises(ValueError, match="expected index 3"):
        stream.push(4, numbered_features(1, dim=2))


def test_positional_encoding_is_the_musetalk_sinusoid_over_50_tokens():
    from realtime_avatar.frame_windows import with_positional_encoding

    windows = np.zeros((2, 50, 384), np.float32)
    pe = with_positional_encoding(windows)[0]
    # token 0: sin(0)=0 on even dims, cos(0)=1 on odd dims
    assert np.allclose(pe[0, 0::2], 0.0) and np.allclose(pe[0, 1::2], 1.0)
    # token 7, dims 0/1: sin(7), cos(7) (the fastest wavelength, w_0 = 1)
    assert pe[7, 0] == pytest.approx(np.sin(7.0), abs=1e-6) and pe[7, 1] == pytest.approx(np.cos(7.0), abs=1e-6)
    # dims 2/3 use w_1 = 10000^(-2/384)
    w1 = 10000.0 ** (-2 / 384)
    assert pe[49, 2] == pytest.approx(np.sin(49 * w1), abs=1e-5)
    # it is added, not substituted
    ones = with_positional_encoding(np.ones((1, 50, 384), np.float32))[0]
    np.testing.assert_allclose(ones - 1.0, pe, atol=1e-6)
