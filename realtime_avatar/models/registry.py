"""Pick and load a renderer model family from a spec string.

    "default"                         our compact model, trained weights shipped in assets/
    "compact:/path/to/file.safetensors"
    "musetalk-v15:/path/to/dir"       a directory laid out as the official MuseTalk release

It also holds what every family shares: `ModelLoadError` and the strict key/shape check that
produces it, the weights hash that avatar caches and engines are keyed by, and the input
checks of encode()/render().
Families are imported lazily: loading the compact model never imports diffusers.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from realtime_avatar.models.base import PATCH_SIZE, RendererModel
from realtime_avatar.timing import AUDIO_TOKENS, WHISPER_DIM

log = logging.getLogger(__name__)

DEFAULT_COMPACT_WEIGHTS = (
    Path(__file__).resolve().parent.parent / "assets" / "models" / "compact-default.safetensors"
)
FAMILIES = ("musetalk-v15", "compact")
HASH_CHARS = 16  # hex digits of sha256 kept: 64 bits, plenty to key caches by


class ModelLoadError(RuntimeError):
    """A checkpoint is missing, malformed, or does not fit the architecture it is loaded into."""


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    loaded: Mapping[str, torch.Tensor],
    source: str | Path,
) -> None:
    """Raise ModelLoadError naming `source` unless `loaded` has exactly the keys and shapes
    of `expected`. Lists every missing key, unexpected key and shape mismatch at once, so a
    user with a wrong or truncated file sees the whole picture in one message."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = sorted(
        f"{key}: file has {tuple(loaded[key].shape)}, model expects {tuple(expected[key].shape)}"
        for key in set(expected) & set(loaded)
        if tuple(loaded[key].shape) != tuple(expected[key].shape)
    )
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source}: the weights do not fit the model architecture."]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items)
    lines.append("  Check that the file belongs to this model family and was not truncated.")
    raise ModelLoadError("\n".join(lines))


def state_dict_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Short sha256 over names, dtypes, shapes and bytes, in sorted key order.

    Call it on the weights as stored (float32 on CPU), before any cast to fp16/bf16, so the
    hash names the checkpoint and not the precision it happens to run at.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # hashed through a uint8 view, without a copy: works for every dtype (numpy has no
        # bfloat16) and for the mmapped tensors of a freshly loaded checkpoint
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:HASH_CHARS]


def check_crops(crops_bgr: np.ndarray) -> None:
    """Shared by both families: clear error for crops that do not fit encode()."""
    if (
        not isinstance(crops_bgr, np.ndarray)
        or crops_bgr.dtype != np.uint8
        or crops_bgr.ndim != 4
        or crops_bgr.shape[1:] != (PATCH_SIZE, PATCH_SIZE, 3)
    ):
        got = (
            f"{type(crops_bgr).__name__} {getattr(crops_bgr, 'dtype', '')} "
            f"{tuple(getattr(crops_bgr, 'shape', ()))}"
        )
        raise ValueError(
            f"face crops must be a uint8 BGR array [N,{PATCH_SIZE},{PATCH_SIZE},3], got {got}; "
            "avatar preparation resizes each crop to 256x256 before encoding"
        )


def check_render_inputs(latents: torch.Tensor, audio: torch.Tensor, latent_channels: int, latent_size: int) -> None:
    """Shared by both families: clear errors for tensors that do not fit render()."""
    want_latents = (2 * latent_channels, latent_size, latent_size)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != want_latents:
        raise ValueError(
            f"latents must be [N,{','.join(map(str, want_latents))}] (masked then reference "
            f"latents concatenated on channels), got {tuple(latents.shape)}"
        )
    if audio.ndim != 3 or tuple(audio.shape[1:]) != (AUDIO_TOKENS, WHISPER_DIM):
        raise ValueError(
            f"audio must be [N,{AUDIO_TOKENS},{WHISPER_DIM}] frame windows (before positional "
            f"encoding), got {tuple(audio.shape)}"
        )
    if latents.shape[0] != audio.shape[0]:
        raise ValueError(f"batch sizes differ: {latents.shape[0]} latents, {audio.shape[0]} audio windows")


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
