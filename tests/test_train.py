"""The trainer (export.train) and personal-video data (export.personal), on real components:
teacher clips from export.dataset, Whisper tiny.en streaming features, a tiny compact model.

Kept fast: a tiny model config, two short clips, a handful of steps.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from export import train as tr
from realtime_avatar.models.compact import CompactConfig, CompactModel, CompactNet
from realtime_avatar.runtime import model_streaming_config
from realtime_avatar.streaming_whisper import LOW_LATENCY
from realtime_avatar.timing import AUDIO_TOKENS, FPS, SAMPLE_RATE, WHISPER_DIM

TINY = CompactConfig(
    latent_channels=4, unet_channels=(16, 32, 64), attention_heads=2, norm_groups=8,
    encoder_channels=(8, 16, 32), decoder_channels=(16, 8, 8),
)  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent
SEEDS = (0, 1)  # the first two training clips: what a run with --seed 0 --clips 2 uses


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def encoder():
    from realtime_avatar.whisper_weights import load_whisper

    torch.set_num_threads(2)
    return load_whisper(tr.WHISPER).encoder


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory, encoder):
    """The two clips prepared once (what the trainer's workers write), shared by the tests."""
    cache = tmp_path_factory.mktemp("clips")
    for seed in SEEDS:
        tr.prepare_teacher_clip(seed, "train", encoder, subclips=2).save(cache / f"train-{seed:05d}.npz")
    return cache


def tiny_settings(out: Path, **kw) -> tr.TrainSettings:
    defaults = dict(out=out, minutes=5.0, clips=len(SEEDS), workers=1, model=TINY, batch_size=4,
                    log_every=1, precision="fp32", max_autoencoder_steps=3, max_unet_steps=4)
    return tr.TrainSettings(**(defaults | kw))


def load_cached(cache: Path) -> list[tr.ClipData]:
    return [tr.ClipData.load(cache / f"train-{s:05d}.npz") for s in SEEDS]


# ------------------------------------------------------------------------------ pure pieces


def test_loss_weight_map_puts_the_weight_on_the_mouth():
    w = tr.loss_weight_map()[0, 0]
    assert w.shape == (256, 256)
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-5)
    mouth_y, mouth_x = int(tr.MOUTH_CENTRE[1] * 256), int(tr.MOUTH_CENTRE[0] * 256)
    assert float(w[mouth_y, mouth_x]) > 3 * float(w[40, 128])  # mouth vs forehead
    assert float(w[200, 10]) > float(w[60, 10])  # lower half vs upper half, away from the mouth


def test_cosine_lr_warms_up_then_decays_to_the_floor():
    lrs = [tr.cosine_lr(1.0, p / 100) for p in range(101)]
    peak = int(np.argmax(lrs))
    assert 0 < peak < 10 and lrs[0] < 0.1
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert lrs[-1] == pytest.approx(0.05)


def test_pick_reference_is_far_away_and_in_another_mouth_state():
    rng = np.random.default_rng(0)
    n = 60
    mouth = np.zeros((n, 5), np.float32)
    mouth[20:40, 0] = np.linspace(0.2, 1.0, 20)  # speech in the middle
    frames = np.zeros((n, 1, 1, 3), np.uint8)
    clip = tr.ClipData("x", frames, np.zeros((n, 1, 1), np.float16), [], mouth, np.zeros((2, 1, 1, 3), np.uint8))
    for _ in range(200):
        t = int(rng.integers(n))
        r = tr.pick_reference(clip, t, rng, photo_p=0.0)
        assert r >= 0 and abs(r - t) > 5
        assert np.abs(mouth[r] - mouth[t]).max() > tr.MIN_STATE_CHANGE
    photo = [tr.pick_reference(clip, 5, rng, photo_p=1.0) for _ in range(20)]
    assert set(photo) == {-1, -2}  # photo crops are encoded as -1 - k
    # a clip with one mouth state throughout: the farthest frame, never a near one
    still = tr.ClipData("y", frames, clip.windows, [], np.zeros((n, 5), np.float32), clip.photos[:0])
    assert abs(tr.pick_reference(still, 10, rng, photo_p=0.0) - 10) > 5


# ------------------------------------------------------------------------------------- data


