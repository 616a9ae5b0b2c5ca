"""Greedy generation and the RL stages' in-training eval.

Generation goes through the policy module (``jaxalign.policy``): its batching loop
and the KV-cache sampler, greedy. The eval registry (loss, pass@k, preference
accuracy, safety, KL, rewards) that ``launch.eval`` runs on checkpoints is
``jaxalign.evals.suite``; comparisons with a baseline and regression gates are
``jaxalign.evals.report``; the scoring of answers is ``jaxalign.evals.scoring``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign import policy, rewards, rollout, sampling
from jaxalign.algos.base import RunContext
from jaxalign.evals.scoring import generation_metrics


def greedy_generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, eos_id: int, pad_id: int = 0,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations (eos excluded) of token-id prompts, with the KV-cache sampler."""
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                  stop_tokens=(eos_id,), pad_id=pad_id)
    model_def, params = policy.split_model(model)
    groups = policy.generate(model_def, params, prompts, jax.random.PRNGKey(0), cfg,
                             rows=min(batch_size, len(prompts)),
                             width=max(len(p) for p in prompts))
    return [s.ids[:-1] if s.stopped else s.ids for (s,) in groups]


def make_prompt_evaluator(ctx: RunContext, on_batch: Callable[..., dict] | None = None
                          ) -> Callable[[Any], dict[str, float]]:
    """``evaluate(params) -> metrics`` for a run whose eval split holds prompts.

    Greedy answers (``rl.max_new_tokens``) to the eval prompt batches, sampled on the
    run's mesh, scored by :func:`~jaxalign.evals.scoring.generation_metrics` and by the
    run's reward (``reward/mean``, shared with the rollout). ``on_batch(params, host,
    out)``, if given, sees each prompt batch and its answers and returns ``{name: (sum,
    count)}``; each name is reported as ``sum / count`` over the eval set.
    """
    config, tok = ctx.config, ctx.tokenizer
    eos = tok.eos_id
    cfg = sampling.SamplingConfig(max_new_tokens=config.rl.max_new_tokens, temperature=0.0,
                                  stop_tokens=(eos,), pad_id=tok.pad_id or 0)
    scorer = rollout.make_rewards(ctx)  # shared with the rollout: one reward model
    key = jax.random.PRNGKey(0)

    def evaluate(params) -> dict[str, float]:
        texts: list[str] = []
        records: list[dict] = []
        prompt_ids: list[list[int]] = []
        got: list[policy.Sample] = []
        sums: dict[str, np.ndarray] = {}
        limit = config.train.eval_batches
        for host in itertools.islice(ctx.eval_data.eval_batches(), limit or None):
            out = policy.sample_batch(ctx.model_def, params, host["prompt_tokens_bt"],
                                      host["prompt_mask_bt"], key, cfg, mesh=ctx.mesh,
                                      rules=ctx.rules)
            if on_batch is not None:
                for name, pair in on_batch(params, host, out).items():
                    sums[name] = sums.get(name, 0.0) + np.asarray(pair, np.float64)
            for r, (s, extra) in enumerate(zip(policy.samples(out), host["extras"],
                                               strict=True)):
                if not extra:
                    continue  # a padding row
                texts.append(tok.decode([x for x in s.ids if x != eos]))
                records.append(extra)
                got.append(s)
                mask = host["prompt_mask_bt"][r] > 0
                prompt_ids.append(list(host["prompt_tokens_bt"][r][mask]))
        result = generation_metrics(texts, records)
        result.update({k: float(v[0] / max(v[1], 1.0)) for k, v in sums.items()})
        if texts:
            reward_ctx = rewards.RewardContext(
                lengths=np.asarray([len(s.ids) for s in got]),
                stopped=np.asarray([s.stopped for s in got]), max_new_tokens=cfg.max_new_tokens,
                prompt_ids=prompt_ids, completion_ids=[s.ids for s in got],
                options=config.rl.to_dict())
            total, parts = scorer(texts, records, reward_ctx)
            result["reward/mean"] = float(total.mean())
            result.update({f"reward/{k}": float(v.mean()) for k, v in parts.items()})
        return result

    return evaluate
