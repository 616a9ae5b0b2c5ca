"""Checkpoint evaluations. So far: greedy pass@1 on the verifiable builtin tasks.

Generation here recomputes the whole prefix each step (no KV cache): it is
exact and simple, and fast enough for eval sets of a few hundred short
answers; the sampler (``jaxalign.sampling``) is the tool for anything larger.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, eos_id: int, pad_id: int = 0,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations (eos excluded) of token-id prompts, right-padded in batches."""
    graphdef, state = nnx.split(model)
    width = max(len(p) for p in prompts) + max_new_tokens

    @jax.jit
    def run(state, tokens_bt, lengths_b):
        m = nnx.merge(graphdef, state)
        b = tokens_bt.shape[0]
        positions_bt = jnp.broadcast_to(jnp.arange(width), (b, width))

        def step(i, carry):
            tokens_bt, lengths_b, done_b = carry
            seg_bt = (positions_bt < lengths_b[:, None]).astype(jnp.int32)
            logits_btv = m(tokens_bt, positions_bt, seg_bt)
            last_bv = jnp.take_along_axis(logits_btv, (lengths_b - 1)[:, None, None], 1)[:, 0]
            next_b = jnp.argmax(last_bv, axis=-1).astype(tokens_bt.dtype)
            write_b = ~done_b
            tokens_bt = tokens_bt.at[jnp.arange(b), lengths_b].set(
                jnp.where(write_b, next_b, tokens_bt[jnp.arange(b), lengths_b]))
            done_b = done_b | (next_b == eos_id)
            lengths_b = lengths_b + (write_b & (next_b != eos_id)).astype(lengths_b.dtype)
            return tokens_bt, lengths_b, done_b

        done = jnp.zeros(tokens_bt.shape[0], bool)
        return jax.lax.fori_loop(0, max_new_tokens, step, (tokens_bt, lengths_b, done))

    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)  # static shapes: pad with a repeat
        tokens = np.full((batch_size, width), pad_id, np.int32)
        for r, p in enumerate(chunk):
            tokens[r, :len(p)] = p
        lengths = np.array([len(p) for p in chunk], np.int32)
        tokens_bt, end_b, _ = jax.device_get(run(state, tokens, lengths))
        out += [list(tokens_bt[r, lengths[r]:end_b[r]]) for r in range(n)]
    return out


def task_accuracy(model: nnx.Module, tokenizer: Any, template: Any,
                  records: Sequence[dict], *, max_new_tokens: int = 12) -> dict[str, float]:
    """Greedy pass@1: the decoded answer equals the record's ``answer`` (stripped)."""
    prompts = [template.encode_prompt([{"role": "user", "content": r["prompt"]}])
               for r in records]
    outs = greedy_generate(model, prompts, max_new_tokens=max_new_tokens,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0)
    hits = [tokenizer.decode(o).strip() == str(r["answer"]).strip()
            for o, r in zip(outs, records, strict=True)]
    per_task: dict[str, list[bool]] = {}
    for r, h in zip(records, hits, strict=True):
        per_task.setdefault(r.get("task", "all"), []).append(h)
    result = {"task_accuracy": float(np.mean(hits)), "task_count": float(len(hits))}
    result.update({f"task_accuracy/{t}": float(np.mean(v)) for t, v in sorted(per_task.items())})
    return result
