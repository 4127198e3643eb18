"""The latency benchmarks: their pure helpers, and every script in a short run that prints JSON.

The helpers are checked on signals with known answers (onsets at known samples, a stream with a
known offset). The scripts run in-process on the suite's shared runtime fixture with their
--quick settings shortened further; these are smoke tests: they check that each benchmark runs
the real pipeline end to end and reports what it promises, never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402

MAX_PNG_BYTES = 200 * 1024


# --- pure helpers ---------------------------------------------------------------------------


def test_window_study_picks_the_lowest_delay_within_005_of_the_best():
    import study_window as sw

    rows = [  # session 6's shape: the astronaut flat, the unseen faces far apart
        {"setting": "rc80-la40", "designed_delay_ms": 160, "pearson_r": 0.877, "silence_closed": 1.0,
         "faces_median_r": 0.934, "faces_silence_closed": 1.0},
        {"setting": "rc80-la0", "designed_delay_ms": 120, "pearson_r": 0.852, "silence_closed": 1.0,
         "faces_median_r": 0.926, "faces_silence_closed": 1.0},
        {"setting": "rc40-la0", "designed_delay_ms": 80, "pearson_r": 0.841, "silence_closed": 1.0,
         "faces_median_r": 0.743, "faces_silence_closed": 0.99},
        {"setting": "rc0-la0", "designed_delay_ms": 40, "pearson_r": 0.70, "silence_closed": 1.0,
         "faces_median_r": 0.60, "faces_silence_closed": 1.0},
    ]
    assert sw.choose(rows)["setting"] == "rc40-la0"  # on the astronaut: 0.841 >= 0.877 - 0.05
    assert sw.choose(rows, prefix="faces_")["setting"] == "rc80-la0"  # on faces never seen
    rows[1]["faces_silence_closed"] = 0.9  # a mouth that stays open in silence never qualifies
    assert sw.choose(rows, prefix="faces_")["setting"] == "rc80-la40"
    assert sw.choose([]) is None


def test_summarize_matches_numpy_and_handles_empty():
    x = np.random.default_rng(0).exponential(10.0, 1000)
    s = common.summarize(x, digits=6)
    assert s["n"] == 1000
    assert s["median"] == pytest.approx(np.median(x), abs=1e-6)
    assert s["p90"] == pytest.approx(np.percentile(x, 90), abs=1e-6)
    assert s["p99"] == pytest.approx(np.percentile(x, 99), abs=1e-6)
    assert s["max"] == pytest.approx(x.max(), abs=1e-6)
    assert s["min"] == pytest.approx(x.min(), abs=1e-6)
    assert common.summarize([])["median"] is None


def test_detect_onsets_finds_clicks_at_their_samples():
    rate = 16_000
    signal = np.zeros(5 * rate, np.float32)
    truth = [0.5, 1.7321, 3.0]
    for t in truth:
        start = int(t * rate)
        signal[start : start + 400] = 0.3 * np.sin(np.arange(400) / 3.0)  # a 25 ms burst
    signal[int(2.2 * rate) : int(2.2 * rate) + 3] = 0.001  # below threshold: not an onset
    found = common.detect_onsets(signal, rate)
    assert len(found) == len(truth)
    for f, t in zip(found, truth):
        assert abs(f - t) <= common.ONSET_BLOCK_S  # within one detection block
    # two bursts closer than min_gap_s are one event
    assert len(common.detect_onsets(signal, rate, min_gap_s=2.0)) == 1


def test_onset_signal_puts_a_click_on_every_reported_onset():
    sig = common.onset_signal(["papa", "map"], [0.8, 0.8], lead_s=0.5, tail_s=0.2, rate=16_000)
    assert len(sig.onsets_s) == 2 and sig.onsets_s[0] == pytest.approx(0.5)
    found = common.detect_onsets(sig.samples, sig.rate)
    assert len(found) == 2
    for f, t in zip(found, sig.onsets_s):
        assert abs(f - t) <= common.ONSET_BLOCK_S
    assert sig.seconds > 0.5 + 2 * 0.8


def test_align_stream_recovers_a_known_offset_and_breaks_ties_by_timing():
    rng = np.random.default_rng(1)
    sent = [rng.uniform(0, 255, (32, 48)).astype(np.float32) for _ in range(60)]
    sent_times = [10.0 + n / 25 for n in range(60)]
    start, gaps = 17, [0, 1, 2, 4, 5, 6, 9, 10]  # received frames, some lost on the way
    arrivals = [sent_times[start + d] + 0.03 for d in gaps]
    received = [sent[start + d] + rng.normal(0, 2, (32, 48)).astype(np.float32) for d in gaps]
    found = common.align_stream(gaps, arrivals, received, sent_times, sent)
    assert found.start == start and found.tied == 1
    assert found.min_delay_s == pytest.approx(0.03)
    # frames that all look alike (an idle avatar): the latest tick consistent with causality
    same = [np.zeros((32, 48), np.float32)] * 60
    found = common.align_stream(gaps, arrivals, same[: len(gaps)], sent_times, same)
    assert found.start == start and found.tied > 1
    # frames that arrived before anything was sent fit nothing
    assert common.align_stream(gaps, [0.0] * len(gaps), received, sent_times, sent) is None


def test_chunk_onsets_agree_with_detect_onsets_on_the_same_audio():
    sig = common.onset_signal(["papa", "map", "bob"], [0.7, 1.2, 0.6], lead_s=0.6, tail_s=0.3, rate=16_000)
    chunk = 640  # one video frame of audio, as the session's ticks carry it
    starts = np.arange(0, len(sig.samples), chunk)
    loud = [common.first_loud(sig.samples[s : s + chunk]) for s in starts]
    loud_abs = [s + x if x >= 0 else -1 for s, x in zip(starts, loud)]
    from_chunks = common.chunk_onsets(loud_abs, starts + chunk, int(0.5 * 16_000))
    from_audio = [round(t * 16_000) for t in common.detect_onsets(sig.samples, 16_000, min_gap_s=0.5)]
    assert len(from_chunks) == len(from_audio) == 3
    assert np.abs(np.array(from_chunks) - from_audio).max() <= int(common.ONSET_BLOCK_S * 16_000)


def test_columns_keep_rows_without_reallocating_until_full():
    log = common.Columns(("t", "x"), capacity=3)
    before = log.nbytes
    for k in range(3):
        log.append(k * 0.5, k)
    assert log.nbytes == before and len(log) == 3
    log.append(9.0, 9)  # past capacity: doubles
    assert log.nbytes == 2 * before
    assert log["x"].tolist() == [0, 1, 2, 9] and log["t"][1] == 0.5


def test_time_ring_reached_finds_the_write_that_brought_a_sample():
    log = common.Columns(("t", "write_index", "loud_at"), 8)
    for t, index in [(1.0, 320), (1.02, 640), (1.04, 960)]:  # (time, ring write index after the write)
        log.append(t, index, -1)
    assert common.time_ring_reached(log, 0) == 1.0
    assert common.time_ring_reached(log, 320) == 1.02  # sample 320 came with the second write
    assert common.time_ring_reached(log, 959) == 1.04
    assert common.time_ring_reached(log, 960) is None  # not written yet


def test_motion_threshold_sits_above_codec_noise():
    noise = np.abs(np.random.default_rng(2).normal(0, 1.0, 200))
    threshold = common.motion_threshold(noise)
    assert threshold > np.percentile(noise, 99)
    assert common.motion_threshold([0.0, 0.0]) == 1.5


def test_markdown_table_lists_every_row_and_column():
    text = common.markdown_table([{"a": 1, "b": 2.5}, {"a": 3, "b": None}], ["a", "b"])
    lines = text.strip().splitlines()
    assert lines[0] == "| a | b |" and len(lines) == 4
    assert "| 3 | – |" in lines[3]


def test_bench_tuning_report_tables_and_plots_earlier_results_without_measuring(tmp_path, capsys):
    import bench_tuning

    def stage(r: float, gap: float, closed: float, steps: int | None = None) -> dict:
        return {"pearson_r": r, "gap_ratio": gap, "silence_closed": closed} | ({"steps": steps} if steps else {})

    rows = [  # measured in parts, so not in face order; three faces give an exact median
        {"face": "women/51", "stages": {"0": stage(0.90, 1.0, 1.0), "5": stage(0.93, 1.1, 1.0, 900),
                                        "15": stage(0.95, 1.2, 1.0, 2000)}},
        {"face": "men/98", "stages": {"0": stage(0.88, 1.2, 1.0), "5": stage(0.85, 0.9, 0.9, 975),
                                      "15": stage(0.83, 0.95, 0.98, 2686)}},
        {"face": "men/90", "stages": {"0": stage(0.87, 0.7, 1.0), "5": stage(0.92, 1.09, 1.0, 1044),
                                      "15": stage(0.89, 1.08, 1.0, 2792)}},
    ]
    results = tmp_path / "tuning.json"
    results.write_text(json.dumps({"faces": rows}))
    markdown = tmp_path / "tuning.md"
    assert bench_tuning.main(["--report", "--json", str(results), "--markdown", str(markdown),
                              "--plots", str(tmp_path)]) == 0
    lines = markdown.read_text().strip().splitlines()
    assert lines[0].startswith("| face | r |") and "5 min / 15 min" in lines[0]
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| men/90", "| men/98", "| women/51"]
    assert lines[3] == "| men/98 | 0.880 / 0.850 / 0.830 | 1.20 / 0.90 / 0.95 | 1.00 / 0.90 / 0.98 | 975 / 2686 |"
    assert lines[5].startswith("| **median of these 3** | **0.880 / 0.920 / 0.890** | 1.00 / 1.09 / 1.08 |")
    assert "median r: 0 min 0.880, 5 min 0.920, 15 min 0.890" in capsys.readouterr().out
    png = tmp_path / "tuning.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < MAX_PNG_BYTES
    with pytest.raises(SystemExit):  # nothing to report: says so instead of measuring for hours
        bench_tuning.main(["--report", "--json", str(tmp_path / "missing.json")])


def test_machine_info_names_the_machine():
    info = common.machine_info()
    assert info["cores"] >= 1 and info["cpu"]
    assert len(info["load_average"]) == 3
    assert info["versions"]["torch"]


# --- every benchmark, short ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(runtime):
    return common.wrap_runtime(runtime)


@pytest.fixture(scope="module")
def results() -> dict:
    return {}


def run_quick(module_name: str, argv: list[str], bench, tmp_path, capsys) -> dict:
    """Run a benchmark's main() with --quick --json-only; return the JSON it printed."""
    import importlib

    module = importlib.import_module(module_name)
    capsys.readouterr()
    module.main(["--quick", "--json-only", "--plots", str(tmp_path), *argv], bench)
    printed = json.loads(capsys.readouterr().out)
    assert printed["mode"] == "quick"
    assert printed["machine"]["cores"] >= 1
    assert printed["runtime"]["weights"] in ("trained", "random")
    for plot in printed["plots"]:
        size = Path(plot).stat().st_size
        assert 0 < size < MAX_PNG_BYTES, (plot, size)
    return printed


