"""Hugging Face checkpoints: import into and export from jaxalign.

Import reads ``config.json`` (see :mod:`jaxalign.models.hf_config`) and the
safetensors files (single or sharded with ``model.safetensors.index.json``)
tensor by tensor, each device reading only its own shard of each tensor
straight from the memory-mapped file. Export writes ``config.json``,
``generation_config.json``, safetensors (sharded above a size) and the
tokenizer files, in a directory ``transformers.AutoModelForCausalLM`` loads.

Only JSON and safetensors are read from a checkpoint directory: no pickle, no
``trust_remote_code``, nothing that executes.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign.data import tokenizer as tokenizer_lib
from jaxalign.mesh import make_mesh
from jaxalign.models import hf_config, hf_tokenizer, hf_weights
from jaxalign.models.transformer import Transformer, TransformerConfig

if TYPE_CHECKING:
    from jaxalign.data.tokenizer import Tokenizer

# Files that make up a tokenizer and its chat template in an HF directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# A tokenizer spec naming the vocabulary inside a GGUF checkpoint.
GGUF_PREFIX = "gguf:"
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(_DTYPE_NAMES)}")
    return name


def checkpoint_dtype(hf: Mapping[str, Any]) -> str:
    """The dtype an HF config.json declares for its weights (float32 if none)."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in _DTYPE_NAMES else "float32"


def load_config(path: str, *, param_dtype: str = "float32",
                dtype: str = "float32") -> TransformerConfig:
    """The :class:`TransformerConfig` of the HF checkpoint directory ``path``."""
    hf = hf_config.read_config_json(path)
    return hf_config.config_from_hf(hf, where=os.path.join(path, "config.json"),
                                    param_dtype=param_dtype, dtype=dtype)


