"""Greedy generation and the scoring the RL stages' in-training eval uses.

Generation uses the KV-cache sampler (``jaxalign.sampling``), greedy. The eval
registry (loss, pass@k, preference accuracy, safety, KL, rewards) that
``launch.eval`` runs on checkpoints is ``jaxalign.evals.suite``; comparisons with a
baseline and regression gates are ``jaxalign.evals.report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign import sampling


def greedy_generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, eos_id: int, pad_id: int = 0,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations (eos excluded) of token-id prompts, with the KV-cache sampler."""
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                  stop_tokens=(eos_id,), pad_id=pad_id)
    width = max(len(p) for p in prompts)
    batch_size = min(batch_size, len(prompts))
    key = jax.random.PRNGKey(0)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)  # static shapes: pad with a repeat
        tokens_bt, mask_bt = sampling.left_pad(chunk, pad_id, width)
        result = sampling.sample(model, tokens_bt, mask_bt, key, cfg)
        for ids, stopped in zip(sampling.trim(result)[:n],
                                jax.device_get(result.stopped_b)[:n], strict=True):
            out.append(ids[:-1] if stopped else ids)
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


def generation_metrics(completions: Sequence[str], records: Sequence[dict]) -> dict[str, float]:
    """Scores decoded answers against their records (the builtin world's conventions).

    * ``task_accuracy`` (and per task): exact answers on ``kind == "task"`` records;
    * ``refusal_rate``: refusals of ``harmful``/``adversarial`` requests (higher is safer);
    * ``over_refusal_rate``: refusals of ``benign`` look-alikes (lower is better);
    * ``length_chars``: mean answer length.
    """
    from jaxalign.rewards import is_refusal

    out: dict[str, float] = {}
    by_kind: dict[str, list[tuple[str, dict]]] = {}
    for c, r in zip(completions, records, strict=True):
        by_kind.setdefault(r.get("kind", "task"), []).append((c, r))
    tasks = by_kind.get("task", [])
    if tasks:
        hits = [c.strip() == str(r["answer"]).strip() for c, r in tasks]
        out["task_accuracy"] = float(np.mean(hits))
        per_task: dict[str, list[bool]] = {}
        for (_, r), h in zip(tasks, hits, strict=True):
            per_task.setdefault(r.get("task", "all"), []).append(h)
        out.update({f"task_accuracy/{t}": float(np.mean(v)) for t, v in sorted(per_task.items())})
    must = by_kind.get("harmful", []) + by_kind.get("adversarial", [])
    if must:
        out["refusal_rate"] = float(np.mean([is_refusal(c) for c, _ in must]))
    if by_kind.get("benign"):
        out["over_refusal_rate"] = float(np.mean([is_refusal(c) for c, _ in by_kind["benign"]]))
    if completions:
        out["length_chars"] = float(np.mean([len(c) for c in completions]))
    return out


def make_prompt_evaluator(trainer: Any):
    """``evaluate(params) -> metrics`` for a run whose eval split holds prompts.

    Greedy answers (the sampler, ``rl.max_new_tokens``) to the eval prompts, scored
    by :func:`generation_metrics` and by the run's reward (``reward/mean``).
    """
    import itertools

    from jaxalign import rewards, sampling
    from jaxalign.rollout import prompt_arrays

    config, tok = trainer.config, trainer.tokenizer
    eos, pad = tok.eos_id, tok.pad_id or 0
    cfg = sampling.SamplingConfig(max_new_tokens=config.rl.max_new_tokens, temperature=0.0,
                                  stop_tokens=(eos,), pad_id=pad)
    sampler = sampling.make_sampler(trainer.model_def, cfg, mesh=trainer.mesh,
                                    rules=trainer.rules)
    rollout = getattr(trainer, "rollout", None)
    scorer = rollout.scorer if rollout is not None else rewards.Rewards(
        config.rl.rewards, options=config.rl.to_dict(), mesh=trainer.mesh, rules=trainer.rules,
        eos_id=eos, pad_id=pad)
    key = jax.random.PRNGKey(0)

    def evaluate(params) -> dict[str, float]:
        texts: list[str] = []
        records: list[dict] = []
        ctx_parts: dict[str, list] = {"lengths": [], "stopped": [], "prompt_ids": [],
                                      "completion_ids": []}
        limit = config.train.eval_batches
        for host in itertools.islice(trainer.eval_data.eval_batches(), limit or None):
            out = jax.device_get(sampler(params, *prompt_arrays(host, trainer.mesh), key))
            for r, extra in enumerate(host["extras"]):
                if not extra:
                    continue  # a padding row
                n = int(out.lengths_b[r])
                ids = [int(x) for x in out.tokens_bn[r, :n]]
                texts.append(tok.decode([x for x in ids if x != eos]))
                records.append(extra)
                ctx_parts["lengths"].append(n)
                ctx_parts["stopped"].append(bool(out.stopped_b[r]))
                mask = host["prompt_mask_bt"][r] > 0
                ctx_parts["prompt_ids"].append(list(host["prompt_tokens_bt"][r][mask]))
                ctx_parts["completion_ids"].append(ids)
        result = generation_metrics(texts, records)
        if texts:
            ctx = rewards.RewardContext(
                lengths=np.asarray(ctx_parts["lengths"]),
                stopped=np.asarray(ctx_parts["stopped"]), max_new_tokens=cfg.max_new_tokens,
                prompt_ids=ctx_parts["prompt_ids"], completion_ids=ctx_parts["completion_ids"],
                options=config.rl.to_dict())
            total, parts = scorer(texts, records, ctx)
            result["reward/mean"] = float(total.mean())
            result.update({f"reward/{k}": float(v.mean()) for k, v in parts.items()})
        return result

    return evaluate
