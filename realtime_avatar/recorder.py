"""Mp4Recorder: writes a live session's ticks (video frame + its 40 ms of audio) to an MP4.

Encoding runs on the recorder's own worker thread behind a bounded queue, so the session's
clock never waits for the encoder; if the encoder falls behind by more than the queue, ticks
are dropped and counted rather than delaying the live output.
"""

from __future__ import annotations

import fractions
import queue
import threading
from pathlib import Path

import av
import numpy as np

from .timing import FPS, SAMPLE_RATE
from .video_encoding import add_h264_stream, even_size, video_frame

QUEUE_TICKS = 2 * FPS  # two seconds of backlog before ticks are dropped


class Mp4Recorder:
    def __init__(self, path: str | Path, width: int, height: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.source_size = (width, height)
        self.width, self.height = even_size(width, height)  # odd sizes are padded, never cropped
        self.frames = 0
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_TICKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mp4-recorder", daemon=True)
        self._thread.start()

    def write(self, image_bgr: np.ndarray, pcm: np.ndarray) -> None:
        """Queue one tick (called from the session's clock; never blocks)."""
        try:
            self._queue.put_nowait((image_bgr, pcm))
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        """Finish the file (drains what is queued). Raises what the encoder thread raised."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            with av.open(str(self.path), mode="w", format="mp4") as container:
                video = add_h264_stream(container, *self.source_size, what=str(self.path))
                sound = container.add_stream("aac", rate=SAMPLE_RATE)
                sound.layout = "mono"
                n_audio = 0
                while (item := self._queue.get()) is not None:
                    image, pcm = item
                    container.mux(video.encode(video_frame(image, self.frames)))
                    samples = av.AudioFrame.from_ndarray(pcm.astype(np.float32)[None], format="fltp", layout="mono")
                    samples.sample_rate = SAMPLE_RATE
                    samples.pts, samples.time_base = n_audio, fractions.Fraction(1, SAMPLE_RATE)
                    n_audio += len(pcm)
                    container.mux(sound.encode(samples))
                    self.frames += 1
                container.mux(video.encode(None))
                container.mux(sound.encode(None))
        except BaseException as e:  # reported by close(); the session must not die of it
            self._error = e
            while self._queue.get() is not None:  # unblock writers until close()
                pass
