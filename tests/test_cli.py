"""The command line: every subcommand explains itself, and user errors end with a clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "realtime_avatar.cli"]


@pytest.mark.parametrize("command", ["features", "prepare", "render", "serve", "live"])
def test_every_command_has_help(command):
    out = subprocess.run(CLI + [command, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: realtime-avatar " + command in out.stdout
    assert len(out.stdout.splitlines()) > 5


def test_no_command_prints_the_overview():
    out = subprocess.run(CLI, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    for command in ("serve", "render", "prepare", "live", "features"):
        assert command in out.stdout


def test_missing_model_file_is_one_clear_line(tmp_path):
    missing = tmp_path / "nope.safetensors"
    out = subprocess.run(CLI + ["render", "--model", f"compact:{missing}", "-o", str(tmp_path / "o.mp4")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert str(missing) in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_serving_processes_freeze_their_startup_objects_out_of_full_collections():
    # serve and live call freeze_startup_objects() after loading: what torch and the model left
    # behind is no longer walked by each full collection (it stalled every session ~185 ms).
    code = ("import gc, torch, realtime_avatar.runtime as r; before = len(gc.get_objects());"
            "frozen = r.freeze_startup_objects(); print(before, frozen, len(gc.get_objects()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    before, frozen, after = map(int, out.stdout.split())
    assert frozen >= before // 2 and after < 1000, (before, frozen, after)
