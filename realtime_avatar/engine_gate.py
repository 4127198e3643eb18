"""The render graph an engine is made from, and the accuracy gate every engine must pass.

An engine (ONNX Runtime, TensorRT, a compiled torch step) runs the per-frame render graph of a
model: latents [N,2C,32,32] + audio windows [N,50,384] -> float images [N,3,256,256] in the
family's own range. The gate renders fixed seeded inputs with the engine and with the torch
model and compares the uint8 patches (max abs error, PSNR, SNR); an engine below the
thresholds of its precision is refused (a known trap: a wide-batch fp16 TensorRT engine that
renders a grey face). Used at run time (engines.py checks every engine it loads) and at build
time (export/ exports this graph).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .models.base import RendererModel
from .timing import AUDIO_TOKENS, WHISPER_DIM

PRECISIONS = ("fp32", "fp16")
INPUT_LATENTS = "latents"  # [N, 2C, 32, 32] float32
INPUT_AUDIO = "audio"  # [N, 50, 384] float32, before positional encoding
OUTPUT_IMAGES = "images"  # [N, 3, 256, 256] float32 in the family's output range
GATE_SEED = 0
GATE_BATCH = 2  # frames the gate renders for a dynamic-batch engine (static: the profile)
UINT8_PEAK = 255.0


@dataclass(frozen=True)
class GateThreshold:
    min_psnr_db: float  # PSNR of the engine's uint8 patches against the torch model's
    min_snr_db: float  # the same error against the reference's own variance (see below)
    max_abs_error: int  # largest per-pixel difference allowed, in uint8 levels


# fp32 engines differ from torch only by summation order: a pixel may round the other way,
# PSNR stays far above 45 dB. fp16 is a real precision loss but still invisible at >= 30 dB.
# PSNR alone is blind to low-contrast output: against a reference of std 3 levels (a random
# decoder), a flat grey engine scores ~38 dB. SNR (reference variance / error) is ~0 dB for
# any flat output, whatever the reference: the grey-face failure cannot pass it.
GATE_THRESHOLDS = {"fp32": GateThreshold(45.0, 30.0, 16), "fp16": GateThreshold(30.0, 15.0, 96)}


class EngineError(RuntimeError):
    """Base of the errors of this module."""


class BackendUnavailable(EngineError):
    """The backend cannot run on this machine (library missing, no GPU, no engine built)."""


class EngineRejected(EngineError):
    """An engine failed the accuracy gate: it renders patches too unlike the torch model's."""


class EngineBuildError(EngineError):
    """Exporting or building an engine failed."""


# ------------------------------------------------------------------------------ render graph


