"""Each jitted step compiles once per shape: training, evaluation and sampling."""

import collections
import contextlib

import jax
import numpy as np
from flax import nnx
from presets import preset

from jaxalign.algos import get_stage
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.models import lineage
from jaxalign.models.transformer import Transformer, TransformerConfig
from jaxalign.sampling import SamplingConfig, left_pad, make_sampler, sample
from jaxalign.step import ModelDef
from jaxalign.train import train

# Wraps every executable build, persistent-cache hits included (jax/_src/dispatch.py).
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """Counts XLA executables built inside the block, by jitted function name."""
    counts = collections.Counter()

    def listener(event, duration_secs, **kwargs):
        if event == BACKEND_COMPILE:
            counts[kwargs.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _compiles_of(counts, name):
    return counts[f"jit({name})"]


def _config(stage, **overrides):
    return preset(stage, **{"train.steps": 4, "train.log_every": 1, "train.eval_every": 2,
                            "train.eval_batches": 3, "checkpoint.save_every": 100, **overrides})


def _fit(tmp_path, stage, **overrides):
    """Four steps with two evaluations of three batches each; returns the compile counts."""
    with count_compiles() as counts:
        train(_config(stage, **overrides), str(tmp_path / stage))
    return counts


def _train_shapes(stage, steps=4, **overrides):
    """The distinct array shapes of the run's first ``steps`` training batches."""
    config = _config(stage, **overrides)
    tok = load_tokenizer(lineage.resolve_tokenizer(config).tokenizer)
    loader = get_stage(stage).build_data(config, tok, "train",
                                         process_index=0, process_count=1)
    it = loader.iterator()
    return {tuple(sorted((k, v.shape) for k, v in next(it).items()
                         if isinstance(v, np.ndarray))) for _ in range(steps)}


def test_sft_train_and_eval_steps_compile_once(tmp_path):
    """Two evaluations of the whole eval split, its padded last batch included."""
    counts = _fit(tmp_path, "sft", **{"train.eval_batches": 0})
    assert _compiles_of(counts, "train_step") == 1, counts
    assert _compiles_of(counts, "eval_step") == 1, counts


def test_dpo_steps_compile_once_per_batch_shape(tmp_path):
    """Packed pairs carry their loss positions, ``k`` per row from a few sizes: the train
    step compiles once for each (width, k) the run meets, never per batch."""
    shapes = _train_shapes("dpo", **{"data.pack": True})
    assert len(shapes) > 1  # the first batches do need different numbers of loss positions
    counts = _fit(tmp_path, "dpo", **{"data.pack": True})
    assert _compiles_of(counts, "train_step") == len(shapes), counts
    assert _compiles_of(counts, "eval_step") == 1, counts


TINY = TransformerConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=48)
PROMPTS = [[1, 5, 9, 11, 3], [2], [7, 30, 31], [4, 4, 8, 15]]
# Settings no other test uses, so no earlier test has compiled this sampler in the process.
SCFG = SamplingConfig(max_new_tokens=7, temperature=0.9, top_k=13, stop_tokens=(3,))


def _prompts(i):
    """Call ``i``'s prompts: other ids, the same padded width."""
    return left_pad(PROMPTS[i:] + PROMPTS[:i], width=6)


def test_sampler_compiles_once_for_new_prompts_rngs_and_params():
    model = Transformer(TINY, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model, nnx.Param)
    sampler = make_sampler(ModelDef(graphdef, state), SCFG)
    with count_compiles() as counts:
        for i in range(3):
            params = jax.tree.map(lambda x, i=i: x * (1.0 + 0.1 * i), nnx.to_pure_dict(state))
            np.asarray(sampler(params, *_prompts(i), jax.random.key(i)).tokens_bn)
    assert _compiles_of(counts, "sampler") == 1, counts


def test_sample_compiles_once_per_model_config():
    with count_compiles() as counts:
        for i in range(3):
            model = Transformer(TINY, rngs=nnx.Rngs(params=i))
            np.asarray(sample(model, *_prompts(i), jax.random.key(i), SCFG).tokens_bn)
    assert _compiles_of(counts, "run") == 1, counts
