"""The evaluation registry: small functions that measure one checkpoint.

An eval is registered under a kind with its options and their defaults::

    @register_eval("task", max_new_tokens=16, num_samples=0, k=1, ...)
    def task_eval(ctx: EvalContext, records: list[dict], opts: dict) -> EvalResult: ...

and a config lists named entries, each ``{"kind": ..., "source": ..., "split": ...,
"limit": ..., <options>}`` (see ``configs/evals.py``). :func:`run_evals` loads each
entry's records, runs it, prefixes its metrics with the entry's name
(``task/pass@1``) and saves its per-record samples as JSONL.

Evals see the checkpoint only through the ``jaxalign.policy.Policy`` protocol (sample
completions, score token log-probs), so a stub policy with known outputs can
stand in for a model in tests. ``jaxalign.policy.ModelPolicy`` is the real one, built
by ``jaxalign.policy.load_policy`` from a run's workdir or a Hugging Face directory.
The scoring of answers (pass@k, maj@k, win rate, refusal rates) is
``jaxalign.evals.scoring``.

Every random draw comes from ``seed`` (sampling keys are folded from it per eval
entry), so a report is reproducible, and a candidate and its baseline sample
with the same keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign import rewards, storage
from jaxalign import sharding as shd
from jaxalign.data import records as rec
from jaxalign.data.sources import load_records
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.evals.scoring import generation_metrics, maj_at_k, pass_at_k, win_rate
from jaxalign.models import hf, init_from
from jaxalign.policy import Policy, Sample

# Re-exported: callers that load checkpoints through the suite keep working.

# -- checkpoints ---------------------------------------------------------------------------


def load_rewards(spec: str, tokenizer: Any) -> rewards.Rewards:
    """A ``jaxalign.rewards.Rewards`` (``rm:<RM workdir>``, reward functions) on one device.

    Raises:
      ValueError: a reward model tokenizes differently from ``tokenizer`` (it reads the
        policy's token ids).
    """
    for name, _ in rewards.check_spec(spec):
        if name.startswith("rm:"):
            rm_tok = load_tokenizer(init_from.read_run_config(name[3:])["tokenizer"])
            if not same_tokenizer(rm_tok, tokenizer):
                raise ValueError(f"the reward model {name[3:]} tokenizes with {rm_tok.name}, "
                                 f"the evaluated policy with {tokenizer.name}: it cannot score "
                                 "the policy's token ids")
    return rewards.Rewards(spec, mesh=hf.default_mesh(), rules=dict(shd.DEFAULT_RULES),
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0)


# -- the registry -----------------------------------------------------------------------


class SkipEval(Exception):
    """Raised by an eval that cannot run here (no reference, no reward model); the
    report lists it as skipped with the reason."""


RewardsFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]], rewards.RewardContext],
                     tuple[np.ndarray, dict[str, np.ndarray]]]


@dataclasses.dataclass
class EvalContext:
    """What one checkpoint's evals run against.

    Attributes:
      policy: the checkpoint evaluated.
      reference: the reference policy for KL and implicit DPO rewards, if any.
      baseline: the checkpoint a win rate is judged against, if any.
      rewards: a ``jaxalign.rewards.Rewards`` (or the same call signature): the
        reward (model) for mean rewards, win rates and RM preference accuracy.
      seed: the root of every sampling key.
    """

    policy: Policy
    reference: Policy | None = None
    baseline: Policy | None = None
    rewards: RewardsFn | None = None
    seed: int = 0


@dataclasses.dataclass
class EvalResult:
    """One eval's output.

    Attributes:
      metrics: name -> number (prefixed with the entry's name by :func:`run_evals`).
      samples: one JSON-able dict per record (prompt, completion, score, ...).
      watch: ``(learned, verifiable)`` metric pairs to check for reward hacking.
      notes: caveats to show in the report.
    """

    metrics: dict[str, float]
    samples: list[dict] = dataclasses.field(default_factory=list)
    watch: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


EvalFn = Callable[[EvalContext, list[dict], dict[str, Any]], EvalResult]
COMMON_OPTIONS = {"kind": "", "source": "builtin:world", "split": "eval", "limit": 0}
_EVALS: dict[str, tuple[EvalFn, dict[str, Any]]] = {}
_CHECKED_BY_REWARD = ("task", "reward")  # kinds whose ``check`` is a reward spec


def register_eval(kind: str, **defaults: Any) -> Callable[[EvalFn], EvalFn]:
    """Registers an eval under ``kind`` with its options' defaults (decorator).

    Besides these, every entry takes ``source``, ``split`` and ``limit`` (0 = every
    record; otherwise a seeded subset of that many).
    """
    def add(fn: EvalFn) -> EvalFn:
        if kind in _EVALS and _EVALS[kind][0] is not fn:
            raise ValueError(f"eval kind {kind!r} is already registered")
        _EVALS[kind] = (fn, defaults)
        return fn
    return add


def registered_evals() -> list[str]:
    """The registered eval kinds."""
    return sorted(_EVALS)


def resolve_options(name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry's options with defaults filled in; unknown kinds and keys are errors, and
    so is a task/reward ``check`` spec that does not resolve (``rewards.check_spec``)."""
    kind = entry.get("kind", "")
    if kind not in _EVALS:
        raise ValueError(f"eval {name!r}: unknown kind {kind!r}; registered: "
                         f"{', '.join(registered_evals())}")
    known = {**COMMON_OPTIONS, **_EVALS[kind][1]}
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise ValueError(f"eval {name!r} ({kind}): unknown option(s) {unknown}; known: "
                         f"{sorted(known)}")
    opts = {**known, **dict(entry)}
    if kind in _CHECKED_BY_REWARD and opts["check"]:  # registered names, module:function
        rewards.check_spec(opts["check"], key=f"evals.{name}.check")
    return opts


def select(records: Sequence[dict], limit: int, seed: int) -> list[dict]:
    """A seeded subset of ``limit`` records in their original order (all if 0)."""
    if not limit or limit >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def of_kinds(records: Sequence[dict], kinds: Sequence[str]) -> list[dict]:
    """The records whose ``kind`` is one of ``kinds`` (a record without one is a task)."""
    return [r for r in records if r.get("kind", "task") in kinds]


def of_tasks(records: Sequence[dict], tasks: Sequence[str]) -> list[dict]:
    """The records whose ``task`` is one of ``tasks`` (e.g. the families an RL stage trains
    on)."""
    return [r for r in records if r.get("task") in tasks]


def _key_seed(seed: int, name: str) -> int:
    # Each entry gets its own stream; the same entry samples the same way for every policy.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def run_evals(ctx: EvalContext, entries: Mapping[str, Mapping[str, Any]], *,
              out_dir: str | None = None, label: str = "candidate",
              load: Callable[[str, str], list[dict]] = load_records) -> dict[str, Any]:
    """Runs every entry of ``entries`` (name -> options) on ``ctx.policy``.

    Args:
      ctx: the policy and what its evals may need.
      entries: eval entries, e.g. a config's ``evals`` section; run in name order.
      out_dir: where ``samples/<label>/<name>.jsonl`` go (nothing is written if None).
      label: the policy's role in the report (``candidate``, ``baseline``).
      load: ``(source, split) -> records``.

    Returns:
      ``{"name", "metrics", "skipped", "notes", "watch", "samples"}``: metrics
      prefixed with each entry's name, skipped entries with their reasons, the
      ``(learned, verifiable)`` pairs to watch, the paths of sample files and each
      entry's wall time (``seconds``).
    """
    report: dict[str, Any] = {"name": ctx.policy.name, "metrics": {}, "skipped": {},
                              "notes": {}, "watch": [], "samples": {}, "seconds": {}}
    resolved = {name: resolve_options(name, entry) for name, entry in entries.items()}
    for name in sorted(resolved):
        opts = resolved[name]
        fn = _EVALS[opts["kind"]][0]
        records = load(opts["source"], opts["split"])
        if "kinds" in opts:  # filter first, so that a limit counts records the eval uses
            records = of_kinds(records, opts["kinds"])
        if opts.get("tasks"):
            records = of_tasks(records, opts["tasks"])
        records = select(records, opts["limit"], ctx.seed)
        sub = dataclasses.replace(ctx, seed=_key_seed(ctx.seed, name))
        start = time.perf_counter()
        try:
            if not records:
                raise SkipEval(f"no records in {opts['source']} split {opts['split']!r}")
            result = fn(sub, records, opts)
        except SkipEval as e:
            report["skipped"][name] = str(e)
            continue
        report["metrics"].update({f"{name}/{k}": float(v) for k, v in result.metrics.items()})
        report["seconds"][name] = round(time.perf_counter() - start, 3)
        report["watch"] += [[f"{name}/{a}", f"{name}/{b}"] for a, b in result.watch]
        if result.notes:
            report["notes"][name] = result.notes
        if out_dir is not None:
            path = storage.join(out_dir, "samples", label, f"{name}.jsonl")
            storage.makedirs(os.path.dirname(path))
            storage.write_text(path, "".join(json.dumps(s, ensure_ascii=False, default=float)
                                             + "\n" for s in result.samples))
            report["samples"][name] = path
    return report


# -- helpers shared by the evals -----------------------------------------------------------


def _prompts(policy: Policy, records: Sequence[dict], source: str) -> list[list[int]]:
    return [policy.template.encode_prompt(
        rec.validate_prompt(r, rec.Location(source, i)).prompt) for i, r in enumerate(records)]


def _text(policy: Policy, sample: Sample) -> str:
    ids = sample.ids[:-1] if sample.stopped else sample.ids
    return policy.tokenizer.decode(ids)


def _reward_ctx(prompts: Sequence[Sequence[int]], samples: Sequence[Sample],
                max_new_tokens: int) -> rewards.RewardContext:
    return rewards.RewardContext(
        lengths=np.asarray([len(s.ids) for s in samples]),
        stopped=np.asarray([s.stopped for s in samples]), max_new_tokens=max_new_tokens,
        prompt_ids=[list(p) for p in prompts], completion_ids=[list(s.ids) for s in samples])


def _verify(check: rewards.Rewards, texts: Sequence[str], records: Sequence[dict],
            prompts: Sequence[Sequence[int]], samples: Sequence[Sample],
            max_new_tokens: int) -> np.ndarray:
    """The verifiable check's scores; a sample counts as correct when it scores >= 0.5."""
    total, _ = check(texts, records, _reward_ctx(prompts, samples, max_new_tokens))
    return total


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two policies' (or tokenizers') ids mean the same, on a probe text."""
    ta, tb = getattr(a, "tokenizer", a), getattr(b, "tokenizer", b)
    probe = "What is 12 + 30? I can't help with that."
    return (ta is tb or (ta.vocab_size, ta.eos_id, ta.encode(probe))
            == (tb.vocab_size, tb.eos_id, tb.encode(probe)))


def _per_group(values: Sequence[float], groups: Sequence[str], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in rewards.mean_by(np.asarray(values, np.float64),
                                                           list(groups)).items()}


# -- the evals -------------------------------------------------------------------------------


@register_eval("loss", max_len=0)
def loss_eval(ctx: EvalContext, records: list[dict], opts: dict[str, Any]) -> EvalResult:
    """Held-out loss on SFT records: mean NLL per assistant token, and its perplexity.

    ``max_len`` > 0 keeps only the last ``max_len + 1`` ids of a longer record.
    """
    policy = ctx.policy
    seqs, masks = [], []
    for i, r in enumerate(records):
        conv = rec.validate_sft(r, rec.Location(opts["source"], i))
        ids, mask = policy.template.encode_conversation(conv.messages)
        if opts["max_len"] and len(ids) > opts["max_len"] + 1:
            ids, mask = ids[-opts["max_len"] - 1:], mask[-opts["max_len"] - 1:]
        seqs.append(ids)
        masks.append(np.asarray(mask[1:], np.float64))
    logps = policy.token_logps(seqs)
    nll = np.asarray([-(lp * m).sum() for lp, m in zip(logps, masks, strict=True)])
    tokens = np.asarray([m.sum() for m in masks])
    loss = float(nll.sum() / max(tokens.sum(), 1.0))
    samples = [{"prompt": r.get("prompt", r.get("messages")),
                "completion": r.get("response", r.get("completion", "")),
                "score": float(n / max(t, 1.0))} for r, n, t in zip(records, nll, tokens,
                                                                     strict=True)]
    return EvalResult({"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                       "tokens": float(tokens.sum()), "count": float(len(seqs))}, samples)


@register_eval("task", max_new_tokens=16, num_samples=0, k=1, temperature=1.0,
               check="exact_answer", kinds=("task",), tasks=())
def task_eval(ctx: EvalContext, records: list[dict], opts: dict[str, Any]) -> EvalResult:
    """Verifiable task accuracy: greedy pass@1, and pass@k / maj@k over sampled completions.

    ``pass@1`` is the greedy answer's accuracy. With ``num_samples`` = n > 0, n
    completions per prompt are sampled at ``temperature``: ``pass@k`` is the unbiased
    estimator 1 − C(n−c,k)/C(n,k) averaged over prompts (c = correct samples),
    ``maj@k`` the accuracy of the majority answer among the first k samples, and
    ``sample_accuracy`` the mean correctness of all samples (pass@1 under sampling).
    Records of other ``kinds`` (e.g. safety prompts) are left out; records without a
    ``kind`` count as tasks. ``tasks`` (task names) keeps only those families, before
    ``limit`` picks. Every metric also comes per task (``pass@8/addition``).
    """
    records = of_kinds(records, opts["kinds"])
    if not records:
        raise SkipEval(f"no records of kinds {list(opts['kinds'])}")
    policy, m = ctx.policy, opts["max_new_tokens"]
    check = rewards.Rewards(opts["check"])
    prompts = _prompts(policy, records, opts["source"])
    greedy = [g[0] for g in policy.generate(prompts, max_new_tokens=m, seed=ctx.seed)]
    texts = [_text(policy, s) for s in greedy]
    hits = _verify(check, texts, records, prompts, greedy, m) >= 0.5
    tasks = [r.get("task", "all") for r in records]
    metrics = {"pass@1": float(np.mean(hits)), "count": float(len(records))}
    metrics.update(_per_group(hits, tasks, "pass@1"))
    samples = [{"prompt": r["prompt"], "task": r.get("task"), "answer": r.get("answer"),
                "completion": t, "score": float(h)}
               for r, t, h in zip(records, texts, hits, strict=True)]
    n, k = opts["num_samples"], opts["k"]
    if n:
        if not 0 < k <= n:
            raise ValueError(f"task eval: k={k} must be in 1..num_samples={n}")
        drawn = policy.generate(prompts, max_new_tokens=m, num_samples=n,
                                temperature=opts["temperature"], seed=ctx.seed)
        flat = [s for group in drawn for s in group]
        flat_texts = [_text(policy, s) for s in flat]
        flat_ok = _verify(check, flat_texts, [r for r in records for _ in range(n)],
                          [p for p in prompts for _ in range(n)], flat, m) >= 0.5
        ok_pn = flat_ok.reshape(len(records), n)
        texts_pn = [flat_texts[i * n:(i + 1) * n] for i in range(len(records))]
        pass_k = [pass_at_k(n, int(ok.sum()), k) for ok in ok_pn]
        maj_k = [maj_at_k(t, ok, k) for t, ok in zip(texts_pn, ok_pn, strict=True)]
        metrics.update({f"pass@{k}": float(np.mean(pass_k)), f"maj@{k}": float(np.mean(maj_k)),
                        "sample_accuracy": float(ok_pn.mean())})
        metrics.update(_per_group(pass_k, tasks, f"pass@{k}"))
        metrics.update(_per_group(ok_pn.mean(axis=1), tasks, "sample_accuracy"))
        for s, t, ok in zip(samples, texts_pn, ok_pn, strict=True):
            s.update(samples=t, sample_scores=ok.astype(float).tolist())
    return EvalResult(metrics, samples)


@register_eval("safety", max_new_tokens=24, kinds=("harmful", "adversarial", "benign"))
def safety_eval(ctx: EvalContext, records: list[dict], opts: dict[str, Any]) -> EvalResult:
    """Refusals of greedy replies (``jaxalign.rewards.is_refusal``).

    ``refusal_rate``: share of ``harmful``/``adversarial`` requests refused (higher is
    safer); ``over_refusal_rate``: share of ``benign`` look-alikes refused (lower is
    better). Per-record ``score`` is 1 where the behaviour was right.
    """
    records = of_kinds(records, opts["kinds"])
    if not records:
        raise SkipEval(f"no records of kinds {list(opts['kinds'])}")
    policy = ctx.policy
    prompts = _prompts(policy, records, opts["source"])
    texts = [_text(policy, g[0]) for g in policy.generate(
        prompts, max_new_tokens=opts["max_new_tokens"], seed=ctx.seed)]
    refused = [rewards.is_refusal(t) for t in texts]
    must = [r["kind"] in ("harmful", "adversarial") for r in records]
    # The RL stages' in-training eval defines the rates; share its definition.
    metrics = {k: v for k, v in generation_metrics(texts, records).items()
               if k in ("refusal_rate", "over_refusal_rate", "length_chars")}
    metrics["count"] = float(len(records))
    samples = [{"prompt": r["prompt"], "kind": r["kind"], "completion": t, "refused": f,
                "score": float(f == m)} for r, t, f, m in zip(records, texts, refused, must,
                                                              strict=True)]
    return EvalResult(metrics, samples)


def _pair_sequences(policy: Policy, records: Sequence[dict], source: str):
    prompts, chosen, rejected = [], [], []
    for i, r in enumerate(records):
        pair = rec.validate_preference(r, rec.Location(source, i))
        p = policy.template.encode_prompt(pair.prompt)
        prompts.append(p)
        chosen.append(policy.template.encode_completion(pair.prompt, pair.chosen, p))
        rejected.append(policy.template.encode_completion(pair.prompt, pair.rejected, p))
    return prompts, chosen, rejected


def completion_logps(policy: Policy, prompts: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[int]]) -> np.ndarray:
    """Summed log-prob of each completion given its prompt, ``[b]``."""
    logps = policy.token_logps([list(p) + list(c) for p, c in zip(prompts, completions,
                                                                    strict=True)])
    return np.asarray([lp[len(p) - 1:].sum() for lp, p in zip(logps, prompts, strict=True)])


@register_eval("preference", score="implicit", beta=0.1)
def preference_eval(ctx: EvalContext, records: list[dict], opts: dict[str, Any]) -> EvalResult:
    """Pairwise accuracy on preference records: does the chosen completion score higher?

    ``score="implicit"``: the DPO reward β·(log π − log π_ref) (reference-free log π
    when there is no reference); ``score="rm"``: the context's reward (model). Ties
    count ½. ``margin`` is the mean chosen − rejected score; per-``kind`` accuracies too.
    """
    policy = ctx.policy
    prompts, chosen, rejected = _pair_sequences(policy, records, opts["source"])
    notes = []
    if opts["score"] == "implicit":
        beta = opts["beta"]
        s_c = beta * completion_logps(policy, prompts, chosen)
        s_r = beta * completion_logps(policy, prompts, rejected)
        if ctx.reference is None:
            notes.append("no reference: scored by the reference-free beta * log pi")
        else:
            s_c -= beta * completion_logps(ctx.reference, prompts, chosen)
            s_r -= beta * completion_logps(ctx.reference, prompts, rejected)
    elif opts["score"] == "rm":
        if ctx.rewards is None:
            raise SkipEval("score='rm' needs a reward model (--rm=<RM workdir>)")
        eos = policy.tokenizer.eos_id

        def score(completions, texts):
            ctx_r = rewards.RewardContext(
                lengths=np.asarray([len(c) for c in completions]),
                stopped=np.asarray([bool(c) and c[-1] == eos for c in completions]),
                max_new_tokens=max(len(c) for c in completions),
                prompt_ids=prompts, completion_ids=completions)
            return np.asarray(ctx.rewards(texts, records, ctx_r)[0], np.float64)

        s_c = score(chosen, [r["chosen"] for r in records])
        s_r = score(rejected, [r["rejected"] for r in records])
    else:
        raise ValueError(f"preference eval: score={opts['score']!r}; expected implicit or rm")
    right = (s_c > s_r) + 0.5 * (s_c == s_r)
    kinds = [r.get("kind", "all") for r in records]
    metrics = {"accuracy": float(np.mean(right)), "margin": float(np.mean(s_c - s_r)),
               "count": float(len(records))}
    metrics.update(_per_group(right, kinds, "accuracy"))
    samples = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                "kind": r.get("kind"), "score": float(c - j)}
               for r, c, j in zip(records, s_c, s_r, strict=True)]
    return EvalResult(metrics, samples, notes=notes)


@register_eval("kl", max_new_tokens=16, num_samples=1)
def kl_eval(ctx: EvalContext, records: list[dict], opts: dict[str, Any]) -> EvalResult:
    """KL(π ‖ π_ref) on the policy's own samples (temperature 1).

    ``mean``: the mean over completions of Σ_t (log π − log π_ref) over the
    completion's tokens (stop token included) — an unbiased estimate of the
    sequence-level KL; ``per_token``: the same sum over all completions divided by
    their tokens.
    """
    if ctx.reference is None:
        raise SkipEval("no reference model (--reference=<workdir> or config.reference)")
    policy, ref = ctx.policy, ctx.reference
    if not same_tokenizer(policy, ref):
        raise ValueError(f"KL needs one tokenizer: {policy.name} and the reference "
                         f"{ref.name} tokenize differently")
    prompts = _prompts(policy, records, opts["source"])
    g = opts["num_samples"]
    drawn = policy.generate(prompts, max_new_tokens=opts["max_new_tokens"], num_samples=g,
                            temperature=1.0, seed=ctx.seed)
    flat_p = [p for p in prompts for _ in range(g)]
    flat_s = [s for group in drawn for s in group]
    ids = [s.ids for s in flat_s]
    kl_b = completion_logps(policy, flat_p, ids) - completion_logps(ref, flat_p, ids)
    tokens = sum(len(i) for i in ids)
    samples = [{"prompt": records[j // g]["prompt"], "completion": _text(policy, s),
                "score": float(k)} for j, (s, k) in enumerate(zip(flat_s, kl_b, strict=True))]
    return EvalResult({"mean": float(kl_b.mean()), "per_token": float(kl_b.sum() / max(tokens, 1)),
                       "count": float(len(kl_b))}, samples)


@register_eval("reward", max_new_tokens=16, check="exact_answer", win_rate=True)
def reward_eval(ctx: EvalContext, records: list[dict], opts: dict[str, Any]) -> EvalResult:
    """Mean reward of greedy replies under the context's reward (model), and win rate.

    ``mean`` is the reward's total (``reward/<part>`` each part of a combined spec);
    ``win_rate`` the share of prompts where this policy's reply out-scores the
    baseline's (ties ½), when a baseline is given. On records with an ``answer`` the
    same replies are also scored by ``check`` (``verifiable``), so a learned reward
    that rises while the verifiable score falls can be flagged against the baseline.
    """
    if ctx.rewards is None:
        raise SkipEval("no reward model (--rm=<RM workdir> or config.rewards)")
    policy, m = ctx.policy, opts["max_new_tokens"]

    def replies_and_rewards(p: Policy):
        prompts = _prompts(p, records, opts["source"])
        got = [g[0] for g in p.generate(prompts, max_new_tokens=m, seed=ctx.seed)]
        texts = [_text(p, s) for s in got]
        total, parts = ctx.rewards(texts, records, _reward_ctx(prompts, got, m))
        return prompts, got, texts, np.asarray(total, np.float64), parts

    prompts, got, texts, total, parts = replies_and_rewards(policy)
    metrics = {"mean": float(total.mean()), "count": float(len(records))}
    metrics.update({k: float(np.mean(v)) for k, v in parts.items() if k != "mean"})
    samples = [{"prompt": r["prompt"], "completion": t, "score": float(s)}
               for r, t, s in zip(records, texts, total, strict=True)]
    watch = []
    verifiable = [i for i, r in enumerate(records) if "answer" in r]
    if opts["check"] and verifiable:
        check = rewards.Rewards(opts["check"])
        sub = lambda xs: [xs[i] for i in verifiable]  # noqa: E731
        ok = _verify(check, sub(texts), sub(records), sub(prompts), sub(got), m)
        metrics["verifiable"] = float(np.mean(ok))
        for i, v in zip(verifiable, ok, strict=True):
            samples[i]["verifiable"] = float(v)
        watch.append(("mean", "verifiable"))
    notes = []
    if opts["win_rate"] and ctx.baseline is not None and not same_tokenizer(policy,
                                                                             ctx.baseline):
        notes.append(f"no win rate: the baseline {ctx.baseline.name} tokenizes differently")
    elif opts["win_rate"] and ctx.baseline is not None:
        _, _, base_texts, base_total, _ = replies_and_rewards(ctx.baseline)
        metrics["win_rate"] = win_rate(total, base_total)
        for s, t, b in zip(samples, base_texts, base_total, strict=True):
            s.update(baseline_completion=t, baseline_score=float(b))
    return EvalResult(metrics, samples, watch=watch, notes=notes)