def test_prepared_clip_holds_aligned_frames_windows_and_photo_crops(clip_cache):
    clip = load_cached(clip_cache)[0]
    n = clip.n_frames
    assert clip.frames.shape == (n, 256, 256, 3) and clip.frames.dtype == np.uint8
    assert clip.windows.shape == (n, AUDIO_TOKENS, WHISPER_DIM)
    assert clip.mouth.shape == (n, 5) and clip.mouth[:, 0].max() > 0.5  # the jaw opens somewhere
    for start, windows in clip.subclips:
        assert len(windows) >= tr.MIN_SUBCLIP_FRAMES and 0 <= start and start + len(windows) <= n
        # a sub-clip streamed on its own hears the same speech, with less context
        whole = clip.windows[start : start + len(windows)].astype(np.float32)
        own = windows.astype(np.float32)
        cos = (whole * own).sum() / np.sqrt((whole**2).sum() * (own**2).sum())
        assert 0.5 < cos < 0.99999
    # Original-photo crops are cut exactly like the teacher frames: the upper face (which the
    # teacher never moves) matches; the lower face does not (the photo smiles, teeth showing).
    assert clip.photos.shape == (tr.PHOTO_CROPS_PER_CLIP, 256, 256, 3)
    at = np.linspace(0, n - 1, tr.PHOTO_CROPS_PER_CLIP).round().astype(int)
    upper = (clip.photos[:, :100].astype(float) - clip.frames[at, :100]) ** 2
    mouth = (clip.photos[:, 140:190, 90:166].astype(float) - clip.frames[at, 140:190, 90:166]) ** 2
    assert 10 * np.log10(255**2 / max(upper.mean(), 1e-9)) > 35
    assert mouth.mean() > 10 * upper.mean()


def test_cache_round_trip_and_stale_version(tmp_path, clip_cache):
    clip = load_cached(clip_cache)[1]
    path = tmp_path / "c.npz"
    clip.save(path)
    again = tr.ClipData.load(path)
    assert again is not None and np.array_equal(again.frames, clip.frames)
    assert [s for s, _ in again.subclips] == [s for s, _ in clip.subclips]
    assert tr.ClipData.load(tmp_path / "missing.npz") is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert tr.ClipData.load(tmp_path / "bad.npz") is None


def test_a_clip_is_re_heard_at_another_setting_without_the_teacher(tmp_path, clip_cache, encoder):
    # benchmarks/study_window.py: every setting trains on the same clips; the teacher's frames are
    # made once and only the audio windows are streamed again for the other settings
    from export.dataset import default_generator
    from realtime_avatar.streaming_whisper import StreamingConfig
    from realtime_avatar.timing import AudioWindow

    clip = load_cached(clip_cache)[0]
    audio = default_generator().audio(SEEDS[0])
    same = tr.hear_clip(clip, audio, SEEDS[0], encoder, subclips=2)  # the default setting: the same clip
    assert np.abs(same.windows.astype(np.float32) - clip.windows.astype(np.float32)).max() < 0.01
    assert [s for s, _ in same.subclips] == [s for s, _ in clip.subclips]
    other = tr.hear_clip(clip, audio, SEEDS[0], encoder, 2, StreamingConfig(1.0, 0.04, 0.0),
                         AudioWindow.with_right_context(0))
    assert other.frames is clip.frames and other.windows.shape == clip.windows.shape
    assert np.abs(other.windows.astype(np.float32) - clip.windows.astype(np.float32)).mean() > 0.01  # hears earlier audio
    # the worker takes the other setting's file and writes the re-heard clip
    hearing = (json.dumps(dataclasses.asdict(StreamingConfig(1.0, 0.04, 0.0))), AudioWindow.with_right_context(0).to_json())
    tr._worker_encoder = encoder
    path = tmp_path / "re-heard.npz"
    tr._worker_prepare((SEEDS[0], "train", 2, str(path), "astronaut", *hearing, str(clip_cache / f"train-{SEEDS[0]:05d}.npz")))
    again = tr.ClipData.load(path)
    assert np.array_equal(again.frames, clip.frames) and np.allclose(again.windows, other.windows, atol=0.01)


