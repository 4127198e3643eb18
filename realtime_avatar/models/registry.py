"""Pick and load a renderer model family from a spec string.

    "default"                         our compact model, trained weights shipped in assets/
    "compact:/path/to/file.safetensors"
    "musetalk-v15:/path/to/dir"       a directory laid out as the official MuseTalk release

What every family shares (`ModelLoadError`, the strict key/shape check, the weights hash, the
input checks) lives in base.py; `ModelLoadError` and `state_dict_hash` are re-exported here.
Families are imported lazily: loading the compact model never imports diffusers.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from realtime_avatar.models.base import HASH_CHARS, ModelLoadError, RendererModel, state_dict_hash  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_COMPACT_WEIGHTS = (
    Path(__file__).resolve().parent.parent / "assets" / "models" / "compact-default.safetensors"
)
FAMILIES = ("musetalk-v15", "compact")


@dataclass(frozen=True)
class ModelSpec:
    family: str  # one of FAMILIES
    path: Path | None  # None for "default": the shipped compact weights


def parse_spec(spec: str) -> ModelSpec:
    """'default' | 'compact:<file>' | 'musetalk-v15:<dir>' -> ModelSpec."""
    spec = spec.strip()
    if spec == "default":
        return ModelSpec("compact", None)
    family, sep, path = spec.partition(":")
    if not sep or family not in FAMILIES or not path:
        raise ValueError(
            f"bad model spec {spec!r}: use 'default', 'compact:/path/to/file.safetensors' "
            "or 'musetalk-v15:/path/to/release/dir'"
        )
    return ModelSpec(family, Path(path).expanduser())


def load_model(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    allow_random: bool = False,
) -> RendererModel:
    """Load the renderer model named by `spec` onto `device`.

    allow_random: only for "default" while no trained weights are shipped: return a randomly
    initialised compact model (it renders noise-like mouths) instead of raising. Meant for
    plumbing tests and demos of the pipeline, never for real use.
    """
    parsed = parse_spec(spec)
    if parsed.family == "musetalk-v15":
        from realtime_avatar.models.musetalk import load_musetalk_v15

        return load_musetalk_v15(parsed.path, device=device)

    from realtime_avatar.models.compact import CompactModel

    if parsed.path is not None:
        return CompactModel.load(parsed.path, device=device)
    if DEFAULT_COMPACT_WEIGHTS.is_file():
        return CompactModel.load(DEFAULT_COMPACT_WEIGHTS, device=device)
    if not allow_random:
        raise ModelLoadError(
            f"the default compact model weights are not installed ({DEFAULT_COMPACT_WEIGHTS} "
            "is missing). Train them (or copy a trained file there), or pick a model with "
            "'compact:/path/to/file.safetensors' or 'musetalk-v15:/path/to/dir'."
        )
    message = (
        f"RANDOM WEIGHTS: {DEFAULT_COMPACT_WEIGHTS} is missing, so the default model is "
        "randomly initialised. Its mouths are meaningless; use it only to test the pipeline."
    )
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    log.warning(message)
    return CompactModel.random(device=device)
