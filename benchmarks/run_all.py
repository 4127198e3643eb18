"""Run the whole latency benchmark suite and write benchmarks/results/latest.{json,md} + PNG plots.

    .venv/bin/python benchmarks/run_all.py            # full suite, about 15-20 min on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick    # every script in its short mode (~3 min)

Each benchmark runs in its own process (a crash or a leak in one cannot spoil the next, and
RSS is per benchmark), one after the other so that they never share the CPU; each prints its
JSON into a temporary file and draws its plots into the results folder. The sustained run
(10 minutes) is the longest. Two benchmarks owned elsewhere are run as extras when present:
bench_backends.py (render throughput per backend) and bench_streaming_whisper.py.

Nothing here downloads anything; the default model's trained weights are used when installed
(else random weights with the same compute, and the results say so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

# (name, script, extra args for a full run, timeout for a full run in s); in suite order
SUITE = (
    ("stages", "bench_stages.py", [], 420),
    ("lookahead", "bench_lookahead.py", [], 300),
    ("baseline", "bench_baseline.py", [], 420),
    ("e2e_webrtc", "bench_e2e_webrtc.py", [], 240),
    ("concurrency", "bench_concurrency.py", [], 300),
    ("sustained", "bench_sustained.py", [], 780),
)
QUICK_TIMEOUT_S = 300
# Benchmarks owned by other parts of the project: run as they are, their JSON kept verbatim.
EXTRAS = (
    ("backends", "bench_backends.py", ["--runs", "3", "--seconds", "0.5", "--batches", "1,4,8"], 300),
    ("streaming_whisper", "bench_streaming_whisper.py", ["--json-only"], 300),
)


def first_json(text: str) -> dict:
    """The first JSON object printed in `text` (scripts print JSON, then a table)."""
    start = text.index("{")
    value, _ = json.JSONDecoder().raw_decode(text[start:])
    return value


def run_script(script: str, args: list[str], timeout: float, json_file: Path | None) -> tuple[dict, float]:
    """Run one benchmark script; returns (its JSON result or an error record, seconds)."""
    t0 = time.monotonic()
    command = [sys.executable, str(HERE / script), *args]
    try:
        done = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:]
        return {"error": f"timed out after {timeout:.0f} s",
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}, timeout
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        return {"error": f"exit status {done.returncode}", "stderr_tail": done.stderr[-3000:]}, seconds
    try:
        if json_file is not None and json_file.is_file():
            return json.loads(json_file.read_text()), seconds
        return first_json(done.stdout), seconds
    except (ValueError, json.JSONDecodeError) as exc:
        return {"error": f"no JSON in its output ({exc})", "stdout_tail": done.stdout[-2000:]}, seconds


def suite_markdown(report: dict) -> str:
    """latest.md: the machine, then each benchmark's own table (or its error)."""
    import importlib

    lines = [f"# Latency benchmarks ({report['mode']} run)", "", machine_line(report), ""]
    if report["mode"] == "quick":
        lines += ["**Quick mode**: short runs that check the scripts work; the numbers are not the "
                  "suite's (run `benchmarks/run_all.py` without --quick for those).", ""]
    lines += ["## Headline", "", headline(report)]
    runtime = next((r["runtime"] for r in report["results"].values() if isinstance(r, dict) and "runtime" in r), None)
    if runtime:
        s = runtime["streaming"]
        lines += [f"Runtime: model {runtime['model']} ({runtime['weights']} weights, {runtime['weights_hash'][:12]}, "
                  f"{runtime.get('backend', 'torch')} backend), "
                  f"avatar {runtime['avatar_frames']} frames {runtime['frame_size']}, encoder window {s['window_s']:g} s "
                  f"/ hop {s['hop_s']:g} s / lookahead {s['lookahead_s']:g} s.", ""]
    for name, result in report["results"].items():
        lines.append(f"## {name}")
        lines.append("")
        if "error" in result:
            lines += [f"FAILED: {result['error']}", "", "```", result.get("stderr_tail", "")[-1500:], "```", ""]
            continue
        module = next((script for n, script, _, _ in SUITE if n == name), None)
        if module is not None:
            lines.append(importlib.import_module(module.removesuffix(".py")).markdown(result))
        else:
            lines.append(extra_markdown(name, result))
        for plot in result.get("plots", []):
            lines.append(f"![{name}]({Path(plot).name})")
        lines.append("")
    return "\n".join(lines) + "\n"


def _get(data: dict, *keys, default=None):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def _ms(value) -> str:
    return "–" if value is None else f"{value:.0f} ms"


