"""GGUF (llama.cpp) checkpoints: import into jaxalign (``model.init_from=gguf:<file>``).

One ``.gguf`` file carries the weights (F32/F16/BF16 or block-quantised), the
architecture as metadata (``llama.block_count``, ...) and the tokenizer
(``tokenizer.ggml.*``, ``tokenizer.chat_template``). Import:

* parses the header, metadata and tensor table with bounds checks: a truncated or
  damaged file is a ValueError naming the file and the fault, never a partial load;
* builds an HF-style ``config.json`` dict from the metadata and reads it through
  :mod:`jaxalign.models.hf_config`, so every family rule (Gemma's RoPE bases,
  sliding windows, ...) is the HF import's;
* maps llama.cpp tensor names onto HF names and reads them through the HF
  import's sharded path: each device dequantises only the rows of its shard,
  undoing llama.cpp's Q/K row permutation (Llama) and its ``+1`` on Gemma norms;
* the tokenizer is rebuilt from the metadata by :mod:`jaxalign.models.gguf_tokenizer`.

The ``gguf`` package provides the format's constants; tensors are dequantised here
(vectorised NumPy over blocks). Nothing in the file executes; the chat template
renders only in the sandboxed Jinja of :mod:`jaxalign.data.chat`.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxalign.models import hf, hf_config, hf_weights
from jaxalign.models.transformer import TransformerConfig

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4
_MAX_DEPTH = 3  # arrays of arrays of arrays; no real file nests deeper
# GGUF value types -> struct format (8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 10: "<u8",
          11: "<i8", 12: "<f8"}

# general.architecture -> the HF architecture jaxalign builds.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


@functools.cache
def _ggml() -> Any:
    """The ``gguf`` package's constants (imported on first use: the package is heavy)."""
    from gguf import constants

    return constants


# -- the container -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table; ``dims`` innermost first, as GGUF stores them."""

    name: str
    ggml_type: int
    dims: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """NumPy (row-major) shape: an HF ``[out, in]`` weight is ``dims=(in, out)``."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return _ggml().GGMLQuantizationType(self.ggml_type).name


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """The parsed header of a GGUF file: metadata and tensor table."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    size: int

    def error(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what}")


class _Cursor:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, buf: Any, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise ValueError(f"{self.path}: truncated file: {what} needs {n} bytes at offset "
                             f"{start}, but the file ends at {self.size}")
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _BOOL:
            flag = self.scalar("<B", what)
            if flag > 1:
                raise ValueError(f"{self.path}: {what} is a bool stored as {flag}")
            return bool(flag)
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype != _ARRAY or depth >= _MAX_DEPTH:
            raise ValueError(f"{self.path}: {what} has unknown value type {vtype}")
        etype, count = self.scalar("<I", what), self.scalar("<Q", what)
        if etype not in _SCALARS and etype not in (_STRING, _ARRAY):
            raise ValueError(f"{self.path}: {what} is an array of unknown type {etype}")
        least = {_STRING: 8, _ARRAY: 12}.get(etype) or struct.calcsize(_SCALARS[etype])
        if count * least > self.size - self.pos:
            raise ValueError(f"{self.path}: {what} claims {count} elements, more than the "
                             f"{self.size - self.pos} bytes left in the file hold")
        if etype in _NUMPY:
            start = self.take(count * least, what)
            return np.frombuffer(self.buf, _NUMPY[etype], count, start).tolist()
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]


