"""What every benchmark script shares: statistics, the machine description, the bench runtime,
the test speech with sharp onsets, onset and mouth-motion detection, and JSON/markdown output.

The scripts live next to this file and run as `python benchmarks/bench_X.py`: this module puts
the repository root on sys.path so that `realtime_avatar` and the test helpers in `tests/`
(espeak-ng speech, the aiortc client) import from the checkout being measured.

Clocks: every time stamp in the benchmarks is time.monotonic() (asyncio's loop.time() is the
same clock), so client, server and session times in one process compare directly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from realtime_avatar.timing import FPS, SAMPLE_RATE  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
WEBRTC_RATE = 48_000  # Hz: what a browser microphone and Opus deliver
PACKET_S = 0.020  # 20 ms audio packets, as WebRTC sends them
QUICK_AVATAR_IDLE_S = 0.4  # --quick: a 10-frame idle cycle (the default avatar has 3 s = 75 frames)
CLICK_S = 0.004  # length of the click that marks each onset exactly
CLICK_HZ = 1_000  # its tone
CLICK_AMPLITUDE = 0.5
ONSET_BLOCK_S = 0.002  # resolution of onset detection in audio
# Words with a closed-lip or plosive start: the mouth visibly opens at the onset.
ONSET_WORDS = ("papa", "baby", "map", "bob", "pop", "more", "paper", "mama", "boat", "pipe", "beam", "party")
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Maybe the best part of the morning is a cup of hot coffee by the window.",
    "Paul bought six big boxes of apples at the market on Monday.",
    "We will meet at the station at half past nine and take the train to Boston.",
    "My brother plays the piano every evening before dinner.",
    "Bright blue balloons floated above the busy park all afternoon.",
    "People who speak slowly and clearly are easier to understand on the phone.",
)


# -- statistics -----------------------------------------------------------------------------------


def summarize(values: Iterable[float], digits: int = 2) -> dict[str, float | int | None]:
    """n, min, median, p90, p99, max and mean of a sample (None fields when it is empty)."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return {"n": 0, "min": None, "median": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {
        "n": int(x.size),
        "min": round(float(x.min()), digits),
        "median": round(float(np.median(x)), digits),
        "p90": round(float(np.percentile(x, 90)), digits),
        "p99": round(float(np.percentile(x, 99)), digits),
        "max": round(float(x.max()), digits),
        "mean": round(float(x.mean()), digits),
    }


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    """Wall milliseconds of `repeats` calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(1000.0 * (time.perf_counter() - t0))
    return out


def rss_mb() -> float:
    """Resident memory of this process (VmRSS of /proc/self/status) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("/proc/self/status has no VmRSS line (not Linux?)")