def headline(report: dict) -> str:
    """The numbers people compare, one line each, from whichever benchmarks succeeded."""
    r = {name: result for name, result in report["results"].items() if "error" not in result}
    rows: list[dict] = []

    def add(measure: str, value: str) -> None:
        rows.append({"measure": measure, "value": value})

    e2e = _get(r, "e2e_webrtc", "summary")
    if e2e:
        true, seen = e2e["mouth_onset_latency_true_ms"], e2e["mouth_onset_latency_ms"]
        weights = _get(r, "e2e_webrtc", "runtime", "weights")
        why = " (random weights: the rendered mouth hardly moves)" if weights == "random" and not seen["n"] else ""
        add("mouth-onset latency over WebRTC loopback, median / p90",
            f"{_ms(true['median'])} / {_ms(true['p90'])} (first rendered mouth); detected in video: "
            f"{_ms(seen['median'])} (n={seen['n']}){why}")
        add("audio latency (spoken -> heard back), median", _ms(e2e["audio_latency_ms"]["median"]))
        add("A/V offset, mouth minus voice onset: in the stream / as received / same audio rendered offline",
            f"{_ms(e2e['av_offset_content_ms']['median'])} / {_ms(e2e['av_offset_received_ms']['median'])} / "
            f"{_ms((e2e.get('av_offset_offline_ms') or {}).get('median'))}")
        pipeline = e2e.get("av_offset_pipeline_ms") or {}
        if pipeline.get("n"):
            add("A/V offset added by streaming + network (received - offline), median / min / max",
                f"{_ms(pipeline['median'])} / {_ms(pipeline['min'])} / {_ms(pipeline['max'])} (n={pipeline['n']})")
        skew, alone = e2e.get("av_transport_skew_ms") or {}, e2e.get("av_offset_streaming_ms") or {}
        if skew.get("n") and alone.get("n"):
            add("of which transport skew (aiortc receiver, video minus audio delay) / streaming alone, median",
                f"{_ms(skew['median'])} / {_ms(alone['median'])}")
        add("session output delay (right context + lookahead + hop + render budget)",
            _ms(e2e["design_ms"]["output_delay_ms"]))
    stages = _get(r, "stages", "rows") or []
    renders = [row for row in stages if row["stage"].startswith("AvatarRenderer.render") and row.get("per_frame_ms")]
    if renders:
        add("render + blend per frame (the runtime's renderer)",
            ", ".join(f"{row['per_frame_ms']:.1f} ms at {row['setting'].split(', ')[-1]}" for row in renders))
    graphs = [row for row in stages if row["stage"].startswith("render graph") and row.get("per_frame_ms")]
    if graphs:
        best = min(graphs, key=lambda row: row["per_frame_ms"])
        add("fastest render graph here", f"{best['per_frame_ms']:.1f} ms per frame ({best['setting']})")
    hops = [row for row in stages if row["stage"] == "whisper encoder hop"]
    if hops:
        add("Whisper encoder hop, median", "; ".join(f"{_ms(row['median'])} ({row['setting'].split(':')[0]})" for row in hops))
    sustained = r.get("sustained")
    if sustained:
        f = sustained["frames"]
        add(f"sustained {sustained['settings']['seconds']:.0f} s: frames delivered / expected, late frames",
            f"{f['ticks']} / {f['expected_ticks']}, {f['late_frames']} late ({f['late_ticks']} late ticks)")
        add("sustained: A/V offset drift, latency drift, RSS growth",
            f"{sustained['av_offset_drift_ms_per_min']} ms/min, {sustained['mouth_latency_drift_ms_per_min']} ms/min, "
            f"{sustained['rss_mib']['growth_mib_per_min_second_half']} MiB/min")
    concurrency = r.get("concurrency")
    if concurrency:
        add("concurrent sessions holding 25 fps (of " + ", ".join(str(lv["sessions"]) for lv in concurrency["levels"]) + ")",
            str(concurrency["max_sessions_holding_25fps"]))
    for row in _get(r, "baseline", "rows") or []:
        add(f"time to first frame, {row['utterance_s']:g} s utterance: offline / streaming",
            f"{_ms(row['offline_ttff_from_speech_start_ms'])} / {_ms(row['streaming_ttff_ms'])}")
    return common.markdown_table(rows, ["measure", "value"]) if rows else "(no results)\n"


README_START = "<!-- results:start (written by run_all.py) -->"
README_END = "<!-- results:end -->"


