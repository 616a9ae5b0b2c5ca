"""Export a jaxalign run as a Hugging Face checkpoint directory.

Reads ``WORKDIR/config.json`` (the resolved config the trainer wrote) and the
parameters of the run's latest checkpoint, and writes what
``transformers.AutoModelForCausalLM.from_pretrained`` loads (see
:func:`jaxalign.models.hf.save_pretrained`). A LoRA run is exported merged: its
adapters are folded into the base weights (an adapters-only run's base is
rebuilt from its ``init_from`` first), so the result is a plain checkpoint.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging
from flax import nnx

from jaxalign import storage
from jaxalign.data import tokenizer as tokenizer_lib
from jaxalign.models import hf, hf_weights, init_from
from jaxalign.models.transformer import TransformerConfig


def restore_params(workdir: str, cfg: TransformerConfig, step: int | None = None):
    """The params of a run's latest (or given) checkpoint, restored into host (CPU) memory.

    LoRA adapters come back merged into the base weights: the result is the
    params of ``cfg`` without its adapters (``dataclasses.replace(cfg, lora=None)``).
    """
    _, abstract = hf.abstract_model(dataclasses.replace(cfg, lora=None))
    abstract_params = nnx.to_pure_dict(abstract)
    on_host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shardings = jax.tree.map(lambda _: on_host, abstract_params)
    return init_from.restore_merged_params(workdir, abstract_params, shardings, step)


def export_workdir(workdir: str, out: str, *, dtype: str | None = None, step: int | None = None,
                   max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Writes the run in ``workdir`` as an HF checkpoint directory ``out``.

    The tokenizer shipped is the one the run trained with (``config.tokenizer``):
    an HF directory's tokenizer files are copied, a SentencePiece model is written
    as ``tokenizer.model`` + ``tokenizer_config.json``. Token ids and the
    generation config come from the HF checkpoint the run descends from, if any.

    Args:
      workdir: a jaxalign run directory (a local path or a URL such as ``gs://b/run``).
      out: the output directory; a URL gets the files written locally first, then
        uploaded (its stale safetensors shards are removed first).
      dtype: dtype of the written tensors (default: the run's ``param_dtype``).
      step: export this checkpoint step instead of the latest.
      max_shard_bytes: split the safetensors into files of at most this size.

    Returns:
      The names of the files written.
    """
    run = init_from.read_run_config(workdir)
    cfg = TransformerConfig.from_mapping(run.get("model", {}))
    params = restore_params(workdir, cfg, step)
    cfg = dataclasses.replace(cfg, lora=None)
    source = init_from.hf_source_dir(run.get("model", {}).get("init_from", "scratch"))
    if source is not None and not os.path.isfile(os.path.join(source, "config.json")):
        logging.warning("the run started from %s, which is gone: token ids and generation "
                        "config are not carried over", source)
        source = None
    tokenizer = run.get("tokenizer") or None
    if tokenizer is not None:
        tokenizer = tokenizer_lib.local_spec(tokenizer)
    if storage.is_url(out) and storage.isdir(out):
        for stale in storage.listdir(out):
            if stale.endswith(".safetensors") or stale == hf_weights.INDEX_FILE:
                storage.remove(storage.join(out, stale))
    with storage.staged_dir(out) as local_out:
        return hf.save_pretrained(params, cfg, local_out, dtype=dtype,
                                  max_shard_bytes=max_shard_bytes, source_dir=source,
                                  tokenizer=tokenizer)
