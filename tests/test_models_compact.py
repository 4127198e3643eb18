"""compact-v1: shapes, checkpoints, strict loading, hashing, backends, and the registry."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from realtime_avatar.models import registry
from realtime_avatar.models.base import BLEND_ROWS_FROM, PATCH_SIZE, RendererModel, mask_lower_half
from realtime_avatar.models.compact import (
    MODEL_ID,
    CompactConfig,
    CompactModel,
    CompactNet,
    CompactRenderGraph,
    count_parameters,
    decoder_reach,
    crops_to_tensor,
    tensor_to_crops,
)
from realtime_avatar.models.registry import ModelLoadError, load_model, parse_spec
from realtime_avatar.timing import AUDIO_TOKENS, WHISPER_DIM

torch.set_num_threads(2)

SMALL = CompactConfig(unet_channels=(32, 64, 128), encoder_channels=(16, 32, 64), norm_groups=8)


@pytest.fixture(scope="module")
def model() -> CompactModel:
    return CompactModel.random(SMALL, seed=1)


def face_crops(n: int, seed: int = 0) -> np.ndarray:
    """Smooth, structured test images (gradients + a dark 'mouth' ellipse), uint8 BGR."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:PATCH_SIZE, 0:PATCH_SIZE] / PATCH_SIZE
    crops = []
    for _ in range(n):
        base = rng.uniform(60, 200, size=3)
        img = base + 40 * np.stack([xx, yy, xx * yy], -1)
        mouth = ((xx - 0.5) / 0.2) ** 2 + ((yy - 0.75) / rng.uniform(0.03, 0.1)) ** 2 < 1
        img[mouth] = 30
        crops.append(img.clip(0, 255).astype(np.uint8))
    return np.stack(crops)


def render_inputs(model: CompactModel, crops: np.ndarray, seed: int = 0):
    latents = torch.cat([model.encode(mask_lower_half(crops)), model.encode(crops)], 1)
    audio = torch.randn(len(crops), AUDIO_TOKENS, WHISPER_DIM, generator=torch.Generator().manual_seed(seed))
    return latents, audio


def test_default_architecture_size_and_protocol():
    net = CompactNet(CompactConfig())
    # sizes the speed budget was set for (DESIGN.md 10): a few M UNet params, a ~64 k decoder
    assert 2_500_000 < count_parameters(net.unet) < 4_500_000
    assert count_parameters(net.decoder) < 100_000
    assert isinstance(CompactModel(net), RendererModel)
    # the decoder has no convolution at full resolution: every conv's output is <= 128x128
    sizes = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: sizes.append(out.shape[-1]))
        for m in net.decoder.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        image = net.decoder(torch.zeros(1, 8, 32, 32))
    for hook in hooks:
        hook.remove()
    assert image.shape == (1, 3, PATCH_SIZE, PATCH_SIZE)
    assert max(sizes) == PATCH_SIZE // 2


def test_a_two_level_decoder_stops_at_64x64_and_shuffles_by_4():
    # decoder_channels with two widths: no convolution past 64x64 (the fast model's decoder)
    net = CompactNet(CompactConfig(decoder_channels=(32, 16)))
    sizes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(out.shape[1:])))
             for m in net.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        image = net.decoder(torch.zeros(2, 8, 32, 32))
    for hook in hooks:
        hook.remove()
    assert image.shape == (2, 3, PATCH_SIZE, PATCH_SIZE) and 0 < image.min() and image.max() < 1
    assert max(size[-1] for size in sizes) == 64 and sizes[-1] == (3 * 16, 64, 64)
    with pytest.raises(ValueError, match="2 or 3 widths"):
        CompactNet(CompactConfig(decoder_channels=(64, 32, 16, 8)))


