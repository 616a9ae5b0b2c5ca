"""KV-cache sampler: prefill and the whole decode loop in one jit.

Prompts arrive as the data pipeline lays them out (``prompt_batch``): left
padded, ``prompt_mask_bt`` 1 on real ids. Left padding puts every row's last
prompt id in the same slot, so each decode step writes one cache slot shared by
all rows, and a row's generated tokens follow its prompt without a gap: the
slot distance between two real tokens equals their position distance, which
keeps sliding-window layers exact.

The cache holds ``T + max_new_tokens`` slots per row; with ``num_samples = G``
each prompt is prefilled once and its cache repeated into its G rows (row
``p * G + g``). Decoding stops early once every row has emitted a stop token.

:func:`completion_batch` lays prompt + completion out for the trainer so a full
(no-cache) forward recomputes the sampler's log-probs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import Mesh

from jaxalign import sharding as shd


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample; frozen so it can key jit caches.

    Attributes:
      max_new_tokens: completion length budget (stop token included).
      temperature: softmax temperature; 0.0 = greedy (argmax).
      top_k: keep the k most likely tokens; 0 = off.
      top_p: keep the smallest set of most likely tokens whose probability
        reaches p (nucleus); 1.0 = off. Applied after top-k.
      stop_tokens: ids that end a row (e.g. eos); the stop token is emitted.
      num_samples: G completions per prompt; rows are prompt-major (p * G + g).
      pad_id: fills ``tokens_bn`` after a row ends.
      on_token: streaming: called on the host as ``on_token(i, tokens_b, alive_b)`` with
        the ids sampled at step ``i`` and which rows were still generating (numpy arrays),
        once per step, while the jitted loop runs. Calls may arrive out of order (``i``
        says where each belongs). None (the default) compiles no callback.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    num_samples: int = 1
    pad_id: int = 0
    on_token: Callable[[Any, Any, Any], None] | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop_tokens", tuple(int(x) for x in self.stop_tokens))
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if self.num_samples < 1:
            raise ValueError(f"sampling.num_samples={self.num_samples} must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SampleOut(NamedTuple):
    """Sampler output; ``B' = B * num_samples`` rows, ``N = max_new_tokens`` columns.

    Attributes:
      tokens_bn: int32 sampled ids, the stop token included, ``pad_id`` after it.
      logps_bn: float32 log-prob of each sampled token under
        ``softmax(logits / temperature)`` (raw logits when greedy), before
        top-k/top-p truncation; 0 after the end.
      mask_bn: int32, 1 on generated tokens (stop token included), 0 after.
      lengths_b: int32 generated tokens per row, stop token included.
      stopped_b: bool, True where the row ended on a stop token (False = it
        ran out of ``max_new_tokens``).
    """

    tokens_bn: jax.Array
    logps_bn: jax.Array
    mask_bn: jax.Array
    lengths_b: jax.Array
    stopped_b: jax.Array


def filter_logits(logits_bv: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k, then outside the top-p nucleus, to -inf.

    Ties at a threshold are kept. The most likely token always survives.
    """
    neg_inf = jnp.asarray(-jnp.inf, logits_bv.dtype)
    if 0 < top_k < logits_bv.shape[-1]:
        kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv >= kth_b1, logits_bv, neg_inf)
    if top_p < 1.0:
        sorted_bv = jnp.flip(jnp.sort(logits_bv, axis=-1), axis=-1)
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        # Keep a token when the mass strictly before it is still short of top_p.
        before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        keep_bv = before_bv < top_p
        keep_bv = keep_bv.at[:, 0].set(True)
        min_kept_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv >= min_kept_b1, logits_bv, neg_inf)
    return logits_bv