def linear_slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope dy/dx, None with fewer than two distinct x."""
    if len(x) < 2 or np.ptp(np.asarray(x, dtype=np.float64)) == 0:
        return None
    return float(np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), 1)[0])


# -- the machine ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The CPU features that decide which backend is fast (DESIGN.md 10); VNNI: int8 dot products."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16"})
    except OSError:
        pass
    return []


def competing_processes() -> list[str]:
    """Other processes known to load the CPU while benchmarks run (model training)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "export.train" in cmdline:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    import torch

    mem_gib = None
    try:
        with open("/proc/meminfo") as meminfo:
            mem_gib = round(int(meminfo.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "competing_processes": competing_processes(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in (
            "torch", "numpy", "av", "aiortc", "onnxruntime", "soxr", "openai-whisper", "realtime-avatar")},
        "git_commit": _git_commit(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# -- the runtime under test -----------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRuntime:
    runtime: Any  # realtime_avatar.runtime.Runtime
    weights: str  # "trained", "random", or "trained: <model spec>" (a candidate model)
    load_seconds: float

    def describe(self) -> dict[str, Any]:
        rt = self.runtime
        s = rt.streaming
        return {
            "model": rt.model.model_id,
            "backend": getattr(rt.model, "backend_name", "torch"),
            "weights": self.weights,
            "weights_hash": rt.model.weights_hash(),
            "avatar_frames": rt.avatar.num_frames,
            "frame_size": f"{rt.avatar.frame_shape[1]}x{rt.avatar.frame_shape[0]}",
            "streaming": {"window_s": s.window_s, "hop_s": s.hop_s, "lookahead_s": s.lookahead_s},
            "renderer_batch": rt.renderer.batch_size,
            "runtime_load_s": round(self.load_seconds, 2),
        }


def load_bench_runtime(quick: bool, batch_size: int = 8, threads: int = 2, backend: str | None = None,
                       frame_format: str = "bgr24", model: str = "default") -> BenchRuntime:
    """The runtime `realtime-avatar serve` uses: the default model (trained weights when they are
    installed, else random ones: the same compute; or the model spec `model`, e.g. a candidate
    `compact:/path.safetensors`) on load_runtime's default render backend (or `backend`), and
    the bundled astronaut avatar. --quick uses a 10-frame idle cycle of the same face so that
    preparing it and its idle frames is fast."""
    import warnings

    import torch

    from realtime_avatar.avatar import (
        AvatarSettings,
        avatar_cache_root,
        default_avatar_dir,
        default_avatar_source,
        load_or_prepare_avatar,
    )
    from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS, load_model
    from realtime_avatar.runtime import load_runtime

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    avatar = None
    if quick:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the random-weights notice
            renderer = load_model(model, allow_random=True)
        source = default_avatar_source()
        out_dir = avatar_cache_root() / "avatars" / f"bench-quick-{default_avatar_dir(source, renderer).name}"
        load_or_prepare_avatar(source, out_dir, renderer, AvatarSettings(idle_seconds=QUICK_AVATAR_IDLE_S),
                               progress=False)
        avatar = out_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        extra = {} if backend is None else {"backend": backend}
        runtime = load_runtime(model, avatar, allow_random=True, batch_size=batch_size, threads=threads, frame_format=frame_format,
                               progress=False, **extra)
    if model != "default":
        weights = f"trained: {model}"
    else:
        weights = "trained" if DEFAULT_COMPACT_WEIGHTS.is_file() else "random"
    return BenchRuntime(runtime, weights, time.perf_counter() - t0)


def wrap_runtime(runtime: Any, load_seconds: float = 0.0) -> BenchRuntime:
    """A BenchRuntime around an already loaded Runtime (the test suite's fixture)."""
    from realtime_avatar.models.registry import DEFAULT_COMPACT_WEIGHTS, state_dict_hash

    weights = "random"
    if DEFAULT_COMPACT_WEIGHTS.is_file():
        from safetensors.torch import load_file

        trained = state_dict_hash(load_file(str(DEFAULT_COMPACT_WEIGHTS)))
        weights = "trained" if trained == runtime.model.weights_hash() else "random"
    return BenchRuntime(runtime, weights, load_seconds)


# -- test speech ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnsetSignal:
    """Mono float32 audio with known event onsets (each marked by a click)."""

    samples: np.ndarray
    rate: int
    onsets_s: tuple[float, ...]  # seconds from the start of `samples`
    labels: tuple[str, ...]  # what is said at each onset

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate

    def write_wav(self, path: Path) -> Path:
        """16-bit PCM mono WAV (what the test client's microphone track reads)."""
        import av

        pcm = np.clip(self.samples * 32767.0, -32768, 32767).astype(np.int16)
        with av.open(str(path), "w", format="wav") as container:
            stream = container.add_stream("pcm_s16le", rate=self.rate, layout="mono")
            frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
            frame.sample_rate = self.rate
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        return path


_SPEECH_CACHE: dict[tuple[str, int], np.ndarray] = {}


def spoken(text: str, rate: int = WEBRTC_RATE) -> np.ndarray:
    """espeak-ng saying `text` at `rate` Hz, trimmed to its voiced span (starts at its onset)."""
    key = (text, rate)
    if key not in _SPEECH_CACHE:
        from tests.rtc_client import voiced_span
        from tests.speech import espeak_wav, read_wav

        with tempfile.TemporaryDirectory() as tmp:
            samples, got_rate = read_wav(espeak_wav(text, Path(tmp) / "s.wav", rate=rate))
        assert got_rate == rate, (got_rate, rate)
        start, end = voiced_span(samples, rate, relative_threshold=0.02)
        _SPEECH_CACHE[key] = samples[int(start * rate) : int(end * rate)].copy()
    return _SPEECH_CACHE[key]


def click(rate: int) -> np.ndarray:
    """A short tone burst with a hard edge: an onset that survives Opus and is exact to a sample."""
    t = np.arange(int(CLICK_S * rate)) / rate
    return (CLICK_AMPLITUDE * np.sin(2 * np.pi * CLICK_HZ * t)).astype(np.float32)


def onset_signal(
    texts: Sequence[str],
    gaps_s: Sequence[float] | float = 1.0,
    *,
    lead_s: float = 1.0,
    tail_s: float = 1.0,
    rate: int = WEBRTC_RATE,
) -> OnsetSignal:
    """Silence, then each text (espeak-ng) with a click on its first sample, each followed by
    its gap of silence. The click track makes every onset exact to the sample."""
    gaps = [gaps_s] * len(texts) if isinstance(gaps_s, (int, float)) else list(gaps_s)
    if len(gaps) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(gaps)} gaps")
    parts = [np.zeros(int(lead_s * rate), np.float32)]
    onsets, position = [], len(parts[0])
    burst = click(rate)
    for text, gap in zip(texts, gaps):
        speech = spoken(text, rate).copy()
        speech[: len(burst)] += burst
        onsets.append(position / rate)
        parts += [speech, np.zeros(int(gap * rate), np.float32)]
        position += len(speech) + int(gap * rate)
    parts.append(np.zeros(int(tail_s * rate), np.float32))
    samples = np.clip(np.concatenate(parts), -1.0, 1.0).astype(np.float32)
    return OnsetSignal(samples, rate, tuple(onsets), tuple(texts))


def onset_words(n: int) -> list[str]:
    return [ONSET_WORDS[i % len(ONSET_WORDS)] for i in range(n)]


def speech_of_length(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Continuous speech (sentences back to back, 0.2 s apart) cut to exactly `seconds`."""
    pause = np.zeros(int(0.2 * rate), np.float32)
    parts, total, i = [], 0, 0
    while total < seconds * rate:
        speech = spoken(SENTENCES[i % len(SENTENCES)], rate)
        parts += [speech, pause]
        total += len(speech) + len(pause)
        i += 1
    return np.concatenate(parts)[: int(seconds * rate)].astype(np.float32)


# -- detection ------------------------------------------------------------------------------------


def detect_onsets(samples: np.ndarray, rate: int, *, threshold: float = 0.02, min_gap_s: float = 0.3,
                  block_s: float = ONSET_BLOCK_S) -> list[float]:
    """Times (s) where the signal's block RMS first exceeds `threshold` after at least
    `min_gap_s` below it. The sample resolution is `block_s`."""
    block = max(1, int(block_s * rate))
    n = len(samples) // block
    if n == 0:
        return []
    rms = np.sqrt(np.mean(np.square(samples[: n * block].reshape(n, block), dtype=np.float64), axis=1))
    loud = rms > threshold
    gap_blocks = int(np.ceil(min_gap_s / block_s))
    onsets, quiet_run = [], gap_blocks  # the start of the signal counts as after silence
    for i, is_loud in enumerate(loud):
        if is_loud:
            if quiet_run >= gap_blocks:
                onsets.append(i * block / rate)
            quiet_run = 0
        else:
            quiet_run += 1
    return onsets


def mouth_box(landmarks: np.ndarray, frame_shape: tuple[int, ...], pad: float = 0.6) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) around the lips of every cached frame ([N,478,2] landmarks), padded by
    `pad` x the lip size on each side so that a jaw drop is inside it."""
    from realtime_avatar.face import LIPS_OUTER

    lips = landmarks[:, list(LIPS_OUTER)].reshape(-1, 2)
    (x1, y1), (x2, y2) = lips.min(axis=0), lips.max(axis=0)
    w, h = x2 - x1, y2 - y1
    height, width = frame_shape[:2]
    box = (int(x1 - pad * w), int(y1 - pad * h), int(np.ceil(x2 + pad * w)), int(np.ceil(y2 + 2 * pad * h)))
    return max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3])


def face_region(landmarks: np.ndarray, frame_shape: tuple[int, ...], pad: float = 0.25) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) around the face in every cached frame ([N,478,2] landmarks), padded by
    `pad` x the face size: a crop mediapipe finds the face in (for measuring the mouth)."""
    points = landmarks.reshape(-1, 2)
    (x1, y1), (x2, y2) = points.min(axis=0), points.max(axis=0)
    w, h = x2 - x1, y2 - y1
    height, width = frame_shape[:2]
    return (max(0, int(x1 - pad * w)), max(0, int(y1 - pad * h)),
            min(width, int(np.ceil(x2 + pad * w))), min(height, int(np.ceil(y2 + pad * h))))


SIGNATURE_SIZE = (48, 32)  # (w, h) of the gray mouth-region thumbnail compared between frames


def mouth_signature(image_bgr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The mouth region as a small gray float32 thumbnail: cheap to keep for every frame and
    insensitive to codec noise in single pixels. A 2-D image is a yuv420p frame (serve's engine
    format), converted to BGR first."""
    import cv2

    if image_bgr.ndim == 2:
        image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_YUV2BGR_I420)
    x1, y1, x2, y2 = box
    gray = cv2.cvtColor(np.ascontiguousarray(image_bgr[y1:y2, x1:x2]), cv2.COLOR_BGR2GRAY)
    return cv2.resize(gray, SIGNATURE_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)