def test_a_run_at_another_setting_takes_its_clips_and_latents_from_another_run(tmp_path, clip_cache, capsys):
    # python -m export.train --clips-from RUN: the teacher frames re-heard, the latents linked
    import shutil

    from realtime_avatar.timing import AudioWindow

    source = tmp_path / "v2"
    shutil.copytree(clip_cache, source / "clips")
    (source / tr.LATENTS_FILE).write_bytes(b"latents")
    settings = tiny_settings(tmp_path / "rc0", window=AudioWindow.with_right_context(0), clips_from=source)
    clips = tr.load_clips(settings)
    tagged = sorted(p.name for p in (tmp_path / "rc0" / "clips").glob("*.npz"))
    assert tagged == [f"train-{s:05d}{tr.features_tag(settings.window, settings.streaming)}.npz" for s in SEEDS]
    for clip, original in zip(clips, load_cached(clip_cache)):
        assert np.array_equal(clip.frames, original.frames)
        assert np.abs(clip.windows.astype(np.float32) - original.windows.astype(np.float32)).mean() > 0.01
    tr._link_latents(source, tmp_path / "rc0")
    assert (tmp_path / "rc0" / tr.LATENTS_FILE).read_bytes() == b"latents"
    assert tr.main(["--out", str(tmp_path / "x"), "--unet-only"]) == 2
    assert "--unet-only needs --init" in capsys.readouterr().err
    assert tr.main(["--out", str(tmp_path / "x"), "--clips-from", str(tmp_path / "nowhere")]) == 2
    assert "no clips/ folder" in capsys.readouterr().err