@pytest.mark.slow
def test_bench_stages_times_every_stage(bench, results, tmp_path, capsys):
    out = run_quick("bench_stages", ["--batches", "1", "--repeats", "2"], bench, tmp_path, capsys)
    stages = {row["stage"] for row in out["rows"]}
    assert {"resample 48k stereo -> 16k", "whisper encoder hop", "window assembly", "unet", "decoder",
            "render graph (unet+decoder+uint8)", "blend patch into frame", "video encode"} <= stages
    assert all(row["median"] is not None and row["median"] >= 0 for row in out["rows"])
    assert {"torch-fp32", "torch-bf16"} <= set(out["backends"])
    results["stages"] = out


@pytest.mark.slow
def test_bench_lookahead_reports_latency_and_parity(bench, results, tmp_path, capsys):
    out = run_quick("bench_lookahead", ["--lookaheads", "0.1"], bench, tmp_path, capsys)
    (row,) = out["rows"]
    assert row["lookahead_s"] == 0.1
    assert row["design_latency_ms"] == pytest.approx(80 + 100 + 1000 * row["hop_s"])
    assert 0.0 < row["parity_cos_last_layer"] <= 1.0
    results["lookahead"] = out


@pytest.mark.slow
def test_bench_baseline_times_first_frames_of_both_pipelines(bench, results, tmp_path, capsys):
    out = run_quick("bench_baseline", ["--durations", "2"], bench, tmp_path, capsys)
    (row,) = out["rows"]
    assert row["utterance_s"] == 2.0
    # the offline pipeline cannot show a frame before the utterance is over
    assert row["offline_ttff_from_speech_start_ms"] >= 2000
    assert row["streaming_ttff_ms"] is not None
    results["baseline"] = out