def signature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute gray-level difference of two mouth signatures (0-255 scale)."""
    return float(np.mean(np.abs(a - b)))


def motion_threshold(idle_distances: Sequence[float], floor: float = 1.5) -> float:
    """The distance above which a received frame's mouth differs from the idle mouth: well above
    what the video codec alone changes on idle frames (4x their p95), never below `floor`."""
    if len(idle_distances) == 0:
        return floor * 4
    return max(floor, 4.0 * float(np.percentile(idle_distances, 95)))


@dataclass(frozen=True)
class Alignment:
    start: int  # the sent tick the first received frame is
    distance: float  # mean signature distance of the received frames to what was sent
    tied: int  # candidates that looked as alike as the best (resolved by timing)
    min_delay_s: float  # smallest (arrival - emission) over all frames with this alignment


def align_stream(offsets: Sequence[int], arrivals: Sequence[float], signatures: Sequence[np.ndarray],
                 sent_times: Sequence[float], sent_signatures: Sequence[np.ndarray], *,
                 tie: float = 0.05) -> Alignment | None:
    """Which sent tick is the first received frame, when received frame j is sent tick
    start + offsets[j] (offsets from RTP timestamps, which carry no absolute tick number).

    Causality rules candidates out: no frame arrives before its tick was emitted. Of the rest,
    the one whose frames look most like what was sent wins; frames that look alike within
    `tie` grey levels (the idle frames of a slowly swaying avatar do) are told apart by timing:
    the latest causal candidate, i.e. the smallest network delay. None when no candidate fits."""
    d = np.asarray(offsets, dtype=np.int64)
    arrived = np.asarray(arrivals, dtype=np.float64)
    sent_t = np.asarray(sent_times, dtype=np.float64)
    received = np.stack(signatures).astype(np.float32)
    sent = np.stack(sent_signatures).astype(np.float32)
    scores = []
    for k in range(0, len(sent_t) - int(d.max())):
        delays = arrived - sent_t[k + d]
        if delays.min() <= 0:
            continue
        scores.append((float(np.abs(received - sent[k + d]).mean()), k, float(delays.min())))
    if not scores:
        return None
    best = min(score for score, _, _ in scores)
    alike = [(k, delay, score) for score, k, delay in scores if score <= best + tie]
    k, delay, score = max(alike)
    return Alignment(k, score, len(alike), delay)


# -- output ---------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `rows` (dicts), columns in `columns` or first-row order."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a short run to check the script works (seconds)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json-only", action="store_true", help="print the JSON result only, no table")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--plots", type=Path, default=None, help="write PNG plots into this directory")
    parser.add_argument("--backend", default=None,
                        help="render backend of the runtime (torch, onnx, auto; default: what serve uses)")
    parser.add_argument("--model", default="default",
                        help="renderer model spec, e.g. compact:/path/to/file.safetensors (default: the shipped model)")


def finish(result: dict[str, Any], args: argparse.Namespace, markdown: Callable[[dict], str]) -> dict[str, Any]:
    """Print the result as JSON (then its markdown table unless --json-only); write --out."""
    text = json.dumps(result, indent=2, default=_json_default)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text, flush=True)
    if not args.json_only:
        print()
        print(markdown(result), flush=True)
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def header(name: str, args: argparse.Namespace, bench: BenchRuntime | None) -> dict[str, Any]:
    """The first keys of every result: which benchmark, mode, machine and runtime."""
    out: dict[str, Any] = {
        "benchmark": name,
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
    }
    if bench is not None:
        out["runtime"] = bench.describe()
    return out


def save_figure(fig: Any, plots: Path | None, name: str) -> str | None:
    """Write a matplotlib figure as PNG into `plots` (kept small: 100 dpi, optimised palette)."""
    import matplotlib.pyplot as plt

    if plots is None:
        plt.close(fig)
        return None
    plots.mkdir(parents=True, exist_ok=True)
    path = plots / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display here, nor on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FRAME_MS = 1000 / FPS


# -- an instrumented live session -----------------------------------------------------------------


class Columns:
    """Rows of numbers kept in preallocated numpy columns: logging allocates nothing while the
    run stays within `capacity` rows (then the columns double), so a long run's RSS measures
    the session, not the benchmark's own bookkeeping."""

    def __init__(self, names: Sequence[str], capacity: int):
        self.names = tuple(names)
        self._data = np.zeros((max(1, capacity), len(self.names)), np.float64)
        self._n = 0

    def append(self, *values: float) -> None:
        if self._n == len(self._data):
            self._data = np.concatenate([self._data, np.zeros_like(self._data)])
        self._data[self._n] = values
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, name: str) -> np.ndarray:
        return self._data[: self._n, self.names.index(name)]

    def rows(self) -> np.ndarray:
        return self._data[: self._n]

    @property
    def nbytes(self) -> int:
        return self._data.nbytes