def test_encode_render_shapes_dtypes_and_range(model):
    crops = face_crops(3)
    latents = model.encode(crops)
    assert latents.shape == (3, SMALL.latent_channels, 32, 32) and latents.dtype == torch.float32
    assert model.net.unet(*render_inputs(model, crops)).shape == (3, SMALL.latent_channels, 32, 32)

    out = model.render(*render_inputs(model, crops))
    assert out.shape == (3, PATCH_SIZE, PATCH_SIZE, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous
    assert out.std() > 0  # not a constant image
    decoded = model.decode(latents)
    assert decoded.shape == (3, PATCH_SIZE, PATCH_SIZE, 3) and decoded.dtype == np.uint8


def test_render_is_deterministic_and_audio_dependent(model):
    crops = face_crops(2)
    latents, audio = render_inputs(model, crops, seed=0)
    first = model.render(latents, audio)
    assert np.array_equal(first, model.render(latents, audio))
    other_audio = torch.randn(audio.shape, generator=torch.Generator().manual_seed(5))
    assert not np.array_equal(first, model.render(latents, other_audio))
    with torch.no_grad():
        predicted, other = model.net.unet(latents, audio), model.net.unet(latents, other_audio)
    # random weights average 50 random tokens, so the effect is small but clearly there
    assert (predicted - other).abs().mean() > 1e-3 * predicted.abs().mean()


def test_unet_predicts_a_residual_on_the_reference_latent(model):
    """With the last conv zeroed, the UNet must return the reference half of its input."""
    net = CompactNet(SMALL)
    net.load_state_dict(model.net.state_dict())
    torch.nn.init.zeros_(net.unet.out.weight)
    torch.nn.init.zeros_(net.unet.out.bias)
    latents, audio = render_inputs(model, face_crops(2))
    with torch.no_grad():
        predicted = net.unet(latents, audio)
    assert torch.equal(predicted, latents[:, SMALL.latent_channels :])


def test_pixel_conversion_round_trip_and_rounding():
    crops = face_crops(2)
    assert np.array_equal(tensor_to_crops(crops_to_tensor(crops)), crops)
    values = torch.tensor([-0.5, 0.0, 0.5 / 255, 0.49 / 255, 1.0, 1.5]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert tensor_to_crops(values)[0, 0, :, 0].tolist() == [0, 0, 1, 0, 255, 255]


def test_bad_inputs_give_clear_errors(model):
    with pytest.raises(ValueError, match=r"\[N,256,256,3\]"):
        model.encode(np.zeros((1, 128, 128, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        model.encode(np.zeros((1, 256, 256, 3), np.float32))
    latents, audio = render_inputs(model, face_crops(2))
    with pytest.raises(ValueError, match="latents must be"):
        model.render(latents[:, :8], audio)
    with pytest.raises(ValueError, match="audio must be"):
        model.render(latents, audio[:, :10])
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.render(latents, audio[:1])


def test_save_load_round_trip(model, tmp_path):
    path = tmp_path / "compact.safetensors"
    model.notes = {"whisper": "tiny.en", "lookahead_s": "0.1"}
    model.save(path)
    loaded = CompactModel.load(path)
    assert loaded.config == SMALL
    assert loaded.notes == model.notes
    original, reloaded = model.net.state_dict(), loaded.net.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert loaded.weights_hash() == model.weights_hash()
    latents, audio = render_inputs(model, face_crops(2))
    assert np.array_equal(loaded.render(latents, audio), model.render(latents, audio))


def _rewrite(path, out, edit_tensors=None, metadata=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(out), metadata=metadata if metadata is not None else meta)
    return out


def test_strict_loading_lists_missing_unexpected_and_mismatched_keys(model, tmp_path):
    good = tmp_path / "good.safetensors"
    model.save(good)

    def break_it(tensors):
        del tensors["unet.mid_attn.query.weight"]
        tensors["unet.extra_layer.weight"] = torch.zeros(3)
        tensors["decoder.layers.0.weight"] = torch.zeros(32, 8, 3, 3)

    bad = _rewrite(good, tmp_path / "bad.safetensors", break_it)
    with pytest.raises(ModelLoadError) as info:
        CompactModel.load(bad)
    message = str(info.value)
    assert str(bad) in message
    assert "1 missing keys" in message and "unet.mid_attn.query.weight" in message
    assert "1 unexpected keys" in message and "unet.extra_layer.weight" in message
    assert "1 shape mismatches" in message
    assert "decoder.layers.0.weight: file has (32, 8, 3, 3), model expects (64, 8, 3, 3)" in message


def test_loading_rejects_foreign_or_broken_files(model, tmp_path):
    good = tmp_path / "good.safetensors"
    model.save(good)
    with pytest.raises(ModelLoadError, match="does not exist"):
        CompactModel.load(tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        CompactModel.load(garbage)
    foreign = _rewrite(good, tmp_path / "foreign.safetensors", metadata={"model_id": "something-else"})
    with pytest.raises(ModelLoadError, match="model_id"):
        CompactModel.load(foreign)
    config = json.loads(SMALL.to_json()) | {"unet_channels": [32, 64]}
    bad_config = _rewrite(good, tmp_path / "cfg.safetensors", metadata={"model_id": MODEL_ID, "config": json.dumps(config)})
    with pytest.raises(ModelLoadError, match="bad compact config"):
        CompactModel.load(bad_config)


def test_weights_hash_is_stable_and_names_the_weights():
    a = CompactModel.random(SMALL, seed=3)
    assert a.weights_hash() == CompactModel.random(SMALL, seed=3).weights_hash()
    assert a.weights_hash() != CompactModel.random(SMALL, seed=4).weights_hash()
    assert len(a.weights_hash()) == registry.HASH_CHARS
    # the hash names the checkpoint, not the precision or memory layout it runs with
    net = CompactNet(SMALL)
    net.load_state_dict(a.net.state_dict())
    assert CompactModel(net, precision="bf16", channels_last=True).weights_hash() == a.weights_hash()
    # one changed value changes it
    net = CompactNet(SMALL)
    net.load_state_dict(a.net.state_dict())
    with torch.no_grad():
        net.decoder.layers[0].bias[0] += 1e-3
    assert CompactModel(net).weights_hash() != a.weights_hash()


def test_random_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    CompactModel.random(SMALL, seed=9)
    assert torch.equal(torch.rand(1), expected_next)


def test_bf16_channels_last_matches_fp32(model):
    net = CompactNet(SMALL)
    net.load_state_dict(model.net.state_dict())
    fast = CompactModel(net, precision="bf16", channels_last=True)
    latents, audio = render_inputs(model, face_crops(2))
    difference = np.abs(fast.render(latents, audio).astype(int) - model.render(latents, audio).astype(int))
    assert difference.mean() < 2.0 and np.percentile(difference, 99) <= 8


TWO_LEVEL = CompactConfig(unet_channels=(16, 48, 96), decoder_channels=(32, 16), norm_groups=8)


@pytest.mark.parametrize("config", [SMALL, TWO_LEVEL], ids=["decoder-3-levels", "decoder-2-levels"])
def test_render_graph_draws_exactly_the_models_rows_from_rows_from(config):
    """The row-cut graph decodes latent rows rows_from/8 - 3 .. 31 only and gives the full
    graph's pixels from rows_from down, zeros above; one latent row less of context would not."""
    model = CompactModel.random(config, seed=4)
    assert model.rows_from == BLEND_ROWS_FROM and decoder_reach(config) == 3
    latents, audio = render_inputs(model, face_crops(2, seed=3), seed=5)
    with torch.no_grad():
        full = model.net(latents, audio)
        for rows in (BLEND_ROWS_FROM, 8, 200):
            graph = CompactRenderGraph(model.net, rows)
            assert graph.first_latent_row == max(0, rows // 8 - 3)
            cut = graph(latents, audio)
            assert cut.shape == full.shape
            assert torch.equal(cut[:, :, rows:], full[:, :, rows:]) and not cut[:, :, :rows].any()
        short = CompactRenderGraph(model.net, BLEND_ROWS_FROM)
        short.first_latent_row += 1  # the decoder's reach minus one row
        assert not torch.equal(short(latents, audio)[:, :, BLEND_ROWS_FROM:], full[:, :, BLEND_ROWS_FROM:])
        # render() (evaluation, tuning) always draws every row; rows_from=0 gives the plain net
        assert np.array_equal(model.render(latents, audio), tensor_to_crops(full))
        assert CompactModel(model.net, rows_from=0).render_graph() is model.net
    for bad in (4, -8, PATCH_SIZE):
        with pytest.raises(ValueError, match="rows_from"):
            CompactRenderGraph(model.net, bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, on purpose
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # group_norm checks a traced size
def test_onnx_export_with_dynamic_batch_matches_torch(model, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "compact.onnx"
    latents, audio = render_inputs(model, face_crops(3))
    torch.onnx.export(
        model.render_graph(),  # rows from BLEND_ROWS_FROM, as engines are built
        (latents[:1], audio[:1]),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["latents", "audio"],
        output_names=["images"],
        dynamic_axes={"latents": {0: "batch"}, "audio": {0: "batch"}, "images": {0: "batch"}},
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.net(latents, audio).numpy()
    got = session.run(None, {"latents": latents.numpy(), "audio": audio.numpy()})[0]
    assert got.shape == (3, 3, PATCH_SIZE, PATCH_SIZE)
    rows = model.rows_from
    assert np.abs(got[:, :, rows:] - expected[:, :, rows:]).max() < 1e-4 and not got[:, :, :rows].any()


# ---------------------------------------------------------------------------------- registry


def test_parse_spec():
    assert parse_spec("default") == registry.ModelSpec("compact", None)
    assert parse_spec("compact:/a/b.safetensors").path.name == "b.safetensors"
    assert parse_spec("musetalk-v15:/x/y").family == "musetalk-v15"
    for bad in ("", "compact", "compact:", "wav2lip:/x", "/just/a/path"):
        with pytest.raises(ValueError, match="bad model spec"):
            parse_spec(bad)


def test_load_model_compact_spec(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = load_model(f"compact:{path}")
    assert isinstance(loaded, CompactModel) and loaded.weights_hash() == model.weights_hash()
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(f"compact:{tmp_path / 'missing.safetensors'}")


def test_default_spec_without_weights(monkeypatch, tmp_path, model):
    missing = tmp_path / "assets" / "compact-default.safetensors"
    monkeypatch.setattr(registry, "DEFAULT_COMPACT_WEIGHTS", missing)
    with pytest.raises(ModelLoadError, match="default compact model weights are not installed"):
        load_model("default")
    with pytest.warns(RuntimeWarning, match="RANDOM WEIGHTS"):
        random_model = load_model("default", allow_random=True)
    assert isinstance(random_model, CompactModel) and random_model.config == CompactConfig()

    # once the trained file is there, "default" loads it, with no warning
    missing.parent.mkdir(parents=True)
    model.save(missing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model("default").weights_hash() == model.weights_hash()
