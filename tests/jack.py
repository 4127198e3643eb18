"""A JACK server with a dummy sound card, so microphone code can be tested without hardware.

`jackd --no-realtime -d dummy` runs a real, clocked audio graph: its system:capture ports
deliver (silent) blocks at exactly the server rate, and PortAudio (hence sounddevice) sees it as
a "JACK Audio Connection Kit" device. `jack_connect` can route any client's output into our
input, which is how a test plays a known tone into the "microphone".

Each server gets a name of its own (JACK_DEFAULT_SERVER) so parallel test runs do not share
one, and JACK_NO_START_SERVER stops libjack from starting a server behind our back. PortAudio
enumerates devices only when it initialises (sounddevice does that at import), so
`reinitialize_portaudio()` must run after the server is up.
"""

from __future__ import annotations

import os
import shutil
import sys
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

JACK_RATE = 48_000  # Hz: the dummy card runs at a typical device rate, not ours, on purpose
STARTUP_TIMEOUT = 10.0  # seconds for jackd to come up


@dataclass
class JackServer:
    name: str
    rate: int
    process: subprocess.Popen

    def _run(self, *args: str) -> str:
        result = subprocess.run(
            [*args, "-s", self.name], capture_output=True, text=True, timeout=10, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed on JACK server {self.name!r}: {result.stderr}"
            )
        return result.stdout

    def ports(self, direction: str) -> list[str]:
        """Port names of one direction ('input' or 'output'), from `jack_lsp -p`."""
        names, current = [], None
        for line in self._run("jack_lsp", "-p").splitlines():
            if not line.startswith((" ", "\t")):
                current = line.strip()
            elif "properties:" in line and current and direction in line.split(":", 1)[1]:
                names.append(current)
        return names

    def connect(self, source: str, destination: str) -> None:
        self._run("jack_connect", source, destination)


def reinitialize_portaudio():
    """Make PortAudio enumerate devices again (it only does so when it initialises)."""
    import sounddevice

    sounddevice._terminate()
    sounddevice._initialize()
    return sounddevice


def stop_process(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace_s`; always reaped."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def jack_server(rate: int = JACK_RATE) -> Iterator[JackServer]:
    """Run a dummy-driver JACK server for the duration of the block. Skips if jackd is absent."""
    jackd = shutil.which("jackd")
    if jackd is None or shutil.which("jack_lsp") is None:
        pytest.skip("jackd2 is not installed (apt-get install jackd2 libportaudio2)")
    name = f"realtime-avatar-test-{os.getpid()}"
    env_keys = ("JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER")
    saved_env = {key: os.environ.get(key) for key in env_keys}
    os.environ["JACK_DEFAULT_SERVER"] = name
    os.environ["JACK_NO_START_SERVER"] = "1"
    log = tempfile.TemporaryFile()  # a file, not a pipe: an unread pipe would stall jackd
    process = subprocess.Popen(
        [jackd, "--no-realtime", "-n", name, "-d", "dummy", "-r", str(rate)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = JackServer(name, rate, process)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(
                    f"jackd exited with {process.returncode}: {log.read().decode(errors='replace')}"
                )
            probe = subprocess.run(
                ["jack_lsp", "-s", name], capture_output=True, timeout=10, check=False
            )
            if probe.returncode == 0 and b"system:capture_1" in probe.stdout:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"jackd did not come up within {STARTUP_TIMEOUT} s")
            time.sleep(0.1)
        yield server
    finally:
        stop_process(process)
        log.close()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def jackd() -> Iterator[JackServer]:
    """A JACK server for the test module. If the tests loaded PortAudio, it is shut down while
    the server still runs (closing its JACK client cleanly) and started again afterwards, so
    later tests see the machine's devices without the server."""
    with jack_server() as server:
        yield server
        sounddevice = sys.modules.get("sounddevice")
        if sounddevice is not None:
            sounddevice._terminate()
    if sounddevice is not None:
        sounddevice._initialize()


class SpeechIntoMicrophone:
    """Plays `speech` (float32 at the JACK rate) from a second PortAudio stream whose output is
    routed into the microphone's input port. Open it (`with`), start the microphone, then
    `route()`: the sentence starts from its beginning once it can be heard."""

    def __init__(self, jackd: JackServer, device: int, speech):
        import threading

        import sounddevice

        self.jackd, self.speech = jackd, speech
        self.position = 0
        self._lock = threading.Lock()
        self._stream = sounddevice.OutputStream(samplerate=jackd.rate, device=device, channels=1,
                                                dtype="float32", callback=self._play)

    def _play(self, outdata, frames, time_info, status) -> None:
        with self._lock:
            chunk = self.speech[self.position : self.position + frames]
            self.position += frames
        outdata[:, 0] = 0.0
        outdata[: len(chunk), 0] = chunk

    @property
    def seconds(self) -> float:
        return len(self.speech) / self.jackd.rate

    def client_ports(self, direction: str) -> list[str]:
        """Ports of the PortAudio clients (ours and the microphone's), not the dummy card's."""
        return [p for p in self.jackd.ports(direction) if not p.startswith("system:")]

    def route(self) -> None:
        """Connect our output to the (first non-system) input port and restart the sentence."""
        self.jackd.connect(self.client_ports("output")[0], self.client_ports("input")[0])
        with self._lock:
            self.position = 0

    def __enter__(self) -> "SpeechIntoMicrophone":
        self._stream.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._stream.__exit__(*exc)


def jack_device_index() -> int:
    """PortAudio's index of the JACK device (after `reinitialize_portaudio()`)."""
    from realtime_avatar.audio_sources import list_input_devices

    return [d for d in list_input_devices() if d.hostapi.startswith("JACK")][0].index
