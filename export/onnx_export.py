"""Export a renderer model's per-frame render graph to ONNX (build time).

The render graph is what the real-time loop runs for every frame:

    latents [N, 2C, 32, 32] float32  (masked then reference latents)
    audio   [N, 50, 384]    float32  (frame windows before positional encoding)
        -> UNet (audio positional encoding inside, single step) -> latent decoder
    images  [N, 3, 256, 256] float32 in the family's own output range

The output stays in the family's range (compact: BGR in [0, 1]; MuseTalk: RGB in [-1, 1]) so
that the run time turns it into uint8 with the family's own function: an engine then rounds
exactly as the torch model does, and the accuracy gate compares like with like.

The graph itself is `realtime_avatar.engine_gate.render_graph` (the run time needs it too: it
is the accuracy gate's torch reference). The batch dimension is dynamic; TensorRT turns it into
a static profile when it builds an engine from this file (export/engine_build.py, driven by
export/build_engines.py or by select_or_build on first use). We use the TorchScript exporter
(`dynamo=False`, opset 17): the dynamo exporter needs onnxscript, which we do not install.
fp16 files are made from the fp32 export with onnxruntime's float16 converter, keeping
float32 inputs and outputs so that every engine has the same interface.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from realtime_avatar.engines import (
    INPUT_AUDIO,
    INPUT_LATENTS,
    ONNX_OPSET,
    OUTPUT_IMAGES,
    PRECISIONS,
    example_inputs,
    render_graph,
)
from realtime_avatar.models.base import RendererModel

# protobuf cannot serialise a message over 2 GiB: bigger models (the full MuseTalk UNet is
# 3.4 GB in fp32) keep their weights in one external file next to model.onnx
PROTOBUF_LIMIT_BYTES = 2**31 - 1
INLINE_LIMIT_BYTES = int(PROTOBUF_LIMIT_BYTES * 0.9)  # weights above this go external: the graph adds some
EXTERNAL_DATA_SUFFIX = ".data"
EXPORT_BATCH = 2  # batch of the example inputs traced (any > 1, so no size-1 special cases)


class ExportError(RuntimeError):
    """The model could not be exported, or the exported file is not a valid ONNX model."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    precision: str
    opset: int
    external_data: bool  # weights in path + ".data" (models over 2 GiB)
    seconds: float
    torch_version: str
    onnx_version: str


def _cpu_float32(graph: nn.Module) -> nn.Module:
    """The graph as the exporter wants it: float32 on CPU, contiguous weights, eval mode.
    A copy only when needed (the full MuseTalk UNet is 3.4 GB)."""
    tensors = [*graph.parameters(), *graph.buffers()]
    needs_copy = any(
        t.device.type != "cpu"
        or (t.is_floating_point() and t.dtype != torch.float32)
        or not t.is_contiguous()
        for t in tensors
    )
    if needs_copy:
        graph = copy.deepcopy(graph).to("cpu", torch.float32, memory_format=torch.contiguous_format)
    return graph.eval()


# ------------------------------------------------------------------------------------ export


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        n = 1
        for d in tensor.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def save_onnx(model: onnx.ModelProto, path: Path, inline_limit: int = INLINE_LIMIT_BYTES) -> bool:
    """Save `model` at `path`, its weights in one `<name>.data` file next to it when they
    exceed `inline_limit` bytes. Returns whether external data was used."""
    external = _tensor_bytes(model) > inline_limit
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + EXTERNAL_DATA_SUFFIX,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return external


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, float32 inputs/outputs (Cast nodes at the edges).

    The converter keeps the ops it lists as unsafe in fp16 (e.g. Resize scales) in float32,
    and appends its edge casts at the end of the node list: the graph is sorted again so that
    it is valid ONNX (onnx.checker and TensorRT's parser need topological order).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
    converted.topological_sort(is_deterministic=True)
    return converted.model


def export_onnx(
    model: RendererModel,
    path: str | Path,
    *,
    precision: str = "fp32",
    opset: int = ONNX_OPSET,
) -> ExportResult:
    """Export `model`'s render graph to `path` (a `.onnx` file) with a dynamic batch.

    precision "fp32" or "fp16" (fp16 weights and compute for GPUs; inputs/outputs stay
    float32). Checks the file with onnx.checker before returning.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    graph = _cpu_float32(render_graph(model))
    latents, audio = example_inputs(model, EXPORT_BATCH)
    dynamic = {0: "batch"}
    # torch writes one external file per tensor for models over 2 GiB: export into a scratch
    # folder, then save the final file (and at most one .data file) where it belongs
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        scratch_path = Path(scratch) / "graph.onnx"
        try:
            # diffusers asserts and branches on shapes: the tracer warns about each one; they
            # hold for every batch (the latent size is fixed), so the warnings are noise. The
            # TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript:
            # chosen on purpose, so its deprecation warnings are silenced here too.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    graph,
                    (latents, audio),
                    str(scratch_path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_LATENTS, INPUT_AUDIO],
                    output_names=[OUTPUT_IMAGES],
                    dynamic_axes={INPUT_LATENTS: dynamic, INPUT_AUDIO: dynamic, OUTPUT_IMAGES: dynamic},
                    do_constant_folding=True,
                )
        except Exception as exc:  # the exporter raises many types; say which model failed
            raise ExportError(f"ONNX export of {model.model_id} failed: {type(exc).__name__}: {exc}") from exc
        proto = onnx.load_model(str(scratch_path), load_external_data=True)
        if precision == "fp16":
            proto = to_float16(proto)
        external = save_onnx(proto, path)
    try:
        onnx.checker.check_model(str(path))  # path form: works with external data too
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: exported ONNX model is invalid: {exc}") from exc
    return ExportResult(
        path=path,
        precision=precision,
        opset=opset,
        external_data=external,
        seconds=time.perf_counter() - start,
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
    )