@dataclass
class TickRecord:
    n: int  # output tick (video frame n, due at t0 + n/25)
    frame: int | None  # the input frame it carries; None: an idle tick
    t: float  # when the tick was emitted
    rendered: bool  # its image was rendered from speech (not the idle frame)
    loud_at: int | None  # first sample (of 640) of its audio in a loud 2 ms block, None: quiet
    signature: np.ndarray | None = None  # mouth-region thumbnail, when asked for


class TickLog:
    """What every output tick carried, in Columns; indexing and iterating give TickRecords."""

    def __init__(self, capacity: int):
        self.columns = Columns(("n", "frame", "t", "rendered", "loud_at"), capacity)
        self.signatures: list[np.ndarray] | None = None

    def append(self, n: int, frame: int | None, t: float, rendered: bool, loud_at: int, signature=None) -> None:
        self.columns.append(n, -1 if frame is None else frame, t, rendered, loud_at)
        if signature is not None:
            if self.signatures is None:
                self.signatures = []
            self.signatures.append(signature)

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, k: int) -> TickRecord:
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        n, frame, t, rendered, loud_at = self.columns.rows()[k]
        return TickRecord(int(n), None if frame < 0 else int(frame), float(t), bool(rendered),
                          None if loud_at < 0 else int(loud_at),
                          self.signatures[k] if self.signatures is not None else None)

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def column(self, name: str) -> np.ndarray:
        return self.columns[name]