def default_mesh() -> Mesh:
    """A one-device mesh with the standard ``(data, fsdp, tensor)`` axes."""
    return make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def abstract_model(cfg: TransformerConfig) -> tuple[Any, nnx.State]:
    """``(graphdef, abstract param state)`` of ``cfg``'s model; allocates nothing."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0))),
                     nnx.Param)


def param_shardings(cfg: TransformerConfig, mesh: Mesh,
                    rules: Mapping[str, shd.MeshAxes] | None = None) -> Any:
    """NamedShardings of every parameter (pure-dict tree) from the logical axis rules."""
    _, abstract = abstract_model(cfg)
    rules = dict(shd.DEFAULT_RULES) if rules is None else rules
    axes = shd.logical_axes_tree(abstract)
    return shd.param_shardings(nnx.to_pure_dict(abstract), axes, mesh, rules)


def load_params(path: str, cfg: TransformerConfig, shardings: Any) -> dict[str, Any]:
    """Reads the checkpoint's tensors into sharded device arrays (a pure params dict).

    Each device's callback reads only the rows/columns of its shard from the
    memory-mapped safetensors file and converts them to jaxalign's layout, so no
    process ever holds a whole model (or a whole tensor per device) on the host.

    Args:
      path: HF checkpoint directory.
      cfg: the model config (e.g. from :func:`load_config`); its ``param_dtype``
        is the dtype of the returned arrays.
      shardings: a pure-dict tree of ``jax.sharding.Sharding`` per parameter; tensors
        for parameters it lacks are checked but not loaded.

    Raises:
      ValueError / FileNotFoundError: missing, extra or misshapen tensors (naming
        the file and the tensor), or no safetensors files.
    """
    files = hf_weights.checkpoint_files(path)
    maps = hf_weights.tensor_maps(cfg)
    ignored = hf_weights.validate_checkpoint(files, maps, tied=cfg.tie_embeddings)
    if ignored:
        logging.info("%s: not loading %d tensor(s) that are not parameters: %s", path,
                     len(ignored), ", ".join(ignored[:4]))
    handles = hf_weights.OpenFiles()
    try:
        return place_params(maps, shardings, lambda m: handles.slice(files[m.name], m.name),
                            cfg.param_dtype)
    finally:
        handles.close()


def place_params(maps: list[hf_weights.TensorMap], shardings: Any,
                 open_slice: Callable[[hf_weights.TensorMap], Any], dtype: Any) -> dict[str, Any]:
    """Builds each parameter as a sharded array whose shards are read straight from a source.

    Args:
      maps: the parameters and their HF layouts.
      shardings: a pure-dict tree of shardings; parameters it lacks are skipped.
      open_slice: the HF tensor of a map as an object whose ``[slices]`` reads part of it
        (a safetensors slice, or a dequantising view of a GGUF tensor).
      dtype: dtype of the returned arrays.
    """
    target = jnp.dtype(dtype)
    params: dict[str, Any] = {}
    for m in maps:
        try:
            sharding = hf_weights.get_path(shardings, m.path)
        except KeyError:
            continue  # the run's model has no such parameter (a reward model's unembedding)
        sl = open_slice(m)
        cache: dict[tuple, np.ndarray] = {}

        def read(index, m=m, sl=sl, cache=cache):
            key = tuple((s.start, s.stop) for s in index)
            # Replicated shards ask for the same block once per device: read it once.
            if key not in cache:
                cache[key] = m.read(sl, index).astype(target)
            return cache[key]

        hf_weights.set_path(params, m.path, jax.make_array_from_callback(m.shape, sharding, read))
        cache.clear()
    return params


def load_model(path: str, *, mesh: Mesh | None = None, dtype: Any = None,
               rules: Mapping[str, shd.MeshAxes] | None = None) -> Transformer:
    """Loads an HF checkpoint directory as a ready jaxalign model.

    ``model(tokens_bt) -> logits_btv`` then gives the logits transformers gives.

    Args:
      path: directory with ``config.json`` and ``*.safetensors``.
      mesh: shard the parameters over this mesh (by the logical axis ``rules``);
        ``None`` puts them on one device.
      dtype: parameter and compute dtype ("float32", "bfloat16", ...); ``None``
        keeps the checkpoint's declared dtype.
      rules: logical axis rules; ``None`` uses ``jaxalign.sharding.DEFAULT_RULES``.

    Raises:
      FileNotFoundError: no config.json or no safetensors.
      ValueError: unsupported architecture (the message lists the supported ones),
        missing/extra/misshapen tensors (naming the file and the tensor).
    """
    hf = hf_config.read_config_json(path)
    name = _dtype_name(dtype) if dtype is not None else checkpoint_dtype(hf)
    cfg = hf_config.config_from_hf(hf, where=os.path.join(path, "config.json"),
                                   param_dtype=name, dtype=name)
    graphdef, abstract = abstract_model(cfg)
    params = load_params(path, cfg, param_shardings(cfg, mesh or default_mesh(), rules))
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


# -- tokenizer -----------------------------------------------------------------


def tokenizer_vocab_size(path: str) -> tuple[int, str] | None:
    """``(number of ids, file)`` of the tokenizer in an HF directory, or None if it has none.

    Reads ``tokenizer.json`` as JSON (model vocabulary plus added tokens), else
    ``tokenizer.model`` with SentencePiece. Nothing from the directory executes.
    """
    file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in data.get("added_tokens") or [] if "id" in t]
        return (max(ids) + 1 if ids else 0), file
    file = os.path.join(path, "tokenizer.model")
    if os.path.isfile(file):
        import sentencepiece as spm

        with open(file, "rb") as f:
            return spm.SentencePieceProcessor(model_proto=f.read()).get_piece_size(), file
    return None


def check_tokenizer_fits(path: str, vocab_size: int) -> None:
    """Refuses a tokenizer that can emit ids past the model's embedding table.

    Raises:
      ValueError: naming the tokenizer file, its size and the model's.
    """
    found = tokenizer_vocab_size(path)
    if found is not None and found[0] > vocab_size:
        raise ValueError(f"{found[1]}: the tokenizer has {found[0]} ids but the model's "
                         f"embedding has vocab_size={vocab_size} rows; ids from {vocab_size} "
                         "up would index past it")


def load_tokenizer(path: str, *, vocab_size: int | None = None) -> Tokenizer:
    """Loads the tokenizer (and chat template) of an HF checkpoint directory.

    Args:
      path: the checkpoint directory (``tokenizer.json`` or ``tokenizer.model``,
        ``tokenizer_config.json`` for the chat template).
      vocab_size: if given, the model's vocabulary size the tokenizer must fit.
    """
    if vocab_size is None:
        vocab_size = load_config(path).vocab_size
    check_tokenizer_fits(path, vocab_size)
    return tokenizer_lib.load_tokenizer(path)


# -- export --------------------------------------------------------------------


def _hf_tensors(params: Mapping[str, Any], maps: list[hf_weights.TensorMap],
                dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    for m in maps:
        # One tensor at a time on the host (gathered from its shards if sharded).
        host = np.asarray(jax.device_get(hf_weights.get_path(params, m.path)))
        if host.shape != m.shape:
            raise ValueError(f"parameter {'/'.join(map(str, m.path))} has shape "
                             f"{list(host.shape)}, but the model config implies {list(m.shape)}")
        yield m.name, m.to_hf(host).astype(dtype)


def save_pretrained(params: Mapping[str, Any], cfg: TransformerConfig, out: str, *,
                    dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    source_dir: str | None = None, tokenizer: str | None = None) -> list[str]:
    """Writes an HF checkpoint directory that ``transformers`` loads.

    Args:
      params: pure params dict (jax or NumPy arrays) of ``cfg``'s model.
      cfg: the model config; ``cfg.family`` picks the HF architecture.
      out: output directory (created; existing files of the same names are replaced).
      dtype: dtype of the written tensors; ``None`` = ``cfg.param_dtype``.
      max_shard_bytes: above this the weights are split into several files + an index.
      source_dir: the HF directory the model came from: its token ids and generation
        config are carried over, and its tokenizer files unless ``tokenizer`` is given.
      tokenizer: the tokenizer to ship (``builtin:<name>``, ``gguf:<file>``, a
        SentencePiece ``.model`` file or an HF directory); it takes precedence over
        ``source_dir``'s.

    Returns:
      The names of the files written.
    """
    dtype = dtype or cfg.param_dtype
    np_dtype = hf_weights.numpy_dtype(dtype)
    for other in (source_dir, tokenizer):
        if other and os.path.isdir(other) and os.path.isdir(out) and os.path.samefile(other, out):
            raise ValueError(f"export directory {out} is the directory the model or tokenizer "
                             "comes from; write the export somewhere else")
    source = hf_config.read_config_json(source_dir) if source_dir else {}
    carried = {k: source[k] for k in hf_config.CARRIED_KEYS if k in source}
    os.makedirs(out, exist_ok=True)
    for stale in os.listdir(out):
        # A previous export with another shard count would leave orphans next to the new index.
        if stale.endswith(".safetensors") or stale == hf_weights.INDEX_FILE:
            os.remove(os.path.join(out, stale))
    written: list[str] = []
    tok_spec = tokenizer or source_dir
    source_ids = dict(carried)
    written += _write_tokenizer(tok_spec, out, carried) if tok_spec else []
    hf = hf_config.config_to_hf(cfg, dtype=dtype, carried=carried)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    written.append("config.json")
    written.append(_write_generation_config(source_dir, out, hf,
                                            new_ids=carried != source_ids))
    maps = hf_weights.tensor_maps(cfg)
    sizes = [(m.name, int(np.prod(m.hf_shape)) * np_dtype.itemsize) for m in maps]
    written += hf_weights.write_safetensors(out, _hf_tensors(params, maps, np_dtype), sizes,
                                            max_shard_bytes)
    return written


def _write_generation_config(source_dir: str | None, out: str, hf: Mapping[str, Any], *,
                             new_ids: bool) -> str:
    """The source's generation config (sampling defaults, stop ids), else one from config.json.

    With ``new_ids`` (the shipped tokenizer is not the source's) the token ids are
    config.json's, which belong to the shipped tokenizer.
    """
    name = "generation_config.json"
    src = os.path.join(source_dir, name) if source_dir else None
    gen: dict[str, Any] = {}
    if src and os.path.isfile(src):
        with open(src, encoding="utf-8") as f:
            gen = json.load(f)
    if new_ids or not gen:
        gen.update({k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if k in hf})
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
    return name


def _write_tokenizer(spec: str, out: str, carried: dict[str, Any]) -> list[str]:
    """Copies an HF directory's tokenizer files, or ships a SentencePiece model.

    For a SentencePiece model (or a ``gguf:<file>`` vocabulary) the token ids it
    defines are added to ``carried`` (so config.json and generation_config.json name them).
    """
    if spec.startswith(GGUF_PREFIX):
        from jaxalign.models import gguf_tokenizer

        # A byte-level vocabulary is written as tokenizer.json; SentencePiece goes below.
        written = gguf_tokenizer.write_hf_tokenizer(spec[len(GGUF_PREFIX):], out, carried)
        if written is not None:
            return written
    if spec.endswith(".json") and os.path.isfile(spec):
        spec = os.path.dirname(spec) or "."
    if os.path.isdir(spec):
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(spec, n))]
        for n in names:
            shutil.copyfile(os.path.join(spec, n), os.path.join(out, n))
        return names
    import sentencepiece as spm

    proto = _sentencepiece_proto(spec)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    with open(os.path.join(out, "tokenizer.model"), "wb") as f:
        f.write(proto)
    written = ["tokenizer.model"]
    try:
        as_json = hf_tokenizer.tokenizer_json(proto)
    except ValueError as e:  # a unigram model: transformers converts tokenizer.model itself
        logging.info("not writing tokenizer.json: %s", e)
    else:
        with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(as_json)
        written.append("tokenizer.json")

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    pad = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
    # The shipped tokenizer defines the special ids, whatever the source config said.
    carried.update(bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), pad_token_id=pad)
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    # tokenizer.json carries the whole pipeline; without it (unigram) transformers wraps
    # tokenizer.model and prepends "▁" unless told the model does not.
    tok_config = {
        "tokenizer_class": ("PreTrainedTokenizerFast" if "tokenizer.json" in written
                            else "LlamaTokenizer"),
        "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()), "pad_token": piece(pad),
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "add_prefix_space": bool(model.normalizer_spec.add_dummy_prefix),
        "model_max_length": 1_000_000_000,
    }
    template = getattr(tokenizer_lib.load_tokenizer(spec), "chat_template", None)
    if template:
        tok_config["chat_template"] = template
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, sort_keys=True)
    return [*written, "tokenizer_config.json"]


def _sentencepiece_proto(spec: str) -> bytes:
    """The serialized SentencePiece model behind ``builtin:<name>``, ``gguf:<file>`` or a
    ``.model`` path."""
    if spec.startswith(GGUF_PREFIX):
        from jaxalign.models import gguf_tokenizer

        return gguf_tokenizer.sentencepiece_proto(spec[len(GGUF_PREFIX):])
    if not spec.startswith("builtin:"):
        with open(spec, "rb") as f:
            return f.read()
    name = spec[len("builtin:"):]
    filename = getattr(tokenizer_lib, "BUILTIN_TOKENIZERS", {}).get(name, f"{name}.model")
    return importlib.resources.files("jaxalign.data").joinpath("assets", filename).read_bytes()
