"""Held-out lip-sync metrics of a renderer model, through the real runtime path.

    python benchmarks/bench_lipsync.py                       # the shipped default model, 8 clips
    python benchmarks/bench_lipsync.py --model compact:run/model.safetensors --clips 4 --sheet sheet.png

Prints a JSON object (one line) and a table: Pearson r between the mouth opening mediapipe
measures on the rendered avatar frames and the teacher's jaw curve, the share of silent
frames with a closed mouth, the upper-half PSNR of the rendered patches against the avatar,
and the pixels changed outside the blending mask (see export/evaluate.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from export.evaluate import contact_sheet, evaluate, load_for_evaluation, mouth_box  # noqa: E402

FIRST_HELDOUT_SEED = 1000  # held-out clips 1000.. (the test uses 0..)


def write_sheet(path: Path, kept: dict, avatar, per_clip: int = 16) -> None:
    """Mouth close-ups: per clip `per_clip` frames spread over it, labelled with the teacher's jaw
    value and the measured opening; then frames rendered from silence."""
    frames, labels = [], []
    for c in kept["clips"]:
        picks = np.linspace(0, len(c["frames"]) - 1, per_clip).round().astype(int)
        for i in picks:
            frames.append(c["frames"][i])
            labels.append(f"{c['seed']}:{i} j{c['jaw'][i]:.2f} m{np.nan_to_num(c['openings'][i], nan=-1):.3f}")
    for i in range(0, len(kept["silence"]), max(1, len(kept["silence"]) // 8))[:8]:
        frames.append(kept["silence"][i])
        labels.append(f"silence {i}")
    sheet = contact_sheet(frames, labels, mouth_box(avatar), columns=per_clip // 2)
    cv2.imwrite(str(path), sheet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model spec (default: the shipped compact model)")
    parser.add_argument("--clips", type=int, default=8, help="held-out clips to score")
    parser.add_argument("--first-seed", type=int, default=FIRST_HELDOUT_SEED)
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="avatar idle cycle (runtime default 3 s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sheet", type=Path, default=None, help="write a PNG contact sheet of mouths here")
    args = parser.parse_args(argv)

    model, encoder, avatar, idle = load_for_evaluation(args.model, args.idle_seconds, threads=args.threads)
    seeds = list(range(args.first_seed, args.first_seed + args.clips))
    report, kept = evaluate(model, encoder, avatar, seeds, idle_frames=idle, keep_frames=args.sheet is not None)
    result = report.to_dict()
    result["model"] = args.model
    result["weights_hash"] = model.weights_hash()
    result["notes_steps"] = getattr(model, "notes", {}).get("steps")
    print(json.dumps(result))
    print(report.table())
    if args.sheet is not None:
        write_sheet(args.sheet, kept, avatar)
        print(f"contact sheet: {args.sheet}")
    return 0 if all(report.passes().values()) else 1


if __name__ == "__main__":
    sys.exit(main())
