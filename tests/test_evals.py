"""Greedy generation against a step-by-step reference loop, and task accuracy."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.evals.generation import greedy_generate
from jaxalign.models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=8, mlp_dim=48)


WIDTH = 16


@nnx.jit
def _last_logits(model, tokens_1t, length):
    # Causal attention: right padding never changes the logits at real positions, so
    # one compiled width serves every prefix length.
    return model(tokens_1t)[0, length - 1]


def _reference(model, prompt, n, eos):
    ids = list(prompt)
    for _ in range(n):
        row = jnp.asarray([ids + [0] * (WIDTH - len(ids))])
        nxt = int(jnp.argmax(_last_logits(model, row, len(ids))))
        if nxt == eos:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def test_greedy_matches_reference_loop():
    model = Transformer(CFG, rngs=nnx.Rngs(params=3))
    prompts = [[1, 5, 9], [1, 2], [1, 30, 31, 32, 33], [7]]
    # Pick an eos the model actually emits for one prompt, so stopping is exercised.
    eos = _reference(model, prompts[1], 3, eos=-1)[2]
    got = greedy_generate(model, prompts, max_new_tokens=6, eos_id=eos, batch_size=3)
    want = [_reference(model, p, 6, eos) for p in prompts]
    assert got == want
    assert any(len(g) < 6 for g in got)
    assert np.all([eos not in g for g in got])
