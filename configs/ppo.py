"""PPO against a reward model (or verifiable rewards) with a value head and KL control.

Presets: ``demo`` (from the SFT world workdir, rewarded by the RM demo's reward
model, adaptive KL toward ``ppo.kl_target``; evaluates greedy answers on held-out
prompts) and ``test`` (tiny, seconds).

    python -m launch.train --config=configs/ppo.py:demo --workdir=runs/ppo-demo
    python -m launch.train --config=configs/ppo.py:demo --workdir=runs/ppo-exact \\
        --config.rl.rewards=exact_answer
"""

import ml_collections

from jaxalign.algos.rollout import rl_config
from jaxalign.config import base_config, model_config


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
    config.data.train = config.data.eval = "builtin:world"
    config.data.train_split = "rl"
    config.data.eval_split = "eval"
    config.data.overlong = "truncate_left"
    config.optim.weight_decay = 0.0
    config.optim.schedule = "constant"
    if arg == "demo":
        config.model = model_config("small")
        config.model.init_from = "workdir:runs/sft-world"
        config.rl.rewards = "rm:runs/rm-demo"
        config.rl.max_new_tokens = 12
        config.ppo.kl_target = 2.0
        config.data.max_len = config.data.max_prompt_len = 32
        config.data.eval_batch_size = 64
        config.train.steps = 80
        config.train.batch_size = 64
        config.train.log_every = 4
        config.train.eval_every = 20
        config.train.eval_at_start = True
        config.optim.learning_rate = 1e-4
        config.optim.warmup_steps = 4
        config.checkpoint.save_every = 20
    elif arg == "test":
        config.model = model_config("tiny")
        config.data.max_len = config.data.max_prompt_len = 24
        config.data.eval_batch_size = 16
        config.rl.max_new_tokens = 6
        config.rl.rewards = "stopped,length_penalty:0.5"
        config.train.steps = 8
        config.train.batch_size = 16
        config.train.log_every = 2
        config.train.eval_every = 4
        config.train.eval_batches = 1
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 1
        config.checkpoint.save_every = 4
        config.checkpoint.async_save = False
        config.metrics.peak_flops = 1e11
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/ppo.py; known: demo, test")
    config.lock()
    return config
