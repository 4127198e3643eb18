"""Build the Whisper encoder's ONNX graph for the CPU run time (see realtime_avatar/onnx_encoder.py).

    python -m export.encoder_onnx                      # tiny.en into the engines folder
    python -m export.encoder_onnx --whisper PATH --engines DIR

Exports streaming_whisper.encoder_states (conv1 -> conv2 -> + positions -> blocks; no ln_post)
with dynamic batch and window length, checks it against torch on 1 s and 2 s windows (max
|difference| <= 1e-3, else nothing is written), and moves it into place atomically under the
weights' fingerprint. Seconds on a CPU; skipped when the graph for these weights exists.
setup.sh runs it, so `serve` uses the faster encoder without a separate step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from realtime_avatar.engines import default_engines_dir
from realtime_avatar.onnx_encoder import OnnxEncoderRunner, encoder_fingerprint, onnx_encoder_path
from realtime_avatar.streaming_whisper import encoder_states
from realtime_avatar.whisper_weights import load_whisper

log = logging.getLogger(__name__)

PARITY_MAX_ABS = 1e-3  # hidden states reach ~|100| in the last block; measured differences ~1.5e-5
CHECK_WINDOWS = (50, 100)  # features: 1 s and 2 s windows


class EncoderBody(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, mel: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.stack(encoder_states(self.encoder, mel, positions, layout=None), dim=2)


def max_difference(encoder, runner: OnnxEncoderRunner, features: int) -> float:
    generator = torch.Generator().manual_seed(features)
    mel = torch.randn(2, encoder.conv1.in_channels, 2 * features, generator=generator)
    positions = torch.stack([encoder.positional_embedding[o : o + features] for o in (0, 7)])
    with torch.inference_mode():
        reference = torch.stack(encoder_states(encoder, mel, positions, layout=None), dim=2)
    return float((runner(mel, positions) - reference).abs().max())


def build_encoder_onnx(whisper: str | Path = "tiny.en", engines_dir: Path | None = None, force: bool = False) -> Path:
    """Export, check and place the graph; returns its path. Raises RuntimeError when the graph
    disagrees with torch (nothing written)."""
    encoder = load_whisper(whisper).encoder.eval()
    root = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    path = onnx_encoder_path(root, encoder_fingerprint(encoder))
    if path.is_file() and not force:
        log.info("encoder graph already built: %s", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    features = CHECK_WINDOWS[0]
    mel = torch.zeros(1, encoder.conv1.in_channels, 2 * features)
    positions = encoder.positional_embedding[:features].unsqueeze(0).detach().clone()
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                EncoderBody(encoder), (mel, positions), str(tmp), input_names=["mel", "positions"],
                output_names=["states"], opset_version=17, dynamo=False,
                dynamic_axes={"mel": {0: "batch", 2: "mel_frames"}, "positions": {0: "batch", 1: "features"},
                              "states": {0: "batch", 1: "features"}},
            )  # fmt: skip
        runner = OnnxEncoderRunner(tmp)
        worst = max(max_difference(encoder, runner, n) for n in CHECK_WINDOWS)
        if worst > PARITY_MAX_ABS:
            raise RuntimeError(f"ONNX encoder differs from torch by {worst:.2e} (> {PARITY_MAX_ABS:g}): not installed")
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("encoder graph built in %.1f s (max |difference| vs torch %.1e): %s", time.perf_counter() - t0, worst, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--whisper", default="tiny.en", help="Whisper model name or checkpoint path (default tiny.en)")
    parser.add_argument("--engines", type=Path, default=None,
                        help="engines folder (default: $REALTIME_AVATAR_ENGINES, the checkout's engines/, or the cache)")
    parser.add_argument("--force", action="store_true", help="build again even when the graph exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(build_encoder_onnx(args.whisper, args.engines, args.force))
    except RuntimeError as exc:
        print(f"python -m export.encoder_onnx: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
