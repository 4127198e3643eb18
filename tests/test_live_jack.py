"""`realtime-avatar live --mic` through a real PortAudio device: a JACK dummy card.

Speech is played by a second PortAudio stream whose output port is routed (jack_connect) into
the microphone's input port, so the whole path is real: PortAudio callback -> soxr -> ring ->
streaming Whisper -> renderer -> 25 fps clock -> MP4 recorder.
"""

from __future__ import annotations

import asyncio
import threading

import av
import numpy as np
import pytest

from realtime_avatar.audio_sources import list_input_devices, read_audio_file
from realtime_avatar.cli import run_live
from realtime_avatar.session import SessionConfig
from realtime_avatar.timing import FPS
from tests.jack import jackd, reinitialize_portaudio  # noqa: F401 - jackd is a fixture
from tests.speech import espeak_wav, read_wav

pytestmark = pytest.mark.jack


def test_live_microphone_session_records_the_avatar_speaking(jackd, runtime, tmp_path):
    import sounddevice

    reinitialize_portaudio()
    device = [d for d in list_input_devices() if d.hostapi.startswith("JACK")][0].index
    speech, rate = read_wav(espeak_wav("Hello, this is the microphone speaking.", tmp_path / "s.wav", rate=jackd.rate))
    assert rate == jackd.rate
    position = [0]
    lock = threading.Lock()

    def play(outdata, frames, time_info, status):
        with lock:
            chunk = speech[position[0] : position[0] + frames]
            position[0] += frames
        outdata[:, 0] = 0.0
        outdata[: len(chunk), 0] = chunk

    player = sounddevice.OutputStream(samplerate=jackd.rate, device=device, channels=1, dtype="float32",
                                      callback=play)
    config = SessionConfig(streaming=runtime.streaming, batch_size=4)
    record = tmp_path / "live.mp4"

    async def scenario():
        live = asyncio.create_task(run_live(runtime, config, device, seconds=len(speech) / rate + 1.0,
                                            record=record, report_every=0.2))
        await asyncio.sleep(0.5)  # the microphone stream is open: route the player into it
        ours_in = [p for p in jackd.ports("input") if not p.startswith("system:")]
        ours_out = [p for p in jackd.ports("output") if not p.startswith("system:")]
        jackd.connect(ours_out[0], ours_in[0])
        with lock:
            position[0] = 0  # start the sentence now that it is routed
        return await live

    with player:
        stats = asyncio.run(scenario())
    print(stats)
    assert stats["microphone"]["callback_errors"] == 0
    assert stats["rendered_frames"] > 20  # speech frames went through the model
    assert stats["frames_played"] > 0.9 * stats["input_seconds"] * FPS
    assert stats["recorded_frames"] == stats["frames_sent"] and stats["recording_dropped"] == 0
    heard = read_audio_file(record)  # the recording's soundtrack carries the speech
    assert np.abs(heard).max() > 0.1
    with av.open(str(record)) as c:
        assert c.streams.video[0].frames == stats["recorded_frames"]