class MuseTalkRenderGraph(nn.Module):
    """MuseTalk's render() without the uint8 conversion: PE -> UNet at t=0 -> VAE decode.

    The timestep is a buffer of shape [1]; diffusers expands it to the batch inside, which the
    ONNX tracer records as a shape-dependent expand, so the batch stays dynamic.
    """

    def __init__(self, model: RendererModel):
        super().__init__()
        self.unet = model.unet
        self.vae = model.vae
        self.pe = model.pe
        self.register_buffer("timestep", model.timestep.clone(), persistent=False)
        self.scaling_factor = model.scaling_factor

    def forward(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        tokens = self.pe(audio.float()).to(latents.dtype)
        predicted = self.unet(latents, self.timestep, encoder_hidden_states=tokens).sample
        return self.vae.decode(predicted / self.scaling_factor).sample


def render_graph(model: RendererModel) -> nn.Module:
    """The torch module that computes `model`'s float render output (the graph engines are
    built from): compact -> its render_graph() (rows above model.rows_from left at 0);
    musetalk -> MuseTalkRenderGraph (every row: its VAE decoder is not local)."""
    if model.model_id.startswith("compact"):
        return model.render_graph()
    if model.model_id.startswith("musetalk"):
        return MuseTalkRenderGraph(model)
    raise EngineBuildError(
        f"no render graph for model family {model.model_id!r}: engines support compact and "
        "musetalk models; use --backend torch"
    )


def output_to_patches(model: RendererModel) -> Callable[[torch.Tensor], np.ndarray]:
    """The family's own float-output -> [N,256,256,3] uint8 BGR conversion."""
    if model.model_id.startswith("compact"):
        from .models.compact import tensor_to_crops

        return tensor_to_crops
    if model.model_id.startswith("musetalk"):
        from .models.musetalk import vae_output_to_crops

        return vae_output_to_crops
    raise EngineBuildError(f"no output conversion for model family {model.model_id!r}")


def _graph_device_dtype(graph: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = next(p for p in graph.parameters() if p.is_floating_point())
    return weight.device, weight.dtype


@torch.no_grad()
def reference_render(model: RendererModel, latents: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
    """The torch model's patches for the gate: its render graph at the dtype its weights are
    held in, without autocast (for fp32 weights this is exactly model.render)."""
    graph = render_graph(model)
    device, dtype = _graph_device_dtype(graph)
    images = graph(latents.to(device, dtype), audio.to(device, torch.float32))
    return output_to_patches(model)(images)


def example_inputs(model: RendererModel, batch: int, seed: int = GATE_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded standard-normal latents [batch,2C,h,w] and audio windows [batch,50,384] (CPU).

    Cached latents of both families are roughly unit-variance (MuseTalk scales its VAE latents
    by 0.18215 for that), and Whisper hidden states are of order 1, so these exercise the
    graph in the range real inputs take.
    """
    generator = torch.Generator().manual_seed(seed)
    size, channels = model.latent_size, 2 * model.latent_channels
    latents = torch.randn(batch, channels, size, size, generator=generator)
    audio = torch.randn(batch, AUDIO_TOKENS, WHISPER_DIM, generator=generator)
    return latents, audio


# ------------------------------------------------------------------------------ accuracy gate


@dataclass(frozen=True)
class GateResult:
    passed: bool
    precision: str
    batch: int
    seed: int
    max_abs_error: int  # uint8 levels
    mean_abs_error: float
    psnr_db: float | None  # None: the patches are identical (infinite PSNR and SNR)
    snr_db: float | None
    min_psnr_db: float
    min_snr_db: float
    max_abs_allowed: int
    seconds: float

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        if self.psnr_db is None:
            quality = "identical patches"
        else:
            quality = (
                f"PSNR {self.psnr_db:.1f} dB (need >= {self.min_psnr_db:g}), SNR {self.snr_db:.1f} dB "
                f"(need >= {self.min_snr_db:g})"
            )
        return (
            f"accuracy gate {verdict} ({self.precision}, {self.batch} patches): {quality}, max abs "
            f"error {self.max_abs_error} (allowed {self.max_abs_allowed}), mean {self.mean_abs_error:.3f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PatchMetrics:
    max_abs_error: int  # uint8 levels
    mean_abs_error: float
    psnr_db: float | None  # 10 log10(255^2 / MSE); None when identical
    snr_db: float | None  # 10 log10(var(reference) / MSE); None when identical


def patch_metrics(reference: np.ndarray, candidate: np.ndarray) -> PatchMetrics:
    """Error of uint8 `candidate` patches against `reference` ones."""
    if reference.shape != candidate.shape:
        raise ValueError(f"patch shapes differ: {reference.shape} vs {candidate.shape}")
    diff = reference.astype(np.int16) - candidate.astype(np.int16)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    if mse == 0.0:
        psnr = snr = None
    else:
        psnr = 10.0 * math.log10(UINT8_PEAK**2 / mse)
        variance = float(reference.astype(np.float64).var())
        snr = 10.0 * math.log10(max(variance, 1e-6) / mse)  # a flat reference: very low
    return PatchMetrics(int(np.abs(diff).max()), float(np.abs(diff).mean()), psnr, snr)


def judge(metrics: PatchMetrics, precision: str) -> bool:
    threshold = GATE_THRESHOLDS[precision]
    if metrics.psnr_db is None:
        return True
    return (
        metrics.psnr_db >= threshold.min_psnr_db
        and metrics.snr_db >= threshold.min_snr_db
        and metrics.max_abs_error <= threshold.max_abs_error
    )


class EngineRunner(Protocol):
    """An engine's forward pass: float32 latents [N,2C,h,w] and audio [N,50,384] (numpy) ->
    float32 images [N,3,256,256] in the family's output range."""

    description: str

    def __call__(self, latents: np.ndarray, audio: np.ndarray) -> np.ndarray: ...


def accuracy_gate(model: RendererModel, run: EngineRunner, precision: str, batch: int = GATE_BATCH) -> GateResult:
    """Render GATE_SEED inputs with the engine and the torch model; compare the uint8 patches."""
    start = time.perf_counter()
    latents, audio = example_inputs(model, batch)
    reference = reference_render(model, latents, audio)
    try:
        images = run(latents.numpy(), audio.numpy())
    except Exception as exc:  # noqa: BLE001 - e.g. an op without a kernel for this provider
        raise EngineBuildError(f"{run.description}: the engine failed to run ({type(exc).__name__}: {exc})") from exc
    if images.shape[0] != batch or images.dtype != np.float32:
        raise EngineBuildError(f"{run.description}: engine output is {images.dtype} {images.shape}, "
                               f"expected float32 [{batch},3,256,256]")
    candidate = output_to_patches(model)(torch.from_numpy(images))
    metrics = patch_metrics(reference, candidate)
    threshold = GATE_THRESHOLDS[precision]
    return GateResult(
        passed=judge(metrics, precision),
        precision=precision,
        batch=batch,
        seed=GATE_SEED,
        max_abs_error=metrics.max_abs_error,
        mean_abs_error=round(metrics.mean_abs_error, 6),
        psnr_db=None if metrics.psnr_db is None else round(metrics.psnr_db, 2),
        snr_db=None if metrics.snr_db is None else round(metrics.snr_db, 2),
        min_psnr_db=threshold.min_psnr_db,
        min_snr_db=threshold.min_snr_db,
        max_abs_allowed=threshold.max_abs_error,
        seconds=round(time.perf_counter() - start, 3),
    )

