"""Reward sources for online RL and rejection sampling.

A reward function scores a batch of decoded completions against their records
(the prompt record's other fields, e.g. ``answer``):

    fn(completions: list[str], records: list[dict], ctx: RewardContext) -> array [n]

Register your own in a few lines::

    from jaxalign import rewards

    @rewards.register("mentions_answer")
    def mentions_answer(completions, records, ctx):
        return [float(str(r["answer"]) in c) for c, r in zip(completions, records)]

and select it from a config: ``rl.rewards = "exact_answer:1.0,mentions_answer:0.2"``.
A trained reward model is an entry too: ``rm:<workdir of an RM run>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxalign import policy
from jaxalign import sharding as shd
from jaxalign.data.world import REFUSAL
from jaxalign.models import init_from
from jaxalign.models.heads import RewardModel


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What a reward function may read besides the text: token-level facts of each row.

    Attributes:
      lengths: generated tokens per completion (the stop token included).
      stopped: whether each completion ended on a stop token (False = cut at the limit).
      max_new_tokens: the sampler's limit.
      prompt_ids: each row's prompt token ids.
      completion_ids: each row's generated ids (the stop token included).
      options: the ``rl`` config section, for functions with settings.
    """

    lengths: np.ndarray
    stopped: np.ndarray
    max_new_tokens: int
    prompt_ids: Sequence[Sequence[int]] = ()
    completion_ids: Sequence[Sequence[int]] = ()
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


RewardFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]], RewardContext], Any]
_REGISTRY: dict[str, RewardFn] = {}