@pytest.mark.slow
def test_bench_e2e_webrtc_receives_the_avatar_and_finds_the_onsets(bench, results, tmp_path, capsys):
    # --no-gc-freeze: freezing is for a serving process, not for the test process
    out = run_quick("bench_e2e_webrtc", ["--words", "2", "--no-gc-freeze"], bench, tmp_path, capsys)
    assert out["received"]["video_frames"] > 25
    assert out["gc_pauses_ms"]["gen0"]["n"] > 0  # the collector was watched while the session ran
    assert out["onsets_found"]["sent"] == 2
    assert out["onsets_found"]["server_input"] == 2  # both clicked onsets crossed the network
    assert out["alignment"]["first_frame_tick"] >= 0  # received frames were matched to ticks
    assert out["alignment"]["min_network_out_ms"] > 0
    assert len(out["events"]) == 2 and all("network_in_ms" in e for e in out["events"])
    assert out["summary"]["design_ms"]["output_delay_ms"] > 0
    results["e2e_webrtc"] = out


def test_bench_concurrency_runs_each_level(bench, results, tmp_path, capsys):
    out = run_quick("bench_concurrency", ["--sessions", "1,2", "--seconds", "2"], bench, tmp_path, capsys)
    assert [level["sessions"] for level in out["levels"]] == [1, 2]
    assert [len(level["sessions_detail"]) for level in out["per_session"]] == [1, 2]
    assert all(s["fps"] > 0 for level in out["per_session"] for s in level["sessions_detail"])
    assert 0 <= out["max_sessions_holding_25fps"] <= 2
    results["concurrency"] = out


