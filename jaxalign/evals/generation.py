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

from jaxalign import multihost, policy, rewards, rollout, sampling
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

    With several processes every process gathers each eval batch whole (its loader
    gives it one share), so ``on_batch`` sees whole batches and every metric is the
    one-process number; the reward functions score each process's own rows.
    """
    config, tok = ctx.config, ctx.tokenizer
    eos = tok.eos_id
    cfg = sampling.SamplingConfig(max_new_tokens=config.rl.max_new_tokens, temperature=0.0,
                                  stop_tokens=(eos,), pad_id=tok.pad_id or 0)
    scorer = rollout.make_rewards(ctx)  # shared with the rollout: one reward model
    key = jax.random.PRNGKey(0)

    def evaluate(params) -> dict[str, float]:
        rows: list[tuple[str, dict, policy.Sample, list[int], bool]] = []
        sums: dict[str, np.ndarray] = {}
        limit = config.train.eval_batches
        for local in itertools.islice(ctx.eval_data.eval_batches(), limit or None):
            host = {**multihost.gather_tree({k: local[k] for k in ("prompt_tokens_bt",
                                                                   "prompt_mask_bt")}),
                    "extras": multihost.gather_objects(local["extras"])}
            out = policy.sample_batch(ctx.model_def, params, host["prompt_tokens_bt"],
                                      host["prompt_mask_bt"], key, cfg, mesh=ctx.mesh,
                                      rules=ctx.rules)
            if on_batch is not None:
                for name, pair in on_batch(params, host, out).items():
                    sums[name] = sums.get(name, 0.0) + np.asarray(pair, np.float64)
            own = multihost.process_share(len(host["extras"]))
            for r, (s, extra) in enumerate(zip(policy.samples(out), host["extras"],
                                               strict=True)):
                if not extra:
                    continue  # a padding row
                mask = host["prompt_mask_bt"][r] > 0
                rows.append((tok.decode([x for x in s.ids if x != eos]), extra, s,
                             list(host["prompt_tokens_bt"][r][mask]), own.start <= r < own.stop))
        texts, records = [r[0] for r in rows], [r[1] for r in rows]
        result = generation_metrics(texts, records)
        result.update({k: float(v[0] / max(v[1], 1.0)) for k, v in sums.items()})
        if rows:
            total, parts = _score_own_rows(scorer, rows, cfg.max_new_tokens,
                                           config.rl.to_dict())
            result["reward/mean"] = float(total.mean())
            result.update({f"reward/{k}": float(v.mean()) for k, v in parts.items()})
        return result

    return evaluate


def _score_own_rows(scorer: rewards.Rewards, rows: Sequence[tuple], max_new_tokens: int,
                    options: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every row's reward and components, in row order: each process scores the rows
    marked its own (``(text, record, sample, prompt_ids, own)``), then all are gathered."""
    idx = np.asarray([i for i, r in enumerate(rows) if r[4]], np.int64)
    mine = [rows[i] for i in idx]
    got = [r[2] for r in mine]
    reward_ctx = rewards.RewardContext(
        lengths=np.asarray([len(s.ids) for s in got], np.int64),
        stopped=np.asarray([s.stopped for s in got], bool), max_new_tokens=max_new_tokens,
        prompt_ids=[r[3] for r in mine], completion_ids=[s.ids for s in got], options=options)
    total, parts = scorer([r[0] for r in mine], [r[1] for r in mine], reward_ctx, gather=True)
    order = np.argsort(multihost.gather_rows(idx), kind="stable")
    return total[order], {k: v[order] for k, v in parts.items()}
