"""MicrophoneSource on a real, clocked audio device: a JACK server with a dummy card at 48 kHz.

PortAudio's callback thread drives the source exactly as a sound card would; the test checks
the sample clock (16000 samples per second of wall time, steadily), that nothing overflows, and,
by routing a 440 Hz tone from a second PortAudio stream into the input port with jack_connect,
that the audio itself arrives intact.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from realtime_avatar.audio_ring import AudioRing
from realtime_avatar.audio_sources import MicrophoneSource, list_input_devices
from realtime_avatar.timing import SAMPLE_RATE
from tests.jack import JackServer, jackd, reinitialize_portaudio  # noqa: F401 - jackd is a fixture

pytestmark = pytest.mark.jack

TONE_HZ = 440.0
TONE_AMPLITUDE = 0.5


def jack_input_device(server: JackServer) -> int:
    reinitialize_portaudio()  # PortAudio only sees the server if it initialises after it started
    inputs = [d for d in list_input_devices() if d.hostapi.startswith("JACK")]
    assert inputs, f"PortAudio lists no JACK input on server {server.name}: {list_input_devices()}"
    assert inputs[0].default_samplerate == server.rate
    return inputs[0].index


def peak_frequency(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-20)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(x)


def test_jack_microphone_fills_the_ring_at_16k_paced_by_the_device(jackd):
    device = jack_input_device(jackd)
    ring = AudioRing(5 * SAMPLE_RATE)
    ratio = jackd.rate / SAMPLE_RATE  # device frames per 16 kHz sample
    with MicrophoneSource(ring, device=device) as mic:
        assert mic.samplerate == jackd.rate and mic.active
        time.sleep(0.3)  # let the stream settle
        steps = []  # (wall time, ring samples, device frames)
        for _ in range(8):  # 2 s in 0.25 s steps
            steps.append((time.perf_counter(), ring.write_index, mic.stats()["frames_in"]))
            time.sleep(0.25)
        steps.append((time.perf_counter(), ring.write_index, mic.stats()["frames_in"]))
        # The resampler keeps up with the device: it holds back at most ~40 ms (soxr HQ). One
        # JACK period (1024 frames, 21 ms) may land between reading the two counters.
        one_period = 0.025 * SAMPLE_RATE
        for _, samples, frames in steps:
            assert -one_period <= frames / ratio - samples <= 0.040 * SAMPLE_RATE + one_period
    stats = mic.stats()
    assert not mic.active
    # after stop() the resampler's tail is in the ring too: exactly the device's duration
    assert stats["samples_out"] == ring.write_index == round(stats["frames_in"] / ratio)

    (t0, n0, _), (t1, n1, _) = steps[0], steps[-1]
    rate = (n1 - n0) / (t1 - t0)
    print(f"JACK microphone: {rate:.0f} samples/s into the ring; stats {stats}")
    assert stats["callback_errors"] == 0, stats
    assert ring.overrun_samples == 0
    # The dummy card is clocked by jackd's sleeps: on a loaded CPU it misses cycles (xruns),
    # which PortAudio reports as input overflows and we count. Without them the clock is exact.
    if stats["input_overflows"] == 0:
        assert abs(rate - SAMPLE_RATE) < 0.03 * SAMPLE_RATE, (rate, steps)
    else:
        assert abs(rate - SAMPLE_RATE) < 0.10 * SAMPLE_RATE, (rate, steps)
    # paced: every quarter second brings about a quarter second of samples, not one burst
    for (ta, na, _), (tb, nb, _) in zip(steps, steps[1:]):
        assert 0.5 < (nb - na) / ((tb - ta) * SAMPLE_RATE) < 1.5, steps
    # the dummy card captures silence, and silence it must stay
    assert np.abs(ring.read(ring.oldest_index, ring.write_index)).max() == 0.0


def test_jack_microphone_records_a_tone_routed_into_its_port(jackd):
    import sounddevice

    device = jack_input_device(jackd)
    phase = [0]

    def play_tone(outdata, frames, time_info, status):
        n = np.arange(phase[0], phase[0] + frames)
        outdata[:, 0] = TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * n / jackd.rate)
        phase[0] += frames

    ring = AudioRing(5 * SAMPLE_RATE)
    player = sounddevice.OutputStream(
        samplerate=jackd.rate, device=device, channels=1, dtype="float32", callback=play_tone
    )
    with MicrophoneSource(ring, device=device) as mic, player:
        # our process's ports (PortAudio:in_0, PortAudio:out_0), not the dummy card's system:*
        ours_in = [p for p in jackd.ports("input") if not p.startswith("system:")]
        ours_out = [p for p in jackd.ports("output") if not p.startswith("system:")]
        assert len(ours_in) == 1 and len(ours_out) == 1, (ours_in, ours_out)
        jackd.connect(ours_out[0], ours_in[0])
        start = ring.write_index + SAMPLE_RATE // 5  # past the moment of connection
        # a real producer thread (PortAudio's) waking an asyncio consumer through the ring
        asyncio.run(ring.wait_until(start + SAMPLE_RATE, timeout=5))
        stats = mic.stats()
    received = ring.read(start, start + SAMPLE_RATE)
    assert abs(peak_frequency(received) - TONE_HZ) < 1.0
    rms = float(np.sqrt(np.mean(received**2)))
    assert abs(rms - TONE_AMPLITUDE / np.sqrt(2)) < 0.05 * TONE_AMPLITUDE, rms
    assert stats["callback_errors"] == 0, stats
    assert ring.overrun_samples == 0
