"""Avatar preparation and cache with real mediapipe landmarks, real PyAV videos, and a tiny
throwaway renderer model (an 8x8 average-pool "encoder"): the real models are tested elsewhere."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from realtime_avatar import avatar as avatar_mod
from realtime_avatar.avatar import (
    Avatar,
    AvatarCacheError,
    AvatarSettings,
    AvatarSourceError,
    FaceTooSmallError,
    NoFaceError,
    _NpyFramesWriter,
    crop_face,
    cycle_index,
    default_avatar_source,
    load_avatar,
    load_or_prepare_avatar,
    prepare_avatar,
    resample_to_fps,
    synthesize_idle_cycle,
)
from realtime_avatar.face import BBox, MultipleFacesWarning, detect_face_landmarks
from realtime_avatar.models.base import RendererModel, mask_lower_half

FAST = AvatarSettings(idle_seconds=0.4)  # 10 frames for image sources


class AvgPoolModel:
    """A RendererModel whose "latents" are the crop average-pooled 8x8 to [3, 32, 32]."""

    model_id = "test-avgpool"
    latent_channels = 3
    latent_size = 32

    def __init__(self, tag: str = "a", fail_on_call: int | None = None):
        self.tag = tag
        self.fail_on_call = fail_on_call
        self.calls = 0

    def weights_hash(self) -> str:
        return f"avgpool-{self.tag}"

    @torch.no_grad()
    def encode(self, crops_bgr: np.ndarray) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("encoder failed (test)")
        x = torch.from_numpy(crops_bgr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return F.avg_pool2d(x, 8)

    @torch.no_grad()
    def render(self, latents: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
        ref = F.interpolate(latents[:, 3:], scale_factor=8, mode="nearest")
        img = ((ref + 1.0) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1)
        return img.numpy()


@pytest.fixture(scope="module")
def astronaut_bgr() -> np.ndarray:
    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory, astronaut_bgr) -> Path:
    path = tmp_path_factory.mktemp("src") / "astronaut.png"
    cv2.imwrite(str(path), astronaut_bgr)
    return path


def _write_png(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image)
    return path


def _write_video(path: Path, frames: list[np.ndarray], fps: int, codec: str = "libx264") -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "ultrafast"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(stream.encode(None))
    return path


MARK_BITS, MARK_PX = 6, 16  # frame index in binary: a row of dark/light 16 px squares


def _marked_frames(face: np.ndarray, n: int) -> list[np.ndarray]:
    """Copies of a face image, each with its index written in binary along the top-left edge
    (squares survive lossy video coding where a grey level would not)."""
    frames = []
    for j in range(n):
        f = face.copy()
        for b in range(MARK_BITS):
            f[:MARK_PX, b * MARK_PX : (b + 1) * MARK_PX] = 230 if (j >> b) & 1 else 25
        frames.append(f)
    return frames


def _marker(frame: np.ndarray) -> int:
    inner = slice(4, MARK_PX - 4)
    return sum(
        1 << b
        for b in range(MARK_BITS)
        if frame[inner, b * MARK_PX + 4 : (b + 1) * MARK_PX - 4].mean() > 128
    )


# -- pure functions ------------------------------------------------------------------------------


def test_cycle_index_is_musetalks_ping_pong():
    n = 3
    cycle = [0, 1, 2] + [2, 1, 0]  # frame_list + frame_list[::-1]
    assert [cycle_index(i, n) for i in range(14)] == cycle * 2 + cycle[:2]
    assert [cycle_index(i, 1) for i in range(4)] == [0, 0, 0, 0]
    assert cycle_index(10**9 + 5, 4) == cycle_index(5 + (10**9 % 8), 4)
    with pytest.raises(ValueError):
        cycle_index(-1, 3)
    with pytest.raises(ValueError):
        cycle_index(0, 0)


def test_resample_30_fps_to_25_drops_the_nearest_frames():
    timed = [(j / 30, j) for j in range(30)]  # one second at 30 fps
    out = list(resample_to_fps(timed, 25, max_frames=1000))
    assert out == [round(k * 30 / 25) for k in range(25)]


def test_resample_keeps_25_fps_and_repeats_slower_sources():
    assert list(resample_to_fps([(j / 25, j) for j in range(10)], 25, 1000)) == list(range(10))
    out = list(resample_to_fps([(j / 10, j) for j in range(5)], 25, 1000))  # 0.5 s at 10 fps
    # targets k/25 s take the nearest 10 fps frame, until half a frame after the last one
    assert out == [round(k * 10 / 25) for k in range(12)]
    assert out[:4] == [0, 0, 1, 1]


def test_resample_variable_rate_cap_and_edge_cases():
    # Timestamps need not start at 0 nor be regular: a 0.2 s hole repeats the frame before it
    timed = [(5.0, "a"), (5.04, "b"), (5.24, "c"), (5.28, "d")]
    assert list(resample_to_fps(timed, 25, 100)) == ["a", "b", "b", "b", "c", "c", "c", "d"]
    assert list(resample_to_fps([(j / 50, j) for j in range(500)], 25, 7)) == [0, 2, 4, 6, 8, 10, 12]
    assert list(resample_to_fps([(0.0, "only")], 25, 100)) == ["only"]
    assert list(resample_to_fps([], 25, 100)) == []
    # A repeated timestamp keeps the newer picture instead of going back in time
    assert list(resample_to_fps([(0.0, 1), (0.0, 2), (0.04, 3)], 25, 100)) == [2, 3]


def test_crop_face_pads_with_border_replicate():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    inside = BBox(50, 20, 306, 276)
    assert np.array_equal(crop_face(frame, inside), frame[20:276, 50:306])  # 256 px: no resize
    cut = BBox(-40, 100, 216, 356)  # past the left and bottom edges
    padded = np.pad(frame, ((0, 56), (40, 0), (0, 0)), mode="edge")
    assert np.array_equal(crop_face(frame, cut), padded[100:356, 0:256])


def test_npy_frames_writer_streams_a_loadable_array(tmp_path):
    frames = np.random.default_rng(1).integers(0, 255, (7, 30, 40, 3), dtype=np.uint8)
    writer = _NpyFramesWriter(tmp_path / "f.npy")
    for f in frames:
        writer.write(f)
    writer.close()
    assert np.array_equal(np.load(tmp_path / "f.npy"), frames)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert mapped.shape == frames.shape and np.array_equal(mapped[3], frames[3])


# -- idle cycle ------------------------------------------------------------------------------------


def _eye_opening(lm) -> float:
    # Both eyes: distance from the upper lid middle to the lower lid middle.
    return float(np.linalg.norm(lm.point(159) - lm.point(145)) + np.linalg.norm(lm.point(386) - lm.point(374)))


def test_idle_cycle_is_subtle_turns_smoothly_and_blinks(astronaut_bgr):
    lm = detect_face_landmarks(astronaut_bgr)
    n = 40
    frames = synthesize_idle_cycle(astronaut_bgr, lm.points, n)
    assert len(frames) == n and all(f.shape == astronaut_bgr.shape for f in frames)
    diffs = [np.abs(f.astype(np.int16) - astronaut_bgr).mean() for f in frames]
    assert max(diffs) < 4.0  # subtle: a degree of sway, a pixel of dip
    assert np.array_equal(frames[0][:, 440:], astronaut_bgr[:, 440:])  # far background still
    # Zero speed at both ends of the pass, so the ping-pong turn-around does not jerk.
    step = [np.abs(a.astype(np.int16) - b).mean() for a, b in zip(frames[1:], frames[:-1])]
    assert step[0] < 0.5 * max(step) and step[-1] < 0.5 * max(step)
    # The blink: mediapipe sees the eyes almost close around 62% of the pass, open elsewhere.
    openings = [_eye_opening(detect_face_landmarks(f)) for f in frames]
    shut = int(np.argmin(openings))
    assert abs(shut - 0.62 * (n - 1)) <= 2
    assert openings[shut] < 0.5 * openings[0]
    assert openings[5] > 0.9 * _eye_opening(lm)


# -- preparing from an image ---------------------------------------------------------------------


def test_prepare_from_image(tmp_path, astronaut_png, astronaut_bgr):
    model = AvgPoolModel()
    assert isinstance(model, RendererModel)
    av_ = prepare_avatar(astronaut_png, tmp_path / "avatar", model, FAST, progress=False)
    assert isinstance(av_, Avatar) and av_.num_frames == 10 and av_.cycle_length == 20
    assert av_.frames.shape == (10, 512, 512, 3) and av_.frames.dtype == np.uint8
    assert av_.latents.shape == (10, 6, 32, 32) and av_.latents.dtype == torch.float32
    assert av_.landmarks.shape == (10, 478, 2)

    m = json.loads((tmp_path / "avatar" / "manifest.json").read_text())
    assert m["format_version"] == avatar_mod.FORMAT_VERSION and m["source_kind"] == "image"
    assert m["model_id"] == "test-avgpool" and m["weights_hash"] == "avgpool-a"
    assert m["frame_count"] == 10 and m["settings"]["idle_seconds"] == 0.4
    assert len(m["source_sha256"]) == 64 and m["created"].endswith("Z")

    # Latents are [masked, reference] of the LANCZOS4 256 crop of each frame's face box.
    boxes = np.load(tmp_path / "avatar" / "boxes.npy")
    for j in (0, 7):
        crop = crop_face(np.asarray(av_.frames[j]), BBox(*map(int, boxes[j, 0])))
        expected = torch.cat([model.encode(mask_lower_half(crop[None])), model.encode(crop[None])], 1)
        assert torch.allclose(av_.latents[j : j + 1], expected)
    assert (av_.latents[:, :3, 16:] == -1.0).all()  # the masked input's lower half is black

    # Cycle accessors and composing a rendered patch.
    assert np.array_equal(av_.frame(10), av_.frames[9]) and np.array_equal(av_.frame(19), av_.frames[0])
    assert torch.equal(av_.latents_at([0, 10, 19]), av_.latents[[0, 9, 0]])
    patch = model.render(av_.latents_at([12]), torch.zeros(1, 50, 384))[0]
    out = av_.compose_into(av_.new_frame_buffer(), patch, 12)
    assert out.shape == (512, 512, 3)
    assert not np.array_equal(out, av_.frames[7])  # patch blended (a blurry 32x32 reconstruction)
    assert np.array_equal(out[:40], av_.frames[7][:40])  # far from the mouth nothing moved

    av_.check_model(model)
    with pytest.raises(AvatarCacheError, match="prepared for model test-avgpool"):
        av_.check_model(AvgPoolModel(tag="other"))


def test_a_smiling_photo_rests_with_its_mouth_closed(tmp_path, astronaut_png):
    # The astronaut smiles with her teeth showing. The avatar's frames (the model's mouth
    # reference, and what silence shows) get the teacher's closed mouth; nothing else changes.
    from realtime_avatar.face import detect_face_landmarks
    from realtime_avatar.tuning import mouth_opening

    still = dict(idle_motion=False)
    closed = prepare_avatar(astronaut_png, tmp_path / "c", AvgPoolModel(), AvatarSettings(**still), progress=False)
    as_shot = prepare_avatar(astronaut_png, tmp_path / "o", AvgPoolModel(), AvatarSettings(close_mouth=False, **still),
                             progress=False)
    frame_c, frame_o = np.asarray(closed.frames[0]), np.asarray(as_shot.frames[0])
    gap_c = mouth_opening(detect_face_landmarks(frame_c).points)
    gap_o = mouth_opening(detect_face_landmarks(frame_o).points)
    assert gap_o > 0.02 and gap_c < 0.01, (gap_o, gap_c)  # evaluate.CLOSED_GAP: closed
    points = detect_face_landmarks(frame_o).points
    face_height = points[152, 1] - points[10, 1]  # chin - forehead top
    above = int(points[1, 1] - 0.1 * face_height)  # landmark 1, the nose tip: the lip moves up to it
    assert np.array_equal(frame_c[:above], frame_o[:above])  # the upper face is untouched
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["settings"]["close_mouth"] is True


def test_still_image_gives_one_frame(tmp_path, astronaut_png):
    av_ = prepare_avatar(astronaut_png, tmp_path / "a", AvgPoolModel(), AvatarSettings(idle_motion=False))
    assert av_.num_frames == 1 and av_.cycle_length == 2


def test_cache_is_reused_and_invalidated(tmp_path, astronaut_png, astronaut_bgr):
    out = tmp_path / "avatar"
    model = AvgPoolModel()
    first = load_or_prepare_avatar(astronaut_png, out, model, FAST, progress=False)
    calls = model.calls
    assert calls > 0
    again = load_or_prepare_avatar(astronaut_png, out, model, FAST, progress=False)
    assert model.calls == calls  # nothing recomputed
    assert again.manifest == first.manifest and torch.equal(again.latents, first.latents)

    # Changed settings, changed weights and changed source bytes each rebuild it.
    load_or_prepare_avatar(astronaut_png, out, model, AvatarSettings(idle_seconds=0.2), progress=False)
    assert model.calls > calls and load_avatar(out).num_frames == 5
    other = AvgPoolModel(tag="b")
    load_or_prepare_avatar(astronaut_png, out, other, AvatarSettings(idle_seconds=0.2), progress=False)
    assert other.calls > 0 and load_avatar(out).manifest.weights_hash == "avgpool-b"

    edited = astronaut_bgr.copy()
    edited[500, 500] ^= 0xFF
    source = _write_png(tmp_path / "edited.png", edited)
    before = other.calls
    rebuilt = load_or_prepare_avatar(source, out, other, AvatarSettings(idle_seconds=0.2), progress=False)
    assert other.calls > before and rebuilt.manifest.source_name == "edited.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avatar", "edited.png"]  # no leftovers


def test_a_damaged_cache_is_rebuilt(tmp_path, astronaut_png):
    out = tmp_path / "avatar"
    model = AvgPoolModel()
    load_or_prepare_avatar(astronaut_png, out, model, FAST, progress=False)
    (out / "latents.npy").write_bytes(b"not an array")
    with pytest.raises(AvatarCacheError, match="damaged cache"):
        load_avatar(out)
    assert load_or_prepare_avatar(astronaut_png, out, model, FAST, progress=False).num_frames == 10


def test_failure_midway_leaves_no_half_written_cache(tmp_path, astronaut_png):
    out = tmp_path / "avatar"
    with pytest.raises(RuntimeError, match="encoder failed"):
        prepare_avatar(astronaut_png, out, AvgPoolModel(fail_on_call=2), FAST, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temporary directory

    # With a good cache in place, a failed rebuild leaves the old one whole and loadable.
    good = prepare_avatar(astronaut_png, out, AvgPoolModel(), FAST, progress=False)

    def crash_at_frame_3(i: int) -> None:
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_avatar(astronaut_png, out, AvgPoolModel(), AvatarSettings(idle_seconds=0.3),
                       progress=False, on_frame=crash_at_frame_3)
    assert [p.name for p in tmp_path.iterdir()] == ["avatar"]
    kept = load_avatar(out)
    assert kept.manifest == good.manifest and np.array_equal(kept.frames, good.frames)


# -- preparing from a video ----------------------------------------------------------------------


def test_prepare_from_video_resamples_to_25_fps(tmp_path, astronaut_bgr):
    face = np.ascontiguousarray(astronaut_bgr[:320, 60:380])
    video = _write_video(tmp_path / "talk.mp4", _marked_frames(face, 45), fps=30)  # 1.5 s
    av_ = prepare_avatar(video, tmp_path / "v", AvgPoolModel(), AvatarSettings(), progress=True)
    assert av_.manifest.source_kind == "video"
    assert av_.num_frames == 38  # targets k/25 nearer to a 30 fps frame than to the end: k <= 37
    markers = [_marker(f) for f in av_.frames]
    assert markers == [round(k * 30 / 25) for k in range(38)]

    capped = prepare_avatar(video, tmp_path / "c", AvgPoolModel(), AvatarSettings(max_seconds=1.0),
                            progress=False)
    assert capped.num_frames == 25


def test_video_display_rotation_is_applied(tmp_path):
    # A sideways-stored clip tagged "display rotated 90 degrees counterclockwise" (as phones
    # write): FFmpeg-based players turn it upright, and so must we.
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)
        stored = np.zeros((32, 64, 3), np.uint8)
        stored[:, :16] = 255  # a white band on the stored image's left
        for _ in range(3):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="bgr24")))
        out.mux(stream.encode(None))
    frames, estimate = avatar_mod._open_video(path, 25, max_frames=100)
    first = next(frames)
    assert first.shape == (64, 32, 3) and estimate == 3
    assert first[-12:].mean() > 200 and first[:40].mean() < 30  # the band is now at the bottom
    assert np.array_equal(avatar_mod.upright(stored, 0.0), stored)
    assert np.array_equal(avatar_mod.upright(stored, -90.0), np.rot90(stored, 3))


def test_video_with_a_faceless_frame_names_it(tmp_path, astronaut_bgr):
    face = np.ascontiguousarray(astronaut_bgr[:320, 60:380])
    frames = [face.copy() for _ in range(6)] + [np.full_like(face, 128) for _ in range(3)]
    video = _write_video(tmp_path / "gone.mp4", frames, fps=25)
    with pytest.raises(NoFaceError, match="no face found in frame 6") as info:
        prepare_avatar(video, tmp_path / "v", AvgPoolModel(), progress=False)
    assert info.value.frame_index == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone.mp4"]


# -- bad sources ---------------------------------------------------------------------------------


def test_unreadable_sources_are_named(tmp_path):
    model = AvgPoolModel()
    with pytest.raises(AvatarSourceError, match="no such file"):
        prepare_avatar(tmp_path / "missing.mp4", tmp_path / "a", model)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(AvatarSourceError, match="junk.mp4"):
        prepare_avatar(junk, tmp_path / "a", model)
    fake_png = tmp_path / "fake.png"
    fake_png.write_bytes(b"\x89PNG but not really")
    with pytest.raises(AvatarSourceError, match="fake.png: cannot be decoded as an image"):
        prepare_avatar(fake_png, tmp_path / "a", model)
    assert not (tmp_path / "a").exists()


def test_image_without_a_face(tmp_path):
    noise = np.random.default_rng(3).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError, match="frame 0"):
        prepare_avatar(_write_png(tmp_path / "noise.png", noise), tmp_path / "a", AvgPoolModel())


def test_face_too_small(tmp_path, astronaut_bgr):
    small = cv2.resize(astronaut_bgr, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    with pytest.raises(FaceTooSmallError, match=r"frame 0: face is \d+ px, at least 64 px needed: use a closer crop"):
        prepare_avatar(_write_png(tmp_path / "small.png", small), tmp_path / "a", AvgPoolModel(), FAST)


def test_two_faces_use_the_largest_and_warn(tmp_path, astronaut_bgr):
    big = astronaut_bgr[:320, 60:380]
    small = cv2.resize(big, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    canvas = np.full((320, 320 + small.shape[1], 3), 200, np.uint8)
    canvas[:, :320] = big
    canvas[: small.shape[0], 320:] = small
    source = _write_png(tmp_path / "two.png", canvas)
    with pytest.warns(MultipleFacesWarning, match="2 faces in the first frame; following face 0 .*largest face is used"):
        av_ = prepare_avatar(source, tmp_path / "a", AvgPoolModel(), FAST, progress=False)
    assert (av_.landmarks[:, :, 0].max(axis=1) < 320).all()  # every frame uses the big face


def test_face_cut_by_the_frame_edge_is_padded(tmp_path, astronaut_bgr):
    cut = np.ascontiguousarray(astronaut_bgr[:, 200:])  # the left of the face is out of frame
    av_ = prepare_avatar(_write_png(tmp_path / "cut.png", cut), tmp_path / "a", AvgPoolModel(), FAST,
                         progress=False)
    boxes = np.load(tmp_path / "a" / "boxes.npy")
    assert (boxes[:, 0, 0] < 0).all()  # face box starts left of the frame
    crop = crop_face(np.asarray(av_.frames[0]), BBox(*map(int, boxes[0, 0])))
    # The padded strip repeats the frame's first column (resized, so compare row profiles).
    pad_cols = int(-boxes[0, 0, 0] / (boxes[0, 0, 2] - boxes[0, 0, 0]) * 256)
    strip = crop[:, : pad_cols - 3].astype(np.int16)
    assert np.abs(strip - strip[:, :1]).max() <= 2
    patch = np.full((256, 256, 3), 255, np.uint8)
    out = av_.compose_into(av_.new_frame_buffer(), patch, 0)  # blending clips, never crashes
    assert out.shape == cut.shape


def test_default_avatar_source_is_the_astronaut(tmp_path, monkeypatch, astronaut_bgr):
    monkeypatch.setenv("REALTIME_AVATAR_CACHE", str(tmp_path))
    path = default_avatar_source()
    assert path.is_file() and path.parent.parent == tmp_path
    assert np.array_equal(cv2.imread(str(path)), astronaut_bgr)
    assert default_avatar_source() == path  # written once
    av_ = prepare_avatar(path, tmp_path / "default", AvgPoolModel(), AvatarSettings(), progress=False)
    assert av_.num_frames == 75  # 3 s idle cycle at 25 fps, 6 s ping-pong


# -- field-report faults: where the face is, which face, transparency, odd sizes -----------------

STILL = AvatarSettings(idle_motion=False, close_mouth=False)  # the pixels as shot: tests compare them


@pytest.mark.parametrize("strip_side", ["right", "left"])
def test_a_grey_strip_beside_the_face_still_prepares(tmp_path, astronaut_bgr, strip_side):
    # The field report: 512x512 astronaut + 320 px grey strip on the right (832x512) gave
    # "no face found in frame 0"; on the left it worked.
    left, right = (0, 320) if strip_side == "right" else (320, 0)
    wide = cv2.copyMakeBorder(astronaut_bgr, 0, 0, left, right, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    av_ = prepare_avatar(_write_png(tmp_path / "wide.png", wide), tmp_path / "a", AvgPoolModel(), STILL)
    assert av_.frame_shape == (512, 832, 3)
    nose_x = float(av_.landmarks[0, 1, 0])
    assert left + 180 < nose_x < left + 280  # the astronaut's nose, wherever the strip is


def test_a_really_small_face_says_so_with_its_size(tmp_path, astronaut_bgr):
    small = cv2.resize(astronaut_bgr, None, fx=0.35, fy=0.35, interpolation=cv2.INTER_AREA)
    canvas = np.full((512, 832, 3), 128, np.uint8)
    canvas[: small.shape[0], 832 - small.shape[1] :] = small  # right edge, where detection failed
    with pytest.raises(FaceTooSmallError, match=r"face is \d\d px, at least 64 px needed: use a closer crop") as e:
        prepare_avatar(_write_png(tmp_path / "far.png", canvas), tmp_path / "a", AvgPoolModel(), STILL)
    assert 25 <= e.value.face_px < 64


def _two_heads(astronaut_bgr: np.ndarray) -> np.ndarray:
    """The field report's input: the same 180x220 head crop twice side by side on 420x260."""
    head = astronaut_bgr[30:250, 135:315]
    canvas = np.full((260, 420, 3), 200, np.uint8)
    canvas[20:240, 20:200] = head
    canvas[20:240, 220:400] = head
    return canvas


