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
A trained reward model is an entry too: ``rm:<workdir of an RM run>``. From the
command line (e.g. on a TPU pod, where no notebook registers anything) a function
is named by its import path instead: ``rl.rewards=exact_answer,my_pkg.rewards:score:0.5``.

The spec grammar (see :func:`parse_spec` and :func:`resolve`)::

    spec   := entry ("," entry)*
    entry  := source [":" weight]        weight: a finite float literal, default 1
    source := "rm:" WORKDIR              a reward model
            | NAME                       a registered name (wins over the next form)
            | MODULE ":" ATTR            MODULE = ident("." ident)*, ATTR = ident("." ident)*

The weight is split off the last ``:`` when it parses as a float and is not an
identifier (``mod:nan`` is the function ``nan``). An import path is imported when the
spec is checked (config checking, before any compute), so it must import on every
host; ``MODULE`` may not be ``rm``. Its scores are logged as ``reward/MODULE.ATTR``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxalign import multihost, policy
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
        """Scores of the given rows; with several processes a collective: each passes its
        own rows (any count), every process's rows are scored in one sharded batch laid
        out as on one process, and each gets its own rows' scores back."""
        seqs = []
        for p, c in zip(prompt_ids, completion_ids, strict=True):
            ids = list(p) + list(c)
            if not c or c[-1] != self.eos_id:
                ids.append(self.eos_id)
            seqs.append(ids[:-1])
        width = multihost.agree_max(max([self.max_len, *(len(s) for s in seqs)]))
        tokens = np.full((len(seqs), width), self.pad_id, np.int32)
        for i, s in enumerate(seqs):
            s = s[-width:]
            tokens[i, :len(s)] = s
        lengths = np.asarray([min(len(s), width) for s in seqs], np.int32)
        own = slice(0, len(seqs))
        if jax.process_count() > 1:
            counts = multihost.gather_rows(np.asarray([len(seqs)]))
            start = int(counts[:jax.process_index()].sum())
            own = slice(start, start + len(seqs))
            tokens, lengths = multihost.gather_rows(tokens), multihost.gather_rows(lengths)
        # Rows must split over the data-parallel devices: pad with empty rows.
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        rows = max(-(-len(lengths) // dp) * dp, dp)
        pad = rows - len(lengths)
        tokens = np.concatenate([tokens, np.full((pad, width), self.pad_id, np.int32)])
        segments = (np.arange(width)[None] < np.concatenate([lengths, np.zeros(pad, np.int32)]
                                                            )[:, None]).astype(np.int32)
        positions = np.where(segments > 0, np.arange(width, dtype=np.int32)[None], 0)
        batch = multihost.global_rows({"t": tokens, "p": positions, "s": segments}, self.mesh)
        out = self._score(self.params, batch["t"], batch["p"], batch["s"])
        return np.asarray(multihost.fetch(out), np.float32)[own]


# -- combinations ------------------------------------------------------------------------

def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"exact_answer:1,stopped:0.1,rm:runs/rm,pkg.mod:fn:0.5"`` -> ``[(source, weight), ...]``.

    A weight follows the last ``:`` when it parses as a number (default 1), so
    ``rm:<dir>``, ``rm:<dir>:0.5``, ``pkg.mod:fn`` and ``pkg.mod:fn:0.5`` all work; an
    identifier is never a weight (``pkg.mod:nan`` names a function ``nan``).
    """
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and not tail.isidentifier():
            try:
                name, weight = head, float(tail)
            except ValueError:
                pass
        out.append((name, weight))
    if not out:
        raise ValueError("rl.rewards is empty; name at least one reward function "
                         f"(registered: {', '.join(registered())}) or rm:<workdir>")
    return out


def is_import_path(name: str) -> bool:
    """Whether a (weightless) entry is ``MODULE:ATTR``, dotted identifiers each side, and
    neither a registered name nor an ``rm:`` source."""
    if name in _REGISTRY or name.startswith("rm:"):
        return False
    module, sep, attr = name.partition(":")
    return bool(sep) and all(p.isidentifier() for p in [*module.split("."), *attr.split(".")])


def resolve(name: str, *, key: str = "rl.rewards") -> RewardFn:
    """The reward function an entry names: a registered name, or ``MODULE:ATTR`` imported.

    Args:
      name: a spec entry without its weight (not an ``rm:`` source).
      key: the config key the spec came from, for messages.

    Raises:
      ValueError: naming the entry: an unknown name, a module that fails to import,
        a missing attribute, or an object that is not callable with
        ``(completions, records, ctx)``.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not is_import_path(name):
        raise ValueError(f"unknown reward {name!r} in {key}; registered: "
                         f"{', '.join(registered())}, rm:<workdir of an RM run>, or an "
                         "import path module.name:function")
    module, _, attr = name.partition(":")
    where = f"reward {name!r} in {key}"
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:  # any failure of the user's module: say which entry
        hint = (f"; {module!r} is a registered reward, so {attr!r} is read as an import "
                "path: a weight must be a number") if module in _REGISTRY else ""
        raise ValueError(f"{where}: cannot import module {module!r} "
                         f"({type(e).__name__}: {e}){hint}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(f"{where}: module {module!r} has no attribute {attr!r} "
                             f"({e})") from e
    if not callable(obj):
        raise ValueError(f"{where}: {attr!r} is a {type(obj).__name__}, not a function "
                         "fn(completions, records, ctx)")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: checked at call time
        return obj
    try:
        signature.bind(None, None, None)
    except TypeError as e:
        raise ValueError(f"{where}: {attr}{signature} cannot be called as "
                         f"fn(completions, records, ctx) ({e})") from e
    return obj


def check_spec(spec: str, *, key: str = "rl.rewards") -> list[tuple[str, float]]:
    """Parses ``spec`` and resolves every entry (registered, ``rm:`` or an import path,
    imported now) and every weight is finite, so a typo fails before any compute; ``key``
    names the config key in messages."""
    entries = parse_spec(spec)
    for name, weight in entries:
        if not math.isfinite(weight):
            raise ValueError(f"reward {name!r} in {key} has the weight {weight}; a weight "
                             "must be a finite number")
        if not name.startswith("rm:"):
            resolve(name, key=key)
    return entries


class NonFiniteReward(ValueError, FloatingPointError):
    """A reward function returned NaN or ±inf (a ``ValueError``; also a
    ``FloatingPointError``, as raised before)."""


def _scores(name: str, raw: Any, n: int) -> np.ndarray:
    """``raw`` as ``float32 [n]``, or a ``ValueError`` naming the reward."""
    try:
        arr = np.asarray(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward {name!r} returned scores that are not an array of "
                         f"numbers ({type(raw).__name__}: {e}); expected {n} floats") from e
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"reward {name!r} returned non-numeric scores (dtype {arr.dtype}, "
                         f"shape {arr.shape}); expected {n} floats")
    scores = np.asarray(arr, np.float32).reshape(-1)
    if scores.shape != (n,):
        raise ValueError(f"reward {name!r} returned {scores.shape[0]} scores for "
                         f"{n} completions (shape {arr.shape}; expected ({n},))")
    if not np.all(np.isfinite(scores)):
        rows = np.flatnonzero(~np.isfinite(scores))
        raise NonFiniteReward(f"reward {name!r} returned a non-finite score "
                              f"({scores[rows[0]]} at row {rows[0]}; {len(rows)} of {n})")
    return scores


def component_key(name: str) -> str:
    """The key an entry's scores are logged under (``reward/<key>``): ``rm`` for a reward
    model, ``module.attr`` for an import path (no ``:``, which gates split on)."""
    if name.startswith("rm:"):
        return "rm"
    return name.replace(":", ".") if is_import_path(name) else name


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
        # Import paths resolve once; registered names are looked up per call, as before.
        self.imported = {name: resolve(name) for name, _ in self.entries
                         if is_import_path(name)}
        for name, _ in self.entries:
            if name.startswith("rm:"):
                if mesh is None:
                    raise ValueError(f"reward {name!r} needs a mesh to run the reward model")
                self.models[name] = RewardModelScorer(name[3:], mesh=mesh, rules=rules,
                                                      eos_id=eos_id, pad_id=pad_id)

    def __call__(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]],
                 ctx: RewardContext, *, gather: bool = False
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(total_b, components)`` of the given rows.

        With several processes this is a collective (a reward model scores every
        process's rows in one batch): each process passes its own rows, which its
        reward functions score on this host. With ``gather``, every process gets every
        process's scores back, concatenated in process order
        (``jaxalign.multihost.gather_rows``); else its own.
        """
        n = len(completions)
        total = np.zeros(n, np.float32)
        components: dict[str, np.ndarray] = {}
        for name, weight in self.entries:
            if name in self.models:
                raw = self.models[name](ctx.prompt_ids, ctx.completion_ids)
            elif not n:  # a process with no rows of its own this time
                raw = np.zeros(0, np.float32)
            elif name in self.imported:
                raw = self.imported[name](completions, records, ctx)
            else:
                raw = _REGISTRY[name](completions, records, ctx)
            scores = _scores(name, raw, n)
            components[component_key(name)] = scores
            total += weight * scores
        if gather:
            total = multihost.gather_rows(total)
            components = multihost.gather_tree(components)
        return total, components


def mean_by(values: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Means of ``values`` per label (e.g. per task), for metrics."""
    out: dict[str, list[float]] = {}
    for v, k in zip(values.tolist(), labels, strict=True):
        out.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(out.items())}
