"""`realtime-avatar live --mic` through a real PortAudio device: a JACK dummy card.

Speech is played by a second PortAudio stream whose output port is routed (jack_connect) into
the microphone's input port, so the whole path is real: PortAudio callback -> soxr -> ring ->
streaming Whisper -> renderer -> 25 fps clock -> MP4 recorder.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import av
import numpy as np
import pytest

from realtime_avatar.audio_sources import read_audio_file
from realtime_avatar.cli import choose_preview, run_live
from realtime_avatar.session import SessionConfig
from realtime_avatar.timing import FPS
from tests.jack import SpeechIntoMicrophone, jack_device_index, jackd, reinitialize_portaudio  # noqa: F401 - jackd is a fixture
from tests.rtc_client import RtcClient, http_client
from tests.speech import espeak_wav, read_wav
from tests.xvfb import x_display  # noqa: F401 - a fixture

pytestmark = pytest.mark.jack


def test_live_microphone_session_records_the_avatar_speaking(jackd, runtime, tmp_path):
    reinitialize_portaudio()
    device = jack_device_index()
    speech, rate = read_wav(espeak_wav("Hello, this is the microphone speaking.", tmp_path / "s.wav", rate=jackd.rate))
    assert rate == jackd.rate
    config = SessionConfig(streaming=runtime.streaming, batch_size=4)
    record = tmp_path / "live.mp4"

    async def scenario(player):
        live = asyncio.create_task(run_live(runtime, config, device, seconds=player.seconds + 1.0,
                                            record=record, report_every=0.2))
        await asyncio.sleep(0.5)  # the microphone stream is open: route the player into it
        player.route()
        return await live

    with SpeechIntoMicrophone(jackd, device, speech) as player:
        stats = asyncio.run(scenario(player))
    print(stats)
    assert stats["microphone"]["callback_errors"] == 0
    assert stats["rendered_frames"] > 20  # speech frames went through the model
    assert stats["frames_played"] > 0.9 * stats["input_seconds"] * FPS
    assert stats["recorded_frames"] == stats["frames_sent"] and stats["recording_dropped"] == 0
    heard = read_audio_file(record)  # the recording's soundtrack carries the speech
    assert np.abs(heard).max() > 0.1
    with av.open(str(record)) as c:
        assert c.streams.video[0].frames == stats["recorded_frames"]


def test_live_microphone_with_the_page_preview_streams_to_a_viewer(jackd, runtime, tmp_path):
    """No display: `live --mic --preview page` serves a watch-only page; an aiortc viewer (what
    the page's JavaScript does) receives the avatar at 25 fps and hears the speech."""
    reinitialize_portaudio()
    device = jack_device_index()
    speech, _ = read_wav(espeak_wav("The preview page shows what I say.", tmp_path / "s.wav", rate=jackd.rate))
    config = SessionConfig(streaming=runtime.streaming, batch_size=4)

    async def scenario(player):
        parts = {}
        live = asyncio.create_task(run_live(runtime, config, device, seconds=player.seconds + 3.0,
                                            report_every=0.2, preview="page", preview_port=0,
                                            started=parts.update))
        while "page" not in parts:
            await asyncio.sleep(0.05)
        async with http_client() as http:
            viewer = RtcClient(parts["page"].url, None)
            viewer.pc.addTransceiver("audio", direction="recvonly")
            await viewer.connect(http)
            await asyncio.wait_for(viewer.first_video.wait(), 10)
            player.route()
            t0 = time.monotonic()
            await asyncio.sleep(player.seconds + 1.5)
            watched = time.monotonic() - t0
            await viewer.close()
        return await live, viewer.recording, watched

    with SpeechIntoMicrophone(jackd, device, speech) as player:
        stats, rec, watched = asyncio.run(scenario(player))
    arrivals = [t for t in rec.video_arrivals if t >= rec.video_arrivals[0] + 0.5]
    fps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(f"viewer: {len(rec.video_arrivals)} frames in {watched:.1f} s ({fps:.1f} fps), "
          f"{len(rec.audio) / rec.audio_rate:.2f} s of audio, peak {np.abs(rec.audio).max():.3f}; {stats}")
    assert stats["preview_viewers"] == 0  # the viewer hung up before the session ended
    assert stats["rendered_frames"] > 20
    assert fps >= FPS - 2
    assert np.abs(rec.audio).max() > 0.1  # the avatar's voice (the microphone's speech) came back
    assert rec.video_size == tuple(runtime.avatar.frame_shape[1::-1])


def test_live_microphone_with_a_window_preview(jackd, tmp_path, x_display):
    """With a display (Xvfb here): `realtime-avatar live --mic --preview window` shows every
    played frame. Run as the CLI in a child process: Tk keeps its X connection until the process
    exits, and Xlib ends the process when that X server goes away (as this test's Xvfb does)."""
    pytest.importorskip("tkinter")
    reinitialize_portaudio()
    device = jack_device_index()
    speech, _ = read_wav(espeak_wav("A window shows the avatar.", tmp_path / "s.wav", rate=jackd.rate))
    assert choose_preview("auto") == "window"
    with SpeechIntoMicrophone(jackd, device, speech) as player:
        before = set(player.client_ports("input"))
        child = subprocess.Popen(
            [sys.executable, "-m", "realtime_avatar.cli", "live", "--mic", "--input-device", str(device),
             "--preview", "window", "--seconds", f"{player.seconds + 4.0:.1f}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not set(player.client_ports("input")) - before:  # the child's microphone port exists: route into it
                assert child.poll() is None, child.stderr.read()
                assert time.monotonic() < deadline, "the live command never opened the microphone"
                time.sleep(0.1)
            player.route()
            out, err = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == 0, err[-3000:]
    stats = json.loads(out)
    print(f"window showed {stats['preview_frames_shown']} of {stats['frames_sent']} ticks; {stats}")
    assert stats["rendered_frames"] > 10  # the speech reached the model through the microphone
    # the window is pumped every 20 ms, faster than the 40 ms ticks: it misses almost none
    assert stats["preview_frames_shown"] >= 0.9 * stats["frames_sent"]
