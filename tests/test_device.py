"""--device on every command: CUDA without a GPU is one clear line and exit 2; auto falls back."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from realtime_avatar.cli import build_parser, main
from realtime_avatar.device import DeviceUnavailable, choose_device, choose_precision

COMMANDS = ["features", "prepare", "render", "serve", "live"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_every_command_takes_device_and_precision():
    parser = build_parser()
    for command in COMMANDS:
        args = parser.parse_args([command, "--device", "cpu", "--precision", "bf16"])
        assert (args.device, args.precision) == ("cpu", "bf16")
        assert parser.parse_args([command]).device == "auto"


@no_cuda
@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_without_a_gpu_is_one_clear_line_and_exit_2(command, capsys):
    assert main([command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"realtime-avatar {command}: --device cuda:") and "no CUDA GPU" in err[0]
    assert "--device cpu" in err[0]  # says what to do instead


@no_cuda
def test_the_real_command_exits_2_without_a_traceback():
    done = subprocess.run([sys.executable, "-m", "realtime_avatar.cli", "render", "--device", "cuda:1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "--device cuda:1" in done.stderr


def test_a_malformed_device_names_the_choices_and_the_microphone_option(capsys):
    assert main(["live", "--device", "USB Mic"]) == 2
    err = capsys.readouterr().err
    assert "auto|cpu|cuda[:N]" in err and "--input-device" in err


@no_cuda
def test_auto_falls_back_to_the_cpu_and_says_so(caplog):
    caplog.set_level("INFO", logger="realtime_avatar.device")
    assert choose_device("auto") == torch.device("cpu")
    assert "no CUDA GPU visible" in caplog.text and "running on the CPU" in caplog.text
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceUnavailable):
        choose_device("cuda:0")


def test_precision_defaults_follow_the_device():
    assert choose_precision(None, torch.device("cpu")) == "fp32"
    assert choose_precision(None, torch.device("cuda")) == "fp16"
    assert choose_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(DeviceUnavailable):
        choose_precision("int8", torch.device("cpu"))


def test_load_runtime_on_auto_runs_everything_on_the_cpu(runtime, tmp_path):
    """The fixture's runtime is a CPU one; load_runtime(device="auto") here picks the CPU and
    puts encoder, model and compose bank on it."""
    from realtime_avatar.runtime import load_runtime

    loaded = load_runtime(avatar=runtime.avatar.path, device="auto", allow_random=True, backend="torch",
                          progress=False, frame_format="auto")
    assert loaded.device == torch.device("cpu") and loaded.engine.precision == "fp32"
    assert loaded.renderer.frame_format == "bgr24"  # serve's "auto": yuv420p only on CUDA
    assert loaded.encoder.conv1.weight.device.type == "cpu"
    assert all(s.bank.frames.device.type == "cpu" for s in loaded.engine.slots)
    assert loaded.renderer.encoder_batcher is not None
