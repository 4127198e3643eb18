"""examples/speak_wav.py runs as documented against a real server and a real AvatarSession."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import wave
from pathlib import Path

import av

from realtime_avatar.broadcast import BroadcastOptions
from realtime_avatar.server import create_app
from realtime_avatar.session import AvatarSession, SessionConfig
from tests.rtc_client import serving
from tests.speech import espeak_wav

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "speak_wav.py"


def load_example():
    spec = importlib.util.spec_from_file_location("speak_wav", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speak_wav_example_records_the_whep_output_with_the_speech(runtime, tmp_path):
    wav = espeak_wav("Hello, I am your avatar.", tmp_path / "hello.wav", rate=22_050)
    out = tmp_path / "hello.mp4"
    example = load_example()

    async def factory():
        return AvatarSession(runtime.encoder, runtime.renderer,
                             SessionConfig(streaming=runtime.streaming, render_budget_s=1.0, batch_size=8))

    async def scenario():
        async with serving(create_app(factory, broadcast=BroadcastOptions())) as url:
            args = argparse.Namespace(server=url, wav=wav, out=out, session=None, interrupt_after=None, token=None)
            return await example.main(args)

    assert asyncio.run(scenario()) == 0
    with wave.open(str(wav)) as w:
        speech_s = w.getnframes() / w.getframerate()
    with av.open(str(out)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(out)) as container:
        audio_s = sum(f.samples / f.sample_rate for f in container.decode(audio=0))
    # idle second + speech + tail, all seen by the viewer
    assert frames >= 25 * (speech_s + 1.0) * 0.8, (frames, speech_s)
    assert audio_s >= speech_s

