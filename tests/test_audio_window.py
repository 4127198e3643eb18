"""The model-declared audio window and the session delays derived from it (issue 14).

Pure index math on hand-checkable arrays; the window and streaming setting round-tripping
through a real compact safetensors file; the MuseTalk golden indices; the delay terms, the
jitter and p99 trackers and render-what-is-due on the numbers they are computed from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from realtime_avatar.delays import (
    ArrivalTracker,
    DurationTracker,
    arrival_jitter,
    frames_to_render,
    quantile,
)
from realtime_avatar.delays import (
    pipeline_delay as delay_terms,
)
from realtime_avatar.frame_windows import (
    StreamingFrameWindows,
    frame_window,
    offline_frame_windows,
)
from realtime_avatar.models.audio_contract import (
    LEGACY_COMPACT_CONTRACT,
    MUSETALK_CONTRACT,
    AudioContract,
    model_audio_contract,
    read_side_file,
)
from realtime_avatar.playback import PlaybackScheduler
from realtime_avatar.session import (
    SessionConfig,
    pipeline_delay,
    session_streaming,
    window_audio_range,
)
from realtime_avatar.streaming_whisper import LOW_LATENCY, StreamingConfig
from realtime_avatar.timing import (
    MUSETALK_WINDOW,
    AudioWindow,
    frames_ready,
    window_first_feature,
    window_last_feature,
)

RC40 = AudioWindow.with_right_context(40)  # 2i-6 .. 2i+3
RC0 = AudioWindow.with_right_context(0)  # 2i-8 .. 2i+1


def numbered_features(n: int, layers: int = 5, dim: int = 3) -> np.ndarray:
    t, l, c = np.meshgrid(np.arange(n), np.arange(layers), np.arange(dim), indexing="ij")
    return (100 * t + 10 * l + c + 1000).astype(np.float32)  # +1000: zero padding stands out


# ------------------------------------------------------------------------------ window math


def test_musetalk_window_golden_indices():
    w = MUSETALK_WINDOW
    assert (w.first, w.last, w.length, w.tokens, w.pad_left) == (-4, 5, 10, 50, 4)
    assert w.right_context_features == 4 and w.right_context_s == pytest.approx(0.08)
    assert AudioWindow.with_right_context(80) == w  # the default window IS MuseTalk's
    for frame, (lo, hi) in {0: (-4, 5), 1: (-2, 7), 10: (16, 25), 100: (196, 205)}.items():
        assert (window_first_feature(frame, w), window_last_feature(frame, w)) == (lo, hi)
    assert [frames_ready(n, None, w) for n in range(10)] == [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]
    assert window_audio_range(0) == (-4 * 320, 6 * 320)


def test_shorter_right_context_shifts_the_same_ten_features_left():
    assert (RC40.first, RC40.last, RC40.length) == (-6, 3, 10)
    assert (RC0.first, RC0.last, RC0.length) == (-8, 1, 10)
    assert RC40.right_context_s == pytest.approx(0.04) and RC0.right_context_s == 0.0
    # frame i is ready once feature 2i+last is final: 2 features sooner per 40 ms of context
    assert [frames_ready(n, None, RC0) for n in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [frames_ready(n, None, RC40) for n in range(6)] == [0, 0, 0, 0, 1, 1]
    assert frames_ready(20, 20, RC0) == frames_ready(20, 20, MUSETALK_WINDOW) == 10  # clip end: all
    assert window_audio_range(10, RC0) == (12 * 320, 22 * 320)


@pytest.mark.parametrize("bad", [(1, 5), (-4, 0), (0, -1)])
def test_window_must_hear_the_whole_frame(bad):
    with pytest.raises(ValueError, match="must include the frame's own features"):
        AudioWindow(*bad)


def test_right_context_must_be_whole_features():
    with pytest.raises(ValueError, match="multiple of 20 ms"):
        AudioWindow.with_right_context(30)
    with pytest.raises(ValueError, match="multiple of 20 ms"):
        AudioWindow.with_right_context(-20)


def test_window_contents_follow_the_model_window():
    feats = numbered_features(20)
    w = frame_window(feats, 5, 0, RC0).reshape(10, 5, 3)  # features 2..11
    assert w[:, 0, 0].tolist() == [1000 + 100 * t for t in range(2, 12)]
    w = frame_window(feats, 0, 0, RC0).reshape(10, 5, 3)  # features -8..1: 8 zero steps first
    assert np.all(w[:8] == 0) and w[8:, 0, 0].tolist() == [1000, 1100]
    # offline and streaming agree at every window, however the features arrive
    offline = offline_frame_windows(feats, None, RC40)
    stream = StreamingFrameWindows(layers=5, dim=3, window=RC40)
    out = []
    for lo in range(0, 20, 3):
        out += stream.push(lo, feats[lo : lo + 3])
    out += stream.finish()
    assert [f.index for f in out] == list(range(10))
    np.testing.assert_array_equal(np.stack([f.window for f in out]), offline)


def test_streaming_releases_frames_as_soon_as_the_window_allows():
    feats = numbered_features(12)
    for window, first_ready_after in ((MUSETALK_WINDOW, 6), (RC40, 4), (RC0, 2)):
        stream = StreamingFrameWindows(layers=5, dim=3, window=window)
        released = [len(stream.push(k, feats[k : k + 1])) for k in range(12)]
        assert released.index(1) + 1 == first_ready_after, window


# ------------------------------------------------------------------------- model metadata


def test_contract_round_trips_through_a_compact_checkpoint(tmp_path):
    from realtime_avatar.models.compact import CompactConfig, CompactModel

    tiny = CompactConfig(latent_channels=4, unet_channels=(16, 32, 64), attention_heads=2, norm_groups=8,
                         encoder_channels=(8, 16, 32), decoder_channels=(16, 8, 8))
    contract = AudioContract(RC0, StreamingConfig(window_s=1.0, hop_s=0.04, lookahead_s=0.04))
    model = CompactModel.random(config=tiny, seed=0)
    model.notes = dict(model.notes or {}, **contract.to_notes())
    model.save(tmp_path / "m.safetensors")
    loaded = CompactModel.load(tmp_path / "m.safetensors")
    assert model_audio_contract(loaded) == contract
    assert json.loads(loaded.notes["audio_window"]) == {"first": -8, "last": 1}

    # a file from before the window was recorded: MuseTalk's window, its recorded streaming
    old = CompactModel.random(config=tiny, seed=0)
    old.notes = {"streaming": json.dumps({"window_s": 2.0, "hop_s": 0.12, "lookahead_s": 0.1, "layout": "v15"})}
    old.save(tmp_path / "old.safetensors")
    assert model_audio_contract(CompactModel.load(tmp_path / "old.safetensors")) == LEGACY_COMPACT_CONTRACT
    bare = CompactModel.random(config=tiny, seed=0)
    bare.notes = {}
    assert model_audio_contract(bare) == LEGACY_COMPACT_CONTRACT


def test_musetalk_default_and_side_file(tmp_path):
    class Released:  # what load_musetalk_v15 returns carries its contract; model_id decides otherwise
        model_id = "musetalk-v15"

    assert model_audio_contract(Released()) == MUSETALK_CONTRACT
    assert MUSETALK_CONTRACT.window == MUSETALK_WINDOW and MUSETALK_CONTRACT.offline
    assert read_side_file(tmp_path) == MUSETALK_CONTRACT
    (tmp_path / "audio_contract.json").write_text(json.dumps({"audio_window": {"first": -6, "last": 3}}))
    assert read_side_file(tmp_path) == AudioContract(RC40, MUSETALK_CONTRACT.streaming, offline=True)
    (tmp_path / "audio_contract.json").write_text(json.dumps({"audio_window": {"first": 2, "last": 3}}))
    with pytest.raises(ValueError, match="audio_contract.json"):
        read_side_file(tmp_path)


# ------------------------------------------------------------------------------- delays


def test_session_delay_derives_from_the_model_window():
    s = StreamingConfig(window_s=1.0, hop_s=0.04, lookahead_s=0.04)
    assert pipeline_delay(s, 0.05, RC0) == pytest.approx(0.0 + 0.04 + 0.04 + 0.05)
    assert pipeline_delay(s, 0.05) == pytest.approx(0.08 + 0.04 + 0.04 + 0.05)  # MuseTalk's default
    cfg = SessionConfig(streaming=s, window=RC0, compute_s=0.03)
    assert cfg.adaptive and cfg.output_delay_s == pytest.approx(0.04 + 0.04 + 0.03 + 0.02)  # + default jitter
    fixed = SessionConfig(streaming=s, window=RC0, render_budget_s=0.15)
    assert not fixed.adaptive and fixed.output_delay_s == pytest.approx(0.08 + 0.15)
    terms = delay_terms(0.08, 0.1, 0.04, 0.03, 0.01)
    assert terms.total_s == pytest.approx(0.26) and terms.as_ms()["total"] == 260.0
    with pytest.raises(ValueError):
        delay_terms(0.08, -0.1, 0.04, 0.03, 0.01)


def test_session_hop_is_cut_to_40_ms_keeping_the_trained_lookahead():
    live = session_streaming(LOW_LATENCY)
    assert (live.window_s, live.hop_s, live.lookahead_s) == (2.0, 0.04, 0.1)
    assert session_streaming(StreamingConfig(1.0, 0.02, 0.0)).hop_s == 0.02  # never made longer
    assert session_streaming(StreamingConfig(0.3, 0.2, 0.05)).window_s > 0.04 + 0.05


def test_p99_and_jitter_trackers():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile(list(range(1, 101)), 0.99) == 99  # nearest rank: an observed value
    t = DurationTracker(default=0.5)
    for _ in range(5):
        t.add(0.01)
    assert t.p99() == 0.5  # too few samples: the default
    for x in [0.01] * 98 + [0.2, 0.3]:
        t.add(x)
    assert t.p99() == 0.2
    # 20 ms packets: on time, except one 60 ms late -> p99 jitter is what the others need
    arrivals = [(320 * k, 10.0 + 0.02 * k) for k in range(100)]
    assert arrival_jitter(arrivals) == pytest.approx(0.0, abs=1e-9)
    arrivals[50] = (320 * 50, 10.0 + 0.02 * 50 + 0.06)
    arrivals[60] = (320 * 60, 10.0 + 0.02 * 60 + 0.03)
    assert arrival_jitter(arrivals) == pytest.approx(0.03)
    # a sender that falls behind steadily (2 ms per packet: drift, not jitter) is not buffered for
    drifting = [(320 * k, 10.0 + 0.022 * k) for k in range(200)]
    assert arrival_jitter(drifting) == pytest.approx(0.002 * 45, abs=0.005)  # only the last 1 s's drift
    assert arrival_jitter(drifting, span_s=10.0) > 0.3
    tracker = ArrivalTracker(default=0.02, history_s=1.0)
    for n, t_ in arrivals[:5]:
        tracker.add(n, t_)
    assert tracker.jitter() == 0.02  # too few packets
    for n, t_ in arrivals[5:] + [(320 * k, 10.0 + 0.02 * k) for k in range(100, 200)]:
        tracker.add(n, t_)
    assert tracker.jitter() == pytest.approx(0.0, abs=1e-9)  # the late packets left the 1 s history


def test_render_what_is_due():
    cost = lambda n: 0.01 + 0.005 * n
    # plenty of time: the whole queue (up to the batch size) in one batch
    assert frames_to_render([1.0, 1.04, 1.08, 1.12], now=0.0, batch_cost=cost, max_batch=4) == 4
    assert frames_to_render([1.0] * 9, now=0.0, batch_cost=cost, max_batch=4) == 4
    # the first frame is due in 22 ms: only a batch that finishes by then (n=2: 20 ms)
    assert frames_to_render([0.022, 0.062, 0.102, 0.142], now=0.0, batch_cost=cost, max_batch=4) == 2
    # already late (even one frame alone misses): the whole queue goes, to catch up at the
    # cheapest cost per frame instead of falling further behind one frame at a time
    assert frames_to_render([-0.1, 0.0, 0.04], now=0.0, batch_cost=cost, max_batch=4) == 3
    assert frames_to_render([-0.1] * 9, now=0.0, batch_cost=cost, max_batch=4) == 4
    assert frames_to_render([], now=0.0, batch_cost=cost, max_batch=4) == 0


def test_scheduler_exposes_due_times_and_spurts():
    s = PlaybackScheduler(delay_s=0.2)
    assert not s.anchored and s.due(0) is None
    s.input_progress(3, now=1.0)
    assert s.tick(1.0) is None and s.anchored  # anchored: frame 0 plays at 1.2
    assert s.due(0) == pytest.approx(1.2) and s.due(2) == pytest.approx(1.28)


# ------------------------------------------------------------------------------- trainer


def test_trainer_takes_the_window_and_streaming_setting_and_records_them(tmp_path, capsys):
    from export import train as tr

    args = tr.build_parser().parse_args(["--out", str(tmp_path), "--right-context-ms", "0", "--lookahead", "0.04",
                                         "--hop", "0.04", "--encoder-window", "1.0"])
    settings = tr.TrainSettings(out=tmp_path, **tr.hearing_from_args(args))
    assert settings.window == RC0
    assert settings.streaming == StreamingConfig(window_s=1.0, hop_s=0.04, lookahead_s=0.04)
    # the checkpoint's settings (JSON, as torch.save stores them) give the same hearing back
    saved = json.loads(json.dumps(settings.to_json()))
    assert tr.hearing_from_json(saved) == {"window": settings.window, "streaming": settings.streaming}
    assert tr.hearing_from_json({}) == {}  # an older checkpoint: the defaults
    # the model file's notes carry the contract the runtime reads back
    notes = tr.model_notes(settings, tr.Progress())
    assert AudioContract.from_notes(notes, LEGACY_COMPACT_CONTRACT) == AudioContract(RC0, settings.streaming)
    # clips made for another setting are cached under another name; the default keeps the old one
    assert tr.features_tag(MUSETALK_WINDOW, LOW_LATENCY) == ""
    assert tr.features_tag(RC0, settings.streaming) == "-w-8_1-s1000_40_40"
    # defaults: what the trainer did before these were options
    default = tr.hearing_from_args(tr.build_parser().parse_args(["--out", str(tmp_path)]))
    assert default == {"window": MUSETALK_WINDOW, "streaming": LOW_LATENCY}
    # a right context that is not whole features: one clear line, exit code 2, nothing trained
    assert tr.main(["--out", str(tmp_path / "x"), "--right-context-ms", "30"]) == 2
    assert "multiple of 20 ms" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------- WebRTC receive


def _rtp(seq: int, timestamp: int, marker: bool = False, payload: bytes = b"x"):
    from aiortc.rtp import RtpPacket

    packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=timestamp, marker=int(marker))
    packet._data = payload  # what the receiver's depayloader leaves for the jitter buffer
    return packet


def test_receiver_releases_frames_when_complete():
    from aiortc.jitterbuffer import JitterBuffer

    from realtime_avatar.rtc_receive import FrameEndJitterBuffer

    # audio: aiortc's own buffer holds a packet until 4 more frames came; ours releases at once
    stock, ours = JitterBuffer(capacity=16, prefetch=4), FrameEndJitterBuffer(capacity=16)
    stock_out = [stock.add(_rtp(k, 960 * k))[1] for k in range(6)]
    ours_out = [ours.add(_rtp(k, 960 * k))[1] for k in range(6)]
    assert [f is not None for f in stock_out] == [False] * 4 + [True, True]  # 4 packets = 80 ms late
    assert [f.timestamp for f in ours_out] == [960 * k for k in range(6)]
    # video: a frame ends at its marker packet, not at the next frame's first packet
    video = FrameEndJitterBuffer(capacity=64, is_video=True)
    assert video.add(_rtp(100, 3600, payload=b"a"))[1] is None
    frame = video.add(_rtp(101, 3600, marker=True, payload=b"b"))[1]
    assert frame.timestamp == 3600 and frame.data == b"ab"
    # a missing packet holds the frame back until it comes
    assert video.add(_rtp(103, 7200, marker=True, payload=b"d"))[1] is None
    frame = video.add(_rtp(102, 7200, payload=b"c"))[1]
    assert frame.timestamp == 7200 and frame.data == b"cd"
    # a lost marker: the next frame's first packet still completes it (aiortc's rule)
    assert video.add(_rtp(104, 10800, payload=b"e"))[1] is None
    assert video.add(_rtp(105, 14400, payload=b"f"))[1].data == b"e"


def test_runtime_session_config_derives_from_the_model_and_the_machine(runtime):
    config = runtime.session_config(4)
    assert config.window == runtime.window == model_audio_contract(runtime.model).window
    assert config.streaming.hop_s <= 0.04
    assert config.streaming.lookahead_s == runtime.streaming.lookahead_s  # what the model was trained with
    assert config.adaptive and 0 < config.compute_s < 10
    assert config.output_delay_s == pytest.approx(pipeline_delay(config.streaming, config.compute_s + 0.02, config.window))
    fixed = runtime.session_config(4, render_budget_s=0.5)  # a fixed budget measures nothing
    assert not fixed.adaptive and fixed.output_delay_s == pytest.approx(pipeline_delay(fixed.streaming, 0.5, fixed.window))


def test_encoder_catches_up_when_a_run_is_slower_than_the_hop():
    from realtime_avatar.streaming_whisper import plan_window

    s = StreamingConfig(window_s=1.0, hop_s=0.04, lookahead_s=0.1)  # hop 2 features, lookahead 5
    # on time: one hop per run, with or without catch-up
    on_time = plan_window(100, 107, s, final=False, catch_up_hops=4)
    assert (on_time.emit_from, on_time.emit_to, on_time.end) == (100, 102, 107)
    # 10 features behind: one hop per run by default (training's rule), 4 hops when allowed
    assert plan_window(100, 117, s, final=False).emit_to == 102
    behind = plan_window(100, 117, s, final=False, catch_up_hops=4)
    assert (behind.emit_to, behind.end) == (108, 113)  # every emitted feature keeps >= 5 of lookahead
    assert behind.end - behind.start <= s.window_features
    # far behind: never more than half the window per run (the rest stays left context)
    far = plan_window(100, 200, s, final=False, catch_up_hops=25)
    assert far.emit_to - far.emit_from == 20 and far.emit_from - far.start >= s.window_features // 2 - 5


def test_delay_corrected_by_what_frames_needed_and_re_timed_in_whole_frames():
    from realtime_avatar.delays import corrected_delay, retime_frames

    assert corrected_delay(0.22, None, 0.08) == pytest.approx(0.22)  # too few frames measured
    assert corrected_delay(0.22, -0.07, 0.08) == pytest.approx(0.15)  # the worst cases never met
    assert corrected_delay(0.22, 0.03, 0.08) == pytest.approx(0.25)  # queueing the sum misses
    assert corrected_delay(0.22, -0.5, 0.08) == pytest.approx(0.08)  # never below context + lookahead
    assert retime_frames(0.30, 0.15) == 3  # skip 3 frames: 0.18 >= target
    assert retime_frames(0.30, 0.27) == 0  # within a frame
    assert retime_frames(0.30, 0.30) == 0
    assert retime_frames(0.15, 0.21) == -2  # 2 idle ticks: 0.23 >= target
    assert retime_frames(0.15, 0.151) == -1


def test_scheduler_retime_skips_or_idles_whole_frames():
    s = PlaybackScheduler(delay_s=0.2)
    s.input_progress(10, now=1.0)
    assert s.tick(1.0) is None  # anchored: frame 0 plays at 1.2
    assert s.tick(1.2) == 0
    assert s.retime(3) == 3  # frames 1..3 never play; frame 4 plays when frame 1 would have
    assert s.delay_s == pytest.approx(0.08) and s.next_frame == 4 and s.due(4) == pytest.approx(1.24)
    assert s.tick(1.24) == 4
    assert s.retime(-2) == -2  # two idle ticks before frame 5
    assert s.delay_s == pytest.approx(0.16) and s.due(5) == pytest.approx(1.36)
    assert s.tick(1.28) is None and s.tick(1.32) is None and s.tick(1.36) == 5
    assert s.retime(100) == 4  # only what is pending (6..9)
    assert s.stats.retimed == [3, -2, 4]
    assert PlaybackScheduler(0.2).retime(3) == 0  # no spurt playing