def test_bench_sustained_tracks_frames_offsets_and_memory(bench, results, tmp_path, capsys):
    out = run_quick("bench_sustained", ["--seconds", "4"], bench, tmp_path, capsys)
    frames = out["frames"]
    assert frames["ticks"] > 0 and frames["expected_ticks"] > 0
    assert frames["input_frames_pushed"] >= 4 * 25 - 1
    assert out["rss_mib"]["max"] >= out["rss_mib"]["start"] > 0
    assert out["series"] and out["series"][0]["rss_mib"] is not None
    results["sustained"] = out


def test_bench_frame_engine_measures_throughput_sessions_and_webrtc(bench, tmp_path, capsys):
    out = run_quick("bench_frame_engine", ["--sessions", "1,2", "--seconds", "1", "--batches", "1,2",
                                           "--webrtc", "2", "--webrtc-seconds", "3"], bench, tmp_path, capsys)
    run = out["runs"][0]
    assert (run["device"], run["backend"], run["frame_format"]) == ("cpu", "torch", "bgr24")
    assert [r["batch"] for r in run["throughput"]] == [1, 2] and all(r["frames_per_s"] > 0 for r in run["throughput"])
    assert run["synthetic"][0]["sessions"] == 1 and run["synthetic"][0]["min_session_fps"] > 0
    if not __import__("torch").cuda.is_available():
        assert any("no CUDA GPU" in s for s in out["skipped"])
    webrtc = out["webrtc"]
    assert webrtc["sessions"] == 2 and len(webrtc["server_fps"]) == 2 and all(f > 0 for f in webrtc["client_fps"])
    assert webrtc["sessions_open_at_end"] == 2 and len(webrtc["rendered_frames"]) == 2


@pytest.mark.slow
def test_gpu_check_runs_on_a_cpu_and_says_there_is_no_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick",
                           "--carry", str(tmp_path / "none"), "--out", str(tmp_path / "gpu.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    if not result["environment"]["cuda"]:
        assert "no CUDA GPU visible" in done.stdout
        assert result["tests"] and all(t["outcome"] == "skipped" for t in result["tests"])
    assert "frame engine" in done.stdout and result["benchmark"]


def test_run_all_writes_the_report(results, tmp_path):
    """The suite's report from the runs above (the ones that ran in this session)."""
    import run_all

    if not results:
        pytest.skip("no benchmark ran in this session")
    report = {
        "mode": "quick", "started": "now", "seconds": 1.0, "command": "test",
        "machine": common.machine_info(), "load_before": [0, 0, 0], "load_after": [0, 0, 0],
        "competing_processes": [], "results": dict(results), "timings_s": {},
    }
    report["results"]["broken"] = {"error": "exit status 1", "stderr_tail": "Traceback ..."}
    json_path, md_path = run_all.write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["results"].keys() == report["results"].keys()
    text = md_path.read_text()
    assert "Quick mode" in text and "## broken" in text and "FAILED" in text
    for name in results:
        assert f"## {name}" in text


@pytest.mark.slow
def test_a_script_runs_from_the_command_line_and_prints_json():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_lookahead.py"), "--quick", "--lookaheads", "0.2"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.JSONDecoder().raw_decode(done.stdout)[0]
    assert result["benchmark"] == "lookahead" and result["rows"][0]["lookahead_s"] == 0.2
    assert "| window_s |" in done.stdout  # the markdown table follows the JSON
