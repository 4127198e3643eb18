"""priority.py: how the cores are shared between the model and the output encoders."""

from __future__ import annotations

import subprocess
import sys

from realtime_avatar.priority import compute_threads


def test_broadcast_outputs_leave_one_core_to_the_encoders_unless_threads_are_given():
    assert compute_threads(2, encodes_outputs=False) is None  # a conversation: all cores
    assert compute_threads(2, encodes_outputs=True) == 1
    assert compute_threads(16, encodes_outputs=True) == 15
    assert compute_threads(1, encodes_outputs=True) == 1  # never zero
    assert compute_threads(2, encodes_outputs=True, requested=2) == 2  # --threads wins


def test_serve_says_how_many_compute_threads_it_takes_with_rtmp(tmp_path):
    import pytest

    from realtime_avatar.engine_runners import cpu_cores

    if cpu_cores() < 2:
        pytest.skip("one core: nothing to leave to the encoders")
    # An RTMP URL that is refused: serve starts anyway (the push retries in the background);
    # we only need its start-up line, so it is stopped once printed.
    proc = subprocess.Popen([sys.executable, "-m", "realtime_avatar.cli", "serve", "--port", "0",
                             "--rtmp", "rtmp://127.0.0.1:9/live/x", "--broadcast", "show"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = ""
        for line in proc.stderr:
            if "compute threads" in line or "Traceback" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    assert f"compute threads: {cpu_cores() - 1} of {cpu_cores()} cores" in line, line