class _TimedDict(dict):
    """The session's rendered-frame store, noting when each rendered frame was put in (the most
    recent `keep` frames only: bounded, like the store itself)."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.set_at: dict[int, float] = {}
        self._keep = keep

    def __setitem__(self, key: int, value: Any) -> None:
        if value is not None:
            self.set_at[key] = time.monotonic()
            if len(self.set_at) > self._keep:
                del self.set_at[next(iter(self.set_at))]
        super().__setitem__(key, value)


class _TimedRenderer:
    """Delegates to the shared AvatarRenderer and logs (end time, seconds, frames) per call.
    The seconds include waiting for the renderer's lock, i.e. for other sessions' renders."""

    def __init__(self, renderer: Any, log: Columns):
        self._renderer = renderer
        self._log = log

    def render(self, positions: list[int], windows: np.ndarray) -> list[np.ndarray]:
        t0 = time.monotonic()
        out = self._renderer.render(positions, windows)
        t1 = time.monotonic()
        self._log.append(t1, t1 - t0, len(positions))
        return out

    async def render_async(self, positions: list[int], windows: np.ndarray, **kwargs) -> list[np.ndarray]:
        """The live path (the FrameEngine's batch per tick); probes are not logged."""
        t0 = time.monotonic()
        out = await self._renderer.render_async(positions, windows, **kwargs)
        t1 = time.monotonic()
        if not kwargs.get("probe"):
            self._log.append(t1, t1 - t0, len(positions))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._renderer, name)