def choose_tokens(logits_bv: jax.Array, rng: jax.Array,
                  cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Next token ids ``[b]`` and their log-probs (before truncation), per ``cfg``."""
    logits_bv = logits_bv.astype(jnp.float32)
    if cfg.greedy:
        logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
        tok_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    else:
        scaled_bv = logits_bv / cfg.temperature
        logp_bv = jax.nn.log_softmax(scaled_bv, axis=-1)
        kept_bv = filter_logits(scaled_bv, cfg.top_k, cfg.top_p)
        tok_b = jax.random.categorical(rng, kept_bv, axis=-1).astype(jnp.int32)
    logp_b = jnp.take_along_axis(logp_bv, tok_b[:, None], axis=-1)[:, 0]
    return tok_b, logp_b


def _is_stop(tok_b: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
    if not stop_tokens:
        return jnp.zeros(tok_b.shape, bool)
    return jnp.isin(tok_b, jnp.asarray(stop_tokens, jnp.int32))


def _stream(cfg: SamplingConfig, i: jax.Array, tok_b: jax.Array, alive_b: jax.Array) -> None:
    """Hands step ``i``'s ids to ``cfg.on_token`` on the host (nothing when it is None)."""
    if cfg.on_token is not None:
        io_callback(cfg.on_token, None, i, tok_b, alive_b, ordered=False)


def generate(model: nnx.Module, prompt_tokens_bt: jax.Array, prompt_mask_bt: jax.Array,
             rng: jax.Array, cfg: SamplingConfig) -> SampleOut:
    """Samples completions of left-padded prompts (traceable; jit it or use make_sampler).

    Args:
      model: a ``Transformer`` (anything with ``init_cache``, ``hidden_cached``,
        ``decode`` and ``logits``).
      prompt_tokens_bt: int ``[B, T]`` left-padded prompt ids.
      prompt_mask_bt: ``[B, T]`` 1 on real ids.
      rng: a PRNG key; step i samples with ``fold_in(rng, i)``.
      cfg: sampling settings.

    Returns:
      A :class:`SampleOut` with ``B * cfg.num_samples`` rows, prompt-major.
    """
    b, t = prompt_tokens_bt.shape
    g, n = cfg.num_samples, cfg.max_new_tokens
    tokens_bt = shd.constrain(prompt_tokens_bt.astype(jnp.int32), ("act_batch", None))
    mask_bt = shd.constrain(prompt_mask_bt.astype(bool), ("act_batch", None))
    # Positions count real ids only, as prompt_batch's prompt_positions_bt does.
    positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=1, dtype=jnp.int32) - 1, 0)
    valid_bs = jnp.concatenate([mask_bt, jnp.ones((b, n), bool)], axis=1)

    cache = model.init_cache(b, t + n)
    h_btd, cache = model.hidden_cached(tokens_bt, positions_bt, cache, 0, valid_bs)
    # The last slot is each row's last prompt id (left padding).
    logits_bv = model.logits(h_btd[:, -1:])[:, 0]

    def repeat(x):  # prompt p -> rows p * G + g
        return x if g == 1 else jnp.repeat(x, g, axis=0)

    logits_bv = shd.constrain(repeat(logits_bv), ("act_batch", "act_vocab"))
    valid_bs = shd.constrain(repeat(valid_bs), ("act_batch", None))
    next_pos_b = repeat(jnp.sum(mask_bt, axis=1, dtype=jnp.int32))
    cache = jax.tree.map(lambda c: shd.constrain(repeat(c), ("act_batch", "act_seq",
                                                             "act_kv_heads", None)), cache)
    rows = b * g

    tok_b, logp_b = choose_tokens(logits_bv, jax.random.fold_in(rng, 0), cfg)
    tokens_bn = jnp.full((rows, n), cfg.pad_id, jnp.int32).at[:, 0].set(tok_b)
    logps_bn = jnp.zeros((rows, n), jnp.float32).at[:, 0].set(logp_b)
    done_b = _is_stop(tok_b, cfg.stop_tokens)
    lengths_b = jnp.ones((rows,), jnp.int32)
    _stream(cfg, jnp.asarray(0, jnp.int32), tok_b, jnp.ones((rows,), bool))

    def cond(carry):
        i, _, _, _, _, done_b, _ = carry
        return (i < n) & ~jnp.all(done_b)

    def body(carry):
        i, tok_b, cache, tokens_bn, logps_bn, done_b, lengths_b = carry
        # Feed the token sampled at step i - 1; it lives in slot T + i - 1.
        logits_b1v, cache = model.decode(tok_b[:, None], (next_pos_b + i - 1)[:, None], cache,
                                         t + i - 1, valid_bs)
        new_b, logp_b = choose_tokens(logits_b1v[:, 0], jax.random.fold_in(rng, i), cfg)
        alive_b = ~done_b
        new_b = jnp.where(alive_b, new_b, cfg.pad_id)
        logp_b = jnp.where(alive_b, logp_b, 0.0)
        tokens_bn = jax.lax.dynamic_update_slice_in_dim(tokens_bn, new_b[:, None], i, axis=1)
        logps_bn = jax.lax.dynamic_update_slice_in_dim(logps_bn, logp_b[:, None], i, axis=1)
        _stream(cfg, i, new_b, alive_b)
        done_b = done_b | (alive_b & _is_stop(new_b, cfg.stop_tokens))
        lengths_b = lengths_b + alive_b.astype(jnp.int32)
        return i + 1, new_b, cache, tokens_bn, logps_bn, done_b, lengths_b

    carry = (jnp.asarray(1, jnp.int32), tok_b, cache, tokens_bn, logps_bn, done_b, lengths_b)
    _, _, _, tokens_bn, logps_bn, done_b, lengths_b = jax.lax.while_loop(cond, body, carry)
    mask_bn = (jnp.arange(n)[None, :] < lengths_b[:, None]).astype(jnp.int32)
    return SampleOut(tokens_bn, logps_bn, mask_bn, lengths_b, done_b)


