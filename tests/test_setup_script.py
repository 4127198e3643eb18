"""setup.sh's choice of Python, with stand-in interpreters on a PATH of their own (the rest of
setup.sh installs packages and is exercised by a fresh clone, not here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fake_python(directory: Path, name: str, version: str, venv: bool = True) -> Path:
    """An executable that answers setup.sh's version probe like Python `version` would."""
    path = directory / name
    path.write_text(
        "#!/bin/sh\n"
        f'case "$2" in *ensurepip*) exit {0 if venv else 1};; esac\n'
        f"echo {version}\n"
    )
    path.chmod(0o755)
    return path


def _which_python(tmp_path: Path, pythons: dict[str, str], env_python: str | None = None):
    script_dir = tmp_path / "checkout"
    script_dir.mkdir()
    shutil.copy(REPO / "setup.sh", script_dir / "setup.sh")  # no .venv beside it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, version in pythons.items():
        _fake_python(bin_dir, name, version)
    for tool in ("dirname", "sed"):  # what setup.sh runs before it picks (no real python on PATH)
        os.symlink(shutil.which(tool), bin_dir / tool)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    if env_python is not None:
        env["PYTHON"] = env_python
    return subprocess.run([shutil.which("bash"), str(script_dir / "setup.sh"), "--which-python"], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    "pythons, chosen",
    [
        ({"python3": "3.12"}, "python3 (Python 3.12)"),  # a fresh Ubuntu 24.04: no python3.11
        ({"python3": "3.13", "python3.12": "3.12"}, "python3.12 (Python 3.12)"),
        ({"python3": "3.12", "python3.11": "3.11"}, "python3.11 (Python 3.11)"),
        ({"python3": "3.11"}, "python3 (Python 3.11)"),
    ],
)
def test_setup_picks_a_supported_python(tmp_path, pythons, chosen):
    result = _which_python(tmp_path, pythons)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("/" + chosen)


def test_setup_says_in_one_line_what_to_install_when_no_python_fits(tmp_path):
    # A fresh Debian 13: python3 is 3.13, for which mediapipe 0.10.21 has no wheel.
    result = _which_python(tmp_path, {"python3": "3.13"})
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no Python 3.11 or 3.12 found (python3 is 3.13)" in lines[0] and "install python3.12" in lines[0]


def test_setup_refuses_an_unsupported_python_given_by_name(tmp_path):
    bad = _fake_python(tmp_path, "py313", "3.13")
    result = _which_python(tmp_path, {"python3.12": "3.12"}, env_python=str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == f"setup.sh: PYTHON={bad} is Python 3.13; realtime-avatar needs 3.11 or 3.12"
