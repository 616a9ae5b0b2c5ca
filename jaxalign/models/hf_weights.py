"""Tensor names and layouts: Hugging Face safetensors <-> jaxalign parameters.

HF stores ``nn.Linear`` weights as ``[out, in]`` with heads flattened into one
dim; jaxalign keeps einsum-friendly ``[in, heads, head_dim]`` arrays. Every
conversion here is a reshape plus a transpose, so it is exactly invertible (a
round trip is bitwise), and it can be applied to any slice of a tensor: a device
reads only the rows and columns of the file that its shard needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxalign.models.transformer import TransformerConfig

ParamPath = tuple[str | int, ...]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Checkpoint buffers that are not parameters (old Llama exports saved RoPE tables).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(jnp.bfloat16)}


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter: ``ours = hf.reshape(inter).transpose(perm)``.

    ``groups[j]`` lists the ``inter`` dims that HF dim ``j`` splits into, in order.
    """

    path: ParamPath
    name: str
    hf_shape: tuple[int, ...]
    inter: tuple[int, ...]
    perm: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.inter[p] for p in self.perm)

    def to_ours(self, hf_array: np.ndarray) -> np.ndarray:
        return hf_array.reshape(self.inter).transpose(self.perm)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array).transpose(np.argsort(self.perm)).reshape(self.hf_shape)

    def read(self, tensor_slice: Any, index: tuple[slice, ...]) -> np.ndarray:
        """Reads the part of the HF tensor that lands at ``index`` of our layout.

        Args:
          tensor_slice: a safetensors slice handle (``safe_open(...).get_slice(name)``).
          index: one slice per dim of our layout (as ``make_array_from_callback`` passes).
        """
        inter_idx: list[slice] = [slice(None)] * len(self.inter)
        for ours_dim, inter_dim in enumerate(self.perm):
            inter_idx[inter_dim] = index[ours_dim]
        bounds = [inter_idx[i].indices(self.inter[i])[:2] for i in range(len(self.inter))]
        hf_idx, local_shape, inner = [], [], []
        for group in self.groups:
            lead, rest = group[0], group[1:]
            trail = int(np.prod([self.inter[i] for i in rest])) if rest else 1
            start, stop = bounds[lead]
            # The leading sub-dim picks a contiguous row range; finer dims are cut after.
            hf_idx.append(slice(start * trail, stop * trail))
            local_shape += [stop - start] + [self.inter[i] for i in rest]
            inner += [slice(None)] + [slice(*bounds[i]) for i in rest]
        block = np.asarray(tensor_slice[tuple(hf_idx)]).reshape(local_shape)
        return block[tuple(inner)].transpose(self.perm)


def _same(path, name, shape) -> TensorMap:
    return TensorMap(path, name, shape, shape, tuple(range(len(shape))),
                     tuple((i,) for i in range(len(shape))))


def _linear(path, name, d_in, d_out) -> TensorMap:
    return TensorMap(path, name, (d_out, d_in), (d_out, d_in), (1, 0), ((0,), (1,)))


def _in_heads(path, name, d, n, h) -> TensorMap:
    return TensorMap(path, name, (n * h, d), (n, h, d), (2, 0, 1), ((0, 1), (2,)))


def _heads_out(path, name, n, h, d) -> TensorMap:
    return TensorMap(path, name, (d, n * h), (d, n, h), (1, 2, 0), ((0,), (1, 2)))


def _heads_bias(path, name, n, h) -> TensorMap:
    return TensorMap(path, name, (n * h,), (n, h), (0, 1), ((0, 1),))


def tensor_maps(cfg: TransformerConfig) -> list[TensorMap]:
    """Every parameter of ``cfg``'s model with its HF tensor name and layout."""
    d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    maps = [_same(("embed",), "model.embed_tokens.weight", (v, d)),
            _same(("final_norm", "scale"), "model.norm.weight", (d,))]
    if not cfg.tie_embeddings:
        maps.append(_linear(("unembed",), "lm_head.weight", d, v))
    # Gemma 2/3 name the four norms by position; Llama's "post_attention" norm is pre-MLP.
    norm_names = {"attn_norm": "input_layernorm"}
    if cfg.post_norms:
        norm_names.update(post_attn_norm="post_attention_layernorm",
                          mlp_norm="pre_feedforward_layernorm",
                          post_mlp_norm="post_feedforward_layernorm")
    else:
        norm_names["mlp_norm"] = "post_attention_layernorm"
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}"
        lp: ParamPath = ("layers", i)
        for ours, theirs in norm_names.items():
            maps.append(_same((*lp, ours, "scale"), f"{pre}.{theirs}.weight", (d,)))
        a = (*lp, "attn")
        maps += [_in_heads((*a, "q_proj"), f"{pre}.self_attn.q_proj.weight", d, n, h),
                 _in_heads((*a, "k_proj"), f"{pre}.self_attn.k_proj.weight", d, k, h),
                 _in_heads((*a, "v_proj"), f"{pre}.self_attn.v_proj.weight", d, k, h),
                 _heads_out((*a, "o_proj"), f"{pre}.self_attn.o_proj.weight", n, h, d)]
        if cfg.qkv_bias:
            maps += [_heads_bias((*a, f"{x}_bias"), f"{pre}.self_attn.{x}_proj.bias", m, h)
                     for x, m in (("q", n), ("k", k), ("v", k))]
        if cfg.qk_norm:
            maps += [_same((*a, f"{x}_norm", "scale"), f"{pre}.self_attn.{x}_norm.weight", (h,))
                     for x in ("q", "k")]
        m = (*lp, "mlp")
        maps += [_linear((*m, "gate_proj"), f"{pre}.mlp.gate_proj.weight", d, f),
                 _linear((*m, "up_proj"), f"{pre}.mlp.up_proj.weight", d, f),
                 _linear((*m, "down_proj"), f"{pre}.mlp.down_proj.weight", f, d)]
    return maps


