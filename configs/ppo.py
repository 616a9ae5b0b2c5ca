"""PPO against a reward model (or verifiable rewards) with a value head and KL control.

Presets: ``hf``/``hf_lora`` (from a pretrained checkpoint,
``--config.model.init_from=hf:<dir>``; ``configs/common.py:hf_preset``), ``demo`` (from
the SFT world workdir, rewarded by the RM demo's reward model, adaptive KL toward
``ppo.kl_target``; evaluates greedy answers on held-out prompts) and ``test`` (tiny,
seconds).

    python -m launch.train --config=configs/ppo.py:demo --workdir=runs/ppo-demo
    python -m launch.train --config=configs/ppo.py:demo --workdir=runs/ppo-exact \\
        --config.rl.rewards=exact_answer
"""

import ml_collections

from configs.common import prompt_data, rl_preset
from jaxalign.config import base_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    """The PPO preset ``arg`` (``demo``, ``test``, ``hf``, ``hf_lora``) over the library
    defaults."""
    config = base_config("ppo")
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
