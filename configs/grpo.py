"""The GRPO family (GRPO, Dr. GRPO, DAPO, GSPO, RLOO) with verifiable rewards.

Each step samples ``rl.num_samples`` completions per prompt with the policy being
trained, scores them with ``rl.rewards`` and updates on group-relative advantages.
Variants (see ``jaxalign.algos.grpo``)::

    Dr. GRPO: --config.grpo.advantage=none --config.grpo.loss_agg=seq-mean-token-sum-norm
    DAPO:     --config.grpo.clip_high=0.28 --config.grpo.loss_agg=token-mean \\
              --config.grpo.dynamic_sampling=True --config.rl.rewards=exact_answer,overlong_penalty
    GSPO:     --config.grpo.importance=sequence
    RLOO:     --config.grpo.advantage=rloo

Presets: ``hf``/``hf_lora`` (from a pretrained checkpoint,
``--config.model.init_from=hf:<dir>``; ``configs/common.py:hf_preset``), ``demo`` (from
the SFT world preset's workdir ``runs/sft-world``, on the builtin world's RL prompts --
an RL-only slice of each task, never in the SFT or preference data nor in the eval --,
exact-answer and refusal rewards; evaluates greedy answers on the held-out ``eval``
prompts) and ``test`` (tiny, seconds).

The demo samples 6 × 16 prompts × 8 completions per step and trains on 16 groups,
those whose rewards differ first (``grpo.oversample=6`` with ``dynamic_sampling``):
only ~10-20% of the SFT model's groups are not flat (all right or all wrong), and
without filtering the update is ~90% of a step's time, spent mostly on flat groups.
In our run (100 steps, 5m49s on a 2-core CPU shared with other jobs) greedy accuracy
on the RL prompts rose from 0.43 to 0.55 (0.48 without filtering, lr 1e-4), but the
held-out greedy accuracy stayed within noise (0.394 -> 0.377, ±0.02 on 480 prompts):
the gains are on answers the 2M model memorises (multiplication facts, word lengths,
uppercased words) and do not transfer to held-out words and numbers. Higher rates
(5e-4, 6e-4) lose held-out accuracy (0.39 -> 0.28-0.35). Watch over-refusal: it rose
on the 21 held-out benign prompts in some runs (0.57 -> 0.76).

    python -m launch.train --config=configs/grpo.py:demo --workdir=runs/grpo-demo
"""

import ml_collections

from configs.common import prompt_data, rl_preset
from jaxalign.config import base_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    """The GRPO preset ``arg`` (``demo``, ``test``, ``hf``, ``hf_lora``) over the library
    defaults."""
    config = base_config("grpo")
    prompt_data(config)
    rl_preset(config, arg, demo_steps=100, demo_batch=128, demo_every=25, test_steps=6,
              test_every=3)
    if arg == "demo":
        # Exact answers, plus refusing exactly the requests that must be refused.
        config.rl.rewards = "exact_answer,refusal_correct:0.5"
        config.rl.num_samples = 8
        config.rl.max_new_tokens = 8
        config.grpo.dynamic_sampling = True
        config.grpo.oversample = 6
        config.optim.learning_rate = 2e-4
    elif arg == "test":
        config.rl.num_samples = 4
    config.lock()
    return config
