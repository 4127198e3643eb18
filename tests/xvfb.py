"""A real X server without a screen (Xvfb), for tests of windows on a display."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.jack import stop_process

XVFB = shutil.which("Xvfb")


@pytest.fixture
def x_display(monkeypatch) -> Iterator[str]:
    """Start Xvfb on a free display number and point DISPLAY at it for the test."""
    if XVFB is None:
        pytest.skip("Xvfb is not installed (apt-get install -y xvfb; ./setup.sh --dev does)")
    number = next(n for n in range(90, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists()
                  and not Path(f"/tmp/.X{n}-lock").exists())
    process = subprocess.Popen([XVFB, f":{number}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{number}").exists():
            if process.poll() is not None:
                raise RuntimeError(f"Xvfb exited with {process.returncode}: {process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError("Xvfb did not come up within 10 s")
            time.sleep(0.05)
        monkeypatch.setenv("DISPLAY", f":{number}")
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        yield os.environ["DISPLAY"]
    finally:
        stop_process(process)
