"""Engines: ONNX export of the render graph, ONNX Runtime backend, accuracy gate, engine
cache and backend selection.

Real components throughout: the compact model at its real size (random init, seeded), a
MuseTalk v1.5 UNet + VAE of the release's block structure at reduced width, real ONNX
exports run by onnxruntime. The gate is shown to refuse an engine whose weights were
perturbed on disk. TensorRT cannot run here (no GPU): its error path is tested.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.engine_build import select_or_build
from export.onnx_export import export_onnx
from realtime_avatar.engines import (
    ENGINES_ENV,
    GATE_THRESHOLDS,
    INPUT_AUDIO,
    INPUT_LATENTS,
    MANIFEST_NAME,
    ONNX_FILE,
    OUTPUT_IMAGES,
    BackendModel,
    BackendUnavailable,
    EngineBuildError,
    EngineManifest,
    EngineRejected,
    OnnxRuntimeRunner,
    accuracy_gate,
    default_engines_dir,
    example_inputs,
    judge,
    patch_metrics,
    reference_render,
    select_backend,
    tensorrt_unavailable_reason,
)
from realtime_avatar.engine_runners import MAX_CPU_SHARDS, batch_parts, cpu_shards
from realtime_avatar.models.base import BLEND_ROWS_FROM, RendererModel
from realtime_avatar.models.compact import CompactConfig, CompactModel, CompactNet

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------- helpers


def assert_matches_torch(model: RendererModel, engine: BackendModel, batch: int, seed: int) -> None:
    """The engine's uint8 patches against the torch model's render() on fresh inputs, on the
    rows the engine's graph draws (the rows above its rows_from are black)."""
    latents, audio = example_inputs(model, batch, seed=seed)
    rows = getattr(model, "rows_from", 0)
    expected = model.render(latents, audio)
    got = engine.render(latents, audio)
    assert got.shape == expected.shape == (batch, 256, 256, 3) and got.dtype == np.uint8
    assert not got[:, :rows].any()
    expected, got = expected[:, rows:], got[:, rows:]
    metrics = patch_metrics(expected, got)
    assert metrics.max_abs_error <= 1, f"batch {batch}: max abs error {metrics.max_abs_error} levels"
    assert metrics.psnr_db is None or metrics.psnr_db >= GATE_THRESHOLDS["fp32"].min_psnr_db
    assert expected.std() > 20  # the comparison is between contrasty images, not flat fields


def engine_folder(root: Path, model: RendererModel, name: str | None = None) -> Path:
    rows = getattr(model, "rows_from", 0)
    name = name or "onnx-fp32-bdyn" + (f"-rows{rows}" if rows else "")
    return root / f"{model.model_id}-{model.weights_hash()[:12]}" / name


def copy_engines(source_root: Path, model: RendererModel, target_root: Path) -> Path:
    """Copy the model's engines to another engines root; returns its ONNX engine folder there."""
    model_dir = engine_folder(source_root, model).parent
    shutil.copytree(model_dir, target_root / model_dir.name)
    return engine_folder(target_root, model)


def file_identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def perturb_last_conv(onnx_path: Path, seed: int = 0) -> None:
    """Add noise (3x the weights' own spread) to the last Conv's weights, in place on disk."""
    proto = onnx.load(str(onnx_path))
    initializers = {init.name: init for init in proto.graph.initializer}
    last_conv = [node for node in proto.graph.node if node.op_type == "Conv"][-1]
    init = initializers[last_conv.input[1]]
    weights = numpy_helper.to_array(init)
    noise = np.random.default_rng(seed).normal(0, 3 * weights.std(), weights.shape).astype(weights.dtype)
    init.CopyFrom(numpy_helper.from_array(weights + noise, init.name))
    onnx.save(proto, str(onnx_path))


# --------------------------------------------------------------------------------- fixtures