def get_path(tree: Mapping[Any, Any], path: ParamPath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict[Any, Any], path: ParamPath, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# -- reading -------------------------------------------------------------------


def checkpoint_files(path: str) -> dict[str, str]:
    """Maps every tensor name of a checkpoint directory to the safetensors file holding it.

    Raises:
      FileNotFoundError: no safetensors (a pickle checkpoint is refused, never read), or
        the index names a shard that is missing.
      ValueError: the index is malformed or two files hold the same tensor.
    """
    from safetensors import safe_open

    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        out = {}
        for name, file in weight_map.items():
            full = os.path.join(path, file)
            if os.path.basename(file) != file or not os.path.isfile(full):
                raise FileNotFoundError(f"{index}: tensor {name!r} is in shard {file!r}, "
                                        f"which is not a file in {path}")
            out[name] = full
        return out
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        pickles = sorted(f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES))
        extra = (f" (found {', '.join(pickles)}: pickle checkpoints are never loaded, since "
                 "unpickling runs code; convert them to safetensors)") if pickles else ""
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{extra}")
    out = {}
    for file in files:
        full = os.path.join(path, file)
        with safe_open(full, framework="numpy") as st:
            for name in st.keys():
                if name in out:
                    raise ValueError(f"tensor {name!r} is in both {out[name]} and {full}")
                out[name] = full
    return out


def validate_checkpoint(files: Mapping[str, str], maps: list[TensorMap], *,
                        tied: bool) -> list[str]:
    """Checks names, shapes and dtypes of a checkpoint against the expected tensors.

    Returns:
      The names present in the checkpoint that are deliberately not loaded.

    Raises:
      ValueError: a missing or unexpected tensor, a shape or dtype mismatch; the
        message names the file and the tensor.
    """
    from safetensors import safe_open

    expected = {m.name: m for m in maps}
    where = os.path.dirname(next(iter(files.values()), "")) or "the checkpoint"
    missing = sorted(set(expected) - set(files))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{where}: tensor {missing[0]!r} is missing from the checkpoint"
                         f"{more}; missing: {missing[:5]}")
    ignored = []
    for name in sorted(set(files) - set(expected)):
        # A tied model's lm_head is the embedding; some exporters write it anyway.
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            ignored.append(name)
            continue
        raise ValueError(f"{files[name]}: unexpected tensor {name!r}, which the model "
                         "described by config.json does not have")
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="numpy") as st:
            for name in names:
                sl = st.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                want = expected[name].hf_shape
                if shape != want:
                    raise ValueError(f"{file}: tensor {name!r} has shape {list(shape)}, but "
                                     f"config.json implies {list(want)}")
                if dtype not in _DTYPES:
                    raise ValueError(f"{file}: tensor {name!r} has dtype {dtype}; supported: "
                                     f"{sorted(_DTYPES)}")
    return ignored


class OpenFiles:
    """Keeps each safetensors file open (memory-mapped) while tensors are read."""

    def __init__(self):
        self._handles: dict[str, Any] = {}

    def slice(self, file: str, name: str) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="numpy").__enter__()
        return self._handles[file].get_slice(name)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


# -- writing -------------------------------------------------------------------


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving split of tensors into files of at most ``max_bytes``."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_safetensors(out_dir: str, tensors: Iterator[tuple[str, np.ndarray]],
                      sizes: list[tuple[str, int]], max_bytes: int) -> list[str]:
    """Writes tensors (produced lazily, in ``sizes`` order) into shards plus an index.

    Only one shard's tensors are held in host memory at a time.

    Returns:
      The written file names.
    """
    from safetensors.numpy import save_file

    shards = plan_shards(sizes, max_bytes)
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    it = iter(tensors)
    for shard, file in zip(shards, names, strict=True):
        batch = {}
        for expected in shard:
            name, array = next(it)
            if name != expected:
                raise RuntimeError(f"tensor order changed: {name} != {expected}")
            batch[name] = np.ascontiguousarray(array)
            weight_map[name] = file
        save_file(batch, os.path.join(out_dir, file), metadata={"format": "pt"})
        del batch
    if len(names) > 1:
        index = {"metadata": {"total_size": int(sum(s for _, s in sizes))},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        names.append(INDEX_FILE)
    return names


def numpy_dtype(name: str) -> np.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> the NumPy dtype safetensors writes."""
    table = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
    if name not in table:
        raise ValueError(f"unsupported export dtype {name!r}; expected one of {sorted(table)}")
    return np.dtype(table[name])