def test_the_training_clock_does_not_count_a_stopped_process():
    # A run paused with SIGSTOP (so that a benchmark gets the machine) keeps its --minutes.
    code = ("import time, realtime_avatar.pause_clock as tr; tr.PAUSE_GAP_S = 1.0; t0 = tr.run_clock(); w0 = time.monotonic();"
            "print('ready', flush=True); time.sleep(3.5); print(time.monotonic() - w0, tr.run_clock() - t0)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(2.5)
    proc.send_signal(signal.SIGCONT)
    wall, clock = map(float, proc.communicate(timeout=30)[0].split())
    assert wall >= 3.4 and clock < wall - 1.5, (wall, clock)  # the 2.5 s stop is not counted


# ---------------------------------------------------------------------------------- training


def shortened(clip: tr.ClipData, n: int) -> tr.ClipData:
    return tr.ClipData(clip.name, clip.frames[:n], clip.windows[:n], [], clip.mouth[:n], clip.photos[:1])


def test_losses_decrease_on_a_fixed_batch(tmp_path, clip_cache):
    clips = [shortened(c, 40) for c in load_cached(clip_cache)]  # fewer latents to encode
    torch.manual_seed(0)
    trainer = tr.Trainer(tiny_settings(tmp_path, lr_autoencoder=3e-3, lr_unet=2e-3), clips, CompactNet(TINY))
    crops, weight = trainer.autoencoder_batch()
    assert crops.shape == (4, 3, tr.AUTOENCODER_CROP, tr.AUTOENCODER_CROP) and weight.shape[-2:] == crops.shape[-2:]
    images = tr.to_images(clips[0].frames[::10][:4])  # fixed whole frames: a steadier signal
    weight = None
    trainer._start_stage("autoencoder")
    for g in trainer.optimizer.param_groups:
        g["lr"] = 3e-3
    ae = [trainer.autoencoder_step(images, weight) for _ in range(60)]  # 25 was not enough on a fresh checkout
    assert np.mean(ae[-5:]) < 0.7 * np.mean(ae[:3])

    trainer.latents = tr.encode_all(trainer.net.encoder, clips)
    batch = trainer.unet_batch()
    assert batch[0].shape == (4, 2 * TINY.latent_channels, 32, 32) and batch[1].shape == (4, 50, 384)
    trainer._start_stage("unet")
    for g in trainer.optimizer.param_groups:
        g["lr"] = 2e-3 * g["scale"]
    unet = [trainer.unet_step(*batch)[0] for _ in range(25)]
    # the decoder is barely trained, so the image loss has a high floor; the UNet still cuts it
    assert np.mean(unet[-5:]) < 0.92 * np.mean(unet[:3])


def test_latents_are_kept_for_resumes_and_redone_for_other_weights(tmp_path, clip_cache, monkeypatch):
    clips = [shortened(c, 12) for c in load_cached(clip_cache)]
    torch.manual_seed(0)
    net = CompactNet(TINY)
    first = tr.cached_latents(tmp_path, net.encoder, clips)
    assert (tmp_path / tr.LATENTS_FILE).is_file() and not list(tmp_path.glob("*.tmp"))
    encoded = []
    real_encode_all = tr.encode_all
    monkeypatch.setattr(tr, "encode_all", lambda *a, **k: encoded.append(1) or real_encode_all(*a, **k))
    again = tr.cached_latents(tmp_path, net.encoder, clips)  # a resume: read, not encoded
    assert not encoded
    assert all(torch.equal(a, b) for a, b in zip(first.full + first.masked + first.photos,
                                                   again.full + again.masked + again.photos))
    with torch.no_grad():
        next(net.encoder.parameters()).add_(0.1)  # other weights: encoded again, file replaced
    third = tr.cached_latents(tmp_path, net.encoder, clips)
    assert encoded == [1] and not torch.equal(third.full[0], first.full[0])
    (tmp_path / tr.LATENTS_FILE).write_bytes(b"torn")  # a torn file: encoded again, no crash
    tr.cached_latents(tmp_path, net.encoder, clips)
    assert encoded == [1, 1]


def test_train_crash_resume_and_export(tmp_path, clip_cache):
    out = tmp_path / "run"
    (out / "clips").mkdir(parents=True)
    for p in clip_cache.iterdir():
        (out / "clips" / p.name).write_bytes(p.read_bytes())  # as a first run would have left them
    settings = tiny_settings(out, checkpoint_minutes=0.0)

    def crash_at_unet_step_2(stage: str, step: int) -> None:
        if stage == "unet" and step == 2:
            raise Crash()

    with pytest.raises(Crash):
        tr.train(settings, on_step=crash_at_unet_step_2)
    state = torch.load(out / tr.CHECKPOINT, weights_only=False)
    assert state["progress"]["stage"] == "unet" and state["progress"]["step"] == 2
    assert not (out / tr.MODEL_FILE).exists()

    seen = []
    path = tr.train(settings, resume=True, on_step=lambda stage, step: seen.append((stage, step)))
    assert seen == [("unet", 3), ("unet", 4)]  # continued where it stopped, autoencoder not redone
    log = [json.loads(line) for line in (out / tr.LOG_FILE).read_text().splitlines()]
    assert [e["step"] for e in log if e.get("stage") == "unet"] == [1, 2, 3, 4]
    assert all(np.isfinite(e["loss"]) for e in log if "loss" in e)

    model = CompactModel.load(path)
    assert model.config == TINY
    assert json.loads(model.notes["steps"]) == {"autoencoder": 3, "unet": 4}
    assert model.notes["whisper"] == "tiny.en"
    assert model_streaming_config(model) == (LOW_LATENCY, False)  # the runtime reads it back
    snapshot = tr.export_snapshot(out)
    assert CompactModel.load(snapshot).weights_hash() == model.weights_hash()
    # the model renders: uint8 patches of the right shape from real inputs
    clip = tr.ClipData.load(out / "clips" / "train-00000.npz")
    lat = model.encode(clip.frames[:2])
    patches = model.render(torch.cat([lat, lat], 1), torch.from_numpy(clip.windows[:2].astype(np.float32)))
    assert patches.shape == (2, 256, 256, 3) and patches.dtype == np.uint8


SMALL = dataclasses.replace(TINY, unet_channels=(8, 16, 32), decoder_channels=(8, 8))  # 64x64 + PixelShuffle(4)


def test_a_smaller_student_distils_from_a_teacher_and_keeps_it_on_resume(tmp_path, clip_cache, capsys):
    # python -m export.train --teacher T --unet-channels ... --decoder-channels ...
    teacher_path = tmp_path / "teacher.safetensors"
    CompactModel.random(TINY, seed=1).save(teacher_path)
    teacher = CompactModel.load(teacher_path).net
    out = tmp_path / "run"
    (out / "clips").mkdir(parents=True)
    for clip in load_cached(clip_cache):  # short clips: fewer latents to encode
        shortened(clip, 24).save(out / "clips" / f"{clip.name}.npz")
    settings = tiny_settings(out, model=SMALL, teacher=teacher_path, checkpoint_minutes=0.0,
                             max_autoencoder_steps=2, max_unet_steps=3)

    student = tr.initial_net(settings)  # the teacher's encoder; UNet and decoder of its own size
    assert all(torch.equal(a, b) for a, b in zip(student.encoder.state_dict().values(), teacher.encoder.state_dict().values()))
    assert student.decoder(torch.zeros(1, SMALL.latent_channels, 32, 32)).shape == (1, 3, 256, 256)
    trainer = tr.Trainer(settings, tr.load_clips(settings), student)
    trainer.latents = tr.encode_all(student.encoder, trainer.clips)
    latents, windows, _, target = trainer.unet_batch(with_images=False)
    with torch.no_grad():  # the latent target is the teacher's answer, not the frame's own latent
        assert torch.allclose(target, teacher.unet(latents, windows), atol=1e-6)

    # function matching: blends of two samples' inputs, the teacher's answer on the blend as target
    trainer.rng = np.random.default_rng(7)
    plain, plain_windows, _, _ = trainer._draw_unet_inputs(with_images=False)
    trainer.rng = np.random.default_rng(7)
    mixed, mixed_windows, images, target = trainer.mixed_batch()
    assert images is None and mixed.shape == plain.shape and mixed_windows.shape == plain_windows.shape
    assert not torch.allclose(mixed, plain)
    with torch.no_grad():
        assert torch.allclose(target, teacher.unet(mixed, mixed_windows), atol=1e-6)

    def on_a_segment(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
        t = float(((x - b) * (a - b)).sum() / ((a - b) ** 2).sum().clamp_min(1e-12))
        return 0.0 <= t <= 1.0 and torch.allclose(x, t * a + (1 - t) * b, atol=1e-5)

    c = plain.shape[1] // 2
    for k in range(len(plain)):  # each part is a blend of its own draw's and one other draw's
        assert any(on_a_segment(mixed[k, :c], plain[k, :c], plain[j, :c])  # masked latent
                   and on_a_segment(mixed[k, c:], plain[k, c:], plain[j, c:])  # reference latent
                   and on_a_segment(mixed_windows[k], plain_windows[k], plain_windows[j]) for j in range(len(plain)))

    def crash_at_unet_step_2(stage: str, step: int) -> None:
        if stage == "unet" and step == 2:
            raise Crash()

    with pytest.raises(Crash):
        tr.train(settings, on_step=crash_at_unet_step_2)
    # the run keeps its teacher; the matching share may change on a resume
    path = tr.train(dataclasses.replace(settings, teacher=None, function_matching=0.5, max_unet_steps=12), resume=True)
    model = CompactModel.load(path)
    assert model.config == SMALL and model.notes["distilled_from"] == "teacher.safetensors"
    assert model.notes["function_matching"] == "0.5"
    logged = [json.loads(line) for line in (out / tr.LOG_FILE).read_text().splitlines()]
    assert sum(line.get("matching_steps", 0) for line in logged) >= 1  # steps on blends were taken
    # the encoder stayed the teacher's through both stages (its latents and caches stay valid)
    assert all(torch.equal(a, b) for a, b in zip(model.net.encoder.state_dict().values(), teacher.encoder.state_dict().values()))
    assert not torch.equal(model.net.decoder.layers[0].weight, student.decoder.layers[0].weight)  # trained

    assert tr.main(["--out", str(tmp_path / "x"), "--unet-channels", "16,47,96"]) == 2
    assert "must be divisible" in capsys.readouterr().err
    assert tr.main(["--out", str(tmp_path / "x"), "--teacher", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert tr.main(["--out", str(tmp_path / "x"), "--autoencoder-share", "1.5"]) == 2
    assert "give a share in [0, 1)" in capsys.readouterr().err
    assert tr.main(["--out", str(tmp_path / "x"), "--function-matching", "0.5"]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert tr.main(["--out", str(tmp_path / "x"), "--function-matching", "1"]) == 2
    assert "give a share in [0, 1)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="teacher's encoder"):
        tr.copy_from_teacher(CompactNet(dataclasses.replace(SMALL, encoder_channels=(8, 8, 16))), teacher)


def test_decoder_only_trains_the_decoder_under_the_inits_unet_and_keeps_it_on_resume(tmp_path, clip_cache, capsys):
    # python -m export.train --init M --decoder-only --decoder-from S: M's encoder and UNet stay
    # exactly M's (its avatar latents and lip sync); S's smaller decoder is trained in both stages
    init_path, small_path = tmp_path / "init.safetensors", tmp_path / "student.safetensors"
    CompactModel.random(TINY, seed=2).save(init_path)
    init = CompactModel.load(init_path).net
    student = CompactNet(dataclasses.replace(TINY, decoder_channels=(8, 8)))  # 64x64 + PixelShuffle(4)
    student.encoder.load_state_dict(init.encoder.state_dict())  # a student of the init: same latent space
    CompactModel(student).save(small_path)
    out = tmp_path / "run"
    (out / "clips").mkdir(parents=True)
    for clip in load_cached(clip_cache):
        shortened(clip, 24).save(out / "clips" / f"{clip.name}.npz")
    settings = tiny_settings(out, init=init_path, decoder_only=True, decoder_from=small_path, checkpoint_minutes=0.0,
                             max_autoencoder_steps=2, max_unet_steps=3)

    def crash_at_unet_step_2(stage: str, step: int) -> None:
        if stage == "unet" and step == 2:
            raise Crash()

    with pytest.raises(Crash):
        tr.train(settings, on_step=crash_at_unet_step_2)
    path = tr.train(dataclasses.replace(settings, decoder_only=False, max_unet_steps=5), resume=True)
    model = CompactModel.load(path)
    assert model.config == student.config and json.loads(model.notes["settings"])["decoder_only"] is True
    for part in ("encoder", "unet"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(model.net, part).state_dict().values(),
                                                     getattr(init, part).state_dict().values())), part
    assert not torch.equal(model.net.decoder.layers[0].weight, student.decoder.layers[0].weight)  # trained
    logged = [json.loads(line) for line in (out / tr.LOG_FILE).read_text().splitlines()]
    unet_stage = [line for line in logged if line.get("stage") == "unet"]
    assert unet_stage and all(line["image_phase"] for line in unet_stage)  # images from the first step

    for argv in (["--decoder-only"], ["--decoder-only", "--init", str(init_path), "--unet-only"],
                 ["--decoder-only", "--init", str(init_path), "--video", str(tmp_path / "talk.mp4")]):
        assert tr.main(["--out", str(tmp_path / "x"), *argv]) == 2
        assert "--decoder-only needs --init" in capsys.readouterr().err
    assert tr.main(["--out", str(tmp_path / "x"), "--init", str(init_path), "--decoder-from", str(small_path)]) == 2
    assert "needs --decoder-only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="encoder differs"):  # another latent space
        tr.with_decoder_of(init, CompactModel.random(dataclasses.replace(TINY, decoder_channels=(8, 8)), seed=9).net)


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        tr.train(tiny_settings(tmp_path), resume=True)


def test_cli_help_and_parse():
    parser = tr.build_parser()
    args = parser.parse_args(["--out", "x", "--minutes", "3", "--resume", "--video", "v.mp4"])
    assert args.minutes == 3 and args.resume and args.video == Path("v.mp4")
    assert "--video" in parser.format_help() and "--resume" in parser.format_help()


# --------------------------------------------------------------------------------- personal


def write_talking_video(path: Path, frames: np.ndarray, audio16k: np.ndarray) -> None:
    """frames (uint8 BGR at 25 fps) + 16 kHz audio -> H.264 + AAC MP4, with PyAV."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "18", "preset": "veryfast"}
        sound = container.add_stream("aac", rate=SAMPLE_RATE)
        sound.layout = "mono"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts, frame.time_base = i, fractions.Fraction(1, FPS)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        pcm = av.AudioFrame.from_ndarray(audio16k[None].astype(np.float32), format="fltp", layout="mono")
        pcm.sample_rate, pcm.pts, pcm.time_base = SAMPLE_RATE, 0, fractions.Fraction(1, SAMPLE_RATE)
        container.mux(sound.encode(pcm))
        container.mux(sound.encode(None))


@pytest.mark.slow
def test_personal_model_from_a_talking_video(tmp_path, encoder):
    from export.dataset import generate_clip
    from export.personal import face_runs, prepare_video

    clip = generate_clip(SEEDS[0], "train")
    video = tmp_path / "me.mp4"
    write_talking_video(video, clip.frames, clip.audio)

    clips = prepare_video(video, tmp_path / "cache", subclips=2, encoder=encoder)
    assert sum(c.n_frames for c in clips) >= clip.n_frames - 2  # a face in (nearly) every frame
    measured = np.concatenate([c.mouth[:, 0] for c in clips])
    jaw = clip.curves.as_array()[: len(measured), 0]
    assert np.corrcoef(measured, jaw)[0, 1] > 0.7  # the measured mouth state follows the speech
    assert face_runs(np.array([1, 1, 0, 1, 1, 1], bool), min_length=2) == [(0, 2), (3, 6)]

    # start from other weights (as a personal model starts from the default), crash, resume
    init = tmp_path / "init.safetensors"
    CompactModel.random(TINY, seed=1).save(init)
    settings = tiny_settings(tmp_path / "run", video=video, init=init, checkpoint_minutes=0.0)

    def crash(stage: str, step: int) -> None:
        if stage == "unet" and step == 1:
            raise Crash()

    with pytest.raises(Crash):
        tr.train(settings, on_step=crash)
    path = tr.train(settings, resume=True)
    model = CompactModel.load(path)
    assert "personal video me.mp4" in model.notes["data"]
    assert json.loads(model.notes["steps"])["unet"] == 4
    assert model.weights_hash() != CompactModel.load(init).weights_hash()
