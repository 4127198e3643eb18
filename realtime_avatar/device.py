"""Device and precision choice: where the encoder, the renderer and the compose step run.

    device = choose_device("auto")          # cuda when torch sees a GPU, else cpu (logged)
    dtype = choose_precision(None, device)  # fp16 on CUDA, fp32 on CPU

Every run-time module takes the resulting `torch.device`; none of them looks for a GPU itself,
so one flag (`--device`) moves the whole frame path.
"""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = "auto|cpu|cuda[:N]"
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceUnavailable(ValueError):
    """The device asked for does not exist here (a user error: the message says what to use)."""


def choose_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> a torch.device that exists on this machine.

    auto: cuda:0 when torch sees a CUDA GPU, else cpu, and the fallback is logged (a server on
    a GPU box that silently ran on its CPU would be 100x slower without saying why).
    Raises DeviceUnavailable for a malformed spec, CUDA without a GPU or a GPU index past the
    last one.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if not _DEVICE_PATTERN.match(spec):
        raise DeviceUnavailable(f"--device {spec!r} is not one of {DEVICE_CHOICES} (a microphone is "
                                "chosen with --input-device)")
    if spec == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", 0)
            log.info("device auto: %s (%s)", device, torch.cuda.get_device_name(device))
            return device
        log.info("device auto: no CUDA GPU visible to torch %s, running on the CPU", torch.__version__)
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"--device {spec}: torch {torch.__version__} sees no CUDA GPU on this machine "
                "(CPU-only build or no driver); use --device cpu or --device auto"
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA GPU(s) here (cuda:0.."
                f"cuda:{torch.cuda.device_count() - 1})"
            )
        device = torch.device("cuda", index)
    return device


def choose_precision(precision: str | None, device: torch.device) -> str:
    """None -> fp16 on CUDA (DESIGN.md 11: within 1 grey level of fp32 there), fp32 on CPU
    (fp16 convolutions are slow on CPUs; bf16 is selectable where the CPU has it)."""
    if precision is None or precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise DeviceUnavailable(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` on `device` (disabled for fp32)."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA is asynchronous; timings without this measure launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