def contrasty_compact(seed: int) -> CompactModel:
    """A compact model at its real size with random weights. PyTorch's default init makes
    the decoder output a near-flat grey (std ~3 levels); its last conv is scaled up so that
    patches span most of the uint8 range (std ~30), like faces, and errors show."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = CompactNet(CompactConfig())
    torch.random.set_rng_state(generator_state)
    last_conv = [m for m in net.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last_conv.weight.mul_(60.0)
    return CompactModel(net, notes={"purpose": "engine tests"})


@pytest.fixture(scope="module")
def compact() -> CompactModel:
    return contrasty_compact(seed=0)


@pytest.fixture(scope="module")
def engines_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def compact_onnx(compact, engines_root) -> BackendModel:
    return select_or_build(compact, "onnx", engines_root)


@pytest.fixture(scope="module")
def musetalk():
    from realtime_avatar.models.musetalk import (
        MUSETALK_V15_UNET_CONFIG,
        SD_VAE_FT_MSE_CONFIG,
        MuseTalkModel,
        build_unet,
        build_vae,
    )

    # the release's blocks, layers and attention (same key names), narrower: as in
    # test_models_musetalk.py, where the full size is shown to load
    unet_config = MUSETALK_V15_UNET_CONFIG | {"block_out_channels": [32, 64, 64, 64]}
    vae_config = SD_VAE_FT_MSE_CONFIG | {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8}
    torch.manual_seed(0)
    return MuseTalkModel(build_unet(unet_config), build_vae(vae_config))


# ------------------------------------------------------------------------------ pure parts


def test_patch_metrics_psnr_and_errors():
    reference = np.full((2, 4, 4, 3), 100, np.uint8)
    identical = patch_metrics(reference, reference.copy())
    assert (identical.max_abs_error, identical.psnr_db, identical.snr_db) == (0, None, None)
    candidate = reference.copy()
    candidate[0, 0, 0, 0] = 110  # one value of 96 off by 10: MSE = 100/96
    metrics = patch_metrics(reference, candidate)
    assert metrics.max_abs_error == 10 and metrics.mean_abs_error == pytest.approx(10 / 96)
    assert metrics.psnr_db == pytest.approx(10 * np.log10(255**2 / (100 / 96)))
    dark = np.zeros_like(reference)  # uint8 wrap-around must not hide errors
    assert patch_metrics(reference, dark).max_abs_error == 100
    with pytest.raises(ValueError, match="shapes differ"):
        patch_metrics(reference, reference[:1])


def test_snr_catches_a_flat_grey_output_that_psnr_lets_through():
    # a low-contrast reference (std ~3 levels, a random decoder's) and a flat grey answer
    reference = np.random.default_rng(0).normal(128, 3, (2, 64, 64, 3)).round().astype(np.uint8)
    grey = np.full_like(reference, 128)
    metrics = patch_metrics(reference, grey)
    assert metrics.psnr_db > GATE_THRESHOLDS["fp16"].min_psnr_db  # PSNR alone would pass it
    assert metrics.snr_db < 1.0
    assert not judge(metrics, "fp16") and not judge(metrics, "fp32")
    close = reference.copy()  # 5% of the values rounded the other way: what fp16 does
    flips = np.random.default_rng(1).random(reference.shape) < 0.05
    close[flips] += 1
    assert judge(patch_metrics(reference, close), "fp16")


def test_reference_render_is_the_models_own_render(compact):
    """Exactly the model's render() on the rows the graph draws (BLEND_ROWS_FROM on), black
    above; with rows_from 0 the whole patch."""
    latents, audio = example_inputs(compact, 2, seed=7)
    rows = compact.rows_from
    assert rows == BLEND_ROWS_FROM
    reference, own = reference_render(compact, latents, audio), compact.render(latents, audio)
    np.testing.assert_array_equal(reference[:, rows:], own[:, rows:])
    assert not reference[:, :rows].any() and own[:, :rows].std() > 20
    every_row = CompactModel(compact.net, rows_from=0)
    np.testing.assert_array_equal(reference_render(every_row, latents, audio), own)


# ------------------------------------------------------------------------- ONNX Runtime: compact


def test_onnx_matches_torch_compact_at_batch_1_and_4(compact, compact_onnx):
    assert compact_onnx.backend_name == "onnx"
    assert compact_onnx.runner.active_providers == ["CPUExecutionProvider"]
    for batch, seed in ((1, 11), (4, 12)):  # one engine, dynamic batch
        assert_matches_torch(compact, compact_onnx, batch, seed)


def test_batch_parts_split_a_batch_into_contiguous_near_equal_parts():
    assert batch_parts(8, 2) == [(0, 4), (4, 8)]
    assert batch_parts(7, 2) == [(0, 4), (4, 7)]
    assert batch_parts(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert batch_parts(1, 2) == [(0, 1)]  # fewer frames than shards: the whole-core session
    assert batch_parts(8, 1) == [(0, 8)] and batch_parts(0, 2) == [(0, 0)]
    with pytest.raises(ValueError, match="shards >= 1"):
        batch_parts(4, 0)
    assert [cpu_shards(t) for t in (1, 2, 3, 16)] == [1, 2, 3, MAX_CPU_SHARDS]


def test_a_sharded_cpu_runner_gives_the_whole_batch_runners_numbers(compact, compact_onnx, engines_root):
    path = engine_folder(engines_root, compact) / ONNX_FILE
    whole = OnnxRuntimeRunner(path, threads=2, shards=1)
    sharded = OnnxRuntimeRunner(path, threads=3)  # 3 one-thread sessions: uneven parts too
    assert (whole.shards, sharded.shards) == (1, 3) and "3 shards x 1 thread" in sharded.description
    try:
        for batch, seed in ((1, 21), (2, 22), (7, 23)):
            latents, audio = (t.numpy() for t in example_inputs(compact, batch, seed=seed))
            expected, got = whole(latents, audio), sharded(latents, audio)
            assert got.shape == expected.shape and len(got) == batch
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
            assert np.abs(expected).max() > 0.1  # real images, not zeros
        # frames are computed each on its own: swapping the batch's halves swaps the output's
        latents, audio = (t.numpy() for t in example_inputs(compact, 6, seed=24))
        order = [3, 4, 5, 0, 1, 2]
        np.testing.assert_allclose(sharded(latents[order], audio[order]), sharded(latents, audio)[order],
                                   rtol=0, atol=1e-5)
    finally:
        sharded.close()
        sharded.close()  # idempotent
    assert sharded._pool is None


def test_backend_model_keeps_the_wrapped_models_identity(compact, compact_onnx):
    assert isinstance(compact_onnx, RendererModel)
    assert compact_onnx.model_id == compact.model_id
    assert compact_onnx.weights_hash() == compact.weights_hash()
    assert (compact_onnx.latent_channels, compact_onnx.latent_size) == (compact.latent_channels, compact.latent_size)
    assert compact_onnx.notes == {"purpose": "engine tests"}
    crops = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    torch.testing.assert_close(compact_onnx.encode(crops), compact.encode(crops), rtol=0, atol=0)
    with pytest.raises(ValueError, match="latents must be"):
        compact_onnx.render(torch.zeros(1, 3, 32, 32), torch.zeros(1, 50, 384))


def test_manifest_records_what_the_engine_is(compact, compact_onnx, engines_root):
    folder = engine_folder(engines_root, compact)
    assert compact_onnx.engine_dir == folder
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["model_id"] == "compact-v1" and manifest["weights_hash"] == compact.weights_hash()
    assert (manifest["backend"], manifest["precision"], manifest["batch_profile"]) == ("onnx", "fp32", "dyn")
    assert manifest["opset"] == 17 and manifest["onnxruntime_version"] and manifest["created"]
    assert manifest["gate"]["passed"] and manifest["gate"]["max_abs_error"] <= 1
    graph = onnx.load(str(folder / ONNX_FILE)).graph
    assert [i.name for i in graph.input] == [INPUT_LATENTS, INPUT_AUDIO]
    assert [o.name for o in graph.output] == [OUTPUT_IMAGES]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic


def test_second_call_reuses_the_cached_engine(compact, compact_onnx, engines_root):
    folder = engine_folder(engines_root, compact)
    before = file_identity(folder / ONNX_FILE), (folder / MANIFEST_NAME).read_text()
    again = select_backend(compact, "onnx", engines_root)
    assert (file_identity(folder / ONNX_FILE), (folder / MANIFEST_NAME).read_text()) == before
    assert again.gate.passed  # the gate runs on every load, not only at build
    assert_matches_torch(compact, again, 2, seed=13)


def test_engine_is_rebuilt_when_the_weights_or_onnxruntime_change(compact, compact_onnx, engines_root, tmp_path):
    # new weights -> new hash -> an engine of its own; the old one stays for the old weights
    changed = contrasty_compact(seed=1)
    assert changed.weights_hash() != compact.weights_hash()
    engine = select_or_build(changed, "onnx", engines_root)
    assert engine.engine_dir == engine_folder(engines_root, changed) != engine_folder(engines_root, compact)
    assert_matches_torch(changed, engine, 2, seed=14)

    # a manifest written by another onnxruntime version: rebuilt in place
    root = tmp_path / "engines"
    folder = copy_engines(engines_root, compact, root)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["onnxruntime_version"] = "1.0.0"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    old_file = file_identity(folder / ONNX_FILE)
    with pytest.raises(BackendUnavailable, match="built with onnxruntime 1.0.0"):
        select_backend(compact, "onnx", root)
    rebuilt = select_or_build(compact, "onnx", root)
    assert file_identity(folder / ONNX_FILE) != old_file
    assert EngineManifest.read(folder).onnxruntime_version == rebuilt.manifest.onnxruntime_version != "1.0.0"


def test_missing_engine_without_building_says_how_to_build(compact, tmp_path):
    with pytest.raises(BackendUnavailable, match="export.build_engines"):
        select_backend(compact, "onnx", tmp_path)
    assert select_backend(compact, "auto", tmp_path).backend_name == "torch"


# --------------------------------------------------------------------------- accuracy gate


def test_gate_refuses_an_engine_with_perturbed_weights(compact, compact_onnx, engines_root, tmp_path, caplog):
    root = tmp_path / "engines"
    folder = copy_engines(engines_root, compact, root)
    perturb_last_conv(folder / ONNX_FILE)

    gate = accuracy_gate(compact, OnnxRuntimeRunner(folder / ONNX_FILE), "fp32")
    assert not gate.passed
    assert gate.psnr_db < GATE_THRESHOLDS["fp32"].min_psnr_db and gate.max_abs_error > 16

    with pytest.raises(EngineRejected, match="accuracy gate FAILED"):
        select_backend(compact, "onnx", root)
    with caplog.at_level(logging.INFO, logger="realtime_avatar.engines"):
        fallback = select_backend(compact, "auto", root)
    assert fallback.backend_name == "torch" and "accuracy gate FAILED" in fallback.reason
    assert "renderer backend torch" in caplog.text

    # it passed its gate when built, so a damaged file is rebuilt when building is allowed
    repaired = select_or_build(compact, "onnx", root)
    assert repaired.gate.passed
    assert_matches_torch(compact, repaired, 1, seed=15)


def test_a_damaged_engine_file_is_refused_then_rebuilt(compact, compact_onnx, engines_root, tmp_path):
    root = tmp_path / "engines"
    folder = copy_engines(engines_root, compact, root)
    data = (folder / ONNX_FILE).read_bytes()
    (folder / ONNX_FILE).write_bytes(data[: len(data) // 2])  # an interrupted copy

    with pytest.raises(EngineBuildError, match="ONNX Runtime cannot load it"):
        select_backend(compact, "onnx", root)
    assert select_backend(compact, "auto", root).backend_name == "torch"
    rebuilt = select_or_build(compact, "onnx", root)
    assert rebuilt.gate.passed and (folder / ONNX_FILE).stat().st_size > len(data) // 2


def test_fp16_export_keeps_float32_io_and_passes_the_fp16_gate(compact, tmp_path):
    result = export_onnx(compact, tmp_path / "fp16.onnx", precision="fp16")
    proto = onnx.load(str(result.path))
    weight_types = {init.data_type for init in proto.graph.initializer if len(init.dims) == 4}
    assert weight_types == {onnx.TensorProto.FLOAT16}  # conv weights in half precision
    io_types = {v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    assert io_types == {onnx.TensorProto.FLOAT}
    assert result.path.stat().st_size < 0.6 * 4 * sum(p.numel() for p in compact.net.unet.parameters())
    gate = accuracy_gate(compact, OnnxRuntimeRunner(result.path), "fp16", batch=2)
    assert gate.passed, gate.describe()


def test_weights_over_the_inline_limit_go_to_one_external_file(compact, compact_onnx, tmp_path):
    # what a full-size MuseTalk export (3.4 GB, over protobuf's 2 GiB) does, at a small limit
    from export.onnx_export import save_onnx

    proto = onnx.load(str(compact_onnx.engine_dir / ONNX_FILE))
    target = tmp_path / ONNX_FILE
    assert save_onnx(proto, target, inline_limit=1_000_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ONNX_FILE, ONNX_FILE + ".data"]
    assert target.stat().st_size < 1_000_000 < (tmp_path / (ONNX_FILE + ".data")).stat().st_size
    gate = accuracy_gate(compact, OnnxRuntimeRunner(target), "fp32")
    assert gate.passed and gate.max_abs_error <= 1


# ------------------------------------------------------------------------ backend selection


def test_auto_picks_onnx_on_this_machine(compact, compact_onnx, engines_root, caplog):
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present: auto picks tensorrt there")
    with caplog.at_level(logging.INFO, logger="realtime_avatar.engines"):
        chosen = select_or_build(compact, "auto", engines_root)
    assert chosen.backend_name == "onnx" and chosen.gate.passed
    assert "tensorrt: TensorRT is not installed / no CUDA GPU" in chosen.reason
    assert "renderer backend onnx" in caplog.text and "CPUExecutionProvider" in caplog.text


def test_tensorrt_here_is_a_clear_error(compact, tmp_path):
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed / no CUDA GPU: use --backend onnx or torch"):
        select_or_build(compact, "tensorrt", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-built left behind


def test_engines_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENGINES_ENV, str(tmp_path / "elsewhere"))
    assert default_engines_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(ENGINES_ENV)
    checkout = Path(__file__).resolve().parent.parent
    assert default_engines_dir() == checkout / "engines"  # tests run from a source checkout


def test_torch_backend_is_the_model_itself(compact):
    chosen = select_or_build(compact, "torch")
    assert chosen.backend_name == "torch" and chosen.gate is None
    latents, audio = example_inputs(compact, 2, seed=16)
    np.testing.assert_array_equal(chosen.render(latents, audio), compact.render(latents, audio))
    with pytest.raises(ValueError, match="backend must be one of"):
        select_or_build(compact, "tensorrt-fp16")


# ------------------------------------------------------------------------- MuseTalk (reduced)


@pytest.mark.slow
def test_onnx_matches_torch_musetalk_reduced_width(musetalk, tmp_path):
    engine = select_or_build(musetalk, "onnx", tmp_path)
    assert engine.backend_name == "onnx" and engine.gate.passed

    latents, audio = example_inputs(musetalk, 1, seed=22)
    expected = musetalk.render(latents, audio)
    # the exported graph (PE -> UNet at t=0 -> VAE decode) is MuseTalk's render, exactly
    np.testing.assert_array_equal(reference_render(musetalk, latents, audio), expected)
    assert patch_metrics(expected, engine.render(latents, audio)).max_abs_error <= 1
    assert_matches_torch(musetalk, engine, 3, seed=23)  # dynamic batch


# ------------------------------------------------------------------------------ build CLI


def test_build_engines_cli_builds_gates_and_times_an_onnx_engine(tmp_path, capsys):
    from export.build_engines import main

    from realtime_avatar.models.compact import CompactModel

    weights = tmp_path / "random.safetensors"  # the shipped default would work too; this is quicker to gate
    CompactModel.random(seed=3).save(weights)
    argv = ["--model", f"compact:{weights}", "--backend", "onnx", "--batch", "1,2",
            "--engines-dir", str(tmp_path), "--seconds", "0.05", "--runs", "1"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert [row["batch"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["gate"]["passed"] and row["engine_patches_per_s"] > 0 and row["torch_patches_per_s"] > 0
    manifests = list(tmp_path.glob(f"{report['model']}-{report['weights_hash'][:12]}/onnx-fp32-bdyn*/manifest.json"))
    assert len(manifests) == 1 and manifests[0].parent.name == f"onnx-fp32-bdyn-rows{BLEND_ROWS_FROM}"
    assert json.loads(manifests[0].read_text())["extra"]["rows_from"] == BLEND_ROWS_FROM


def test_build_engines_cli_tensorrt_here_exits_with_a_clear_message(tmp_path, capsys):
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present")
    from export.build_engines import EXIT_UNAVAILABLE, main

    assert main(["--backend", "tensorrt", "--engines-dir", str(tmp_path)]) == EXIT_UNAVAILABLE
    assert "TensorRT is not installed / no CUDA GPU: use --backend onnx or torch" in capsys.readouterr().err


# ---------------------------------------------------------------------- with the renderer


def test_avatar_renderer_on_the_onnx_engine_gives_the_same_frames(runtime, tmp_path):
    from realtime_avatar.renderer import AvatarRenderer, silence_window

    engine = select_or_build(runtime.model, "auto", tmp_path)
    assert engine.backend_name == ("onnx" if tensorrt_unavailable_reason() else "tensorrt")
    runtime.avatar.check_model(engine)  # the avatar's latents are keyed by the same weights
    renderer = AvatarRenderer(engine, runtime.avatar, silence_window(runtime.encoder), batch_size=4)
    for i in range(runtime.avatar.num_frames):  # idle frames: rendered by the engine at start
        assert np.abs(renderer.idle_frame(i).astype(int) - runtime.renderer.idle_frame(i)).max() <= 1
    windows = np.random.default_rng(0).normal(size=(5, 50, 384)).astype(np.float32)
    positions = list(range(5))
    expected = runtime.renderer.render_batched(positions, windows)
    got = renderer.render_batched(positions, windows)
    for want, have in zip(expected, got):
        assert want.shape == have.shape and np.abs(want.astype(int) - have).max() <= 1


def test_run_time_code_never_imports_build_time_code():
    """realtime_avatar/ loads and selects engines; export/ builds them (no import back)."""
    import ast

    package = Path(__file__).resolve().parent.parent / "realtime_avatar"
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "export" or n.startswith("export.")]
    assert not offenders, offenders