def test_two_faces_of_equal_size_the_chosen_one_is_kept_in_every_frame(tmp_path, astronaut_bgr):
    # Before: the largest face was picked again per frame and the mouth jumped between them
    # (face centre x 296, 296, 103, 285, 92, 289, ...).
    rng = np.random.default_rng(7)
    canvas = _two_heads(astronaut_bgr)
    frames = [np.clip(canvas + rng.normal(0, 3, canvas.shape), 0, 255).astype(np.uint8) for _ in range(12)]
    video = _write_video(tmp_path / "two.mp4", frames, fps=25)
    with pytest.warns(MultipleFacesWarning, match="2 faces in the first frame; following face 0"):
        av_ = prepare_avatar(video, tmp_path / "a", AvgPoolModel(), AvatarSettings(), progress=False)
    centre_x = np.load(tmp_path / "a" / "boxes.npy")[:, 0, [0, 2]].mean(axis=1)
    assert av_.num_frames == 12
    assert centre_x.max() - centre_x.min() <= 2 and centre_x[0] < 210  # one face, the left one

    with pytest.warns(MultipleFacesWarning, match="following face 1 .*as asked"):
        right = prepare_avatar(video, tmp_path / "b", AvgPoolModel(), AvatarSettings(face_index=1), progress=False)
    centre_x = np.load(tmp_path / "b" / "boxes.npy")[:, 0, [0, 2]].mean(axis=1)
    assert right.num_frames == 12 and centre_x.min() > 210 and centre_x.max() - centre_x.min() <= 2

    with pytest.warns(MultipleFacesWarning, match="following face 1"):
        prepare_avatar(video, tmp_path / "c", AvgPoolModel(), AvatarSettings(face_box=(260, 50, 100, 120)),
                       progress=False)
    with pytest.raises(avatar_mod.FaceNotChosenError, match=r"face 2 asked for, but 2 found"):
        prepare_avatar(video, tmp_path / "d", AvgPoolModel(), AvatarSettings(face_index=2), progress=False)