@contextlib.contextmanager
def _maybe_rules(mesh: Mesh | None, rules: shd.Rules | None):
    if mesh is None:
        yield
        return
    with shd.axis_rules(mesh, dict(shd.DEFAULT_RULES) if rules is None else rules):
        yield


def make_sampler(model_def: Any, cfg: SamplingConfig, *, mesh: Mesh | None = None,
                 rules: shd.Rules | None = None
                 ) -> Callable[[Any, jax.Array, jax.Array, jax.Array], SampleOut]:
    """Builds the jitted ``sampler(params, prompt_tokens_bt, prompt_mask_bt, rng) -> SampleOut``.

    Args:
      model_def: a ``jaxalign.step.ModelDef`` (rebuilds the model from params).
      cfg: sampling settings (static: a new config means a new compilation).
      mesh, rules: the mesh and logical axis rules to shard activations and the
        KV cache by (batch over the data axes, kv heads over tensor); ``rules``
        defaults to ``DEFAULT_RULES``. Without a mesh nothing is constrained.

    ``params`` is a pure param dict, as in the train state's ``"params"``.
    """
    def sampler(params, prompt_tokens_bt, prompt_mask_bt, rng):
        with _maybe_rules(mesh, rules):
            return generate(model_def.merge(params), prompt_tokens_bt, prompt_mask_bt, rng, cfg)
    return jax.jit(sampler)


_SAMPLERS: dict[Any, Callable[..., SampleOut]] = {}