def first_loud(samples: np.ndarray, rate: int = SAMPLE_RATE, threshold: float = 0.02,
               block_s: float = ONSET_BLOCK_S) -> int:
    """Index of the first sample of the first `block_s` block whose RMS exceeds `threshold`
    (the criterion of detect_onsets), -1 when there is none."""
    block = max(1, int(block_s * rate))
    n = len(samples) // block
    if n == 0:
        return -1
    rms = np.sqrt(np.mean(np.square(samples[: n * block].reshape(n, block), dtype=np.float64), axis=1))
    loud = np.flatnonzero(rms > threshold)
    return int(loud[0] * block) if len(loud) else -1


def instrumented_session(encoder: Any, renderer: Any, config: Any, *, signature_box=None,
                         keep_audio: bool = True, capacity_s: float = 120.0):
    """An AvatarSession (the real one, unchanged in behaviour) that logs when input audio is
    written to its ring, when each encoder run ends, when each frame is rendered and what each
    output tick carries. Logging only wraps methods and the session's on_tick hook; its logs
    are preallocated for `capacity_s` seconds. keep_audio: also keep the 16 kHz input and
    output audio (grows: for short runs)."""
    from realtime_avatar.session import AvatarSession

    ticks = int(capacity_s * FPS)
    render_log = Columns(("t_end", "seconds", "frames"), ticks)
    session = AvatarSession(encoder, _TimedRenderer(renderer, render_log), config)
    session.render_log = render_log
    session._rendered = _TimedDict(keep=ticks)  # type: ignore[assignment]
    session.input_log = Columns(("t", "write_index", "loud_at"), ticks * 4)  # ~ one write per 20 ms
    session.encoder_log = Columns(("first", "end", "t0", "t1"), ticks)
    session.tick_log = TickLog(ticks)
    session.input_chunks = [] if keep_audio else None  # 16 kHz audio as written to the ring
    session.output_chunks = [] if keep_audio else None  # 16 kHz audio of every tick

    write = session.ring.write

    def logged_write(samples: np.ndarray) -> None:
        start = session.ring.write_index
        write(samples)
        loud = first_loud(np.asarray(samples, np.float32))
        session.input_log.append(time.monotonic(), session.ring.write_index, -1 if loud < 0 else start + loud)
        if session.input_chunks is not None:
            session.input_chunks.append(np.array(samples, dtype=np.float32))

    session.ring.write = logged_write

    finish_run = session.whisper.finish_run

    def logged_finish_run(plan, states, t0):
        # every encoder run ends here, batched (the runtime's EncoderBatcher) or not
        block = finish_run(plan, states, t0)
        session.encoder_log.append(plan.emit_from, plan.emit_to, t0, time.monotonic())
        return block

    session.whisper.finish_run = logged_finish_run

    def on_tick(n: int, frame: int | None, image: np.ndarray, audio: np.ndarray) -> None:
        t = time.monotonic()
        idle = renderer.idle_frame(n % renderer.cycle_length)
        signature = mouth_signature(image, signature_box) if signature_box is not None else None
        session.tick_log.append(n, frame, t, image is not idle, first_loud(audio), signature)
        if session.output_chunks is not None:
            session.output_chunks.append(np.array(audio, dtype=np.float32))

    session.on_tick = on_tick
    return session