def test_prepare_cli_takes_face_and_background_options(tmp_path, astronaut_bgr):
    from realtime_avatar.cli import build_parser

    args = build_parser().parse_args(["prepare", "x.png", "--face-box", "220,20,180,220", "--background", "0,255,0"])
    settings = avatar_mod.settings_from_args(args)
    assert settings.face_box == (220, 20, 180, 220) and settings.background == "#00ff00"
    assert not args.keep_mouth and build_parser().parse_args(["prepare", "x.png", "--keep-mouth"]).keep_mouth
    args = build_parser().parse_args(["serve", "--avatar", "x.png", "--face", "1"])
    assert avatar_mod.settings_from_args(args).face_index == 1
    bad = build_parser().parse_args(["prepare", "--background", "loud"])
    with pytest.raises(avatar_mod.AvatarError, match="colour 'loud'"):
        avatar_mod.settings_from_args(bad)


def _rgba_with_loud_transparent_pixels(astronaut_bgr: np.ndarray) -> np.ndarray:
    """The astronaut as BGRA: the right 112 columns fully transparent but holding magenta, and
    a half-transparent band at the top."""
    bgra = cv2.cvtColor(astronaut_bgr, cv2.COLOR_BGR2BGRA)
    bgra[:, 400:, :3] = (255, 0, 255)
    bgra[:, 400:, 3] = 0
    bgra[:20, :400, 3] = 128
    return bgra