def machine_line(report: dict) -> str:
    m = report["machine"]
    hardware = f"{m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_flags']) or 'no AVX'}), {m['memory_gib']} GiB"
    hardware += f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    line = (f"{report['mode'].capitalize()} run of {report['started']} ({report['seconds']:.0f} s) on {hardware}; "
            f"torch {m['versions']['torch']} ({m['torch_threads']} threads), onnxruntime "
            f"{m['versions']['onnxruntime']}, aiortc {m['versions']['aiortc']}, commit {m['git_commit']}. "
            f"Load average before / after: {report['load_before']} / {report['load_after']}.")
    if report["competing_processes"]:
        line += " Other CPU-heavy work was running (" + "; ".join(report["competing_processes"]) + ")."
    return line


def update_readme(report: dict, readme: Path) -> bool:
    """Replace the results section of benchmarks/README.md (between its markers)."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = [machine_line(report), ""]
    if report["mode"] == "quick":
        body += ["**Quick mode**: short runs that show every benchmark works and what it reports, not "
                 "the suite's numbers.", ""]
    body.append(headline(report))
    readme.write_text(head + README_START + "\n" + "\n".join(body) + README_END + tail)
    return True


def write_report(report: dict, results: Path) -> tuple[Path, Path]:
    """latest.json (everything) and latest.md (the tables) in `results`."""
    results.mkdir(parents=True, exist_ok=True)
    json_path, md_path = results / "latest.json", results / "latest.md"
    json_path.write_text(json.dumps(report, indent=1, default=common._json_default) + "\n")
    md_path.write_text(suite_markdown(report))
    return json_path, md_path


def extra_markdown(name: str, result: dict) -> str:
    """Tables for the benchmarks owned elsewhere (their own output is JSON, then free text)."""
    if name == "backends" and isinstance(result.get("patches_per_s_median"), dict):
        cells = result["patches_per_s_median"]
        batches = sorted({int(b) for row in cells.values() for b in row})
        rows = [{"backend": backend, **{f"batch {b}": row.get(str(b)) for b in batches}} for backend, row in cells.items()]
        return ("Render throughput per backend (patches/s, render() incl. uint8, median of runs)\n\n"
                + common.markdown_table(rows))
    if isinstance(result.get("rows"), list) and result["rows"]:
        return common.markdown_table(result["rows"])
    summary = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    return "```json\n" + json.dumps(summary)[:2000] + "\n```\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every script in its short mode (not the suite's numbers)")
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names to run (default: all)")
    parser.add_argument("--no-extras", action="store_true", help="skip bench_backends / bench_streaming_whisper")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rewrite latest.md (and the README section) from latest.json")
    args = parser.parse_args(argv)

    if args.render_only:
        report = json.loads((args.results / "latest.json").read_text())
        write_report(report, args.results)
        if args.results.resolve() == common.RESULTS_DIR.resolve():
            update_readme(report, HERE / "README.md")
        return 0

    only = set(args.only.split(",")) if args.only else None
    plan = [(n, s, a, t) for n, s, a, t in SUITE if only is None or n in only]
    if not (args.quick or args.no_extras):
        plan += [(n, s, a, t) for n, s, a, t in EXTRAS if (HERE / s).is_file() and (only is None or n in only)]
    args.results.mkdir(parents=True, exist_ok=True)
    for stale in args.results.glob("*.png"):
        stale.unlink()
    t_start = time.monotonic()
    report = {
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/run_all.py", *(argv or sys.argv[1:])]),
        "machine": common.machine_info(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "competing_processes": common.competing_processes(),
        "results": {},
        "timings_s": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, extra, timeout in plan:
            json_file = Path(tmp) / f"{name}.json"
            if (name, script, extra, timeout) in SUITE:
                script_args = ["--json-only", "--out", str(json_file), "--plots", str(args.results),
                               "--threads", str(args.threads)] + (["--quick"] if args.quick else extra)
            else:
                script_args, json_file = extra + ["--threads", str(args.threads)], None
            print(f"[{time.monotonic() - t_start:6.0f} s] {name} ...", file=sys.stderr, flush=True)
            result, seconds = run_script(script, script_args, QUICK_TIMEOUT_S if args.quick else timeout, json_file)
            report["results"][name] = result
            report["timings_s"][name] = round(seconds, 1)
            status = result.get("error", "ok")
            print(f"[{time.monotonic() - t_start:6.0f} s] {name}: {status} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    report["seconds"] = round(time.monotonic() - t_start, 1)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["competing_processes"] = sorted(set(report["competing_processes"]) | set(common.competing_processes()))
    write_report(report, args.results)
    if args.results.resolve() == common.RESULTS_DIR.resolve():
        update_readme(report, HERE / "README.md")
    print(f"wrote {args.results / 'latest.json'} and latest.md in {report['seconds']:.0f} s", file=sys.stderr)
    return 1 if any("error" in r for r in report["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