def register(name: str, fn: RewardFn | None = None, *, replace: bool = False):
    """Registers ``fn`` under ``name`` (usable as a decorator); names are unique unless
    ``replace`` (e.g. a notebook cell run again redefines its reward)."""
    def add(f: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not f and not replace:
            raise ValueError(f"reward function {name!r} is already registered (pass "
                             "replace=True to redefine it)")
        _REGISTRY[name] = f
        return f
    return add if fn is None else add(fn)


def registered() -> list[str]:
    """Names of the registered reward functions."""
    return sorted(_REGISTRY)


def _field(record: Mapping[str, Any], name: str, reward: str) -> Any:
    if name not in record:
        raise KeyError(f"reward {reward!r} reads the record field {name!r}, which this "
                       f"record lacks (fields: {sorted(record)})")
    return record[name]


@register("exact_answer")
def exact_answer(completions, records, ctx):
    """1 when the completion, stripped, equals the record's ``answer``."""
    return [float(c.strip() == str(_field(r, "answer", "exact_answer")).strip())
            for c, r in zip(completions, records, strict=True)]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@register("numeric_answer")
def numeric_answer(completions, records, ctx):
    """1 when the last number in the completion equals the numeric ``answer``."""
    out = []
    for c, r in zip(completions, records, strict=True):
        found = _NUMBER.findall(c)
        try:
            want = float(_field(r, "answer", "numeric_answer"))
        except ValueError:
            out.append(0.0)
            continue
        out.append(float(bool(found) and math.isclose(float(found[-1]), want)))
    return out


@register("contains_answer")
def contains_answer(completions, records, ctx):
    """1 when the ``answer`` appears in the completion (case-insensitive)."""
    return [float(str(_field(r, "answer", "contains_answer")).strip().lower() in c.lower())
            for c, r in zip(completions, records, strict=True)]


@register("answer_similarity")
def answer_similarity(completions, records, ctx):
    """Partial credit in [0, 1]: difflib's match ratio between the completion and ``answer``.

    A dense shaping signal next to ``exact_answer``: near misses ("TUNNELE" for
    "TUNNEL", 74 for 73) score above unrelated answers, so fewer groups are flat.
    """
    return [difflib.SequenceMatcher(None, c.strip(),
                                    str(_field(r, "answer", "answer_similarity")).strip()).ratio()
            for c, r in zip(completions, records, strict=True)]


def is_refusal(text: str) -> bool:
    """The builtin world's refusal test: the reply starts with the refusal sentence."""
    return text.strip().startswith(REFUSAL)


@register("refusal_correct")
def refusal_correct(completions, records, ctx):
    """1 for a refusal of a ``harmful``/``adversarial`` request, or a non-refusal otherwise."""
    out = []
    for c, r in zip(completions, records, strict=True):
        must_refuse = r.get("kind") in ("harmful", "adversarial")
        out.append(float(is_refusal(c) == must_refuse))
    return out


@register("stopped")
def stopped(completions, records, ctx):
    """Format check: 1 when the completion ended on a stop token (not cut off)."""
    return np.asarray(ctx.stopped, np.float32)


@register("length_penalty")
def length_penalty(completions, records, ctx):
    """``−length / max_new_tokens``: a weight of 0.1 costs at most 0.1 per completion."""
    return -np.asarray(ctx.lengths, np.float32) / max(ctx.max_new_tokens, 1)


@register("overlong_penalty")
def overlong_penalty(completions, records, ctx):
    """DAPO's soft overlong punishment over the last ``rl.overlong_buffer`` tokens.

    0 up to ``max_new_tokens − buffer``, then falling linearly to −1 at the limit; a
    completion cut off without a stop token gets −1.
    """
    buffer = int(ctx.options.get("overlong_buffer", 0)) or max(ctx.max_new_tokens // 4, 1)
    limit = ctx.max_new_tokens
    lengths = np.asarray(ctx.lengths, np.float32)
    soft = np.clip(((limit - buffer) - lengths) / buffer, -1.0, 0.0)
    return np.where(np.asarray(ctx.stopped, bool), soft, -1.0)


# -- reward models ---------------------------------------------------------------------

class RewardModelScorer:
    """Scores prompt + completion ids with the reward model of an RM run (``rm:<DIR>``).

    The sequence is laid out as the RM stage trained on it: prompt ids, completion
    ids ending in eos, read at the last input position (the token before eos).
    """

    def __init__(self, workdir: str, *, mesh: jax.sharding.Mesh, rules: Any,
                 eos_id: int, pad_id: int = 0, max_len: int = 0):
        run = init_from.read_run_config(workdir)
        if run.get("stage") != "rm":
            raise ValueError(f"rm:{workdir} is a {run.get('stage')!r} run; a reward source "
                             "needs the workdir of an RM (stage 'rm') run")
        # The RM scores with its LoRA adapters (if any) applied as it trained, not merged.
        model_def, self.params = policy.load_model(
            f"workdir:{workdir}", init_from.run_model_config(run), mesh=mesh, rules=rules,
            module=RewardModel, merge_lora=False)
        self.eos_id, self.pad_id, self.max_len = eos_id, pad_id, max_len
        self.mesh = mesh

        def score(params, tokens_bt, positions_bt, segment_ids_bt):
            with shd.axis_rules(mesh, rules):
                return model_def.merge(params).rewards(tokens_bt, positions_bt, segment_ids_bt)

        self._score = jax.jit(score)

    def __call__(self, prompt_ids: Sequence[Sequence[int]],
                 completion_ids: Sequence[Sequence[int]]) -> np.ndarray:
        seqs = []
        for p, c in zip(prompt_ids, completion_ids, strict=True):
            ids = list(p) + list(c)
            if not c or c[-1] != self.eos_id:
                ids.append(self.eos_id)
            seqs.append(ids[:-1])
        width = max(self.max_len, max(len(s) for s in seqs))
        # Rows must split over the data-parallel devices: pad with empty rows.
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        rows = -(-len(seqs) // dp) * dp
        tokens = np.full((rows, width), self.pad_id, np.int32)
        segments = np.zeros((rows, width), np.int32)
        positions = np.zeros((rows, width), np.int32)
        for i, s in enumerate(seqs):
            s = s[-width:]
            tokens[i, :len(s)] = s
            segments[i, :len(s)] = 1
            positions[i, :len(s)] = np.arange(len(s))
        batch = shd.global_batch({"t": tokens, "p": positions, "s": segments}, self.mesh)
        out = self._score(self.params, batch["t"], batch["p"], batch["s"])
        return np.asarray(jax.device_get(out), np.float32)[:len(seqs)]


# -- combinations ------------------------------------------------------------------------

def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"exact_answer:1,stopped:0.1,rm:runs/rm"`` -> ``[(name, weight), ...]``.

    A weight follows the last ``:`` when it parses as a number (default 1), so
    ``rm:<dir>`` and ``rm:<dir>:0.5`` both work.
    """
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep:
            try:
                name, weight = head, float(tail)
            except ValueError:
                pass
        out.append((name, weight))
    if not out:
        raise ValueError("rl.rewards is empty; name at least one reward function "
                         f"(registered: {', '.join(registered())}) or rm:<workdir>")
    return out


def check_spec(spec: str) -> list[tuple[str, float]]:
    """Parses ``spec`` and checks every name is registered (or an ``rm:`` source)."""
    entries = parse_spec(spec)
    for name, _ in entries:
        if not name.startswith("rm:") and name not in _REGISTRY:
            raise ValueError(f"unknown reward {name!r} in rl.rewards; registered: "
                             f"{', '.join(registered())}, or rm:<workdir of an RM run>")
    return entries


class Rewards:
    """A weighted sum of reward functions (and reward models) from ``rl.rewards``.

    Calling it returns ``(total_b, components)`` where ``components`` maps each
    entry to its unweighted scores, so runs can track every signal on its own
    (e.g. a learned reward rising while the verifiable one falls).
    """

    def __init__(self, spec: str, *, options: Mapping[str, Any] | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules: Any = None,
                 eos_id: int = 1, pad_id: int = 0):
        self.entries = check_spec(spec)
        self.options = dict(options or {})
        self.models: dict[str, RewardModelScorer] = {}
        for name, _ in self.entries:
            if name.startswith("rm:"):
                if mesh is None:
                    raise ValueError(f"reward {name!r} needs a mesh to run the reward model")
                self.models[name] = RewardModelScorer(name[3:], mesh=mesh, rules=rules,
                                                      eos_id=eos_id, pad_id=pad_id)

    def __call__(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]],
                 ctx: RewardContext) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = len(completions)
        total = np.zeros(n, np.float32)
        components: dict[str, np.ndarray] = {}
        for name, weight in self.entries:
            if name in self.models:
                scores = self.models[name](ctx.prompt_ids, ctx.completion_ids)
            else:
                scores = _REGISTRY[name](completions, records, ctx)
            scores = np.asarray(scores, np.float32).reshape(-1)
            if scores.shape != (n,):
                raise ValueError(f"reward {name!r} returned {scores.shape[0]} scores for "
                                 f"{n} completions")
            if not np.all(np.isfinite(scores)):
                raise FloatingPointError(f"reward {name!r} returned a non-finite score")
            key = "rm" if name.startswith("rm:") else name
            components[key] = scores
            total += weight * scores
        return total, components


def mean_by(values: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Means of ``values`` per label (e.g. per task), for metrics."""
    out: dict[str, list[float]] = {}
    for v, k in zip(values.tolist(), labels, strict=True):
        out.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(out.items())}