@pytest.mark.parametrize("background, bgr", [(None, (128, 128, 128)), ("#00ff00", (0, 255, 0))])
def test_transparent_pixels_show_the_background_not_their_hidden_colour(tmp_path, astronaut_bgr, background, bgr, caplog):
    source = _write_png(tmp_path / "rgba.png", _rgba_with_loud_transparent_pixels(astronaut_bgr))
    settings = STILL if background is None else AvatarSettings(idle_motion=False, close_mouth=False, background=background)
    with caplog.at_level("INFO", logger="realtime_avatar.avatar"):
        av_ = prepare_avatar(source, tmp_path / "a", AvgPoolModel(), settings)
    frame = np.asarray(av_.frames[0])
    assert (frame[:, 400:] == np.array(bgr, np.uint8)).all()  # no magenta left
    half = np.rint(astronaut_bgr[:20, :400] * (128 / 255) + np.array(bgr) * (127 / 255))
    assert np.abs(frame[:20, :400].astype(np.int16) - half).max() <= 1  # straight-alpha blend
    assert np.array_equal(frame[40:, :400], astronaut_bgr[40:, :400])  # opaque pixels untouched
    said = [r.getMessage() for r in caplog.records if "transparency" in r.getMessage()]
    assert len(said) == 1 and f"composited onto {settings.background}" in said[0]


def test_an_odd_sized_avatar_keeps_every_pixel(tmp_path, astronaut_bgr):
    odd = np.ascontiguousarray(astronaut_bgr[:425])  # 512x425
    av_ = prepare_avatar(_write_png(tmp_path / "odd.png", odd), tmp_path / "a", AvgPoolModel(), STILL)
    assert av_.frame_shape == (425, 512, 3) and np.array_equal(av_.frames[0], odd)


def test_a_video_with_alpha_is_composited_too(tmp_path, astronaut_bgr):
    bgra = _rgba_with_loud_transparent_pixels(astronaut_bgr)
    path = tmp_path / "alpha.mov"
    with av.open(str(path), "w") as out:  # PNG-in-MOV keeps the alpha channel (rgba)
        stream = out.add_stream("png", rate=25)
        stream.width, stream.height, stream.pix_fmt = 512, 512, "rgba"
        for _ in range(3):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA), format="rgba")))
        out.mux(stream.encode(None))
    av_ = prepare_avatar(path, tmp_path / "a", AvgPoolModel(), AvatarSettings(), progress=False)
    assert av_.manifest.source_kind == "video" and av_.num_frames == 3
    assert (np.asarray(av_.frames)[:, :, 400:] == 128).all()  # grey, not magenta
