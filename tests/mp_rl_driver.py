"""Runs the online stages' test cases one after another in one process of a run.

``tests/test_multiprocess_rl.py`` starts this script alone (1 process x 8 devices) or
as 2 processes x 4 devices under ``jax.distributed`` (the ``JAXALIGN_*`` variables)::

    python tests/mp_rl_driver.py ROOT CASE[,CASE...] [MODELS_ROOT]

Case ``c`` runs in ``ROOT/c``; process 0 also writes the token ids of every sampler
call (rollouts, evals, rejection rounds) to ``ROOT/c/samples.npz``. One process runs
every case, so the interpreter and JAX start once. Rewards include
``mp_rl_driver:overlap_reward``: a user's Python reward, imported by its path. PPO's
reward model and the distillation teacher are the rm and grpo runs under
``MODELS_ROOT`` (default ``ROOT``), so two drivers can share them.
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RL = {"train.log_every": 1, "rl.rewards": "mp_rl_driver:overlap_reward,length_penalty:0.5"}
# Per case: the stage and overrides of its test preset.
CASES = {
    # Dynamic sampling over 2x the prompts, two updates per rollout (a kill lands
    # mid-rollout), the KL reference.
    "grpo": ("grpo", {**_RL, "train.steps": 6, "rl.minibatches": 2, "rl.kl_coef": 0.05,
                      "grpo.dynamic_sampling": True, "grpo.oversample": 2,
                      "checkpoint.save_every": 2, "data.eval": ""}),
    # The sampler on 4 devices of its own (2 per process), one rollout ahead of the trainer.
    "async": ("grpo", {**_RL, "train.steps": 4, "rl.rollout_devices": 4, "rl.async_steps": 1,
                       "checkpoint.save_every": 2, "data.eval": ""}),
    # A reward model for PPO: one step on unpacked pairs, none dropped (packing, and
    # dropping overlong records, fill rows within each process's share of the records).
    "rm": ("rm", {"train.steps": 1, "data.eval": "", "data.pack": False,
                  "data.max_len": 128}),
    # Whitened advantages, 2 epochs x 2 minibatches (the permutation), adaptive KL; the
    # reward model of the rm case scores too. (Shared: the Bradley-Terry loss leaves the
    # RM's bias without a gradient, and Adam turns rounding noise in it into an offset
    # of ~lr, which differs from one layout's RM to another's.)
    "ppo": ("ppo", {**_RL, "train.steps": 8, "ppo.kl_target": 1.0, "train.eval_every": 8,
                    "checkpoint.save_every": 4}),
    # One round; unpacked SFT rows (packing fills rows within each process's share).
    "rejection": ("rejection", {"rejection.rounds": 1, "train.steps": 2, "data.pack": False,
                                "rejection.rewards": _RL["rl.rewards"]}),
    # Every batch sampled by the student; the eval's teacher KL on gathered batches. The
    # teacher is the GRPO case's policy.
    "distill": ("distill", {"train.steps": 2, "train.log_every": 1, "train.eval_every": 2,
                            "distill.on_policy_fraction": 1.0}),
}


def overlap_reward(completions, records, ctx):
    """Characters shared with the record's answer over the completion's distinct ones
    (dense: a group's samples rarely tie)."""
    del ctx
    return [len(set(c) & set(str(r.get("answer", "")))) / (1.0 + len(set(c)))
            for c, r in zip(completions, records, strict=True)]


def main(root: str, cases: list[str], models: str = "") -> None:
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from jaxalign.mesh import maybe_initialize_distributed

    maybe_initialize_distributed()
    import jax
    from presets import preset

    from jaxalign import multihost, policy
    from jaxalign.jobs import run_stage

    calls = []
    sample_batch = policy.sample_batch

    def recording(*args, **kwargs):
        out = sample_batch(*args, **kwargs)
        calls.append(np.asarray(multihost.fetch(out.tokens_bn)))
        return out

    policy.sample_batch = recording
    for case in cases:
        stage, overrides = CASES[case]
        if stage == "distill":
            overrides = {**overrides, "distill.teacher": f"workdir:{models or root}/grpo"}
        if stage == "ppo":
            overrides = {**overrides,
                         "rl.rewards": f"rm:{models or root}/rm,{overrides['rl.rewards']}"}
        workdir = os.path.join(root, case)
        calls.clear()
        run_stage(preset(stage, **overrides), workdir)
        if jax.process_index() == 0:
            np.savez(os.path.join(workdir, "samples.npz"), *calls)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), *sys.argv[3:])
