"""PPO against a reward model (or verifiable rewards) with a value head and KL control.

Presets: ``demo`` (from the SFT world workdir, rewarded by the RM demo's reward
model, adaptive KL toward ``ppo.kl_target``; evaluates greedy answers on held-out
prompts) and ``test`` (tiny, seconds).

    python -m launch.train --config=configs/ppo.py:demo --workdir=runs/ppo-demo
    python -m launch.train --config=configs/ppo.py:demo --workdir=runs/ppo-exact \\
        --config.rl.rewards=exact_answer
"""

import ml_collections

from configs.grpo import prompt_data, rl_preset
from jaxalign.config import base_config
from jaxalign.rollout import rl_config


def get_config(arg: str = "demo"):
    config = base_config("ppo")
    config.rl = rl_config(num_samples=1, epochs=2, minibatches=2, kl_coef=0.05)
    config.ppo = ml_collections.ConfigDict(dict(
        gamma=1.0, lam=0.95,
        clip=0.2,               # policy ratio clip
        value_clip=0.2,         # value prediction clip around the rollout's values
        vf_coef=0.1,
        entropy_coef=0.0,
        whiten_advantages=True,
        missing_eos_penalty=1.0,  # subtracted from the score of a cut-off completion
        kl_target=0.0,          # > 0: adaptive β toward this per-sequence KL
        kl_horizon=10_000.0,
    ))
    prompt_data(config)
    rl_preset(config, arg, demo_steps=80, demo_batch=64, demo_every=20, test_steps=8,
              test_every=4)
    if arg == "demo":
        config.rl.rewards = "rm:runs/rm-demo"
        config.rl.max_new_tokens = 12
        config.ppo.kl_target = 2.0
        # 40 rollouts of 128 rows: β may move up to ±13% per rollout (a 10k-sample
        # horizon would leave it fixed over so short a run and let the KL overshoot).
        config.ppo.kl_horizon = 200.0
        config.rl.kl_coef = 0.1
    config.lock()
    return config
