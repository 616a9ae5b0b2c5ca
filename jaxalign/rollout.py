"""Rollouts shared by the online RL stages: sample, score, lay out a training batch.

One rollout turns a batch of prompts into ``epochs × minibatches`` training batches:

1. the sampler (``jaxalign.sampling``) generates ``G`` completions per prompt with the
   trainer's own params — no weight copy, so the hand-off costs nothing;
2. completions are decoded and scored by ``jaxalign.rewards`` (host side);
3. one jitted log-prob pass adds the frozen reference's token log-probs (when the
   KL coefficient is positive) and the rollout policy's (when the batch is reused
   for more than one update), and the stage adds its advantages;
4. rows are shuffled into minibatches, once per epoch.

Sequences are laid out by ``sampling.completion_batch`` as ``[left-padded prompt |
completion | padding]``; position ``t`` of ``inputs_bt`` predicts ``targets_bt[t]``,
and ``loss_mask_bt`` marks the targets that are generated tokens (the stop token
included). Log-probs are those of the sampling distribution (logits / temperature).

With several processes (``jax.distributed``) each process loads its share of the
prompts; the shares are gathered (``jaxalign.multihost``), every device samples the
rows it holds, each process scores its own prompts' samples (reward functions run
on that host) and the scores are gathered. Every process then holds the whole
rollout and runs the same host code on it (advantages, selection, minibatches), so
the numbers are those of one process; each minibatch is placed as a global array.

With ``rl.rollout_devices`` the sampler (and the log-prob pass) run on devices of their
own, from a copy of the weights (``jaxalign.rollout_mesh``); with ``rl.async_steps=k``
the next ``k`` rollouts are sampled while the trainer updates. A rollout is therefore
two halves: :meth:`Rollout.start` dispatches the sampler and returns at once,
:meth:`Rollout.finish` waits for the samples, scores them and lays out the batches.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import losses, multihost, policy, rewards, rollout_mesh, sampling
from jaxalign import sharding as shd
from jaxalign.algos.base import Loader, RunContext
from jaxalign.config import sampling_keys, section
from jaxalign.data.loader import DataSettings
from jaxalign.data.loader import Loader as DataLoader
from jaxalign.models import lora
from jaxalign.step import ModelDef

SEQ_KEYS = ("inputs_bt", "targets_bt", "positions_bt", "segment_ids_bt", "loss_mask_bt")
# Key of the rollout's host state inside the checkpointed data state.
ROLLOUT_STATE_KEY = "rollout"
# Key of the in-flight rollouts (asynchronous sampling) inside the checkpointed data state.
INFLIGHT_KEY = "inflight_rollouts"


def oversample(config: Any) -> int:
    """How many times more prompts a rollout samples than its updates train on.

    A stage that selects groups after scoring (GRPO's ``grpo.oversample``) samples
    ``oversample ×`` the prompts and keeps one share; every other stage keeps all.
    """
    stage = config.get(config.stage) if "stage" in config else None
    return int(stage.get("oversample", 1)) if stage is not None else 1


def prompts_per_rollout(config: Any) -> int:
    """Prompts one rollout samples: ``oversample × minibatches × batch_size / num_samples``."""
    rl = config.rl
    rows = config.train.batch_size * rl.minibatches
    if rl.num_samples < 1 or config.train.batch_size % rl.num_samples:
        raise ValueError(f"train.batch_size={config.train.batch_size} must be a multiple of "
                         f"rl.num_samples={rl.num_samples} (whole groups per update)")
    return rows // rl.num_samples * oversample(config)


def build_data(config: Any, tokenizer: Any, split: str, *, process_index: int,
               process_count: int):
    """Prompt batches: ``prompts_per_rollout`` rows for training, the eval batch size else."""
    rows = prompts_per_rollout(config) if split == "train" else config.data.eval_batch_size
    settings = DataSettings.from_config(config.data, split, "prompt", rows)
    return DataLoader(settings, tokenizer, process_index=process_index,
                      process_count=process_count)


def check_config(config: Any) -> None:
    """Stops before any compute on impossible RL settings."""
    rl = config.rl
    for name in ("num_samples", "max_new_tokens", "epochs", "minibatches"):
        if rl[name] < 1:
            raise ValueError(f"rl.{name}={rl[name]} must be at least 1")
    if rl.temperature < 0:
        raise ValueError(f"rl.temperature={rl.temperature} must be >= 0 (0 = greedy)")
    if rl.kl_coef < 0:
        raise ValueError(f"rl.kl_coef={rl.kl_coef} must be >= 0 (0 drops the reference)")
    if rl.kl_estimator not in losses.KL_ESTIMATORS:
        raise ValueError(f"rl.kl_estimator={rl.kl_estimator!r}; expected one of "
                         f"{list(losses.KL_ESTIMATORS)}")
    if rl.offpolicy not in losses.OFFPOLICY_MODES:
        raise ValueError(f"rl.offpolicy={rl.offpolicy!r}; expected one of "
                         f"{list(losses.OFFPOLICY_MODES)}")
    if not rl.offpolicy_cap > 1:
        raise ValueError(f"rl.offpolicy_cap={rl.offpolicy_cap} must be > 1")
    prompts_per_rollout(config)
    rollout_mesh.check_config(config)
    rewards.check_spec(rl.rewards)


def make_rewards(ctx: RunContext) -> rewards.Rewards:
    """The run's reward (``config.rl.rewards``), built once and shared by the rollout and
    the in-training eval (a reward model is loaded once)."""
    def build() -> rewards.Rewards:
        tok = ctx.tokenizer
        return rewards.Rewards(ctx.config.rl.rewards, options=ctx.config.rl.to_dict(),
                               mesh=ctx.mesh, rules=ctx.rules, eos_id=tok.eos_id,
                               pad_id=tok.pad_id or 0)
    return ctx.shared("rewards", build)


@dataclasses.dataclass
class Started:
    """A rollout whose sampler is dispatched (maybe still running on the devices)."""

    step: int  # the first step that trains on it
    version: int  # update count of the weights that sample it
    params: Any  # those weights (on the sampler's mesh)
    prompts: dict[str, np.ndarray]  # the whole prompt batch
    extras: list[dict[str, Any]]  # this process's prompt records
    out: sampling.SampleOut  # device arrays
    t0: float  # when the sampler was dispatched
    handoff: dict[str, float]
    dispatch_s: float  # host time to dispatch it (tracing and compiling included)
    _done: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        # A watcher notes when the samples are ready, so the sampler's own time is known
        # even when the host only asks for them later.
        def watch():
            jax.block_until_ready(self.out)
            self._done.append(time.perf_counter())
        self._watcher = threading.Thread(target=watch, daemon=True)
        self._watcher.start()

    def sampled_s(self, fetched: float) -> float:
        """Seconds from dispatch to samples ready: the watcher's time, or ``fetched`` (when
        the host had them) if earlier — a watcher waiting for the GIL notes late."""
        self._watcher.join(timeout=1.0)
        return min(self._done[0] if self._done else fetched, fetched) - self.t0


@dataclasses.dataclass
class Rollout:
    """Samples, scores and lays out one RL batch; built once per run by an RL stage.

    ``advantages(host, rewards_b, groups)`` is the stage's hook: it receives the host
    batch (with the log-prob columns) and returns the extra columns (advantages,
    returns, ...) and host metrics. ``select(rewards_b, real_b, rows, step)``, when the
    rollout samples more rows than its updates use (``oversample``), picks the row
    indices to train on (and returns host metrics); it runs after scoring, before the
    log-prob pass, so the unused rows cost only their sampling.
    """

    ctx: RunContext
    advantages: Callable[[dict[str, np.ndarray], np.ndarray], tuple[dict, dict]]
    value_fn: Callable[..., jax.Array] | None = None
    select: Callable[[np.ndarray, np.ndarray, int, int], tuple[np.ndarray, dict]] | None = None

    def __post_init__(self):
        ctx = self.ctx
        config = ctx.config
        check_config(config)
        rl = config.rl
        self.rl = rl
        self.tokenizer = ctx.tokenizer
        self.eos_id, self.pad_id = ctx.tokenizer.eos_id, ctx.tokenizer.pad_id or 0
        self.sampling = sampling.SamplingConfig(
            max_new_tokens=rl.max_new_tokens, temperature=float(rl.temperature),
            top_k=rl.top_k, top_p=float(rl.top_p), stop_tokens=(self.eos_id,),
            num_samples=rl.num_samples, pad_id=self.pad_id)
        self.scorer = make_rewards(ctx)
        self.reuse = rl.epochs * rl.minibatches > 1
        model_def, mesh, rules = ctx.model_def, ctx.mesh, ctx.rules
        # The KL reference is the initial policy. With LoRA that is the policy's own
        # params with the adapters off: no second copy of the weights.
        self.shared_reference = rl.kl_coef > 0 and ctx.model_cfg.lora is not None
        ref_def = model_def
        if self.shared_reference:
            ref_def = ModelDef(lora.without_adapters(model_def.graphdef,
                                                     model_def.abstract_state),
                               model_def.abstract_state)
        # The sampler's own devices (rl.rollout_devices), or the training mesh.
        self.devices = (rollout_mesh.SamplerDevices(config, mesh, ctx.param_shardings,
                                                    model_def.trainable)
                        if rl.rollout_devices else None)
        self.reference = None
        if rl.kl_coef > 0 and not self.shared_reference:
            # With devices of its own, only the sampler's keep a reference copy (built
            # outside the run's cache, so the training devices' one is freed).
            self.reference = (ctx.initial_params() if self.devices is None
                              else self.devices.place(ctx.initial_params_fn()))
        if self.devices is not None:
            mesh = self.devices.mesh
        self.mesh = mesh
        # Asynchronous batches come from older weights: the update's ratio needs the
        # behaviour policy's log-probs even when each rollout feeds one update.
        self.reuse = self.reuse or rl.async_steps > 0
        value_fn, temp = self.value_fn, float(rl.temperature)

        def logprob_pass(params, ref_params, seq):
            out = {}
            with shd.axis_rules(mesh, rules):
                if ref_params is not None:
                    out["ref_logps_bt"] = token_logps(ref_def.merge(ref_params), seq, temp)
                if self.reuse:
                    out["old_logps_bt"] = token_logps(model_def.merge(params), seq, temp)
                if value_fn is not None:
                    # The critic's values are needed for GAE even with one update.
                    out["old_values_bt"] = value_fn(model_def.merge(params), seq)
            return out

        self._logprob_pass = jax.jit(logprob_pass)
        self._key = jax.random.PRNGKey(config.seed + 1)
        self.host_state: dict[str, Any] = {}

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or self.shared_reference

    def state(self) -> dict[str, Any]:
        """Host-side state to checkpoint with the data position (e.g. an adaptive KL)."""
        return dict(self.host_state)

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.host_state = dict(state)

    def start(self, state: Mapping[str, Any], host: Mapping[str, Any], step: int, *,
              version: int) -> Started:
        """Dispatches the sampler on a prompt batch and returns while it runs.

        ``host`` is this process's share of the prompt batch: every process gathers the
        whole batch, and the sampler draws each row on the devices that hold it.
        ``step`` is the first step that trains on the rollout (it seeds the sampler and
        the minibatch order); ``version`` the update count of ``state``'s params.
        """
        handoff: dict[str, float] = {"time/handoff_s": 0.0}
        params = state["params"]
        if self.devices is not None:
            params, handoff = self.devices.handoff(params)
        t0 = time.perf_counter()
        prompts = multihost.gather_tree({k: host[k] for k in ("prompt_tokens_bt",
                                                              "prompt_mask_bt")})
        out = policy.sample_batch(self.ctx.model_def, params, prompts["prompt_tokens_bt"],
                                  prompts["prompt_mask_bt"], jax.random.fold_in(self._key, step),
                                  self.sampling, mesh=self.mesh, rules=self.ctx.rules,
                                  fetch=False)
        return Started(step=step, version=version, params=params, prompts=prompts,
                       extras=list(host["extras"]), out=out, t0=t0, handoff=handoff,
                       dispatch_s=time.perf_counter() - t0)

    def finish(self, started: Started) -> list[tuple[dict[str, jax.Array],
                                                     dict[str, np.ndarray], dict[str, float]]]:
        """Waits for a started rollout's samples, scores them (each process its own
        prompts'; the scores gathered) and, from the gathered rewards, lays out the whole
        rollout on every process with the same host code (advantages, selection,
        minibatches): the numbers do not depend on the process count."""
        mesh, g, step = self.mesh, self.rl.num_samples, started.step
        t_wait = time.perf_counter()
        out = multihost.fetch(started.out)
        t1 = time.perf_counter()
        # The host's share of sampling: dispatching it, then waiting for what was left.
        exposed = started.dispatch_s + t1 - t_wait
        # Sampling's own time, when something ran beside it (else all of it was exposed).
        sampled_s = started.sampled_s(t1) if self.rl.async_steps else exposed
        prompts = started.prompts
        reward_b, parts, real_b = self._score(prompts, out, started.extras)
        t2 = time.perf_counter()

        seq = jax.device_get(sampling.completion_batch(
            prompts["prompt_tokens_bt"], prompts["prompt_mask_bt"], out, g))
        batch = {"inputs_bt": seq["tokens_bt"], "targets_bt": seq["targets_bt"],
                 "positions_bt": seq["positions_bt"], "segment_ids_bt": seq["segment_ids_bt"],
                 "loss_mask_bt": seq["completion_mask_bt"],
                 "sampler_logps_bt": seq["sample_logps_bt"]}
        batch = {k: np.asarray(v) for k, v in batch.items()}
        batch["weight_b"] = real_b.astype(np.float32)
        batch["stopped_b"] = np.asarray(out.stopped_b, np.float32)
        rows = self.ctx.config.train.batch_size * self.rl.minibatches
        select_metrics: dict[str, float] = {}
        if len(reward_b) > rows:
            if self.select is None:
                raise ValueError(f"the rollout sampled {len(reward_b)} rows for {rows} "
                                 "training rows and the stage selects none")
            keep, select_metrics = self.select(reward_b, real_b, rows, step)
            batch = {k: v[keep] for k, v in batch.items()}
            train_reward_b = reward_b[keep]
        else:
            train_reward_b = reward_b
        if self.has_reference or self.reuse or self.value_fn is not None:
            seq = multihost.global_rows({k: batch[k] for k in SEQ_KEYS}, mesh)
            ref = started.params if self.shared_reference else self.reference
            batch.update(multihost.fetch(self._logprob_pass(started.params, ref, seq)))
        t3 = time.perf_counter()
        extra, metrics = self.advantages(batch, train_reward_b)
        metrics.update(select_metrics)
        batch.update(extra)

        real = max(int(real_b.sum()), 1)
        lengths, stopped = np.asarray(out.lengths_b), np.asarray(out.stopped_b)
        metrics.update({
            "reward/mean": float(reward_b[real_b].mean()) if real_b.any() else 0.0,
            "completion/length": float(lengths[real_b].mean()) if real_b.any() else 0.0,
            "completion/stopped": float(stopped[real_b].mean()) if real_b.any() else 0.0,
            # Sampling's own time, and the part of it the host waited for (the rest
            # ran while the trainer updated).
            "time/rollout_s": sampled_s, "time/rollout_wait_s": exposed,
            "rollout/overlap": float(np.clip(1.0 - exposed / max(sampled_s, 1e-9), 0, 1)),
            "time/reward_s": t2 - t1, "time/logprobs_s": t3 - t2,
            "rl/policy_version": float(started.version),
            **started.handoff,
        })
        for name, scores in parts.items():
            metrics[f"reward/{name}"] = float(scores[real_b].sum() / real)
        return self._minibatches(batch, metrics, step)

    def _score(self, prompts: Mapping[str, np.ndarray], out: sampling.SampleOut,
               extras: list[dict[str, Any]]
               ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Decodes and scores this process's rows (the samples of its own prompts, whose
        records ``extras`` are); returns every row's reward, components and realness."""
        g = self.rl.num_samples
        own = multihost.process_share(len(out.lengths_b))
        tokens_bn = np.asarray(out.tokens_bn)[own]
        lengths, stopped = np.asarray(out.lengths_b)[own], np.asarray(out.stopped_b)[own]
        prompt_tokens = np.repeat(prompts["prompt_tokens_bt"], g, axis=0)[own]
        prompt_mask = np.repeat(prompts["prompt_mask_bt"], g, axis=0)[own]
        records = [e for e in extras for _ in range(g)]
        if len(records) != len(lengths):
            raise ValueError(f"{len(records)} prompt records for this process's "
                             f"{len(lengths)} sampled rows")
        completion_ids = [list(tokens_bn[i, :lengths[i]]) for i in range(len(lengths))]
        texts = [self.tokenizer.decode([x for x in ids if x != self.eos_id])
                 for ids in completion_ids]
        prompt_ids = [list(prompt_tokens[i][prompt_mask[i] > 0]) for i in range(len(lengths))]
        ctx = rewards.RewardContext(
            lengths=lengths, stopped=stopped, max_new_tokens=self.rl.max_new_tokens,
            prompt_ids=prompt_ids, completion_ids=completion_ids, options=self.rl.to_dict())
        # Padding prompts (empty records) are scored as 0 and carry no weight.
        safe = [r if r else {"answer": "", "kind": "task"} for r in records]
        reward_b, parts = self.scorer(texts, safe, ctx, gather=True)
        real_b = multihost.gather_rows(np.asarray([bool(r) for r in records], bool))
        self.last_samples = list(zip([self.tokenizer.decode(x) for x in prompt_ids[:g * 2:g]],
                                     texts[:g * 2:g], strict=True))
        return np.where(real_b, reward_b, 0.0).astype(np.float32), parts, real_b

    def _minibatches(self, batch: dict[str, np.ndarray], metrics: dict[str, float], step: int
                     ) -> list[tuple[dict[str, jax.Array], dict[str, np.ndarray],
                                     dict[str, float]]]:
        rows = self.ctx.config.train.batch_size
        m = self.rl.minibatches
        rng = np.random.default_rng([self.ctx.config.seed, step])
        # Every update of this rollout carries an equal share of its sampling time, so
        # the logged time split is the rollout's whatever step gets logged.
        share = {k: (v / (m * self.rl.epochs) if k.startswith("time/") else v)
                 for k, v in metrics.items()}
        out = []
        for _ in range(self.rl.epochs):
            # Whole groups stay together, so every minibatch holds complete groups.
            groups = rng.permutation(len(batch["weight_b"]) // self.rl.num_samples)
            order = (groups[:, None] * self.rl.num_samples
                     + np.arange(self.rl.num_samples)[None]).reshape(-1)
            for i in range(m):
                idx = order[i * rows:(i + 1) * rows] if m > 1 else np.arange(rows)
                part = {k: v[idx] for k, v in batch.items()}
                out.append((multihost.global_rows(part, self.ctx.mesh), part, share))
        return out


class RolloutBatches:
    """An online stage's training batches (a ``jaxalign.algos.base.BatchSource``).

    Each prompt batch of the loader becomes one rollout, whose ``epochs × minibatches``
    batches feed that many steps. Synchronously (``rl.async_steps=0``) a rollout is
    sampled with the params of the step it starts at. With ``async_steps=k`` the
    sampler, on devices of its own, keeps ``k`` rollouts in flight: when a rollout's
    first step comes, the oldest in flight is finished (scored, laid out) and the next
    is started from the current weights, then sampled while the trainer updates — so
    a batch comes from weights up to ``k`` rollouts old (``rl/policy_lag`` logs the
    updates between sampling and training weights). The first ``k`` rollouts all use
    the initial weights.

    A checkpoint is possible only between rollouts; it records the loader's position,
    the rollout's host state (e.g. PPO's adaptive KL coefficient) and the in-flight
    rollouts, finished (``jaxalign.rollout_mesh.encode_rollout``), so a resumed run
    continues exactly.
    """

    host_is_global = True  # every process holds the whole rollout

    def __init__(self, rollout: Rollout, prompts: Loader):
        self.rollout = rollout
        self.prompts = prompts.iterator()
        rl, train = rollout.rl, rollout.ctx.config.train
        self.async_steps = int(rl.async_steps)
        # Synchronous: the next rollout needs this update's params, so each step waits.
        self.synchronous = self.async_steps == 0
        self.updates_per_rollout = rl.epochs * rl.minibatches
        self.total_steps = train.steps
        self._queue: list[tuple[dict[str, jax.Array], dict[str, np.ndarray],
                                dict[str, float]]] = []
        # Rollouts started ahead (Started) or restored finished ((host, metrics) lists).
        self._inflight: list[Started | list] = []
        self._next_start = 0  # first step of the next rollout to start
        self._state = self.prompts.get_state()
        self._t0 = 0.0
        self._update_done: list[float] = []

    def _start(self, state: Mapping[str, Any], version: int) -> None:
        self._inflight.append(self.rollout.start(state, next(self.prompts), self._next_start,
                                                 version=version))
        self._next_start += self.updates_per_rollout

    def _finish(self, item: Started | list) -> list:
        return self.rollout.finish(item) if isinstance(item, Started) else item

    def next(self, state: Mapping[str, Any], step: int):
        if not self._queue:
            if not self._inflight:
                self._next_start = step
                self._start(state, step)
            self._queue = self._finish(self._inflight.pop(0))
            # Start the rollouts the sampler works on while this one trains (none past
            # the run's last step).
            while (len(self._inflight) < self.async_steps
                   and self._next_start < self.total_steps):
                self._start(state, step)
            self._state = {**self.prompts.get_state(),
                           ROLLOUT_STATE_KEY: self.rollout.state()}
        batch, host, host_metrics = self._queue.pop(0)
        host_metrics = dict(host_metrics)
        if "rl/policy_version" in host_metrics:
            host_metrics["rl/policy_lag"] = step - host_metrics["rl/policy_version"]
        now = time.perf_counter()
        if self._t0:
            # The whole previous step, as the host saw it (its logging included).
            host_metrics["time/step_s"] = now - self._t0
        self._t0 = now
        return batch, host, host_metrics

    def after_update(self, metrics: Any, host_metrics: dict[str, float]) -> dict[str, float]:
        """Adds the update's time and the step's time split. Synchronously it waits for
        the update; asynchronously a watcher times it, read at the next step."""
        if self.synchronous:
            jax.block_until_ready(metrics)
            update_s = time.perf_counter() - self._t0
        else:
            update_s = self._update_done[0] if self._update_done else 0.0
            done, t0 = [], self._t0

            def watch():
                jax.block_until_ready(metrics)
                done.append(time.perf_counter() - t0)
            threading.Thread(target=watch, daemon=True).start()
            self._update_done = done
        host_metrics = {**host_metrics, "time/update_s": update_s}
        # The host's time: sampling counts only as far as it was waited for.
        exposed = {**host_metrics, "time/rollout_s": host_metrics.get(
            "time/rollout_wait_s", host_metrics.get("time/rollout_s", 0.0))}
        parts = ("rollout", "reward", "logprobs", "update", "handoff")
        total = sum(exposed.get(f"time/{k}_s", 0.0) for k in parts)
        for k in parts:
            host_metrics[f"time_frac/{k}"] = exposed.get(f"time/{k}_s", 0.0) / max(total, 1e-9)
        return host_metrics

    @property
    def at_boundary(self) -> bool:
        return not self._queue

    def get_state(self) -> dict[str, Any]:
        """The data position; with rollouts in flight, finishes them to record them."""
        state = dict(self._state)
        if self._inflight:
            self._inflight = [self._finish(x) for x in self._inflight]
            state[INFLIGHT_KEY] = {
                "next_start": self._next_start,
                "rollouts": [rollout_mesh.encode_rollout([(h, m) for _, h, m in x])
                             for x in self._inflight]}
            # Finishing updated the rollout's host state (e.g. PPO's adaptive KL).
            state[ROLLOUT_STATE_KEY] = self.rollout.state()
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        rollout_state = state.pop(ROLLOUT_STATE_KEY, None)
        inflight = state.pop(INFLIGHT_KEY, None)
        if state:
            self.prompts.set_state(state)
        self._state = self.prompts.get_state()
        if rollout_state is not None:
            self.rollout.load_state(rollout_state)
        if inflight:
            mesh = self.rollout.ctx.mesh
            self._inflight = [[(multihost.global_rows(h, mesh), h, m)
                               for h, m in rollout_mesh.decode_rollout(x)]
                              for x in inflight["rollouts"]]
            self._next_start = int(inflight["next_start"])

    def metrics(self) -> dict[str, float]:
        return self.prompts.metrics()

    def close(self) -> None:
        self.prompts.close()


def token_logps(model: Any, seq: Mapping[str, jax.Array], temperature: float) -> jax.Array:
    """Masked log-probs of a rollout's completion tokens under ``model``."""
    h_btd = model.hidden(seq["inputs_bt"], seq["positions_bt"], seq["segment_ids_bt"])
    logps_bt = model.token_stats(h_btd, seq["targets_bt"], temperature=temperature)["logps_bt"]
    return logps_bt * seq["loss_mask_bt"]


def rl_config(**overrides: Any):
    """The ``rl`` config section every RL stage reads, with its defaults.

    Args:
      **overrides: a stage's own defaults for some keys (e.g. PPO's ``num_samples=1``).
    """
    rl = section(
        "rl", "Rollouts of the online RL stages: sampling, rewards, the KL penalty and how "
        "often each rollout is reused (jaxalign.rollout).",
        num_samples=(8, "G completions sampled per prompt (one group)"),
        **sampling_keys(" (log-probs are those of logits / temperature)"),
        overlong_buffer=(0, "overlong_penalty's soft zone in tokens (0 = max_new_tokens // "
                         "4)"),
        kl_coef=(0.0, "β of the per-token KL penalty toward the initial policy; 0 drops the "
                 "reference model"),
        kl_estimator=("k3", "per-token KL estimator: k1 | k2 | k3"),
        epochs=(1, "updates per rollout batch (μ)"),
        minibatches=(1, "optimizer steps per epoch; a rollout is minibatches × "
                     "train.batch_size rows"),
        offpolicy=("none", "GRPO/PPO policy-loss correction of sampler/trainer mismatch: none | "
                   "tis (truncated IS) | mis (masked IS) | seq_mask (drop sequences)"),
        offpolicy_cap=(2.0, "off-policy ratio bound (> 1): tis caps at it, mis and seq_mask "
                       "zero ratios outside [1/cap, cap]"),
        **rollout_mesh.config_keys(),
    )
    rl.update(overrides)
    return rl


def mean_metric(x_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A (sum, count) metric over masked entries."""
    return jnp.sum(x_bt * mask_bt), jnp.sum(mask_bt)


def consistency_metric(logps_bt: jax.Array, batch: Mapping[str, jax.Array],
                       mask_bt: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Mean |trainer − sampler| log-prob of the sampled tokens: any gap is drift.

    Measured where the trainer's params are the sampler's: in the loss of an
    on-policy update, or (when a rollout feeds several updates) in the rollout's
    log-prob pass, as ``old_logps_bt``.
    """
    ref_bt = batch.get("old_logps_bt", jax.lax.stop_gradient(logps_bt))
    return {"consistency/logp_gap": mean_metric(jnp.abs(ref_bt - batch["sampler_logps_bt"]),
                                                mask_bt)}