def time_ring_reached(input_log: Columns, sample: int) -> float | None:
    """When the ring first held audio up to and including `sample` (from a session's
    input_log, whose write indices only grow)."""
    k = int(np.searchsorted(input_log["write_index"], sample, side="right"))
    return float(input_log["t"][k]) if k < len(input_log) else None


def features_final_at(encoder_log: Columns, feature: int) -> tuple[float, float] | None:
    """(end time, run seconds) of the encoder run that made `feature` final."""
    hit = np.flatnonzero((encoder_log["first"] <= feature) & (feature < encoder_log["end"]))
    if not len(hit):
        return None
    t0, t1 = encoder_log["t0"][hit[0]], encoder_log["t1"][hit[0]]
    return float(t1), float(t1 - t0)


def render_call_before(render_log: Columns, t: float) -> tuple[float, float, int] | None:
    """The last render call that ended at or before `t` (the one whose frames were stored at t)."""
    k = int(np.searchsorted(render_log["t_end"], t + 1e-6, side="right")) - 1
    if k < 0:
        return None
    t_end, seconds, frames = render_log.rows()[k]
    return float(t_end), float(seconds), int(frames)


def chunk_onsets(loud_at: Sequence[float], chunk_ends: Sequence[float], min_gap_samples: int) -> list[int]:
    """Onsets from chunked audio summarised per chunk: loud_at[k] is the absolute index of the
    chunk's first loud sample (-1: a quiet chunk), chunk_ends[k] one past its last sample. An
    onset is a loud chunk starting at least `min_gap_samples` after the previous loud chunk
    ended (the same rule as detect_onsets, at chunk resolution for the quiet gap)."""
    onsets, previous_end = [], None
    for loud, end in zip(loud_at, chunk_ends):
        if loud < 0:
            continue
        if previous_end is None or loud - previous_end >= min_gap_samples:
            onsets.append(int(loud))
        previous_end = int(end)
    return onsets


async def push_realtime(sessions: Sequence[Any], samples: np.ndarray, rate: int, *, channels: int = 2,
                        stop_after_s: float | None = None) -> float:
    """Push mono float `samples` into every session in 20 ms packets at real-time pace, as
    int16 with `channels` channels (WebRTC's stereo s16). Returns the time the first packet
    was pushed."""
    import asyncio

    loop = asyncio.get_running_loop()
    packet = int(PACKET_S * rate)
    t0 = loop.time()
    for i in range(0, len(samples), packet):
        due = t0 + i / rate
        if stop_after_s is not None and i / rate >= stop_after_s:
            break
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pcm = np.clip(samples[i : i + packet] * 32767.0, -32768, 32767).astype(np.int16)
        if channels > 1:
            pcm = np.repeat(pcm[:, None], channels, axis=1)
        for session in sessions:
            session.push_pcm(pcm, rate, channels)
    return t0
