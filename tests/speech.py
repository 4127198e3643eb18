"""Real speech for tests: Debian espeak-ng synthesises it, sox converts it to any rate.

espeak-ng always synthesises at 22050 Hz; sox resamples (its high-quality `rate` effect) and
writes 16-bit PCM mono, the format every decoder in the project (and Chromium's fake capture)
reads. Nothing here is mocked: tests that use it hear a real voice.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

ESPEAK_RATE = 22_050  # Hz, what espeak-ng synthesises at


def _require(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise RuntimeError(
            f"{binary} not found on PATH: install it with `apt-get install -y espeak-ng sox`"
        )
    return found


def espeak_wav(
    text: str,
    path: str | Path,
    rate: int = 16_000,
    voice: str = "en",
    wpm: int = 150,
    pitch: int = 50,
) -> Path:
    """Speak `text` with espeak-ng into a 16-bit mono PCM wav at `rate` Hz; return its path.

    voice: an espeak-ng voice name ("en", "en-us", "de", ...); wpm: words per minute;
    pitch: 0-99. Raises RuntimeError naming the tool and its stderr if either step fails.
    """
    if not text.strip():
        raise ValueError("espeak_wav: text is empty; give it something to say")
    if rate <= 0:
        raise ValueError(f"espeak_wav: rate must be a positive sample rate in Hz, got {rate}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    espeak = _require("espeak-ng")
    sox = _require("sox")

    synth = subprocess.run(
        [espeak, "-v", voice, "-s", str(wpm), "-p", str(pitch), "--stdout", text],
        capture_output=True,
        check=False,
    )
    if synth.returncode != 0 or not synth.stdout:
        raise RuntimeError(
            f"espeak-ng failed for voice {voice!r} (rc {synth.returncode}): "
            f"{synth.stderr.decode(errors='replace').strip()}"
        )
    # espeak-ng's --stdout wav header has unknown (0xFFFFFFFF) sizes: sox reads it as a stream.
    convert = subprocess.run(
        [sox, "-q", "-t", "wav", "-", "-t", "wav", "-e", "signed-integer", "-b", "16",
         "-c", "1", str(path), "rate", "-v", str(rate)],
        input=synth.stdout,
        capture_output=True,
        check=False,
    )
    if convert.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"sox failed writing {path} at {rate} Hz (rc {convert.returncode}): "
            f"{convert.stderr.decode(errors='replace').strip()}"
        )
    return path


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a wav (or anything PyAV opens) to float32 mono in [-1, 1]; return (samples, rate).

    PyAV's resampler does the format and channel conversion (planar float, mono) at the
    file's own rate, so nothing here needs an ffmpeg binary.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        to_mono_float = av.AudioResampler(format="fltp", layout="mono", rate=rate)
        chunks = []
        for frame in container.decode(stream):
            chunks.extend(f.to_ndarray()[0] for f in to_mono_float.resample(frame))
        chunks.extend(f.to_ndarray()[0] for f in to_mono_float.resample(None))
    if not chunks:
        raise ValueError(f"read_wav: {path} holds no audio samples")
    return np.concatenate(chunks).astype(np.float32), rate