def _parse(path: str) -> GGUFFile:
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path}: truncated file: {size} bytes is shorter than a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path)
        if buf[:4] != _MAGIC:
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected "
                             f"{_MAGIC!r})")
        cur.pos = 4
        version = cur.scalar("<I", "the version")
        if version & 0xFFFF == 0 and version:
            raise ValueError(f"{path}: big-endian GGUF files are not supported")
        if version not in _VERSIONS:
            raise ValueError(f"{path}: GGUF version {version} is not supported (supported: "
                             f"{list(_VERSIONS)})")
        n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the kv count")
        if n_kv * 13 + n_tensors * 32 > size - cur.pos:
            raise ValueError(f"{path}: the header claims {n_kv} metadata entries and "
                             f"{n_tensors} tensors, more than the file can hold")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"the key of metadata entry #{i}")
            if key in metadata:
                raise ValueError(f"{path}: metadata key {key!r} appears twice")
            metadata[key] = cur.value(cur.scalar("<I", f"the type of {key!r}"), repr(key))
        infos = [_tensor_info(cur, i) for i in range(n_tensors)]
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
                or alignment & (alignment - 1)):
            raise ValueError(f"{path}: general.alignment={alignment!r} is not a power of two")
        data = -(-cur.pos // alignment) * alignment
    tensors = _place_tensors(path, infos, data, alignment, size)
    return GGUFFile(path, version, metadata, tensors, size)


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int]:
    name = cur.string(f"the name of tensor #{i}")
    n_dims = cur.scalar("<I", f"the rank of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise ValueError(f"{cur.path}: tensor {name!r} has {n_dims} dimensions (1 to "
                         f"{_MAX_DIMS} allowed)")
    dims = tuple(cur.scalar("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims))
    ggml_type = cur.scalar("<I", f"the type of tensor {name!r}")
    offset = cur.scalar("<Q", f"the offset of tensor {name!r}")
    if ggml_type not in _ggml().GGML_QUANT_SIZES:
        raise ValueError(f"{cur.path}: tensor {name!r} has unknown quantisation type {ggml_type}")
    if 0 in dims:
        raise ValueError(f"{cur.path}: tensor {name!r} has an empty dimension {list(dims)}")
    return name, ggml_type, dims, offset


def _place_tensors(path: str, infos: list, data: int, alignment: int,
                   size: int) -> dict[str, TensorInfo]:
    """Checks each tensor's bytes lie in the data section, aligned and apart from the others."""
    out: dict[str, TensorInfo] = {}
    for name, ggml_type, dims, offset in infos:
        block, type_size = _ggml().GGML_QUANT_SIZES[ggml_type]
        kind = _ggml().GGMLQuantizationType(ggml_type).name
        if name in out:
            raise ValueError(f"{path}: tensor {name!r} appears twice in the tensor table")
        if dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} ({kind}) has rows of {dims[0]} values, "
                             f"not a whole number of {block}-value blocks")
        nbytes = int(np.prod(dims, dtype=object)) // block * type_size
        if offset % alignment:
            raise ValueError(f"{path}: tensor {name!r} starts at data offset {offset}, not a "
                             f"multiple of the alignment {alignment}")
        if data + offset + nbytes > size:
            raise ValueError(f"{path}: tensor {name!r} ({nbytes} bytes at offset "
                             f"{data + offset}) runs past the end of the file ({size} bytes): "
                             "the file is truncated or its tensor table is damaged")
        out[name] = TensorInfo(name, ggml_type, dims, data + offset, nbytes)
    spans = sorted(out.values(), key=lambda t: t.start)
    for a, b in zip(spans, spans[1:], strict=False):
        if b.start < a.start + a.nbytes:
            raise ValueError(f"{path}: the data of tensors {a.name!r} and {b.name!r} overlap")
    return out


_CACHE: dict[tuple, GGUFFile] = {}


def read_file(path: str) -> GGUFFile:
    """The parsed header of ``path`` (cached while the file is unchanged).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not a well-formed GGUF file; the message names it.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _parse(path)
    return _CACHE[key]


# -- dequantisation ------------------------------------------------------------


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 scale at byte ``at`` of every block, as a ``[blocks, 1]`` float32 column."""
    return blocks[:, at:at + 2].view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles then high nibbles along the last axis."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b, 2)


def _q4_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    s = b[:, 4:16]
    # Eight 6-bit (scale, min) pairs: the first four in the low bits of bytes 0-7, the
    # last four split over bytes 8-11 (low/high nibble) and the top bits of bytes 0-7.
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    scale = (_f16(b, 0) * sc.astype(np.float32))[:, :, None]
    offset = (_f16(b, 2) * mn.astype(np.float32))[:, :, None]
    # Each 32-byte run of qs holds two sub-blocks: low nibbles, then high nibbles.
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return (scale * q - offset).reshape(n, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    ql = b[:, :128].reshape(n, 2, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    # Per 128-value half: values 0-63 take the low nibbles of ql, 64-127 the high ones;
    # their top two bits come from qh, 32 values per shift.
    q = _nibbles(ql) | ((qh & 3).reshape(n, 2, 128) << 4)
    q = (q.astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    scale = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)
    return (scale[:, :, None] * q).reshape(n, 256)


def _bf16(b: np.ndarray) -> np.ndarray:
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


_DEQUANT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": lambda b: b.view("<f4").astype(np.float32),
    "F16": lambda b: b.view("<f2").astype(np.float32),
    "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k,
}
SUPPORTED_TYPES = tuple(_DEQUANT)


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Float32 values of ``raw`` (the bytes of whole blocks of one type), flat.

    Raises:
      ValueError: the type is not one jaxalign dequantises, or ``raw`` is not whole blocks.
    """
    name = _ggml().GGMLQuantizationType(ggml_type).name
    if name not in _DEQUANT:
        raise ValueError(f"quantisation type {name} is not supported (supported: "
                         f"{', '.join(SUPPORTED_TYPES)})")
    _, type_size = _ggml().GGML_QUANT_SIZES[ggml_type]
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size % type_size:
        raise ValueError(f"{raw.size} bytes are not whole {name} blocks of {type_size} bytes")
    return _DEQUANT[name](raw.reshape(-1, type_size)).reshape(-1)


# -- Q/K row order ---------------------------------------------------------------


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for a Q/K projection (rotary pairs interleaved per head)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's row order (rotary halves per head) of a llama.cpp Q/K projection."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


# -- metadata -> config ----------------------------------------------------------


def meta(g: GGUFFile, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """The metadata value ``key``, of Python type ``kind`` (a bool is no int here).

    Raises:
      ValueError: the key is missing and has no ``default``, or its value has another type.
    """
    if key not in g.metadata:
        if default is None:
            raise g.error(f"metadata key {key!r} is missing")
        return default
    value = g.metadata[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise g.error(f"metadata key {key!r} has a value of the wrong type: {value!r}")
    return value


def _count(g: GGUFFile, key: str, default: int | None = None) -> int:
    """A positive size; a per-layer list must repeat one value."""
    value = g.metadata.get(key, default)
    if isinstance(value, list) and value and len(set(value)) == 1:
        value = value[0]
    if value is None:
        raise g.error(f"metadata key {key!r} is missing")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise g.error(f"metadata key {key!r}={value!r} is not a positive integer (per-layer "
                      "values that differ are not supported)")
    return value


def _number(g: GGUFFile, key: str, default: float) -> float:
    return float(meta(g, key, (int, float), default))


def architecture(g: GGUFFile) -> str:
    """``general.architecture``, checked to be one jaxalign builds."""
    arch = meta(g, "general.architecture", str)
    if arch not in ARCHITECTURES:
        raise g.error(f"architecture {arch!r} is not supported (supported: "
                      f"{', '.join(sorted(ARCHITECTURES))})")
    return arch


def hf_config_dict(g: GGUFFile) -> dict[str, Any]:
    """The HF ``config.json`` equivalent of the file's metadata."""
    arch = architecture(g)
    a = arch + "."
    d, n = _count(g, a + "embedding_length"), _count(g, a + "attention.head_count")
    embed = g.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2 or embed.shape[1] != d:
        got = "is missing" if embed is None else f"has shape {list(embed.shape)}"
        raise g.error(f"tensor 'token_embd.weight' {got}; the metadata implies [vocab, {d}]")
    vocab = embed.shape[0]
    if _count(g, a + "vocab_size", vocab) != vocab:
        raise g.error(f"metadata {a}vocab_size={g.metadata[a + 'vocab_size']} but "
                      f"'token_embd.weight' has {vocab} rows")
    head_dim = _count(g, a + "attention.key_length", d // n if d >= n else None)
    for key in ("attention.value_length", "rope.dimension_count"):
        if _count(g, a + key, head_dim) != head_dim:
            raise g.error(f"metadata {a}{key}={g.metadata[a + key]} differs from the head "
                          f"dimension {head_dim}, which jaxalign does not support")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "hidden_size": d, "vocab_size": vocab,
        "num_hidden_layers": _count(g, a + "block_count"), "num_attention_heads": n,
        "num_key_value_heads": _count(g, a + "attention.head_count_kv", n),
        "head_dim": head_dim, "intermediate_size": _count(g, a + "feed_forward_length"),
        "rms_norm_eps": _number(g, a + "attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": _count(g, a + "context_length", 8192),
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }
    theta = _number(g, a + "rope.freq_base", 1e6 if arch == "gemma3" else 1e4)
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    kind = meta(g, a + "rope.scaling.type", str, "none")
    if kind == "linear":
        out["rope_parameters"].update(rope_type="linear",
                                      factor=_number(g, a + "rope.scaling.factor", 1.0))
    elif kind != "none":
        raise g.error(f"RoPE scaling {kind!r} ({a}rope.scaling.type) is not supported")
    if "rope_freqs.weight" in g.tensors:
        out["rope_parameters"] = _llama3_rope(g, a, theta, head_dim)
    if arch in ("gemma2", "gemma3"):
        out["sliding_window"] = _count(g, a + "attention.sliding_window", 4096)
        # llama.cpp scales the scores of the 27B models by d/n, the others by head_dim.
        big = out["num_hidden_layers"] in (46, 62)
        out["query_pre_attn_scalar"] = d // n if big else head_dim
    if arch == "gemma2":
        out["attn_logit_softcapping"] = _number(g, a + "attn_logit_softcapping", 50.0)
        out["final_logit_softcapping"] = _number(g, a + "final_logit_softcapping", 30.0)
    return out


def _llama3_rope(g: GGUFFile, a: str, theta: float, head_dim: int) -> dict[str, Any]:
    """Llama 3.1 RoPE scaling, recovered from the per-frequency factors in ``rope_freqs``.

    The banded scheme depends on ``original_max_len / low`` and ``/ high`` only, so
    fixing ``original_max_len`` leaves ``low`` and ``high`` a linear fit over the
    interpolated band; the fit is checked by recomputing every factor.
    """
    from jaxalign.models.attention import rope_inv_freq

    info = g.tensors["rope_freqs.weight"]
    if info.shape != (head_dim // 2,):
        raise g.error(f"tensor 'rope_freqs.weight' has shape {list(info.shape)}; expected "
                      f"[{head_dim // 2}]")
    f = _TensorView(g, info)[(slice(None),)].astype(np.float64)
    if np.allclose(f, 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    orig = _count(g, a + "rope.scaling.original_context_length", 8192)
    factor = float(f.max())
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    low, high = 1.0, 4.0
    if mid.sum() >= 2:
        # 1/f = (1 - s)/factor + s with s = (orig/wavelen - low) / (high - low).
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, icpt = np.polyfit(orig / wavelen[mid], s, 1)
        low, high = -icpt / slope, (1 - icpt) / slope
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
              "low_freq_factor": float(low), "high_freq_factor": float(high),
              "original_max_position_embeddings": orig}
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    ours = rope_inv_freq(head_dim, theta, scaling="llama3", factor=factor,
                         low_freq_factor=low, high_freq_factor=high, original_max_len=orig)
    if not (high > low > 0) or not np.allclose(ours, inv / f, rtol=1e-4):
        raise g.error("tensor 'rope_freqs.weight' holds RoPE factors that are not Llama 3.1 "
                      "scaling, which is the only per-frequency scaling jaxalign supports")
    return params


def load_config(path: str, *, param_dtype: str = "float32",
                dtype: str = "float32") -> TransformerConfig:
    """The :class:`TransformerConfig` of a GGUF file, checked against its tensor table.

    Raises:
      ValueError: unsupported architecture or feature, missing metadata, or tensors that
        do not fit the metadata; the message names the file.
    """
    g = read_file(path)
    try:
        cfg = hf_config.config_from_hf(hf_config_dict(g), where=g.path,
                                       param_dtype=param_dtype, dtype=dtype)
    except ValueError as e:
        raise e if g.path in str(e) else g.error(str(e)) from None
    _views(g, cfg)
    return cfg


# -- tensors ---------------------------------------------------------------------

# llama.cpp names inside ``blk.N.`` -> HF names inside ``model.layers.N.``.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Gemma 2/3 norm both sides of each sub-block; their ffn_norm is the pre-MLP one.
_POST_NORM_NAMES = {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# Tensors that are not parameters: Llama 3.1's RoPE factors become config values.
_CONSUMED = ("rope_freqs.weight",)


def hf_name(name: str, cfg: TransformerConfig) -> str | None:
    """The HF tensor name of a llama.cpp tensor name (None if it has none)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    table = {**_LAYER_NAMES, **_POST_NORM_NAMES} if cfg.post_norms else _LAYER_NAMES
    theirs = table.get(parts[2])
    return f"model.layers.{int(parts[1])}.{theirs}" if theirs else None


class _TensorView:
    """A GGUF tensor in HF layout; ``view[rows, cols]`` dequantises only the blocks it needs.

    It serves as the tensor slice :meth:`hf_weights.TensorMap.read` cuts shards from.
    """

    def __init__(self, g: GGUFFile, info: TensorInfo, *, heads: int = 0, shift: float = 0.0,
                 data: np.ndarray | None = None):
        self.g, self.info, self.heads, self.shift = g, info, heads, shift
        self.data = np.memmap(g.path, np.uint8, mode="r") if data is None else data
        self.block, self.type_size = _ggml().GGML_QUANT_SIZES[info.ggml_type]
        self.row_bytes = info.dims[0] // self.block * self.type_size

    def _tile(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` x columns ``[c0, c1)`` of the stored (row-major) tensor."""
        b0, b1 = c0 // self.block, -(-c1 // self.block)
        start = self.info.start + r0 * self.row_bytes
        rows = self.data[start:start + (r1 - r0) * self.row_bytes].reshape(r1 - r0, -1)
        try:
            values = dequantize(rows[:, b0 * self.type_size:b1 * self.type_size],
                                self.info.ggml_type)
        except ValueError as e:
            raise self.g.error(f"tensor {self.info.name!r}: {e}") from None
        values = values.reshape(r1 - r0, (b1 - b0) * self.block)
        return values[:, c0 - b0 * self.block:c1 - b0 * self.block]

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        shape = self.info.shape
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        c0, c1, _ = index[-1].indices(shape[-1])
        if len(shape) == 1:
            block = self._tile(0, 1, c0, c1)[0]
        else:
            r0, r1, _ = index[0].indices(shape[0])
            if self.heads:
                # Whole heads are read: llama.cpp's permutation mixes rows within a head.
                size = shape[0] // self.heads
                h0, h1 = r0 // size, -(-r1 // size)
                block = unpermute_qk(self._tile(h0 * size, h1 * size, c0, c1), h1 - h0)
                block = block[r0 - h0 * size:r1 - h0 * size]
            else:
                block = self._tile(r0, r1, c0, c1)
        return block - np.float32(self.shift) if self.shift else block


def _views(g: GGUFFile, cfg: TransformerConfig) -> dict[str, _TensorView]:
    """HF name -> view of every parameter tensor, after checking names, shapes and types."""
    maps = {m.name: m for m in hf_weights.tensor_maps(cfg)}
    data = np.memmap(g.path, np.uint8, mode="r")
    arch = architecture(g)
    out: dict[str, _TensorView] = {}
    for name, info in g.tensors.items():
        if name in _CONSUMED:
            continue
        theirs = hf_name(name, cfg)
        if theirs not in maps:
            raise g.error(f"unexpected tensor {name!r}, which a {arch} model with this "
                          "metadata does not have")
        want = maps[theirs].hf_shape
        if info.shape != want:
            raise g.error(f"tensor {name!r} has shape {list(info.shape)}, but the metadata "
                          f"implies {list(want)}")
        if info.type_name not in _DEQUANT:
            raise g.error(f"tensor {name!r} has type {info.type_name}, which jaxalign does not "
                          f"dequantise (supported: {', '.join(SUPPORTED_TYPES)})")
        heads = 0
        if arch == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads
        # llama.cpp stores Gemma's (1 + w) RMSNorm weights with the 1 added.
        shift = 1.0 if cfg.norm_plus_one and name.endswith("norm.weight") else 0.0
        out[theirs] = _TensorView(g, info, heads=heads, shift=shift, data=data)
    missing = sorted(set(maps) - set(out))
    if missing:
        raise g.error(f"{len(missing)} parameter tensor(s) are missing, first the one HF calls "
                      f"{missing[0]!r}")
    return out


def load_params(path: str, cfg: TransformerConfig, shardings: Any) -> dict[str, Any]:
    """Reads a GGUF file's tensors into sharded device arrays (a pure params dict).

    The same placement as :func:`jaxalign.models.hf.load_params`: each device's
    callback dequantises only the rows of its shard.

    Args:
      path: the ``.gguf`` file.
      cfg: the model config (e.g. from :func:`load_config`); its ``param_dtype`` is the
        dtype of the returned arrays.
      shardings: a pure-dict tree of shardings per parameter; tensors for parameters
        it lacks are checked but not loaded.

    Raises:
      ValueError: a damaged file, or tensors that do not fit ``cfg`` (naming the file).
    """
    views = _views(read_file(path), cfg)
    return hf.place_params(hf_weights.tensor_maps(cfg), shardings,
                           lambda m: views[m.name], cfg.param_dtype)


def load_model(path: str, *, mesh: Any = None, dtype: str = "float32") -> Any:
    """Loads a GGUF file as a ready jaxalign ``Transformer`` (dequantised to ``dtype``)."""
    from flax import nnx

    cfg = load_config(path, param_dtype=dtype, dtype=dtype)
    graphdef, abstract = hf.abstract_model(cfg)
    params = load_params(path, cfg, hf.param_shardings(cfg, mesh or hf.default_mesh()))
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)