def sample(model: nnx.Module, prompt_tokens_bt: Any, prompt_mask_bt: Any, rng: jax.Array,
           cfg: SamplingConfig, *, mesh: Mesh | None = None,
           rules: shd.Rules | None = None) -> SampleOut:
    """Samples from an NNX model directly (notebooks, evals); compiled once per shape/config."""
    graphdef, state = nnx.split(model)
    rules_key = None if rules is None else tuple(sorted(rules.items()))
    key = (graphdef, cfg, mesh, rules_key)
    if key not in _SAMPLERS:
        if len(_SAMPLERS) >= 16:  # one compiled sampler per model/config; do not grow forever
            _SAMPLERS.clear()

        def run(state, prompt_tokens_bt, prompt_mask_bt, rng):
            with _maybe_rules(mesh, rules):
                return generate(nnx.merge(graphdef, state), prompt_tokens_bt, prompt_mask_bt,
                                rng, cfg)
        _SAMPLERS[key] = jax.jit(run)
    return _SAMPLERS[key](state, jnp.asarray(prompt_tokens_bt), jnp.asarray(prompt_mask_bt), rng)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> left-padded ``(tokens_bt, mask_bt)`` int32 arrays of ``width`` columns."""
    width = max(len(p) for p in prompts) if width is None else width
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
        if len(p) > width:
            raise ValueError(f"prompt {r} has {len(p)} ids, more than width={width}")
        if len(p):
            tokens[r, width - len(p):] = p
            mask[r, width - len(p):] = 1
    return tokens, mask


def completion_batch(prompt_tokens_bt: jax.Array, prompt_mask_bt: jax.Array, out: SampleOut,
                     num_samples: int = 1) -> dict[str, jax.Array]:
    """Lays prompt + completion out as one left-padded sequence for a full forward.

    Every array is ``[B * G, T + N]``, rows as in ``out``:

    * ``tokens_bt``: the prompt (left padded) then the completion (pad after it);
      feed it as the model's input ids.
    * ``positions_bt``: 0, 1, ... over real ids, continuing into the completion.
    * ``segment_ids_bt``: 1 on real ids, 0 on padding.
    * ``targets_bt``: ``tokens_bt`` shifted left by one (column t holds token t + 1).
    * ``completion_mask_bt``: float32, 1 where ``targets_bt`` is a generated token.
    * ``sample_logps_bt``: the sampler's log-probs, aligned with ``targets_bt``.

    So ``token_logps(model(tokens_bt, positions_bt, segment_ids_bt) / temperature,
    targets_bt) * completion_mask_bt`` recomputes ``sample_logps_bt``.
    """
    g = num_samples
    prompt_tokens_bt = jnp.repeat(jnp.asarray(prompt_tokens_bt, jnp.int32), g, axis=0)
    prompt_mask_bt = jnp.repeat(jnp.asarray(prompt_mask_bt, jnp.int32), g, axis=0)
    b, t = prompt_tokens_bt.shape
    n = out.tokens_bn.shape[1]
    if out.tokens_bn.shape[0] != b:
        raise ValueError(f"{out.tokens_bn.shape[0]} sampled rows but {b // g} prompts x "
                         f"num_samples={g}")
    mask_bn = out.mask_bn.astype(jnp.int32)
    tokens_bt = jnp.concatenate([prompt_tokens_bt, out.tokens_bn.astype(jnp.int32)], axis=1)
    segment_ids_bt = jnp.concatenate([prompt_mask_bt, mask_bn], axis=1)
    prompt_pos_bt = jnp.maximum(jnp.cumsum(prompt_mask_bt, axis=1) - 1, 0)
    gen_pos_bn = jnp.sum(prompt_mask_bt, axis=1, keepdims=True) + jnp.arange(n)[None]
    positions_bt = jnp.concatenate([prompt_pos_bt, gen_pos_bn * mask_bn], axis=1)
    pad_b1 = jnp.zeros((b, 1), jnp.int32)
    targets_bt = jnp.concatenate([tokens_bt[:, 1:], pad_b1], axis=1)
    lead = jnp.zeros((b, t - 1), jnp.float32)
    tail = jnp.zeros((b, 1), jnp.float32)
    completion_mask_bt = jnp.concatenate([lead, mask_bn.astype(jnp.float32), tail], axis=1)
    sample_logps_bt = jnp.concatenate([lead, out.logps_bn.astype(jnp.float32), tail], axis=1)
    return {"tokens_bt": tokens_bt, "positions_bt": positions_bt.astype(jnp.int32),
            "segment_ids_bt": segment_ids_bt, "targets_bt": targets_bt,
            "completion_mask_bt": completion_mask_bt, "sample_logps_bt": sample_logps_bt}


def trim(out: SampleOut) -> list[list[int]]:
    """Each row's generated ids (stop token included) as Python lists, on the host."""
    tokens_bn, lengths_b = jax.device_get((out.tokens_bn, out.lengths_b))
    return [list(map(int, tokens_bn[r, :lengths_b[r]])) for r in range(len(lengths_b))]

